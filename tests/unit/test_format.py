"""Pins on-disk format version 1 (docs/format.md) to the bytes shardckpt writes.

The golden test saves a fixed state_dict in one process, replaces what legitimately
varies between saves (created_at, the shardckpt and torch versions, the host name, the
random save_id inside file names and data-file headers, and so the whole-file hashes,
which are recomputed over the normalised bytes), and compares the result with
``tests/unit/golden/``: ``manifest_v1.json`` byte for byte, and ``data_v1.json`` holding the
exact header and the sha256 of the data section of every data file.

If the golden test fails, **the format changed**. Before regenerating, decide whether the
change is compatible (docs/format.md, section 9): if it is not, bump
``shardckpt.format.manifest.FORMAT_VERSION``; either way update docs/format.md and
shardckpt/format/manifest.schema.json in the same change. Then regenerate and review the diff::

    SHARDCKPT_REGEN_GOLDEN=1 python -m pytest -q tests/unit/test_format.py

The other tests check that every manifest validates against manifest.schema.json, that
broken manifests do not, that plain ``safetensors.safe_open`` reads every data file under
the documented entry names, and that a reader written from docs/format.md alone (json,
struct, xxhash, torch.frombuffer; no shardckpt code) reads the checkpoints back exactly.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import hashlib
import importlib.resources
import itertools
import json
import math
import os
import re
import socket
import struct
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import xxhash
from distributed import run_ranks
from safetensors import safe_open

import shardckpt
from shardckpt.errors import ManifestError, UnsupportedFormatVersionError
from shardckpt.format.manifest import FORMAT_VERSION, manifest_to_json, parse_manifest, seal, unseal

pytestmark = pytest.mark.compat  # the subset .ci/torch_compat runs on other torch releases

# Named by version: a bump starts new golden files and leaves the old ones as a record.
# A save that is not incremental writes format 1 (readable by every shardckpt), so the
# plain golden save is pinned against the v1 files; format 2 has its own golden test.
GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN_MANIFEST = GOLDEN_DIR / "manifest_v1.json"
GOLDEN_DATA = GOLDEN_DIR / "data_v1.json"
REGEN = os.environ.get("SHARDCKPT_REGEN_GOLDEN") == "1"

SAVE_ID_TOKEN = "000000000000"
CREATED_AT_TOKEN = "2000-01-01T00:00:00+00:00"
HOST_TOKEN = "HOST"
SHARDCKPT_VERSION_TOKEN = "SHARDCKPT_VERSION"
TORCH_VERSION_TOKEN = "TORCH_VERSION"

# docs/format.md, section 5, written out again on purpose: the spec, not datafile.py.
SPEC_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


# ---------------------------------------------------------------- the fixed state


def golden_state_dict() -> dict[str, Any]:
    """Every value is exact in its dtype, so the bytes do not depend on rounding."""
    return {
        "model": {
            "weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 4,
            "bias": torch.tensor([0.5, -1.25, 3.0], dtype=torch.bfloat16),
            "half": torch.tensor([[1.5, -2.0]], dtype=torch.float16),
            "mask": torch.tensor([True, False, True, True]),
            "count": torch.tensor([1, -2, 2**40], dtype=torch.int64),
            "codes": torch.arange(6, dtype=torch.int32).reshape(2, 3).t(),  # non-contiguous
            "pixels": torch.arange(0, 250, 50, dtype=torch.uint8),
        },
        "scale": torch.tensor(0.125, dtype=torch.float64),  # 0-d
        "empty": torch.zeros(0, 3, dtype=torch.float16),  # zero-size
        "layers": [torch.tensor([1, -1], dtype=torch.int8), torch.arange(4, dtype=torch.int16)[::2]],
        "optim": {"lr": 0.001, "betas": (0.9, 0.95), "eps": 1e-8, "best": float("nan"), "worst": float("-inf")},
        "sched": ("cosine", {"$warmup": 100, "min_lr": None}),  # a "$"-key dict that stays one value
        "flags": {"$fused": True},  # a "$"-key dict that flattening turns into key "flags.$fused"
        "history": [[1, 2.5], [], [None, "x"]],
        "step": 100,
        "name": "run-\u00e9",
    }


def expected_tensors(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    m = sd["model"]
    return {
        **{f"model.{k}": v for k, v in m.items()},
        "scale": sd["scale"],
        "empty": sd["empty"],
        "layers.0": sd["layers"][0],
        "layers.1": sd["layers"][1],
    }


def expected_values(sd: dict[str, Any]) -> dict[str, Any]:
    return {
        **{f"optim.{k}": v for k, v in sd["optim"].items()},
        "sched": sd["sched"],
        "flags.$fused": True,
        "history": sd["history"],
        "step": 100,
        "name": sd["name"],
    }


@pytest.fixture(scope="module")
def golden_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("golden") / "ckpt")
    shardckpt.save(golden_state_dict(), path, num_io_threads=2)  # pinned: the file split follows it
    return path


def _save_sharded_example(rank: int, world: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = sharded_example_tensors()
    sd = {"w": distribute_tensor(full["w"], mesh, [Shard(0)]), "v": distribute_tensor(full["v"], mesh, [Shard(1)])}
    shardckpt.save(sd, path)


def sharded_example_tensors() -> dict[str, torch.Tensor]:
    return {
        "w": torch.arange(15, dtype=torch.float32).reshape(5, 3),
        "v": torch.arange(24, dtype=torch.float32).reshape(4, 6).to(torch.bfloat16),
    }


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two tensors sharded over 2 gloo ranks: w along dim 0 (rows 3 + 2), v along dim 1."""
    path = str(tmp_path_factory.mktemp("sharded") / "ckpt")
    run_ranks(_save_sharded_example, 2, path)
    return path


