"""The quick path of the format-3 parser: the tensors that are one rule each, checked at once.

A format-3 manifest of thousands of small sharded tensors is thousands of records of
the same shape: ``{"dtype", "shape", "chunks": [], "rule": {"grid", "block", "runs"}}``.
:func:`~shardckpt.format.manifest_v3_parser._parse_tensor` checks one in ~17 us of
Python (issue #18: 52 ms of a 3,058-tensor manifest, most of its parse);
:func:`ruled_tensors` does the same checks column by column (``map`` with ``operator``
functions and ``itemgetter``, type sets: C loops over the whole manifest, exact Python
integers, no Python code per tensor) and builds the records without their dataclass
constructors. It accepts only what the full parser accepts: on any doubt it returns None
and the full parser runs, naming the first problem; a tensor of another form (listed
chunks, empty boxes beside a rule) goes to the full parser by itself. Pure, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import accumulate, chain, compress, islice, repeat
from operator import add, floordiv, itemgetter, le, lt, mul, neg, sub
from typing import Any

from shardckpt.format import datafile
from shardckpt.format.manifest_records import frozen_records
from shardckpt.format.manifest_v3 import Tensor
from shardckpt.format.rules import MAX_OFFSET, MAX_RULE_CELLS, Rule, Run

_RULED = frozenset({"dtype", "shape", "chunks", "rule"})
_RULE_KEYS = frozenset({"grid", "block", "runs"})
_TENSOR = itemgetter("dtype", "shape", "chunks", "rule")
_RULE = itemgetter("grid", "block", "runs")


class _Doubt(Exception):
    """Something the quick path does not accept; the full parser will say what."""


def ruled_tensors(
    doc_tensors: dict[str, Any], files: int, parse_one: Callable[[str, Any], Tensor]
) -> dict[str, Tensor]:
    """The manifest's ``"tensors"`` as records, in their order: those of the common form
    (a rule, no listed chunk) checked in bulk, every other one by ``parse_one(key, doc)``
    (the full parser). If a tensor of the common form fails any check, every tensor goes
    to ``parse_one`` in order, so the first problem is the one reported. ``files``: the
    file table's size."""
    keys, docs = list(doc_tensors), list(doc_tensors.values())
    common = [type(d) is dict and d.keys() == _RULED and d["chunks"] == [] for d in docs]
    try:
        quick = _checked(list(compress(docs, common)), files)
    except (_Doubt, TypeError, ValueError, OverflowError):
        return {k: parse_one(k, d) for k, d in zip(keys, docs, strict=True)}
    built = iter(quick)
    return {k: next(built) if ok else parse_one(k, d) for k, d, ok in zip(keys, docs, common, strict=True)}


def _only(values: Any, typ: type) -> None:
    """Every value exactly of type ``typ`` (a bool is not an int here, as in the full parser)."""
    if not set(map(type, values)) <= {typ}:
        raise _Doubt


def _ints_in(values: list[Any], low: int, high: int) -> None:
    """Every value an int (not a bool) in [low, high)."""
    _only(values, int)
    if values and not (low <= min(values) and max(values) < high):
        raise _Doubt


