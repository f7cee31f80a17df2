"""Pins on-disk format version 2 (docs/format.md, section 11: incremental checkpoints).

The golden test saves test_format.py's fixed state_dict with ``incremental=True`` into
``step_0000000100``, changes two tensors and a value, and saves again with that folder as
``base`` into ``step_0000000101``. Both manifests, normalised as test_format.py does (its
helpers; the two saves' ids become the tokens below), are compared byte for byte with
``tests/unit/golden/manifest_v2_full.json`` and ``manifest_v2_incremental.json``;
``data_v2.json`` holds the header and the data section's sha256 of every data file each
save wrote. If it fails, the format changed: read test_format.py's docstring, then::

    SHARDCKPT_REGEN_GOLDEN=1 python -m pytest -q tests/unit/test_format_v2.py

The schema tests check written and golden v2 manifests against manifest_v2.schema.json.
The hostile suite changes one field of the golden incremental manifest at a time and
expects a ManifestError that names the field; a counting test proves that checking files
against ``bases`` stays linear on hostile input.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import xxhash
from distributed import run_ranks
from test_format import (
    DELETE,
    GOLDEN_DIR,
    GOLDEN_MANIFEST,
    REGEN,
    SAVE_ID_TOKEN,
    _apply,
    _diff,
    golden_state_dict,
    normalise,
    read_manifest_doc,
)

import shardckpt
from shardckpt.errors import ManifestError, UnsupportedFormatVersionError
from shardckpt.format import layout
from shardckpt.format.manifest import MAX_BASES, _parse_document, manifest_to_json, parse_manifest, seal

pytestmark = pytest.mark.compat

FULL, INCREMENTAL = "step_0000000100", "step_0000000101"
INCREMENTAL_TOKEN = "111111111111"  # the second save's id (SAVE_ID_TOKEN is the first's)
GOLDEN_FULL = GOLDEN_DIR / "manifest_v2_full.json"
GOLDEN_INCREMENTAL = GOLDEN_DIR / "manifest_v2_incremental.json"
GOLDEN_DATA = GOLDEN_DIR / "data_v2.json"


def changed_state_dict() -> dict[str, Any]:
    """The golden state after a step: two tensors and one value changed, the rest equal."""
    sd = golden_state_dict()
    sd["model"]["weight"] = sd["model"]["weight"] + 1
    sd["scale"] = torch.tensor(0.25, dtype=torch.float64)
    sd["step"] = 101
    return sd


@pytest.fixture(scope="module")
def v2_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("v2")
    shardckpt.save(golden_state_dict(), root / FULL, num_io_threads=2, incremental=True)
    shardckpt.save(changed_state_dict(), root / INCREMENTAL, num_io_threads=2, base=root / FULL)
    return root


def save_id_of(root: Path) -> str:
    """The id of the save that wrote the checkpoint at ``root`` (its marker says it)."""
    return str(json.loads((root / layout.SAVE_MARKER_NAME).read_text("utf-8"))["save_id"])


def normalise_v2(root: Path) -> tuple[str, str, dict[str, Any]]:
    """(full manifest text, incremental manifest text, data records of the files each wrote)."""
    tokens = {save_id_of(root / FULL): SAVE_ID_TOKEN, save_id_of(root / INCREMENTAL): INCREMENTAL_TOKEN}
    full, full_data = normalise(str(root / FULL), {save_id_of(root / FULL): SAVE_ID_TOKEN})
    incremental, incremental_data = normalise(str(root / INCREMENTAL), tokens)
    own = {n: d for n, d in incremental_data.items() if INCREMENTAL_TOKEN in n}
    return full, _files_in_token_order(incremental), {FULL: full_data, INCREMENTAL: own}


def _files_in_token_order(text: str) -> str:
    """The writer sorts ``files`` by name, and so by the two saves' random ids: put the
    normalised lines in the order of the tokens (and re-seal), or the golden would flip."""
    head, rest = text.split('\n "files": {\n', 1)
    block, tail = rest.split("\n },\n", 1)
    names = [json.loads("{" + line + "}").popitem()[0] for line in block.split(",\n")]
    assert len(names) == len(set(names)) and names, "one line per file"
    text = head + '\n "files": {\n' + ",\n".join(sorted(block.split(",\n"))) + "\n },\n" + tail
    body = text.encode()[: text.encode().rfind(b',\n "manifest_hash": "')]
    return seal(body + b"\n}\n").decode()


@pytest.fixture(scope="module")
def v2_validator() -> jsonschema.Draft202012Validator:
    text = (importlib.resources.files("shardckpt.format") / "manifest_v2.schema.json").read_text("utf-8")
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def golden_doc() -> dict[str, Any]:
    return dict(json.loads(GOLDEN_INCREMENTAL.read_text("utf-8")))


# ---------------------------------------------------------------- golden bytes


def test_golden_v2_manifests_and_data_files(v2_root: Path) -> None:
    """The format is pinned: see test_format.py's docstring before regenerating."""
    full, incremental, data = normalise_v2(v2_root)
    data_text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    if REGEN:
        GOLDEN_FULL.write_bytes(full.encode("utf-8"))
        GOLDEN_INCREMENTAL.write_bytes(incremental.encode("utf-8"))
        GOLDEN_DATA.write_bytes(data_text.encode("utf-8"))
        pytest.skip(f"regenerated the v2 files in {GOLDEN_DIR}; review the diff, then run without it")
    for golden, text in ((GOLDEN_FULL, full), (GOLDEN_INCREMENTAL, incremental), (GOLDEN_DATA, data_text)):
        want = golden.read_bytes().decode("utf-8")
        assert text == want, f"{golden.name} differs: the format changed:\n" + _diff(want, text)


