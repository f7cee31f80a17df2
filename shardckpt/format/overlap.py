"""Whether boxes overlap: the tiling check of a manifest's chunks and of a save's plan.

Pure, no I/O. :func:`first_overlap` is exact and bounded on hostile input (see its
docstring): :mod:`shardckpt.format.manifest` runs it on every tensor of an untrusted
manifest, :mod:`shardckpt.engine.planner` on the boxes of a save's global plan.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np

from shardckpt.errors import ManifestError

# Work bounds of first_overlap, per non-empty box plus a constant (see its docstring).
SMALL_LAYOUT = 32  # up to this many boxes the sweep is cheapest (numpy's fixed cost is ~0.1 ms)
GRID_CELLS_PER_BOX = 4
GRID_CELLS_SLACK = 1 << 16
SWEEP_WORK_PER_BOX = 8
SWEEP_WORK_SLACK = 1 << 17

Box = tuple[Sequence[int], Sequence[int]]


def first_overlap(boxes: Sequence[Box]) -> tuple[int, int] | None:
    """Indices ``(i, j)``, ``i < j``, of two overlapping (offsets, sizes) boxes, or None.

    Empty boxes overlap nothing; all boxes have the same number of dimensions d. Exact, in
    O(d * n log n) time and O(d * n) memory for n boxes, or ManifestError if neither method
    below fits its bound (a layout shardckpt never writes). Up to SMALL_LAYOUT boxes, the
    sweep of 2. alone (at most SMALL_LAYOUT**2 comparisons).

    1. Grid painting. The distinct box boundaries of each dimension cut space into a grid
       of ``cells`` = prod(intervals per dimension). Two boxes overlap iff they share a cell
       (every box end is a cut, so renumbering the cuts in order keeps every interval
       comparison). Boxes are painted into a bytearray in index order, row by row along the
       last dimension, stopping at the first cell painted twice: every row but the last
       paints fresh cells, so <= cells + n rows, each O(log cells) Python work plus a C
       find/fill. Used when cells <= GRID_CELLS_PER_BOX * n + GRID_CELLS_SLACK, which holds
       for every layout that splits each dimension independently (DTensor placements, so
       everything shardckpt saves: cells == n, one cell per box, decided by one sort).
    2. Otherwise (or with coordinates of 2**62 or more) a sweep along the dimension with the
       most distinct offsets, comparing each box with the boxes still open there; it stops
       with ManifestError once the comparisons exceed SWEEP_WORK_PER_BOX * n + SWEEP_WORK_SLACK.
    """
    live = [i for i, (_, sizes) in enumerate(boxes) if math.prod(sizes) > 0]
    if len(live) < 2:
        return None
    if not boxes[live[0]][0]:  # 0-d: every non-empty box is the one element
        return live[0], live[1]
    if _disjoint_slabs(boxes, live):
        return None
    if len(live) <= SMALL_LAYOUT:
        return _sweep_overlap(boxes, live, len(live) ** 2)
    grid = _Grid.build(boxes, live, GRID_CELLS_PER_BOX * len(live) + GRID_CELLS_SLACK)
    if grid is not None:
        return grid.first_overlap()
    return _sweep_overlap(boxes, live, SWEEP_WORK_PER_BOX * len(live) + SWEEP_WORK_SLACK)


class _Grid:
    """The live boxes renumbered onto the grid of their boundaries (coordinate compression).

    ``lo``/``hi``: (n, d) int64 arrays of each box's first and past-last cell per dimension.
    """

    def __init__(self, live: list[int], lo: np.ndarray, hi: np.ndarray, extent: list[int]) -> None:
        self.live, self.lo, self.hi, self.extent = live, lo, hi, extent
        self.cells = math.prod(extent)
        self.stride = np.array([math.prod(extent[k + 1 :]) for k in range(len(extent))], dtype=np.int64)

    @classmethod
    def build(cls, boxes: Sequence[Box], live: list[int], max_cells: int) -> _Grid | None:
        """The grid, or None if it has more than ``max_cells`` cells or the numbers do not fit int64."""
        n, dims = len(live), len(boxes[live[0]][0])
        try:
            off = np.array([boxes[i][0] for i in live], dtype=np.int64).reshape(n, dims)
            size = np.array([boxes[i][1] for i in live], dtype=np.int64).reshape(n, dims)
        except (OverflowError, ValueError):  # huge or ragged: leave it to the sweep
            return None
        if off.min() <= -(2**62) or off.max() >= 2**62 or size.max() >= 2**62 or size.min() <= 0:
            return None  # off + size could wrap
        lo, hi, extent = np.empty_like(off), np.empty_like(off), []
        for k in range(dims):
            cuts = np.unique(np.concatenate((off[:, k], off[:, k] + size[:, k])))
            extent.append(len(cuts) - 1)
            if math.prod(extent) > max_cells:
                return None
            lo[:, k] = np.searchsorted(cuts, off[:, k])
            hi[:, k] = np.searchsorted(cuts, off[:, k] + size[:, k])
        return cls(live, lo, hi, extent)

    def first_overlap(self) -> tuple[int, int] | None:
        start = self.lo @ self.stride  # first cell of each box
        if bool((self.hi - self.lo == 1).all()):
            return self._first_duplicate(start)
        return self._paint(start.tolist())

    def _first_duplicate(self, cell: np.ndarray) -> tuple[int, int] | None:
        """One cell per box: the pair that painting in index order would find first."""
        order = np.argsort(cell, kind="stable")
        dup = np.flatnonzero(cell[order][1:] == cell[order][:-1])
        if not len(dup):
            return None
        at = int(dup[np.argmin(order[dup + 1])])
        return self.live[int(order[at])], self.live[int(order[at + 1])]

    def _paint(self, starts: list[int]) -> tuple[int, int] | None:
        painted = bytearray(self.cells)
        ones = memoryview(b"\x01" * self.extent[-1])
        spans = self.hi - self.lo
        widths, several = spans[:, -1].tolist(), (spans[:, :-1] > 1).any(axis=1).tolist()
        stride = self.stride.tolist()
        for n, (base, width) in enumerate(zip(starts, widths, strict=True)):
            for row in _rows(base, spans[n].tolist(), stride) if several[n] else (base,):
                hit = painted.find(1, row, row + width)
                if hit >= 0:
                    return self._owner(hit, n), self.live[n]
                painted[row : row + width] = ones[:width]
        return None

    def _owner(self, cell: int, until: int) -> int:
        """The first live box holding ``cell``, among the first ``until`` (one O(n d) pass)."""
        at = cell // self.stride % np.array(self.extent, dtype=np.int64)
        holds = ((self.lo[:until] <= at) & (at < self.hi[:until])).all(axis=1)
        assert holds.any(), "a painted cell belongs to an earlier box"
        return self.live[int(np.argmax(holds))]


def _rows(base: int, span: list[int], stride: list[int]) -> Iterator[int]:
    """First cell of each row (a run along the last dimension) of the box at ``base``.

    Dimensions the box spans one cell of are skipped, so each remaining one at least
    doubles the rows: summing the steps costs O(log rows) per row.
    """
    axes = [range(0, s * st, st) for s, st in zip(span[:-1], stride[:-1], strict=True) if s > 1]
    return (base + step for step in map(sum, itertools.product(*axes)))


def _disjoint_slabs(boxes: Sequence[Box], live: list[int]) -> bool:
    """True if the (>= 2) ``live`` boxes are slabs along one dimension - the same offsets and
    sizes in every other - whose intervals along it are disjoint: then no two overlap. False
    means "not shown" (the exact methods decide): O(d * n log n), most layouts a save writes
    (one sharded dimension) end here."""
    first, second = boxes[live[0]][0], boxes[live[1]][0]
    k = next((d for d in range(len(first)) if first[d] != second[d]), None)
    if k is None:
        return False
    off, size = boxes[live[0]]
    others = (tuple(off[:k]), tuple(off[k + 1 :]), tuple(size[:k]), tuple(size[k + 1 :]))
    spans = []
    for i in live:
        off, size = boxes[i]
        if (tuple(off[:k]), tuple(off[k + 1 :]), tuple(size[:k]), tuple(size[k + 1 :])) != others:
            return False
        spans.append((off[k], size[k]))
    spans.sort()
    return all(a + n <= b for (a, n), (b, _) in itertools.pairwise(spans))


def _sweep_overlap(boxes: Sequence[Box], live: list[int], budget: int) -> tuple[int, int] | None:
    """Sweep along the dimension with the most distinct offsets; ManifestError past ``budget``."""
    dims = len(boxes[live[0]][0])
    d = max(range(dims), key=lambda k: len({boxes[i][0][k] for i in live}))
    order = sorted(live, key=lambda i: boxes[i][0][d])
    active: list[int] = []
    work = 0
    for i in order:
        off, size = boxes[i]
        work += 2 * len(active)  # filtering the open boxes, then comparing with them
        if work > budget:
            raise ManifestError(
                f"the layout of {len(live)} non-empty chunks is too irregular to check for overlaps "
                f"within the work bound: its boundaries cut too many grid cells (more than {GRID_CELLS_PER_BOX} "
                f"per chunk) and a sweep needs more than {budget} box comparisons. shardckpt writes only layouts "
                "that split each dimension independently; re-save the tensor with such a sharding."
            )
        active = [a for a in active if boxes[a][0][d] + boxes[a][1][d] > off[d]]
        for a in active:
            ao, asz = boxes[a]
            if all(x < y + ys and y < x + xs for x, xs, y, ys in zip(ao, asz, off, size, strict=True)):
                return min(a, i), max(a, i)
        active.append(i)
    return None


def disjoint_slab_groups(offsets: np.ndarray, sizes: np.ndarray, ndims: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """For each group of boxes, whether :func:`_disjoint_slabs` would show it disjoint (or it
    has fewer than two non-empty boxes), decided for all groups at once: the manifest parser
    checks thousands of small tensors this way (issue #18). False means "not shown".

    Box ``i`` has ``ndims[i]`` dimensions, its offsets and sizes the next ``ndims[i]`` values
    of the flat int64 ``offsets`` and ``sizes`` (each in [0, 2**62)); group ``g`` is the next
    ``counts[g]`` boxes. A group is shown disjoint when its non-empty boxes agree in every
    dimension but one, k, and their intervals along k, sorted, do not overlap. O(d n log n).
    """
    groups = len(counts)
    group_of = np.repeat(np.arange(groups), counts)
    starts = np.cumsum(ndims) - ndims
    shown = np.ones(groups, dtype=bool)
    for d in np.unique(ndims).tolist():
        rows = np.flatnonzero(ndims == d)
        at = starts[rows][:, None] + np.arange(d)
        off, size = offsets[at], sizes[at]
        live = (size > 0).all(axis=1)
        if d == 0:
            live_count = np.bincount(group_of[rows][live], minlength=groups)
            shown &= live_count < 2
            continue
        shown &= _slabs_shown(off[live], size[live], group_of[rows][live], groups)
    return shown


def _slabs_shown(off: np.ndarray, size: np.ndarray, group: np.ndarray, groups: int) -> np.ndarray:
    """:func:`disjoint_slab_groups` for the non-empty boxes ``off``/``size`` (n, d), d >= 1, of
    the (sorted) ``group`` ids; True for groups with no box here."""
    n, d = off.shape
    shown = np.ones(groups, dtype=bool)
    if n == 0:
        return shown
    first = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])  # each group's first box
    head = np.repeat(first, np.diff(np.r_[first, n]))
    differs = (off != off[head]) | (size != size[head])  # (n, d): where a box leaves its group's first
    varying = np.zeros((groups, d), dtype=bool)
    varying[group[first]] = np.logical_or.reduceat(differs, first, axis=0)
    several = np.bincount(group, minlength=groups) > 1
    k = np.argmax(varying, axis=1)  # the one dimension that varies (0 when none does)
    shown &= ~several | (varying.sum(axis=1) == 1)
    key, span = off[np.arange(n), k[group]], size[np.arange(n), k[group]]
    order = np.lexsort((key, group))
    g, lo, hi = group[order], key[order], key[order] + span[order]
    clash = (g[1:] == g[:-1]) & (hi[:-1] > lo[1:])
    shown[g[1:][clash]] = False
    return shown