@pytest.fixture(scope="module")
def schema_validator() -> jsonschema.Draft202012Validator:
    # Read through importlib.resources: the schema must ship inside the package.
    schema = json.loads((importlib.resources.files("shardckpt.format") / "manifest.schema.json").read_text("utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8")


def read_manifest_doc(root: str) -> dict[str, Any]:
    return json.loads(read_text(os.path.join(root, "manifest.json")))


# ---------------------------------------------------------------- (a) golden bytes


def _replace_once(text: str, old: str, new: str, what: str) -> str:
    assert text.count(old) == 1, f"expected {what} exactly once in the manifest as {old!r}"
    return text.replace(old, new)


def _normalised_data_file(raw: bytes, save_id: str, token: str = SAVE_ID_TOKEN) -> bytes:
    """The file with its save_id replaced by ``token`` inside the header (same length)."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n]
    assert header.count(f'"save_id":"{save_id}"'.encode()) == 1
    return raw[:8] + header.replace(save_id.encode(), token.encode()) + raw[8 + n :]


def normalise(root: str, save_tokens: dict[str, str] | None = None) -> tuple[str, dict[str, dict[str, Any]]]:
    """(normalised manifest text, golden record per normalised data file name).

    Checks each volatile field is what it should be before replacing it, so the
    normalisation cannot hide a wrong value. ``save_tokens`` (format 2, test_format_v2.py):
    the token of each save whose files the manifest lists (an incremental checkpoint lists
    files of its bases too); a file with a ``checkpoint`` is read from that sibling folder.
    """
    text = read_text(os.path.join(root, "manifest.json"))
    doc = json.loads(text)
    names = [re.fullmatch(r"data/([0-9a-f]{12})-r00000-[0-9]{2}\.safetensors", n) for n in doc["files"]]
    assert all(names), f"data file names: {sorted(doc['files'])}"
    save_ids = {m.group(1) for m in names if m}
    if save_tokens is None:
        assert len(save_ids) == 1, f"one save_id per save, found {save_ids}"
        save_tokens = {next(iter(save_ids)): SAVE_ID_TOKEN}
    assert save_ids == set(save_tokens), f"save ids {save_ids}, expected {sorted(save_tokens)}"
    created = datetime.datetime.fromisoformat(doc["created_at"])
    assert created.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.timezone.utc) - created) < datetime.timedelta(minutes=10)
    assert doc["created_at"] == created.isoformat(timespec="seconds")
    assert doc["shardckpt_version"] == shardckpt.__version__
    assert doc["torch_version"] == torch.__version__

    for field, found, token in [
        ('"created_at": ', doc["created_at"], CREATED_AT_TOKEN),
        ('"shardckpt_version": ', shardckpt.__version__, SHARDCKPT_VERSION_TOKEN),
        ('"torch_version": ', torch.__version__, TORCH_VERSION_TOKEN),
        ('"host":', socket.gethostname(), HOST_TOKEN),
    ]:
        text = _replace_once(text, field + json.dumps(found), field + json.dumps(token), field)

    data: dict[str, dict[str, Any]] = {}
    for name, rec in doc["files"].items():
        raw = (
            Path(root, "..", rec["checkpoint"], name).read_bytes()
            if "checkpoint" in rec
            else Path(root, name).read_bytes()
        )
        assert xxhash.xxh3_64_hexdigest(raw) == rec["hash"], f"{name}: whole-file hash"
        save_id = name[len("data/") : name.index("-")]
        norm = _normalised_data_file(raw, save_id, save_tokens[save_id])
        new_hash = xxhash.xxh3_64_hexdigest(norm)
        text = _replace_once(text, f'"hash":"{rec["hash"]}"', f'"hash":"{new_hash}"', f"the hash of {name}")
        (n,) = struct.unpack("<Q", norm[:8])
        data[name.replace(save_id, save_tokens[save_id])] = {
            "size": len(norm),
            "header_length": n,
            "header": norm[8 : 8 + n].decode("utf-8"),
            "data_sha256": hashlib.sha256(norm[8 + n :]).hexdigest(),
        }
    for save_id, token in save_tokens.items():
        text = text.replace(f"data/{save_id}-", f"data/{token}-")
        assert save_id not in text
    # the manifest's own checksum covers the volatile fields too: check it, then re-seal
    # the normalised text so the golden pins the rule rather than one run's digest
    original = read_text(os.path.join(root, "manifest.json")).encode()
    unseal(original, source="written manifest")
    body = text.encode()[: text.encode().rfind(b',\n "manifest_hash": "')]
    return seal(body + b"\n}\n").decode(), data


def _diff(expected: str, found: str) -> str:
    lines = difflib.unified_diff(expected.splitlines(), found.splitlines(), "golden", "written", lineterm="", n=1)
    return "\n".join(lines)


def test_golden_manifest_and_data_files(golden_ckpt: str) -> None:
    """The format is pinned: see the module docstring before regenerating."""
    text, data = normalise(golden_ckpt)
    data_text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    if REGEN:
        GOLDEN_DIR.mkdir(exist_ok=True)
        GOLDEN_MANIFEST.write_bytes(text.encode("utf-8"))
        GOLDEN_DATA.write_bytes(data_text.encode("utf-8"))
        pytest.skip(f"regenerated {GOLDEN_DIR}; review the diff, then run without SHARDCKPT_REGEN_GOLDEN")
    assert GOLDEN_MANIFEST.exists(), "no golden files: run with SHARDCKPT_REGEN_GOLDEN=1 once"
    golden = GOLDEN_MANIFEST.read_bytes().decode("utf-8")
    assert text == golden, (
        "manifest.json differs from tests/unit/golden/manifest_v1.json: the format changed "
        "(see this module's docstring before regenerating):\n" + _diff(golden, text)
    )
    golden_data = GOLDEN_DATA.read_bytes().decode("utf-8")
    assert data_text == golden_data, (
        "data file bytes differ from tests/unit/golden/data_v1.json: the format changed "
        "(see this module's docstring before regenerating):\n" + _diff(golden_data, data_text)
    )


def test_async_save_writes_the_same_bytes(tmp_path: Path) -> None:
    """async_save stages, then persists on another thread: the format must not notice."""
    path = str(tmp_path / "ckpt")
    shardckpt.async_save(golden_state_dict(), path, num_io_threads=2).wait(timeout_s=120)
    text, data = normalise(path)
    assert text == GOLDEN_MANIFEST.read_text("utf-8"), _diff(GOLDEN_MANIFEST.read_text("utf-8"), text)
    assert json.dumps(data, indent=1, sort_keys=True) + "\n" == GOLDEN_DATA.read_text("utf-8")


def test_golden_is_a_valid_manifest_for_the_parser() -> None:
    """The checked-in golden file itself parses (tokens included): it is an example a reader can use."""
    m = parse_manifest(GOLDEN_MANIFEST.read_bytes(), source=str(GOLDEN_MANIFEST))
    assert m.format_version == 1
    assert set(m.tensors) == set(expected_tensors(golden_state_dict()))
    assert set(m.values) == set(expected_values(golden_state_dict()))


def test_data_file_headers_are_compact_padded_and_tile_the_data_section(golden_ckpt: str) -> None:
    doc = read_manifest_doc(golden_ckpt)
    for name, rec in doc["files"].items():
        raw = Path(golden_ckpt, name).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert (8 + n) % 8 == 0
        header_text = raw[8 : 8 + n].decode("ascii")
        compact = header_text.rstrip(" ")
        assert len(header_text) - len(compact) < 8, "padding is the fewest spaces that reach a multiple of 8"
        header = json.loads(compact)
        assert compact == json.dumps(header, separators=(",", ":")), "compact JSON, ASCII only"
        assert next(iter(header)) == "__metadata__"
        entries = [v for k, v in header.items() if k != "__metadata__"]
        ends = [0] + [e["data_offsets"][1] for e in entries]
        assert [e["data_offsets"][0] for e in entries] == ends[:-1], "entries tile the data section in order"
        assert len(raw) == rec["size"] == 8 + n + ends[-1]


# ---------------------------------------------------------------- (b), (c) schema


def test_manifests_validate_against_the_schema(
    golden_ckpt: str, sharded_ckpt: str, schema_validator: jsonschema.Draft202012Validator, tmp_path: Path
) -> None:
    multi_block = str(tmp_path / "blocks")
    x = torch.arange(2500, dtype=torch.float32)  # 3 checksum blocks
    shardckpt.save({"x": x}, multi_block, hash_block_bytes=4096, metadata={"step": 3, "loss": 0.5})
    docs = {
        "golden save": read_manifest_doc(golden_ckpt),
        "golden file": json.loads(GOLDEN_MANIFEST.read_text("utf-8")),
        "sharded": read_manifest_doc(sharded_ckpt),
        "multi-block": read_manifest_doc(multi_block),
    }
    for what, doc in docs.items():
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in schema_validator.iter_errors(doc)]
        assert not errors, f"{what} manifest: {errors}"


DELETE = object()
_CHUNK = ("tensors", "model.weight", "chunks", 0)
_FILE0 = ("files", f"data/{SAVE_ID_TOKEN}-r00000-00.safetensors")

# (what, path in the golden manifest, new value or DELETE, whether parse_manifest must refuse it too)
BROKEN: list[tuple[str, tuple[str | int, ...], Any, bool]] = [
    ("newer format_version", ("format_version",), 2, True),
    ("format_version as a string", ("format_version",), "1", True),
    ("other format", ("format",), "dcp", True),
    ("missing paths", ("paths",), DELETE, True),
    ("other hash algorithm", ("hash_algorithm",), "sha256", True),
    ("block size not a multiple of 64", ("hash_block_bytes",), 5000, True),
    ("unknown dtype", ("tensors", "model.weight", "dtype"), "F128", True),
    ("torch dtype name", ("tensors", "model.weight", "dtype"), "float32", True),
    ("negative byte_offset", (*_CHUNK, "byte_offset"), -8, True),
    ("shape with a fraction", ("tensors", "model.weight", "shape"), [3, 4.5], True),
    ("chunk without block_hashes", (*_CHUNK, "block_hashes"), DELETE, True),
    ("escaping chunk file", (*_CHUNK, "file"), "../../etc/passwd", True),
    ("absolute chunk file", (*_CHUNK, "file"), "/etc/passwd", True),
    ("unknown value tag", ("values", "step"), {"$set": [1, 2]}, True),
    ("bad $float", ("values", "step"), {"$float": "NaN"}, True),
    ("tag with a second key", ("values", "step"), {"$tuple": [1], "x": 2}, True),
    ("nested unknown tag", ("values", "history"), [[{"$bytes": "00"}]], True),
    ("boolean world_size", ("world_size",), True, True),
    # What v1 writers guarantee beyond what the v1 parser enforces:
    ("unknown top-level field", ("extra",), 1, False),
    ("unknown chunk field", (*_CHUNK, "crc"), "0", False),
    ("uppercase block hash", (*_CHUNK, "block_hashes"), ["ABCDEF0123456789"], False),
    ("short file hash", (*_FILE0, "hash"), "abc", False),
    ("zero world_size", ("world_size",), 0, False),
    ("data file outside data/", (*_CHUNK, "file"), "weights.safetensors", False),
    ("path component that is a float", ("paths", "step"), ["step", 1.5], False),
]


def _apply(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    node: Any = doc
    for part in path[:-1]:
        node = node[part]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value


@pytest.mark.parametrize(("what", "path", "value", "parser_refuses"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_manifests_fail_the_schema(
    what: str,
    path: tuple[str | int, ...],
    value: Any,
    parser_refuses: bool,
    schema_validator: jsonschema.Draft202012Validator,
) -> None:
    good = json.loads(GOLDEN_MANIFEST.read_text("utf-8"))
    assert schema_validator.is_valid(good)
    broken = copy.deepcopy(good)
    _apply(broken, path, value)
    assert json.dumps(broken) != json.dumps(good), f"setting {path} changed nothing"
    assert not schema_validator.is_valid(broken), f"{what}: the schema accepts it"
    if parser_refuses:
        with pytest.raises(ManifestError):
            parse_manifest(json.dumps(broken).encode(), source="broken")


def test_newer_format_version_is_refused_with_an_upgrade_hint() -> None:
    doc = json.loads(GOLDEN_MANIFEST.read_text("utf-8"))
    doc["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(UnsupportedFormatVersionError, match="upgrade shardckpt"):
        parse_manifest(json.dumps(doc).encode(), source="future")


def test_the_example_in_the_docs_is_a_valid_manifest(schema_validator: jsonschema.Draft202012Validator) -> None:
    """docs/format.md, section 10: the complete example must stay true to the schema and the parser."""
    text = (Path(__file__).parents[2] / "docs" / "format.md").read_text("utf-8")
    example = text.split("## 10.", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    assert schema_validator.is_valid(json.loads(example))
    m = parse_manifest(example.encode(), source="docs/format.md")
    assert set(m.tensors) == {"model.weight", "model.bias"} and m.metadata == {"step": 100}
    assert example == manifest_to_json(m).decode(), "the example is byte for byte what the writer emits"


# ---------------------------------------------------------------- (d) plain safetensors


def test_golden_data_files_open_with_safetensors(golden_ckpt: str) -> None:
    doc = read_manifest_doc(golden_ckpt)
    expected = expected_tensors(golden_state_dict())
    (save_id,) = {n.split("/")[1].split("-")[0] for n in doc["files"]}
    seen = set()
    for name, rec in doc["files"].items():
        with safe_open(os.path.join(golden_ckpt, name), framework="pt") as sf:
            meta = {"format": "shardckpt", "format_version": "1", "save_id": save_id, "rank": str(rec["rank"])}
            assert sf.metadata() == meta
            for key in sf.keys():
                got = sf.get_tensor(key)
                assert got.dtype == expected[key].dtype and torch.equal(got, expected[key]), key
                assert doc["tensors"][key]["chunks"][0]["file"] == name
                seen.add(key)
    assert seen == set(expected), "every whole tensor is stored under its key"


def test_sharded_chunks_open_with_safetensors_under_documented_names(sharded_ckpt: str) -> None:
    doc = read_manifest_doc(sharded_ckpt)
    full = sharded_example_tensors()
    boxes = {k: [(c["offsets"], c["sizes"]) for c in t["chunks"]] for k, t in doc["tensors"].items()}
    assert sorted(boxes["w"]) == [([0, 0], [3, 3]), ([3, 0], [2, 3])]
    assert sorted(boxes["v"]) == [([0, 0], [4, 3]), ([0, 3], [4, 3])]
    assert doc["world_size"] == 2 and [p["rank"] for p in doc["process_layout"]] == [0, 1]
    found = {}
    for name, rec in doc["files"].items():
        assert re.fullmatch(rf"data/[0-9a-f]{{12}}-r{rec['rank']:05d}-[0-9]{{2}}\.safetensors", name)
        with safe_open(os.path.join(sharded_ckpt, name), framework="pt") as sf:
            assert sf.metadata()["rank"] == str(rec["rank"])
            found.update({k: sf.get_tensor(k) for k in sf.keys()})
    assert set(found) == {"w@0,0", "w@3,0", "v@0,0", "v@0,3"}
    for key, t in doc["tensors"].items():
        for c in t["chunks"]:
            box = tuple(slice(o, o + s) for o, s in zip(c["offsets"], c["sizes"], strict=True))
            assert torch.equal(found[f"{key}@{','.join(map(str, c['offsets']))}"], full[key][box])


# ---------------------------------------------------------------- a reader from the spec alone


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def spec_decode(v: Any) -> Any:
    """docs/format.md, section 6.3."""
    if isinstance(v, list):
        return [spec_decode(x) for x in v]
    if isinstance(v, dict):
        if any(k.startswith("$") for k in v):
            assert len(v) == 1, v
            ((tag, inner),) = v.items()
            if tag == "$tuple":
                return tuple(spec_decode(x) for x in inner)
            if tag == "$float":
                assert inner in ("nan", "inf", "-inf")
                return float(inner)
            assert tag == "$dict", v
            return {k: spec_decode(x) for k, x in inner.items()}
        return {k: spec_decode(x) for k, x in v.items()}
    return v


def _read_chunk(
    c: dict[str, Any], t: dict[str, Any], key: str, raw: bytes, header: dict[str, Any], block: int
) -> torch.Tensor:
    """One chunk's box, after checking its block hashes and its header entry (sections 4 and 7)."""
    (n,) = struct.unpack("<Q", raw[:8])
    data = raw[c["byte_offset"] : c["byte_offset"] + c["byte_length"]]
    assert len(data) == c["byte_length"] == math.prod(c["sizes"]) * SPEC_DTYPES[t["dtype"]].itemsize
    hashes = [xxhash.xxh3_64_hexdigest(data[i : i + block]) for i in range(0, len(data), block)]
    assert hashes == c["block_hashes"], f"{key}: block hashes"
    whole = all(o == 0 for o in c["offsets"]) and c["sizes"] == t["shape"]
    entry = key if whole else f"{key}@{','.join(map(str, c['offsets']))}"
    begin = c["byte_offset"] - 8 - n
    assert header[entry] == {"dtype": t["dtype"], "shape": c["sizes"], "data_offsets": [begin, begin + len(data)]}
    dtype = SPEC_DTYPES[t["dtype"]]
    if not data:
        return torch.empty(c["sizes"], dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(c["sizes"])


def read_by_spec(root: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, values, manifest) read with json, struct, xxhash and torch.frombuffer only."""
    doc = json.loads(Path(root, "manifest.json").read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    assert (doc["format"], doc["format_version"], doc["hash_algorithm"]) == ("shardckpt", 1, "xxh3_64")
    files = {}
    for name, rec in doc["files"].items():
        raw = Path(root, *name.split("/")).read_bytes()
        assert len(raw) == rec["size"] and xxhash.xxh3_64_hexdigest(raw) == rec["hash"], name
        (n,) = struct.unpack("<Q", raw[:8])
        files[name] = (raw, json.loads(raw[8 : 8 + n]))
    tensors = {}
    for key, t in doc["tensors"].items():
        out = torch.zeros(t["shape"], dtype=SPEC_DTYPES[t["dtype"]])
        hits = torch.zeros(t["shape"], dtype=torch.int32)
        for c in t["chunks"]:
            box = tuple(slice(o, o + s) for o, s in zip(c["offsets"], c["sizes"], strict=True))
            raw, header = files[c["file"]]
            out[box] = _read_chunk(c, t, key, raw, header, doc["hash_block_bytes"])
            hits[box] += 1
        assert bool((hits == 1).all()), f"{key}: chunks must cover every element exactly once"
        tensors[key] = out
    values = {k: spec_decode(v) for k, v in doc["values"].items()}
    return tensors, values, doc


def same_value(a: Any, b: Any) -> bool:
    """Equality that tells tuple from list, int from float from bool, and nan from nothing."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return bool(a == b)


def _slot(node: dict[str, Any] | list[Any], part: str | int, value: Any, *, replace: bool) -> Any:
    """``node[part]``, set to ``value`` if ``replace`` or if it is not there yet."""
    if isinstance(node, list):
        assert isinstance(part, int)
        node.extend([None] * (part + 1 - len(node)))
        if replace or node[part] is None:
            node[part] = value
        return node[part]
    assert isinstance(part, str)
    if replace:
        node[part] = value
    return node.setdefault(part, value)


def rebuild_from_paths(paths: dict[str, list[str | int]], leaves: dict[str, Any]) -> dict[str, Any]:
    """The nested state_dict, from ``paths`` alone: str parts are dict keys, int parts list indices."""
    root: dict[str, Any] = {}
    for key, path in paths.items():
        node: Any = root
        for part, following in itertools.pairwise(path):
            node = _slot(node, part, [] if isinstance(following, int) else {}, replace=False)
        _slot(node, path[-1], leaves[key], replace=True)
    return root


def test_reader_from_the_spec_reads_the_golden_checkpoint(golden_ckpt: str) -> None:
    sd = golden_state_dict()
    tensors, values, doc = read_by_spec(golden_ckpt)
    assert same_value(tensors, expected_tensors(sd))
    assert same_value(values, expected_values(sd))
    assert set(doc["paths"]) == set(tensors) | set(values)
    assert same_value(rebuild_from_paths(doc["paths"], {**tensors, **values}), sd)


def test_reader_from_the_spec_reads_sharded_and_multi_block_checkpoints(sharded_ckpt: str, tmp_path: Path) -> None:
    tensors, _, _ = read_by_spec(sharded_ckpt)
    assert same_value(tensors, sharded_example_tensors())

    path = str(tmp_path / "blocks")
    x = torch.arange(2500, dtype=torch.float32)  # 10,000 bytes: blocks of 4096, 4096 and 1808
    shardckpt.save({"x": x}, path, hash_block_bytes=4096)
    tensors, _, doc = read_by_spec(path)
    assert torch.equal(tensors["x"], x)
    raw = x.numpy().tobytes()
    hashes = doc["tensors"]["x"]["chunks"][0]["block_hashes"]
    assert hashes == [xxhash.xxh3_64_hexdigest(raw[i : i + 4096]) for i in (0, 4096, 8192)]
    for i, h in enumerate(hashes):  # 16 lowercase hex digits of the big-endian 64-bit value
        assert re.fullmatch(r"[0-9a-f]{16}", h)
        assert int(h, 16) == xxhash.xxh3_64_intdigest(raw[i * 4096 : (i + 1) * 4096])


@pytest.mark.parametrize(
    "document",
    [
        b'{\n "a": 1\n}\n',
        b'{\n "a": 1\n}',
        b'{\n "a": 1 \t\r\n\x0b\x0c}\x0c \n\t',
        b'{"a": 1}',
        b"{}",
        b"",
        b"   ",
        b'{\n "a": "}"\n',
        b'{\n "a": [1, 2]\n} }\n',
    ],
)
def test_seal_appends_the_hash_of_the_document_without_its_closing_brace(document: bytes) -> None:
    """seal() strips trailing whitespace, one closing brace and the whitespace before it (as
    bytes.rstrip() strips), and appends the xxh3-64 of what is left; unseal() returns that."""
    head = document.rstrip()
    if head.endswith(b"}"):
        head = head[:-1].rstrip()
    sealed = seal(document)
    assert sealed == head + b',\n "manifest_hash": "' + xxhash.xxh3_64_hexdigest(head).encode() + b'"\n}\n'
    assert unseal(sealed, source="t") == head