def test_what_the_golden_v2_pair_shows(v2_root: Path) -> None:
    """The decisions the golden files pin, spelled out: unchanged chunks point at the base's
    file, changed ones are written anew, every chunk has a digest, every header says 2."""
    full = read_manifest_doc(str(v2_root / FULL))
    incremental = read_manifest_doc(str(v2_root / INCREMENTAL))
    assert (full["format_version"], full["bases"]) == (2, [])
    assert (incremental["format_version"], incremental["bases"]) == (2, [FULL])
    assert all("checkpoint" not in f for f in full["files"].values())
    assert list(incremental["files"]) == sorted(incremental["files"]), "files sorted by name, wherever they live"
    for key, t in incremental["tensors"].items():
        (chunk,) = t["chunks"]
        changed = key in ("model.weight", "scale")
        assert incremental["files"][chunk["file"]].get("checkpoint") == (None if changed else FULL), key
        before = full["tensors"][key]["chunks"][0]
        assert (chunk == before) == (not changed), key  # same file, range, hashes and digest
    sd = changed_state_dict()
    weight = incremental["tensors"]["model.weight"]["chunks"][0]
    raw = sd["model"]["weight"].numpy().tobytes()
    assert weight["digest"] == xxhash.xxh3_128_hexdigest(raw) == format(xxhash.xxh3_128_intdigest(raw), "032x")
    for folder, doc in ((FULL, full), (INCREMENTAL, incremental)):
        for name, rec in doc["files"].items():
            if "checkpoint" in rec:
                continue
            raw = (v2_root / folder / name).read_bytes()
            header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
            assert header["__metadata__"]["format_version"] == "2", name
    assert (v2_root / FULL / layout.REFERENCED_NAME).exists()
    assert not (v2_root / INCREMENTAL / layout.REFERENCED_NAME).exists()


def test_a_fresh_checkpointer_writes_the_same_incremental_bytes(v2_root: Path, tmp_path: Path) -> None:
    """The base's chunks read from its manifest or remembered from the save: one format."""
    root = tmp_path / "run"
    shardckpt.save(golden_state_dict(), root / FULL, num_io_threads=2, incremental=True)
    with shardckpt.Checkpointer() as ck:
        ck.save(changed_state_dict(), root / INCREMENTAL, num_io_threads=2, base=root / FULL)
    assert normalise_v2(root) == normalise_v2(v2_root)


def test_golden_v2_files_parse() -> None:
    for golden in (GOLDEN_FULL, GOLDEN_INCREMENTAL):
        m = parse_manifest(golden.read_bytes(), source=str(golden))
        assert m.format_version == 2 and m.is_v2
        assert manifest_to_json(m) == golden.read_bytes(), f"{golden.name}: the writer emits the golden bytes"
    m = parse_manifest(GOLDEN_INCREMENTAL.read_bytes(), source="golden")
    assert m.bases == (FULL,)
    assert {f.checkpoint for f in m.files.values()} == {FULL, None}


