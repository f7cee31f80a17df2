"""The format-3 parser's quick path (format/manifest_v3_bulk.py, issue #18) gives exactly what
the full per-tensor checks give: the same records (rules, runs and their caches), or the same
first error, for valid tensors and for every single and random damage to them."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import shardckpt
from shardckpt.errors import ManifestError
from shardckpt.format import manifest_v3_bulk, manifest_v3_parser, rank_index
from shardckpt.format.manifest_v3 import Tensor
from shardckpt.format.manifest_v3_bulk import ruled_tensors
from tests.support.damage import DELETE, single_damages, value_paths

FILES = 6


def _valid_tensors() -> dict[str, Any]:
    """Rules of one, two and three runs (Shard(0) over 4 files, a 2-D grid, a 0-d tensor,
    a replicated one), beside tensors the quick path leaves to the full parser (listed
    chunks; an empty box listed beside a rule)."""

    def ruled(dtype: str, shape: list[int], grid: list[int], block: list[int], runs: list[list[int]]) -> dict[str, Any]:
        return {"dtype": dtype, "shape": shape, "chunks": [], "rule": {"grid": grid, "block": block, "runs": runs}}

    def chunk(offsets: list[int], sizes: list[int], file: int, length: int) -> dict[str, Any]:
        return {"offsets": offsets, "sizes": sizes, "file": file, "byte_offset": 0, "byte_length": length}

    beside = ruled("F32", [4], [2], [2], [[2, 0, 1, 0, 0]])
    beside["chunks"] = [chunk([4], [0], 2, 0)]
    return {
        "w": ruled("F32", [64, 26], [4, 1], [16, 26], [[2, 0, 1, 4096, 0], [2, 2, 1, 8192, 0]]),
        "grid": ruled("BF16", [5, 6, 2], [3, 2, 1], [2, 3, 2], [[3, 0, 1, 0, 12], [1, 3, 0, 64, 0], [2, 4, 1, 64, 24]]),
        "step": ruled("I64", [], [], [], [[1, 5, 0, 8, 0]]),
        "bias": ruled("F16", [7], [1], [7], [[1, 1, 0, 0, 0]]),
        "odd": {"dtype": "F32", "shape": [3, 2], "chunks": [chunk([0, 0], [1, 2], 0, 8), chunk([1, 0], [2, 2], 1, 16)]},
        "beside": beside,
    }


def _parse_one(key: str, doc: Any) -> Tensor:
    return manifest_v3_parser._parse_tensor(doc, FILES, f"src: tensors[{key!r}]")


def _full(doc: dict[str, Any]) -> Any:
    try:
        return {k: _parse_one(k, t) for k, t in doc.items()}
    except ManifestError as e:
        return str(e)


def _quick(doc: dict[str, Any]) -> Any:
    try:
        return ruled_tensors(doc, FILES, _parse_one)
    except ManifestError as e:
        return str(e)


def _same_records(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k] == b[k], k
        assert a[k].__dict__.keys() == b[k].__dict__.keys(), k
        if a[k].rule is not None:
            assert a[k].rule.__dict__ == b[k].rule.__dict__, k  # with Rule's caches (_starts, _grid)
            assert [r.__dict__ for r in a[k].rule.runs] == [r.__dict__ for r in b[k].rule.runs], k


def _agree(doc: dict[str, Any]) -> None:
    expected = _full(copy.deepcopy(doc))
    got = _quick(doc)
    if isinstance(expected, str):
        assert got == expected, "the quick path accepted what the full checks refuse, or named another problem"
    else:
        assert not isinstance(got, str), got
        _same_records(got, expected)


def test_valid_tensors_take_the_quick_path_with_the_same_records(monkeypatch):
    doc = _valid_tensors()
    asked: list[str] = []

    def counted(key: str, t: Any) -> Tensor:
        asked.append(key)
        return _parse_one(key, t)

    got = ruled_tensors(doc, FILES, counted)
    assert asked == ["odd", "beside"]  # the common form never reaches the full parser
    _same_records(got, _full(_valid_tensors()))
    assert got["grid"].rule.cell_at((2, 3, 0)) == _full(_valid_tensors())["grid"].rule.cell_at((2, 3, 0))


_ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([-1, 0, 1, 2, 3, 5, 7, 16, 26, 64, 2**26, 2**26 + 1, 2**62 - 1, 2**62, -(2**62), 2**63, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "F32", "F64", "I64", "bad", "0"]),
    st.lists(st.integers(-2, 70), max_size=5),
    st.lists(st.lists(st.integers(-3, 9), min_size=5, max_size=5), max_size=3),
    st.just({}),
    st.just([]),
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), damage=st.integers(1, 3))
@example(data=None, damage=0)
def test_random_damage_gives_the_same_records_or_the_same_error(data: Any, damage: int) -> None:
    doc = _valid_tensors()
    for _ in range(damage):
        where = data.draw(st.sampled_from(value_paths(doc)[1:]))
        parent = doc
        for k in where[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[where[-1]]
        elif data.draw(st.booleans()) and isinstance(parent, list):
            parent.append(data.draw(_ODD))
        else:
            parent[where[-1]] = data.draw(_ODD)
    _agree(doc)


_BOUNDARY = [None, True, False, -1, 0, 1, 2, 2**26 + 1, 2**62 - 1, 2**62, -(2**62) - 1, 2**63, 1.0, "1", [], [0], {}]


def test_every_single_damage_gives_the_same_records_or_the_same_error() -> None:
    """Exhaustively: each value of the valid document in turn replaced by each boundary
    value, or deleted."""
    for doc in single_damages(_valid_tensors(), [*_BOUNDARY, DELETE]):
        _agree(doc)


def _with(shape: list[int] | None = None, **rules: dict[str, Any]) -> dict[str, Any]:
    """The valid tensors with rule fields replaced (and "w"'s shape, if given)."""
    doc = _valid_tensors()
    for key, rule in rules.items():
        doc[key]["rule"].update(rule)
    if shape is not None:
        doc["w"]["shape"] = shape
    return doc


@pytest.mark.parametrize(
    "doc",
    [
        _with(w={"runs": [[0, 0, 1, 4096, 0], [4, 0, 1, 8192, 0]]}),  # a count of 0, the sum still right
        _with(w={"runs": [[0, 0, 0, 4096, 0], [4, 0, 1, 8192, 0]]}),  # the same, with steps of 0
        _with(w={"runs": [[-1, 0, 0, 4096, 0], [5, 0, 0, 8192, 0]]}),  # a negative count
        _with(w={"runs": [[5, 0, 1, 4096, 0], [-1, 0, 1, 8192, 0]]}),  # more cells than left, then fewer
        _with(w={"runs": [[4, 3, 1, 0, 0]]}),  # files 3..6 of 6
        _with(w={"runs": [[4, 3, -1, 0, 0]]}),  # files 3..0: fine
        _with(w={"runs": [[4, 1, -1, 0, 0]]}),  # files 1..-2
        _with(w={"runs": [[4, 0, 0, 2**62 - 1, 1]]}),  # the last offset at 2**62
        _with(w={"runs": [[4, 0, 0, 3, -1]]}),  # offsets 3..0: fine
        _with(w={"runs": [[4, 0, 0, 2, -1]]}),  # offsets 2..-1
        _with([2**26 + 1, 26], w={"grid": [2**26 + 1, 1], "block": [1, 26], "runs": [[2**26 + 1, 0, 0, 0, 0]]}),
        _with([2**26, 26], w={"grid": [2**26, 1], "block": [1, 26], "runs": [[2**26, 0, 0, 0, 0]]}),  # the limit
        _with(w={"grid": [0, 1], "block": [0, 26]}),  # an empty block
        _with(w={"grid": [1, 1], "block": [65, 26], "runs": [[1, 0, 0, 0, 0]]}),  # a block beyond the shape
    ],
)
def test_damage_that_keeps_the_counts_summing_right(doc: dict[str, Any]) -> None:
    _agree(doc)


def test_huge_steps_and_counts_are_exact_and_quick() -> None:
    """A run's last file is first + (count - 1) * step in exact integers (an int64 would
    wrap), and huge values cost no huge work."""
    doc = _valid_tensors()
    doc["w"]["rule"]["runs"] = [[4, 0, 2**62 - 1, 0, 0]]
    doc["grid"]["rule"]["grid"] = [2**61, 2**61, 1]
    doc["grid"]["rule"]["block"] = [1, 1, 2]
    t0 = time.perf_counter()
    _agree(doc)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("version", [3])
def test_a_saved_format_3_manifest_parses_alike_by_both_paths(tmp_path, monkeypatch, version):
    state = {
        "w": torch.randn(40, 3),
        "step": torch.tensor(7),
        "empty": torch.zeros(0, 4),
        "h": torch.ones(5, dtype=torch.bfloat16),
        "n": {f"t{i}": torch.full((i + 1,), float(i)) for i in range(30)},
    }
    shardckpt.save(state, tmp_path / "c", format_version=version)
    raw = (tmp_path / "c" / "manifest.json").read_bytes()
    quick = manifest_v3_parser.parse_manifest_v3(raw, source="m")
    monkeypatch.setattr(
        manifest_v3_parser, "ruled_tensors", lambda doc, files, one: {k: one(k, t) for k, t in doc.items()}
    )
    full = manifest_v3_parser.parse_manifest_v3(raw, source="m")
    _same_records(quick.tensors, full.tensors)
    assert quick.tensors["empty"].rule is None  # an empty tensor lists its chunk: the full parser's


def test_the_module_is_the_one_the_parser_calls() -> None:
    assert manifest_v3_parser.ruled_tensors is manifest_v3_bulk.ruled_tensors


# ---------------------------------------------------------------- index records' entries (rank_index)

BLOCK = 4096


def _file_object(digests: bool) -> dict[str, Any]:
    """A data file of 4 chunks: one of 0 bytes, one of 3 blocks, a gap between two."""
    spans = [(0, 0), (0, 100), (100, 3 * BLOCK), (3 * BLOCK + 200, 8)]
    entries = []
    for k, (at, n) in enumerate(spans):
        e: list[Any] = [at, n, "".join(f"{k:x}{b:015x}" for b in range(-(-n // BLOCK)))]
        if digests:
            e.append(f"{k:032x}")
        entries.append(e)
    return {"size": 3 * BLOCK + 208, "hash": "0" * 16, "entries": entries}


def _index_outcome(doc: Any, digests: bool, quick: bool) -> Any:
    saved = rank_index._entries_in_bulk
    try:
        if not quick:
            rank_index._entries_in_bulk = lambda *a: None  # type: ignore[assignment]
        return rank_index._file_index(doc, BLOCK, digests, "r0: files[0]")
    except ManifestError as e:
        return str(e)
    finally:
        rank_index._entries_in_bulk = saved


def _index_agree(doc: Any, digests: bool) -> None:
    expected = _index_outcome(copy.deepcopy(doc), digests, quick=False)
    got = _index_outcome(doc, digests, quick=True)
    assert got == expected
    if not isinstance(got, str):
        assert [e.__dict__ for e in got.entries] == [e.__dict__ for e in expected.entries]


def test_a_valid_file_object_takes_the_bulk_path():
    for digests in (False, True):
        doc = _file_object(digests)
        quick = rank_index._entries_in_bulk(doc["entries"], doc["size"], BLOCK, digests)
        assert quick is not None and len(quick) == 4
        _index_agree(doc, digests)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), digests=st.booleans(), damage=st.integers(1, 3))
def test_damaged_index_entries_give_the_same_entries_or_the_same_error(data: Any, digests: bool, damage: int) -> None:
    doc = _file_object(digests)
    odd = st.one_of(
        _ODD,
        st.sampled_from(
            ["0" * 16, "f" * 32, "0" * 15, "A" * 16, "0" * 16 + "\n", "0" * 48, 4 * BLOCK, 3 * BLOCK + 208]
        ),
    )
    for _ in range(damage):
        where = data.draw(st.sampled_from(value_paths(doc["entries"])[1:]))
        parent = doc["entries"]
        for k in where[:-1]:
            parent = parent[k]
        parent[where[-1]] = data.draw(odd)
    _index_agree(doc, digests)


def test_every_single_damage_to_an_entry_gives_the_same_entries_or_the_same_error() -> None:
    values = [*_BOUNDARY, "0" * 16, "0" * 32, 3 * BLOCK + 208, 3 * BLOCK + 209, 99]
    for digests in (False, True):
        valid = _file_object(digests)
        for entries in single_damages(valid["entries"], values):
            _index_agree({**valid, "entries": entries}, digests)