def _checked(docs: list[dict[str, Any]], files: int) -> list[Tensor]:
    """The records of ``docs`` (each of the common form), after every check of
    ``_parse_tensor`` and ``rules.parse_rule``; _Doubt at the first doubt."""
    if not docs:
        return []
    dtypes, shapes, _, rule_docs = (list(c) for c in zip(*map(_TENSOR, docs), strict=True))
    _only(dtypes, str)
    if not all(map(datafile.is_dtype_name, set(dtypes))):
        raise _Doubt
    _only(shapes, list)
    ndims = list(map(len, shapes))
    if max(ndims) > datafile.MAX_NDIM:
        raise _Doubt
    _only(rule_docs, dict)
    if set(map(frozenset, rule_docs)) != {_RULE_KEYS}:
        raise _Doubt
    grids, blocks, run_lists = (list(c) for c in zip(*map(_RULE, rule_docs), strict=True))
    for column in (grids, blocks, run_lists):
        _only(column, list)
    if list(map(len, grids)) != ndims or list(map(len, blocks)) != ndims:
        raise _Doubt
    dims, flat_blocks, flat_grids = (list(chain.from_iterable(c)) for c in (shapes, blocks, grids))
    _ints_in(dims, 0, MAX_OFFSET)
    _ints_in(flat_blocks, 1, MAX_OFFSET)
    _ints_in(flat_grids, 0, MAX_OFFSET)
    if not all(map(le, flat_blocks, dims)):  # 0 < block <= shape
        raise _Doubt
    if list(map(neg, map(floordiv, map(neg, dims), flat_blocks))) != flat_grids:  # grid = ceil(shape / block)
        raise _Doubt
    cells = list(map(math.prod, grids))
    if max(cells) > MAX_RULE_CELLS:  # every grid entry >= 1: no partial product exceeds the whole
        raise _Doubt
    runs = _checked_runs(run_lists, cells, files)
    shapes = list(map(tuple, shapes))
    # Rule.__post_init__'s two caches too: the first cell of each run, and the grid (checked equal)
    starts = [list(accumulate(map(itemgetter(0), r), initial=0)) for r in run_lists]
    columns = zip(shapes, map(tuple, blocks), runs, starts, map(tuple, grids), strict=True)
    attrs = [{"shape": s, "block": b, "runs": r, "_starts": a, "_grid": g} for s, b, r, a, g in columns]
    rules = frozen_records(Rule, attrs)
    tensors = zip(dtypes, shapes, rules, strict=True)
    return frozen_records(Tensor, [{"dtype": t, "shape": s, "rule": r, "chunks": ()} for t, s, r in tensors])


def _checked_runs(run_lists: list[list[Any]], cells: list[int], files: int) -> list[tuple[Run, ...]]:
    """Every tensor's runs as records, after ``rules._parse_runs``' checks: each run 5
    ints in [-2**62, 2**62), a count >= 1, the counts of a tensor summing to its cells
    (so no run places more cells than are left), and every cell's file position in
    [0, files) and byte offset in [0, 2**62) (a run is affine: its two ends bound it)."""
    lengths = list(map(len, run_lists))
    if min(lengths) < 1:
        raise _Doubt
    flat = list(chain.from_iterable(run_lists))
    _only(flat, list)
    if set(map(len, flat)) != {5}:
        raise _Doubt
    counts, firsts, file_steps, offsets, byte_steps = (list(c) for c in zip(*flat, strict=True))
    for column in (counts, firsts, file_steps, offsets, byte_steps):
        _ints_in(column, -MAX_OFFSET, MAX_OFFSET)
    if min(counts) < 1:
        raise _Doubt
    runs_left = iter(counts)
    if [sum(islice(runs_left, n)) for n in lengths] != cells:
        raise _Doubt
    steps = list(map(sub, counts, repeat(1)))
    lasts = list(map(add, firsts, map(mul, steps, file_steps)))
    last_offsets = list(map(add, offsets, map(mul, steps, byte_steps)))
    for low_ends, high_ends, limit in ((firsts, lasts, files), (offsets, last_offsets, MAX_OFFSET)):
        if min(low_ends) < 0 or min(high_ends) < 0 or not all(map(lt, low_ends, repeat(limit))):
            raise _Doubt
        if not all(map(lt, high_ends, repeat(limit))):
            raise _Doubt
    attrs = [
        {"count": n, "file": f, "file_step": fs, "byte_offset": b, "byte_step": bs}
        for n, f, fs, b, bs in zip(counts, firsts, file_steps, offsets, byte_steps, strict=True)
    ]
    records = iter(frozen_records(Run, attrs))
    return [tuple(islice(records, n)) for n in lengths]