def test_the_example_in_the_docs_is_a_valid_v2_manifest(v2_validator: Any) -> None:
    """docs/format.md, section 11.9: the example stays true to the schema, the parser and the writer."""
    text = (Path(__file__).parents[2] / "docs" / "format.md").read_text("utf-8")
    example = text.split("### 11.9", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    assert v2_validator.is_valid(json.loads(example))
    m = parse_manifest(example.encode(), source="docs/format.md")
    assert m.bases == (FULL,) and m.metadata == {"step": 101}
    assert [m.files[c.file].checkpoint for c in m.tensors["model.weight"].chunks] == [FULL]
    assert [m.files[c.file].checkpoint for c in m.tensors["model.bias"].chunks] == [None]
    assert example == manifest_to_json(m).decode(), "the example is byte for byte what the writer emits"


def test_plain_saves_stay_v1(tmp_path: Path) -> None:
    m = shardckpt.save({"x": torch.ones(3)}, tmp_path / "plain")
    assert m is not None and m.format_version == 1
    doc = read_manifest_doc(str(tmp_path / "plain"))
    assert doc["format_version"] == 1 and "bases" not in doc
    assert all("digest" not in c for t in doc["tensors"].values() for c in t["chunks"])


# ---------------------------------------------------------------- schema


def test_v2_manifests_validate_against_the_v2_schema(v2_root: Path, v2_validator: Any) -> None:
    docs = {
        "full": read_manifest_doc(str(v2_root / FULL)),
        "incremental": read_manifest_doc(str(v2_root / INCREMENTAL)),
        "golden full": json.loads(GOLDEN_FULL.read_text("utf-8")),
        "golden incremental": golden_doc(),
    }
    for what, doc in docs.items():
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in v2_validator.iter_errors(doc)]
        assert not errors, f"{what} manifest: {errors}"
    assert not v2_validator.is_valid(json.loads(GOLDEN_MANIFEST.read_text("utf-8"))), "a v1 manifest is not v2"
    v1 = json.loads((importlib.resources.files("shardckpt.format") / "manifest.schema.json").read_text("utf-8"))
    assert not jsonschema.Draft202012Validator(v1).is_valid(docs["golden full"]), "a v2 manifest is not v1"


_CHUNK = ("tensors", "model.weight", "chunks", 0)
_SHARED = ("tensors", "model.bias", "chunks", 0)  # unchanged: its file is in the base


def _shared_file(doc: dict[str, Any]) -> str:
    return str(doc["tensors"]["model.bias"]["chunks"][0]["file"])


# (what, path, new value or DELETE); "{shared}" in a path is the base's file name
SCHEMA_BROKEN: list[tuple[str, tuple[str | int, ...], Any]] = [
    ("format_version 1", ("format_version",), 1),
    ("no bases", ("bases",), DELETE),
    ("base '..'", ("bases",), [".."]),
    ("base with '/'", ("bases",), ["runs/" + FULL]),
    ("duplicate bases", ("bases",), [FULL, FULL]),
    ("too many bases", ("bases",), [f"s{i:05d}" for i in range(MAX_BASES + 1)]),
    ("no digest", (*_CHUNK, "digest"), DELETE),
    ("short digest", (*_CHUNK, "digest"), "abc"),
    ("upper-case digest", (*_CHUNK, "digest"), "ABCDEF0123456789ABCDEF0123456789"),
    ("checkpoint '.'", ("files", "{shared}", "checkpoint"), "."),
    ("checkpoint not a string", ("files", "{shared}", "checkpoint"), 7),
    ("unknown file field", ("files", "{shared}", "folder"), FULL),
]


@pytest.mark.parametrize(("what", "path", "value"), SCHEMA_BROKEN, ids=[b[0] for b in SCHEMA_BROKEN])
def test_broken_v2_manifests_fail_the_schema(
    what: str, path: tuple[str | int, ...], value: Any, v2_validator: Any
) -> None:
    good = golden_doc()
    assert v2_validator.is_valid(good)
    broken = copy.deepcopy(good)
    path = tuple(_shared_file(good) if p == "{shared}" else p for p in path)
    _apply(broken, path, value)
    assert broken != good
    assert not v2_validator.is_valid(broken), f"{what}: the schema accepts it"


# ---------------------------------------------------------------- hostile v2 manifests


def _set_base(doc: dict[str, Any], name: Any) -> None:
    """Rename the base everywhere (bases and the file that lives there)."""
    doc["bases"] = [name]
    doc["files"][_shared_file(doc)]["checkpoint"] = name


