"""Checkpoints from someone else: pickles are never run, hostile manifests are refused early.

Manifest tests delete the ``data/`` folder before loading: a manifest that got past
validation would then fail with IntegrityError (missing data file), so a ManifestError
proves the refusal came before any data was read.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardckpt
from shardckpt.errors import (
    IntegrityError,
    ManifestError,
    ShardckptError,
    UnsupportedFormatVersionError,
)
from shardckpt.format import datafile, integrity
from shardckpt.format.manifest import parse_manifest, seal

# ---------------------------------------------------------------- helpers


def source_state() -> dict[str, Any]:
    return {"w": torch.arange(4.0), "v": 1, "opt": {"betas": (0.9, 0.95)}}


def fresh_target() -> dict[str, Any]:
    return {"w": torch.zeros(4), "v": 0, "opt": {"betas": None}}


@pytest.fixture
def ckpt(tmp_path) -> Path:
    folder = tmp_path / "c"
    shardckpt.save(source_state(), str(folder), hash_block_bytes=4096, num_io_threads=1)
    return folder


def read_doc(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def only_file(doc: dict[str, Any]) -> str:
    (name,) = doc["files"]
    return name


def load_error(folder: Path, manifest: dict[str, Any] | bytes, **load_kwargs: Any) -> ShardckptError:
    """Write ``manifest``, remove the data files, load; return the ShardckptError raised."""
    # sealed (the manifest's own checksum is right) so the parser's checks are what is tested
    raw = seal(manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())
    (folder / "manifest.json").write_bytes(raw)
    shutil.rmtree(folder / "data")
    with pytest.raises(ShardckptError) as info:
        shardckpt.load(fresh_target(), str(folder), **load_kwargs)
    return info.value


def rename_file(doc: dict[str, Any], new: str) -> None:
    old = only_file(doc)
    doc["files"][new] = doc["files"].pop(old)
    doc["tensors"]["w"]["chunks"][0]["file"] = new


# ---------------------------------------------------------------- pickle payloads


class _CreatesMarker:
    """Unpickling this opens ``path`` for writing, i.e. creates the file: code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def payload(marker: Path) -> bytes:
    return pickle.dumps(_CreatesMarker(str(marker)))


