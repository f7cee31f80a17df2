"""The manifest parser's quick path (format/manifest_bulk.py, issue #18) accepts exactly what
the full per-record checks accept: random damage to a valid "tensors" field either makes
both refuse (the full checks then name the problem) or gives the same records; and the
one-split-dimension shortcut of the overlap check agrees with comparing every pair."""

from __future__ import annotations

import copy
import itertools
import json
import time
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shardckpt.errors import ManifestError
from shardckpt.format import manifest_parser
from shardckpt.format.manifest_bulk import bulk_tensors, top_fields
from shardckpt.format.manifest_records import FileRecord
from shardckpt.format.overlap import first_overlap
from tests.support.damage import DELETE, single_damages, value_paths

BLOCK = 4096
FILES = {
    "data/ab-r00000-00.safetensors": FileRecord(size=1 << 20, hash="0" * 16, rank=0, checkpoint=None),
    "data/ab-r00001-00.safetensors": FileRecord(size=1 << 20, hash="1" * 16, rank=1, checkpoint=None),
}


def _valid_tensors(digests: bool) -> dict[str, Any]:
    """Three tensors: rows split over two files, a 0-d tensor, an empty one; 2 blocks in one chunk."""

    def chunk(offsets: list[int], sizes: list[int], file: int, at: int, isz: int = 4) -> dict[str, Any]:
        length = isz * (sizes[0] * sizes[1] if len(sizes) == 2 else (sizes[0] if sizes else 1))
        c: dict[str, Any] = {
            "offsets": offsets,
            "sizes": sizes,
            "file": sorted(FILES)[file],
            "byte_offset": at,
            "byte_length": length,
            "block_hashes": [f"{at + i:016x}" for i in range(-(-length // BLOCK))],
        }
        if digests:
            c["digest"] = f"{at:032x}"
        return c

    return {
        "w": {
            "dtype": "F32",
            "shape": [64, 26],
            "chunks": [chunk([0, 0], [40, 26], 0, 0), chunk([40, 0], [24, 26], 1, 64)],
        },
        "step": {"dtype": "I64", "shape": [], "chunks": [chunk([], [], 0, 8192, isz=8)]},
        "empty": {"dtype": "BF16", "shape": [0, 3], "chunks": [chunk([0, 0], [0, 3], 1, 0, isz=2)]},
    }


def _full(doc_tensors: Any, digests: bool) -> Any:
    """The full per-record checks (the parser's path when the quick one doubts): records, or the error."""
    r = manifest_parser._Reader({}, "src")
    try:
        if not isinstance(doc_tensors, dict):
            raise ManifestError("tensors must be an object")
        return {
            k: manifest_parser._parse_tensor(r, k, t, FILES, BLOCK, digests=digests) for k, t in doc_tensors.items()
        }
    except ManifestError as e:
        return e


def _quick(doc_tensors: Any, digests: bool) -> Any:
    """The quick path as the parser runs it, on the field's JSON text: records (overlaps then
    checked per tensor), None, or the error."""
    got = bulk_tensors(json.dumps(doc_tensors).encode(), FILES, BLOCK, digests=digests)
    if got is None:
        return None
    try:
        for k in got.unproven:
            manifest_parser._check_disjoint(list(got.tensors[k].chunks), where=f"tensors[{k!r}]")
    except ManifestError as e:
        return e
    return got.tensors


def _agree(doc: Any, digests: bool) -> None:
    expected = _full(copy.deepcopy(doc), digests)
    got = _quick(doc, digests)
    if isinstance(expected, ManifestError):
        assert got is None or isinstance(got, ManifestError), (
            f"the quick path accepted what the full checks refuse: {expected}"
        )
    else:
        assert got is None or got == expected


_ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([-1, 0, 1, 3, 24, 26, 40, 64, 2**62 - 1, 2**62, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "a", "F32", "0" * 16, "G" * 16, "0" * 15, "0" * 17, "0" * 32, "A" * 32, "0" * 16 + "\n"]),
    st.sampled_from([*sorted(FILES), "data/zz-r00000-00.safetensors", "../x"]),
    st.lists(st.integers(-2, 70), max_size=3),
    st.lists(st.sampled_from(["0" * 16, "f" * 16, 7, None, "x"]), max_size=3),
    st.just({}),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), digests=st.booleans(), damage=st.integers(1, 3))
@example(data=None, digests=False, damage=0)
def test_the_quick_path_accepts_exactly_what_the_full_checks_accept(data: Any, digests: bool, damage: int) -> None:
    doc = _valid_tensors(digests)
    for _ in range(damage):
        paths = value_paths(doc)[1:]
        where = data.draw(st.sampled_from(paths))
        parent = doc
        for k in where[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent[where[-1]] = data.draw(_ODD)
    _agree(doc, digests)


_BOUNDARY = [None, True, False, -1, 0, 1, 2**62 - 1, 2**62, 2**63, 1.0, "1", "0" * 16, "0" * 32, [], [0], [-1], {}]


def test_every_single_damage_is_refused_by_both_or_neither() -> None:
    """Exhaustively: each value of the valid document in turn replaced by each boundary
    value, or deleted, compared with the full checks (random damage above, combined)."""
    for digests in (False, True):
        for doc in single_damages(_valid_tensors(digests), [*_BOUNDARY, DELETE]):
            _agree(doc, digests)


def test_the_quick_path_does_no_arithmetic_on_values_that_are_not_ints() -> None:
    """["a", 10**12] as sizes would be a terabyte-long string if multiplied before the type check."""
    doc = _valid_tensors(False)
    doc["w"]["chunks"][0]["sizes"] = ["a", 10**12]
    doc["w"]["chunks"][0]["offsets"] = [[1], 10**12]
    t0 = time.perf_counter()
    assert bulk_tensors(json.dumps(doc).encode(), FILES, BLOCK, digests=False) is None
    assert time.perf_counter() - t0 < 1.0


def test_a_valid_manifest_takes_the_quick_path() -> None:
    doc = _valid_tensors(True)
    bulk = bulk_tensors(json.dumps(doc).encode(), FILES, BLOCK, digests=True)
    assert bulk is not None and bulk.tensors == _full(doc, True) and bulk.unproven == []
    got = bulk.tensors
    assert got["w"].chunks[1].offsets == (40, 0) and got["w"].chunks[1].digest == f"{64:032x}"


def _pairs(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[tuple[int, int]]:
    """Every overlapping pair, by comparing all of them (empty boxes overlap nothing)."""
    return [
        (i, j)
        for (i, (a, an)), (j, (b, bn)) in itertools.combinations(enumerate(boxes), 2)
        if all(x < y + ys and y < x + xs and xs and ys for x, xs, y, ys in zip(a, an, b, bn, strict=True))
    ]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 4), st.integers(0, 1), st.integers(1, 2)), min_size=2, max_size=9
    ),
    st.integers(0, 1),
)
def test_slabs_along_one_dimension_are_checked_exactly(spans: list[tuple[int, int, int, int]], dim: int) -> None:
    """Boxes that mostly differ along one dimension (the layouts saves write): the shortcut
    says "disjoint" only when no pair overlaps; the exact methods name a real pair otherwise."""
    boxes = []
    for start, length, other_start, other_len in spans:
        off, size = [other_start, other_start], [other_len, other_len]
        off[dim], size[dim] = start, length
        boxes.append((tuple(off), tuple(size)))
    found = first_overlap(boxes)
    pairs = _pairs(boxes)
    if found is None:
        assert pairs == []
    else:
        assert found in pairs


def test_manifests_that_saves_write_take_the_quick_path(tmp_path: Any) -> None:
    """Formats 1 and 2 (an incremental save): every tensor record passes the quick path, so
    the per-record checks run only on damaged manifests."""
    import torch

    import shardckpt
    from shardckpt.format.manifest import parse_manifest

    state = {
        "w": torch.randn(40, 3),
        "scalar": torch.tensor(3),
        "empty": torch.zeros(0, 2),
        "bf16": torch.ones(5000, dtype=torch.bfloat16),
    }
    shardckpt.save(state, tmp_path / "v1", hash_block_bytes=4096)
    shardckpt.save(state, tmp_path / "v2", incremental=True)
    for name, digests in (("v1", False), ("v2", True)):
        raw = (tmp_path / name / "manifest.json").read_bytes()
        m = parse_manifest(raw, source=name)
        fields = top_fields(raw)
        assert fields is not None
        got = bulk_tensors(fields["tensors"], m.files, m.hash_block_bytes, digests=digests)
        assert got is not None and got.tensors == m.tensors and got.unproven == []
        assert (m.format_version, len(m.tensors["bf16"].chunks[0].block_hashes)) == ((1, 3) if name == "v1" else (2, 1))