def _set(path: tuple[str | int, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        names = {"{shared}": _shared_file(doc), "{own}": doc["tensors"]["model.weight"]["chunks"][0]["file"]}
        _apply(doc, tuple(names.get(p, p) if isinstance(p, str) else p for p in path), value)

    return change


_NL = "\n"
HOSTILE: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("base '..'", lambda d: _set_base(d, ".."), r"bases entry '\.\.'"),
    ("base '.'", lambda d: _set_base(d, "."), r"bases entry '\.'"),
    ("base with '/'", lambda d: _set_base(d, f"runs/{FULL}"), r"bases entry 'runs/"),
    ("base with '\\'", lambda d: _set_base(d, f"..\\{FULL}"), r"bases entry"),
    ("empty base", lambda d: _set_base(d, ""), r"bases entry ''"),
    ("base not a string", lambda d: _set_base(d, 7), r"bases entry 7"),
    ("base with a trailing newline", lambda d: _set_base(d, FULL + _NL), r"bases entry"),
    ("bases not a list", _set(("bases",), FULL), r"field bases must be list"),
    ("no bases", _set(("bases",), DELETE), r"missing field bases"),
    ("unsorted bases", _set(("bases",), ["step_9", FULL]), r"bases must be sorted and unique"),
    ("duplicate bases", _set(("bases",), [FULL, FULL]), r"bases must be sorted and unique"),
    ("too many bases", _set(("bases",), [f"s{i:05d}" for i in range(MAX_BASES + 1)]), rf"{MAX_BASES + 1} bases"),
    ("file checkpoint not in bases", _set(("files", "{shared}", "checkpoint"), "step_9"), r"\.checkpoint 'step_9'"),
    ("file checkpoint not a string", _set(("files", "{shared}", "checkpoint"), 7), r"checkpoint must be str"),
    ("base no file uses", _set(("bases",), [FULL, "step_9"]), r"bases \['step_9'\] are listed but no file"),
    (
        "missing digest",
        _set((*_CHUNK, "digest"), DELETE),
        r"missing field tensors\['model.weight'\]\.chunks\[0\]\.digest",
    ),
    ("short digest", _set((*_CHUNK, "digest"), "abc"), r"chunks\[0\].digest must be 32 lowercase hex"),
    ("upper-case digest", _set((*_CHUNK, "digest"), "ABCDEF01" * 4), r"chunks\[0\].digest must be 32 lowercase"),
    ("digest with a newline", _set((*_CHUNK, "digest"), "ab" * 16 + _NL), r"chunks\[0\].digest must be 32"),
    ("digest not a string", _set((*_CHUNK, "digest"), 12), r"chunks\[0\].digest must be str"),
    ("file hash with a newline", _set(("files", "{shared}", "hash"), "ab" * 8 + _NL), r"\.hash must be 16"),
    ("own file's rank >= world_size", _set(("files", "{own}", "rank"), 1), r"\.rank 1 >= world_size 1"),
    ("block hash with a newline", _set((*_CHUNK, "block_hashes"), ["ab" * 8 + _NL]), r"block hashes of 16 hex"),
]


@pytest.mark.parametrize(("what", "change", "field"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_v2_manifest_is_refused_naming_the_field(
    what: str, change: Callable[[dict[str, Any]], None], field: str
) -> None:
    doc = golden_doc()
    parse_manifest(json.dumps(doc).encode(), source="golden")  # the unchanged document is fine
    change(doc)
    with pytest.raises(ManifestError, match=field) as err:
        parse_manifest(json.dumps(doc).encode(), source="hostile.json")
    assert "hostile.json" in str(err.value), what


def test_data_file_name_with_a_newline_is_refused() -> None:
    """A name that only a line-anchored pattern accepts: 'data/<id>-r00000-00.safetensors\\n'."""
    doc = golden_doc()
    name = _shared_file(doc)
    doc["files"][name + _NL] = doc["files"].pop(name)
    doc["tensors"]["model.bias"]["chunks"][0]["file"] = name + _NL
    with pytest.raises(ManifestError, match="files"):
        parse_manifest(json.dumps(doc).encode(), source="hostile.json")
    assert not layout.is_data_file_name(name + _NL) and not layout.is_temp_name(f".manifest.json.tmp-{'a' * 12}\n")


def test_format_version_3_says_upgrade() -> None:
    doc = golden_doc()
    doc["format_version"] = 3
    with pytest.raises(UnsupportedFormatVersionError, match=r"format version 3.*upgrade shardckpt"):
        parse_manifest(json.dumps(doc).encode(), source="future")


def test_v2_fields_in_a_v1_manifest_are_ignored() -> None:
    """A v1 reader never sees a digest or a base: a v1 manifest that carries them (written by
    hand or by a confused tool) is read as v1, every file from the checkpoint's own folder."""
    doc = json.loads(GOLDEN_MANIFEST.read_text("utf-8"))
    doc["bases"] = [".."]
    for t in doc["tensors"].values():
        for c in t["chunks"]:
            c["digest"] = "NOT A DIGEST"
    for f in doc["files"].values():
        f["checkpoint"] = "../elsewhere"
    m = parse_manifest(json.dumps(doc).encode(), source="v1")
    assert m.format_version == 1 and m.bases == () and not m.is_v2
    assert all(c.digest is None for t in m.tensors.values() for c in t.chunks)
    assert all(f.checkpoint is None for f in m.files.values())


class _CountingStr(str):
    """A str that counts its equality comparisons (all instances share one counter)."""

    calls = 0

    def __eq__(self, other: object) -> bool:
        _CountingStr.calls += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_files_are_checked_against_bases_in_linear_time() -> None:
    """Each file's ``checkpoint`` is looked up in a set of the bases, not scanned through
    the list: n files in n bases cost O(n) comparisons, not n**2 / 2."""
    n = 1024
    doc = golden_doc()
    record = doc["files"][_shared_file(doc)]
    doc["tensors"], doc["values"], doc["paths"] = {}, {}, {}
    doc["bases"] = [_CountingStr(f"s{i:05d}") for i in range(n)]
    doc["files"] = {
        layout.data_file_name(f"{i:012x}", 0, 0): {**record, "checkpoint": _CountingStr(f"s{i:05d}")} for i in range(n)
    }
    _CountingStr.calls = 0
    m = _parse_document(doc, "many bases")
    assert len(m.bases) == n and len({f.checkpoint for f in m.files.values()}) == n
    assert _CountingStr.calls <= 8 * n, f"{_CountingStr.calls} comparisons for {n} files in {n} bases"


def _save_on_two_ranks(rank: int, world: int, path: str) -> None:
    shardckpt.save(small_state(), path, incremental=True)


def small_state() -> dict[str, torch.Tensor]:
    """Plain tensors: with 2 ranks, each is written by one of them (replicated, balanced)."""
    return {"w": torch.arange(64.0).reshape(8, 8), "v": torch.ones(16), "u": torch.zeros(4)}


def test_an_incremental_save_with_fewer_ranks_than_its_base_reads_back(tmp_path: Path) -> None:
    """A file of a base keeps the rank that wrote it there: rank 1 of a 2-rank save is a
    valid writer of a file that a 1-rank incremental checkpoint reads."""
    run_ranks(_save_on_two_ranks, 2, str(tmp_path / "s0"))
    assert {f["rank"] for f in read_manifest_doc(str(tmp_path / "s0"))["files"].values()} == {0, 1}
    m = shardckpt.save(small_state(), tmp_path / "s1", base=tmp_path / "s0")
    assert m is not None and m.world_size == 1 and m.bases == ("s0",)
    assert any(f.rank == 1 and f.checkpoint == "s0" for f in m.files.values())
    got = {k: torch.zeros_like(v) for k, v in small_state().items()}
    shardckpt.load(got, tmp_path / "s1")
    assert all(torch.equal(got[k], v) for k, v in small_state().items())


# ---------------------------------------------------------------- section 11.5: deletion


def test_the_sweep_keeps_what_any_committed_checkpoint_in_the_root_reads(tmp_path: Path) -> None:
    """Mark over every committed manifest under the root, not only the steps': a checkpoint
    saved beside the steps with base= a step keeps that step's bytes alive."""
    root = tmp_path / "run"
    sd = small_state()
    with shardckpt.CheckpointManager(root, incremental=True, keep_last=1, full_every=1) as mgr:
        mgr.save(1, sd)
        shardckpt.save(sd, root / "final", base=mgr.path(1))
        mgr.save(2, sd)  # full: no step reads step 1 any more, "final" does
    with shardckpt.CheckpointManager(root, incremental=True, keep_last=1, full_every=1):
        pass  # start-up sweeps again
    assert not (root / layout.step_dir_name(1) / layout.MANIFEST_NAME).exists()  # the step is gone
    got = {k: torch.zeros_like(v) for k, v in sd.items()}
    shardckpt.load(got, root / "final")  # its bytes are not
    assert all(torch.equal(got[k], v) for k, v in sd.items())