def test_the_payload_used_below_is_live(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(payload(marker)).close()
    assert marker.exists()


def test_dcp_metadata_pickle_next_to_the_manifest_is_never_read(ckpt, tmp_path):
    marker = tmp_path / "marker"
    (ckpt / ".metadata").write_bytes(payload(marker))
    (ckpt / "data" / ".metadata").write_bytes(payload(marker))
    (ckpt / "__0_0.distcp").write_bytes(payload(marker))
    target = fresh_target()
    shardckpt.load(target, str(ckpt))
    assert not marker.exists()
    assert target["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert target["v"] == 1 and target["opt"]["betas"] == (0.9, 0.95)


def test_manifest_replaced_by_a_pickle_is_a_manifest_error(ckpt, tmp_path):
    marker = tmp_path / "marker"
    (ckpt / "manifest.json").write_bytes(payload(marker))
    with pytest.raises(ManifestError, match="checksum"):
        shardckpt.load(fresh_target(), str(ckpt))
    assert not marker.exists()


def test_data_file_replaced_by_a_same_size_pickle_fails_verification(ckpt, tmp_path):
    marker = tmp_path / "marker"
    name = only_file(read_doc(ckpt))
    path = ckpt / name
    size = path.stat().st_size
    evil = payload(marker)
    path.write_bytes(evil + b"\0" * (size - len(evil)))
    with pytest.raises(IntegrityError) as info:
        shardckpt.load(fresh_target(), str(ckpt))
    assert name in str(info.value)
    assert not marker.exists()


def test_data_file_replaced_by_a_same_size_pickle_is_read_as_raw_bytes_without_verify(ckpt, tmp_path):
    marker = tmp_path / "marker"
    doc = read_doc(ckpt)
    chunk = doc["tensors"]["w"]["chunks"][0]
    path = ckpt / chunk["file"]
    size = path.stat().st_size
    evil = (payload(marker) * 10)[:size]
    path.write_bytes(evil)
    target = fresh_target()
    shardckpt.load(target, str(ckpt), verify=False)
    assert not marker.exists()
    raw = evil[chunk["byte_offset"] : chunk["byte_offset"] + 16]
    assert torch.equal(target["w"].view(torch.uint8), torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def test_data_file_replaced_by_a_torch_save_archive_is_refused(ckpt, tmp_path):
    marker = tmp_path / "marker"
    name = only_file(read_doc(ckpt))
    torch.save({"w": _CreatesMarker(str(marker))}, ckpt / name)
    with pytest.raises(IntegrityError) as info:
        shardckpt.load(fresh_target(), str(ckpt))
    assert name in str(info.value)
    assert not marker.exists()


class _Stateful:
    def __init__(self, n: int) -> None:
        self.n = n

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "t": torch.full((2,), float(self.n))}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.n = sd["n"]


def test_save_and_load_never_call_pickle_or_torch_serialization(tmp_path, monkeypatch):
    calls: list[str] = []

    def forbidden(name: str):
        def refuse(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} was called on the save/load path")

        return refuse

    for name in ("load", "loads", "dump", "dumps", "Pickler", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden(f"pickle.{name}"))
    for name in ("load", "save"):
        monkeypatch.setattr(torch, name, forbidden(f"torch.{name}"))

    state = {
        "w": torch.arange(5.0),
        "nested": {"b": torch.ones(2, dtype=torch.bfloat16), "lr": 0.1},
        "mixed": [torch.zeros(1), "x", (1, 2)],
        "obj": _Stateful(4),
        "step": 9,
    }
    shardckpt.save(state, str(tmp_path / "c"))
    target = {
        "w": torch.zeros(5),
        "nested": {"b": torch.zeros(2, dtype=torch.bfloat16), "lr": 0.0},
        "mixed": [torch.ones(1), "", None],
        "obj": _Stateful(0),
        "step": 0,
    }
    shardckpt.load(target, str(tmp_path / "c"))
    assert calls == []
    assert target["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert target["nested"]["b"].tolist() == [1.0, 1.0] and target["nested"]["lr"] == 0.1
    assert target["mixed"][1:] == ["x", (1, 2)]
    assert target["obj"].n == 4 and target["step"] == 9


# ---------------------------------------------------------------- file names


@pytest.mark.parametrize(
    "name",
    [
        "../outside.safetensors",
        "data/../../outside.safetensors",
        "ABSOLUTE",
        "data\\x.safetensors",
        "..\\outside.safetensors",
        "C:/x.safetensors",
        "file:///etc/passwd",
        "s3://bucket/x.safetensors",
        "memory://x.safetensors",
        "data/./x.safetensors",
        "data//x.safetensors",
        "data/x.safetensors\x00",
        "",
        "~/x.safetensors",
    ],
)
def test_unsafe_file_names_are_refused(ckpt, tmp_path, name):
    doc = read_doc(ckpt)
    real = ckpt / only_file(doc)
    shutil.copy(real, tmp_path / "outside.safetensors")  # what an escape would successfully read
    if name == "ABSOLUTE":
        name = str(tmp_path / "outside.safetensors")
    rename_file(doc, name)
    err = load_error(ckpt, doc)
    assert isinstance(err, ManifestError)
    assert repr(name) in str(err)


def test_unsafe_name_only_under_files_is_refused(ckpt):
    doc = read_doc(ckpt)
    doc["files"]["../stray.safetensors"] = {"size": 1, "hash": "0", "rank": 0}
    err = load_error(ckpt, doc)
    assert isinstance(err, ManifestError) and "'../stray.safetensors'" in str(err)


# ---------------------------------------------------------------- sizes, ranges, shapes


def chunk_of(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["tensors"]["w"]["chunks"][0]


def test_byte_range_beyond_the_declared_file_size(ckpt):
    doc = read_doc(ckpt)
    chunk_of(doc)["byte_offset"] = doc["files"][only_file(doc)]["size"] - 8
    err = load_error(ckpt, doc)
    assert isinstance(err, ManifestError) and "beyond the end" in str(err)


def test_byte_length_inconsistent_with_shape(ckpt):
    doc = read_doc(ckpt)
    chunk_of(doc)["byte_length"] = 12
    err = load_error(ckpt, doc)
    assert isinstance(err, ManifestError) and "byte_length 12" in str(err)


HUGE_SHAPES = {
    "2**61_elements_consistent_box": ([2**61], [0], [2**61], 2**63),
    "2**61_box_of_4": ([2**61], [0], [4], 16),
    "2**62": ([2**62], [0], [2**62], 2**64),
    "product_overflows_int64": ([2**40, 2**40], [0, 0], [2**40, 2**40], 2**82),
    "65_dims": ([1] * 65, [0] * 65, [1] * 65, 4),
    "zero_times_huge": ([0, 2**61], [0, 0], [0, 2**61], 0),
}


@pytest.mark.parametrize("case", list(HUGE_SHAPES))
def test_huge_shapes_fail_fast_without_allocating(ckpt, case):
    shape, offsets, sizes, length = HUGE_SHAPES[case]
    doc = read_doc(ckpt)
    doc["tensors"]["w"]["shape"] = shape
    chunk_of(doc).update(offsets=offsets, sizes=sizes, byte_length=length)
    start = time.process_time()  # CPU time: other processes on a loaded machine do not count
    err = load_error(ckpt, doc)
    assert time.process_time() - start < 2.0  # takes ~0.01 s; allocating or iterating the shape would not
    assert isinstance(err, ManifestError) and not isinstance(err, MemoryError)


def test_declared_file_size_of_2_61_bytes_is_caught_by_the_real_size(ckpt):
    doc = read_doc(ckpt)
    doc["files"][only_file(doc)]["size"] = 2**61
    (ckpt / "manifest.json").write_bytes(seal(json.dumps(doc).encode()))
    start = time.process_time()  # CPU time: other processes on a loaded machine do not count
    with pytest.raises(IntegrityError) as info:
        shardckpt.load(fresh_target(), str(ckpt))
    assert time.process_time() - start < 2.0
    assert only_file(doc) in str(info.value) and str(2**61) in str(info.value)


def test_chunks_not_covering_the_shape(ckpt):
    doc = read_doc(ckpt)
    chunk_of(doc).update(sizes=[2], byte_length=8)
    err = load_error(ckpt, doc)
    assert isinstance(err, ManifestError) and "cover 2 elements of 4" in str(err)


def test_box_outside_the_shape(ckpt):
    doc = read_doc(ckpt)
    chunk_of(doc).update(offsets=[3], sizes=[4])
    err = load_error(ckpt, doc)
    assert isinstance(err, ManifestError) and "outside shape" in str(err)


def test_chunk_in_a_file_not_listed(ckpt):
    doc = read_doc(ckpt)
    chunk_of(doc)["file"] = "data/unlisted.safetensors"
    err = load_error(ckpt, doc)
    assert isinstance(err, ManifestError) and "not listed under 'files'" in str(err)


def test_overlapping_chunks_that_leave_a_gap_are_refused(ckpt):
    doc = read_doc(ckpt)
    first = chunk_of(doc)
    data = (ckpt / first["file"]).read_bytes()
    half = data[first["byte_offset"] : first["byte_offset"] + 8]
    first.update(sizes=[2], byte_length=8, block_hashes=[integrity.hash_hex(half)])
    doc["tensors"]["w"]["chunks"].append(dict(first))  # elements 0..1 twice, 2..3 never
    (ckpt / "manifest.json").write_bytes(seal(json.dumps(doc).encode()))
    target = fresh_target()
    target["w"].fill_(-7.0)
    with pytest.raises(ManifestError):
        shardckpt.load(target, str(ckpt))


# ---------------------------------------------------------------- JSON itself


@pytest.mark.parametrize(
    "raw,text",
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"manifest"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
    ],
)
def test_invalid_or_non_object_json(ckpt, raw, text):
    with pytest.raises(ManifestError) as info:
        parse_manifest(raw, source="m")
    assert text in str(info.value)
    err = load_error(ckpt, raw)  # through load: refused too (sealing cannot make these a manifest)
    assert isinstance(err, ManifestError)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_standard_json_constants(ckpt, constant):
    raw = json.dumps(read_doc(ckpt)).replace('"v": 1', f'"v": {constant}').encode()
    assert constant.encode() in raw
    err = load_error(ckpt, raw)
    assert isinstance(err, ManifestError) and constant in str(err)


def test_overflowing_float_literal_is_a_manifest_error(ckpt):
    raw = json.dumps(read_doc(ckpt)).replace('"v": 1', '"v": 1e999').encode()
    err = load_error(ckpt, raw)
    assert isinstance(err, ManifestError)


def test_deeply_nested_json_is_a_manifest_error():
    with pytest.raises(ManifestError):
        parse_manifest(b'{"a":' * 100_000, source="deep")


def test_deeply_nested_value_is_a_manifest_error(ckpt):
    raw = json.dumps(read_doc(ckpt)).replace('"v": 1', '"v": ' + "[" * 5000 + "]" * 5000).encode()
    with pytest.raises(ManifestError):
        parse_manifest(raw, source="deep")


def test_oversized_manifest_is_refused_without_reading_it(ckpt):
    with open(ckpt / "manifest.json", "r+b") as f:
        f.truncate(2 * 1024**3 + 1)  # sparse: no real allocation
    start = time.process_time()  # CPU time: other processes on a loaded machine do not count
    with pytest.raises(ManifestError, match="too large for a manifest"):
        shardckpt.load(fresh_target(), str(ckpt))
    assert time.process_time() - start < 2.0  # reading and hashing 2 GiB would take more


# ---------------------------------------------------------------- versions and field types


def test_future_format_version_says_to_upgrade(ckpt):
    doc = read_doc(ckpt)
    doc["format_version"] = 4  # 3 is read now (a version-1 document relabelled 3 lacks its fields)
    err = load_error(ckpt, doc)
    assert isinstance(err, UnsupportedFormatVersionError)
    assert "format version 4" in str(err) and "upgrade shardckpt" in str(err)
    assert "reads versions 1, 2, 3" in str(err)


def test_past_format_version_is_called_corrupt(ckpt):
    doc = read_doc(ckpt)
    doc["format_version"] = 0
    err = load_error(ckpt, doc)
    assert isinstance(err, UnsupportedFormatVersionError) and "corrupt" in str(err)


def _set(doc: dict[str, Any], path: tuple, value: Any) -> None:
    for p in path[:-1]:
        doc = doc[p]
    doc[path[-1]] = value


def _delete(doc: dict[str, Any], path: tuple) -> None:
    for p in path[:-1]:
        doc = doc[p]
    del doc[path[-1]]


FILE = object()  # stands for the data file's name in a path
CHUNK = ("tensors", "w", "chunks", 0)
WRONG_VALUES = [
    (("format",), "dcp"),
    (("format_version",), True),
    (("format_version",), "1"),
    (("hash_algorithm",), "sha256"),
    (("hash_block_bytes",), 100),
    (("hash_block_bytes",), 4097),
    (("hash_block_bytes",), 4096.0),
    (("world_size",), "1"),
    (("world_size",), -1),
    (("tensors",), []),
    (("files",), ["x"]),
    (("values",), []),
    (("process_layout",), {}),
    (("process_layout",), [1]),
    (("paths",), []),
    (("metadata",), []),
    (("created_at",), 5),
    (("tensors", "w"), 5),
    (("tensors", "w", "dtype"), 5),
    (("tensors", "w", "dtype"), "C64"),
    (("tensors", "w", "shape"), "4"),
    (("tensors", "w", "shape"), [4.0]),
    (("tensors", "w", "shape"), [True]),
    (("tensors", "w", "chunks"), {}),
    (CHUNK, "chunk"),
    ((*CHUNK, "offsets"), [-1]),
    ((*CHUNK, "byte_offset"), -1),
    ((*CHUNK, "byte_offset"), True),
    ((*CHUNK, "byte_offset"), 2**62),
    ((*CHUNK, "byte_length"), "16"),
    ((*CHUNK, "block_hashes"), "abc"),
    ((*CHUNK, "block_hashes"), [1]),
    ((*CHUNK, "block_hashes"), []),
    ((*CHUNK, "file"), 3),
    (("files", FILE), 3),
    (("files", FILE, "size"), "16"),
    (("files", FILE, "hash"), 5),
    (("files", FILE, "rank"), -1),
    (("values", "v"), {"$pickle": "gASV"}),
    (("values", "opt.betas"), {"$tuple": "not a list"}),
]


@pytest.mark.parametrize("path,value", WRONG_VALUES, ids=[f"{'.'.join(map(str, p))}={v!r}" for p, v in WRONG_VALUES])
def test_wrong_field_values_are_manifest_errors(ckpt, path, value):
    doc = read_doc(ckpt)
    path = tuple(only_file(doc) if p is FILE else p for p in path)
    _set(doc, path, value)
    err = load_error(ckpt, doc)
    assert isinstance(err, ManifestError)
    assert str(ckpt) in str(err)


REQUIRED = [
    ("format",),
    ("format_version",),
    ("hash_algorithm",),
    ("hash_block_bytes",),
    ("world_size",),
    ("tensors",),
    ("files",),
    ("values",),
    ("process_layout",),
    ("paths",),
    ("tensors", "w", "dtype"),
    ("tensors", "w", "shape"),
    ("tensors", "w", "chunks"),
    (*CHUNK, "offsets"),
    (*CHUNK, "sizes"),
    (*CHUNK, "file"),
    (*CHUNK, "byte_offset"),
    (*CHUNK, "byte_length"),
    (*CHUNK, "block_hashes"),
    ("files", FILE, "size"),
    ("files", FILE, "hash"),
]


@pytest.mark.parametrize("path", REQUIRED, ids=[".".join(map(str, p)) for p in REQUIRED])
def test_missing_fields_are_manifest_errors_naming_the_field(ckpt, path):
    doc = read_doc(ckpt)
    path = tuple(only_file(doc) if p is FILE else p for p in path)
    _delete(doc, path)
    err = load_error(ckpt, doc)
    assert isinstance(err, ManifestError)
    assert "missing field" in str(err) and str(path[-1]) in str(err)


def test_paths_entry_of_the_wrong_type_is_a_manifest_error(ckpt):
    doc = read_doc(ckpt)
    doc["paths"]["w"] = 5
    err = load_error(ckpt, doc)
    assert isinstance(err, ManifestError)


# ---------------------------------------------------------------- data files on disk


@pytest.mark.parametrize("change", ["append", "truncate", "delete"])
def test_data_file_whose_real_size_differs_is_an_integrity_error(ckpt, change):
    name = only_file(read_doc(ckpt))
    path = ckpt / name
    data = path.read_bytes()
    if change == "append":
        path.write_bytes(data + b"\0")
    elif change == "truncate":
        path.write_bytes(data[:-1])
    else:
        path.unlink()
    target = fresh_target()
    with pytest.raises(IntegrityError) as info:
        shardckpt.load(target, str(ckpt))
    assert repr(name) in str(info.value)
    assert target["w"].tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "length,file_size,text",
    [
        (2**63, 1000, "absurd"),
        (datafile.MAX_HEADER_BYTES + 8, 2 * datafile.MAX_HEADER_BYTES, "absurd"),
        (993, 1000, "absurd"),
        (8, 4, "too short"),
    ],
)
def test_absurd_safetensors_header_length(length, file_size, text):
    prefix = struct.pack("<Q", length)
    with pytest.raises(ManifestError, match=text) as info:
        datafile.header_length(prefix, file="data/x.safetensors", file_size=file_size)
    assert "'data/x.safetensors'" in str(info.value)


def test_header_length_accepts_a_real_file(ckpt):
    path = ckpt / only_file(read_doc(ckpt))
    data = path.read_bytes()
    n = datafile.header_length(data[:8], file="f", file_size=len(data))
    entries, meta = datafile.parse_header(data[8 : 8 + n], file="f", file_size=len(data))
    assert (n + 8) % 8 == 0
    assert {e.name for e in entries} == {"w"} and meta["format"] == "shardckpt"


# ---------------------------------------------------------------- fuzz


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _paths(v, (*prefix, i))
    return found


_INTERESTING = st.sampled_from(
    [
        0,
        -1,
        1,
        4,
        16,
        2**31,
        2**62,
        2**63,
        2**64,
        4096,
        True,
        False,
        None,
        "",
        "F32",
        "../x",
        "data/x.safetensors",
        "$tuple",
        "$float",
        "nan",
        0.5,
        -0.0,
        1e308,
        [],
        {},
        [0],
        [2**61],
    ]
)
_JSON = st.recursive(
    _INTERESTING | st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _valid_manifest_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        state = {
            "w": torch.arange(2000.0).reshape(40, 50),
            "b": torch.ones(3, dtype=torch.bfloat16),
            "e": torch.empty(0, 2),
            "v": 1,
            "opt": {"betas": (0.9, 0.95), "name": "adam"},
        }
        shardckpt.save(state, d + "/c", hash_block_bytes=4096, num_io_threads=2)
        with open(d + "/c/manifest.json", "rb") as f:
            return f.read()


_VALID = _valid_manifest_bytes()


def test_the_fuzz_seed_manifest_parses():
    m = parse_manifest(_VALID, source="seed")
    assert set(m.tensors) == {"w", "b", "e"} and len(m.files) == 2


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_mutated_manifests_raise_only_manifest_errors(data):
    doc = json.loads(_VALID)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = _paths(doc)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["replace", "delete", "wrap"]), label="op")
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        if op == "delete":
            del parent[path[-1]]
        elif op == "wrap":
            parent[path[-1]] = data.draw(
                st.sampled_from([[parent[path[-1]]], {"x": parent[path[-1]]}, str(parent[path[-1]])])
            )
        else:
            parent[path[-1]] = data.draw(_JSON, label="value")
    try:
        parse_manifest(json.dumps(doc).encode(), source="fuzz")
    except ManifestError:
        pass


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.data())
def test_fuzz_byte_flips_raise_only_manifest_errors(data):
    raw = bytearray(_VALID)
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        i = data.draw(st.integers(0, len(raw) - 1), label="index")
        raw[i] = data.draw(st.integers(0, 255), label="byte")
    try:
        parse_manifest(bytes(raw), source="fuzz")
    except ManifestError:
        pass


