"""The cheaper parts of the version 1-2 manifest parse (issue #18): records built without
their ``__init__`` and the overlap check of slab layouts done for all tensors at once.
Each must give exactly what the plain way gives (test_manifest_bulk.py compares the quick
path's checks with the full ones)."""

from __future__ import annotations

import copy
import gc
import itertools
import json
import pickle
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardckpt.errors import ManifestError
from shardckpt.format import manifest_parser
from shardckpt.format.manifest import manifest_to_json, parse_manifest
from shardckpt.format.manifest_records import (
    ChunkRecord,
    FileRecord,
    Manifest,
    TensorRecord,
    chunk_records,
    frozen_records,
    tensor_records,
)
from shardckpt.format.overlap import _disjoint_slabs, disjoint_slab_groups

FILE = "data/ab-r00000-00.safetensors"


def test_records_built_in_bulk_equal_those_of_the_constructor() -> None:
    fields = [((0, 1), (2, 3), FILE, 8, 24, ("0" * 16,), None), ((), (), FILE, 0, 4, ("f" * 16,), "a" * 32)]
    columns = [list(c) for c in zip(*fields, strict=True)]
    built = chunk_records(*columns)
    plain = [ChunkRecord(*f) for f in fields]
    assert built == plain and list(map(hash, built)) == list(map(hash, plain))
    assert list(map(repr, built)) == list(map(repr, plain))
    assert [msgspec.structs.astuple(c) for c in built] == [msgspec.structs.astuple(c) for c in plain]
    assert pickle.loads(pickle.dumps(built)) == plain
    assert built[0].replace(byte_offset=16) == ChunkRecord((0, 1), (2, 3), FILE, 16, 24, ("0" * 16,))
    assert built[0].byte_offset == 8  # replace copies
    with pytest.raises(AttributeError):
        built[0].byte_offset = 0  # type: ignore[misc]
    tensors = tensor_records(["F32", "I64"], [(2, 3), ()], [(built[0],), (built[1],)])
    assert tensors == [TensorRecord("F32", (2, 3), (plain[0],)), TensorRecord("I64", (), (plain[1],))]
    assert all(not hasattr(r, "__dict__") for r in (*built, *tensors))  # slotted: nothing else to set
    assert len({built[0], plain[0], built[1]}) == 2  # hashed by value, as the frozen dataclasses were
    # never tracked by the cyclic collector (gc=False): they hold only numbers, strings and tuples
    assert not any(map(gc.is_tracked, (*built, *tensors)))


_BOX = st.tuples(
    st.lists(st.integers(0, 5), min_size=3, max_size=3), st.lists(st.integers(0, 3), min_size=3, max_size=3)
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.lists(_BOX, max_size=6)), max_size=6), st.integers(0, 2))
def test_slab_groups_in_bulk_agree_with_the_per_tensor_shortcut(groups: list[Any], vary: int) -> None:
    """Groups of boxes of 0-3 dimensions, mostly slabs along ``vary`` (the layouts saves
    write), some empty: shown in bulk iff the per-tensor shortcut shows them (or fewer than
    two are non-empty), and never when two boxes overlap."""
    boxes_of = []
    for ndim, raw in groups:
        boxes = []
        for off, size in raw:
            o, s = [1, 1, 1], [2, 2, 2]  # the same in every dimension but ``vary`` ...
            o[vary], s[vary] = off[vary], size[vary]
            if off[2] == 5:  # ... except now and then
                o, s = off, size
            boxes.append((tuple(o[:ndim]), tuple(s[:ndim])))
        boxes_of.append(boxes)
    flat = [b for boxes in boxes_of for b in boxes]
    shown = disjoint_slab_groups(
        np.array([x for off, _ in flat for x in off], dtype=np.int64),
        np.array([x for _, size in flat for x in size], dtype=np.int64),
        np.array([len(off) for off, _ in flat], dtype=np.int64),
        np.array([len(boxes) for boxes in boxes_of], dtype=np.int64),
    ).tolist()
    for g, boxes in enumerate(boxes_of):
        live = [i for i, (_, size) in enumerate(boxes) if all(size)]
        expected = len(live) < 2 or (bool(boxes[0][0]) and _disjoint_slabs(boxes, live))
        assert shown[g] == expected, (boxes, shown[g])
        if shown[g]:
            assert not any(_overlap(boxes[i], boxes[j]) for i, j in itertools.combinations(live, 2))


def _overlap(a: tuple[Any, Any], b: tuple[Any, Any]) -> bool:
    return all(x < y + ys and y < x + xs for x, xs, y, ys in zip(a[0], a[1], b[0], b[1], strict=True))


def _manifest(tensors: dict[str, TensorRecord]) -> bytes:
    size = 1 << 20
    return manifest_to_json(
        Manifest(
            world_size=1,
            process_layout=({"rank": 0},),
            tensors=tensors,
            values={},
            files={FILE: FileRecord(size=size, hash="0" * 16, rank=0)},
            hash_block_bytes=4096,
            created_at="",
            shardckpt_version="",
            torch_version="",
        )
    )