def test_manifest_without_metadata_field_still_loads(ckpt):
    """'metadata' was added to format 1 before any release; readers treat it as optional."""
    doc = read_doc(ckpt)
    del doc["metadata"]
    assert shardckpt.format.manifest.parse_manifest(json.dumps(doc).encode(), source="m").metadata == {}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.one_of(
        st.binary(max_size=400),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
            lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
            max_leaves=20,
        ).map(lambda v: json.dumps(v).encode()),
        st.builds(
            lambda name, dtype, shape, lo, hi: json.dumps(
                {name: {"dtype": dtype, "shape": shape, "data_offsets": [lo, hi]}}
            ).encode(),
            st.text(max_size=6),
            st.sampled_from(["F32", "BF16", "I64", "BOOL", "X9", 3]),
            st.lists(st.integers(-3, 2**63), max_size=3),
            st.integers(-5, 2**64),
            st.integers(-5, 2**64),
        ),
    )
)
def test_data_file_header_parser_only_raises_manifest_errors(raw):
    """Untrusted safetensors headers: parse or raise ManifestError; never another exception,
    never an entry outside the data section."""
    file_size = 8 + len(raw) + 64
    try:
        entries, _ = datafile.parse_header(raw, file="fuzz", file_size=file_size)
    except ManifestError:
        return
    for e in entries:
        assert 0 <= e.begin <= e.end <= 64


def test_deeply_nested_data_file_header_is_a_manifest_error():
    raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ManifestError, match="nests deeper than 64"):
        datafile.parse_header(raw, file="deep", file_size=8 + len(raw))