def _chunk(offsets: tuple[int, ...], sizes: tuple[int, ...], at: int) -> ChunkRecord:
    n = 4 * int(np.prod(sizes))
    return ChunkRecord(offsets, sizes, FILE, at, n, tuple(f"{at + i:016x}" for i in range(-(-n // 4096))))


def _full(raw: bytes) -> dict[str, TensorRecord]:
    doc = json.loads(raw)
    r = manifest_parser._Reader(doc, "src")
    files = manifest_parser._parse_files(r, doc, 1, 1, frozenset())
    return {k: manifest_parser._parse_tensor(r, k, t, files, 4096, digests=False) for k, t in doc["tensors"].items()}


def test_layouts_split_in_two_dimensions_take_the_exact_overlap_check() -> None:
    """A 2x2 split (not slabs) parses to the records of the full checks; the same with two
    chunks overlapping is refused with the full checks' message naming both."""
    grid = (_chunk((0, 0), (2, 2), 0), _chunk((0, 2), (2, 2), 16), _chunk((2, 0), (2, 2), 32))
    good = {"g": TensorRecord("F32", (4, 4), (*grid, _chunk((2, 2), (2, 2), 48)))}
    raw = _manifest(good)
    assert parse_manifest(raw, source="src").tensors == good == _full(raw)
    # the last chunk moved down over the first and third (the element count stays 16)
    doc = json.loads(raw)
    chunks = doc["tensors"]["g"]["chunks"]
    chunks[3]["offsets"] = [1, 0]
    with pytest.raises(ManifestError, match=r"src, tensors\['g'\]: chunks at \[0, 0\] and \[1, 0\] overlap"):
        manifest_parser._parse_document(doc, "src")


def test_an_overlapping_slab_layout_is_refused_with_the_full_checks_message() -> None:
    slabs = {"s": TensorRecord("F32", (8, 3), (_chunk((0, 0), (4, 3), 0), _chunk((4, 0), (4, 3), 64)))}
    doc = json.loads(_manifest(slabs))
    doc["tensors"]["s"]["chunks"][1]["offsets"] = [2, 0]  # rows 2..6 covered twice, 6..8 never
    with pytest.raises(ManifestError) as quick:
        manifest_parser._parse_document(copy.deepcopy(doc), "src")
    r = manifest_parser._Reader(doc, "src")
    with pytest.raises(ManifestError) as full:
        manifest_parser._parse_tensor(
            r, "s", doc["tensors"]["s"], {FILE: FileRecord(1 << 20, "0" * 16, 0)}, 4096, digests=False
        )
    assert str(quick.value) == str(full.value) and "overlap" in str(quick.value)


def test_a_chunk_with_a_field_the_format_does_not_write_takes_the_full_checks() -> None:
    tensors = {"s": TensorRecord("F32", (8,), (_chunk((0,), (8,), 0),))}
    doc = json.loads(_manifest(tensors))
    doc["tensors"]["s"]["chunks"][0]["note"] = "ignored"
    m = manifest_parser._parse_document(doc, "src")
    assert m.tensors == tensors and msgspec.structs.astuple(m.tensors["s"].chunks[0]) == msgspec.structs.astuple(
        tensors["s"].chunks[0]
    )


@pytest.mark.parametrize(
    "path", [[], {}, "a", None, ["a", True], ["a", 1.5], ["a", None], ["a", ["b"]], ["a", {"b": 1}]]
)
def test_paths_that_the_per_key_check_refuses_are_refused_by_the_bulk_check(path: Any) -> None:
    r = manifest_parser._Reader({}, "src")
    good = {"a": ["model", "w", 0], "b": ["step"]}
    assert manifest_parser._parse_paths(r, {"paths": good}) == good
    with pytest.raises(ManifestError, match=r"src: paths\['z'\] must be a non-empty list of str/int"):
        manifest_parser._parse_paths(r, {"paths": {**good, "z": path}})


def test_frozen_records_of_structs_take_every_field_from_each_dict() -> None:
    """What ``frozen_records`` builds from dicts for a Struct (format 3's resolved chunks)
    equals the constructor's, field by field; a dict without a field is refused (KeyError),
    not filled with the field's default."""
    attrs = {"offsets": (0,), "sizes": (2,), "file": FILE, "byte_offset": 0, "byte_length": 8, "block_hashes": ()}
    full = {**attrs, "digest": "d" * 32}
    built = frozen_records(ChunkRecord, [full, {**full, "byte_offset": 8}])
    assert built == [ChunkRecord(**full), ChunkRecord(**{**full, "byte_offset": 8})]
    assert msgspec.structs.asdict(built[0]) == full
    with pytest.raises(KeyError, match="digest"):
        frozen_records(ChunkRecord, [attrs])
