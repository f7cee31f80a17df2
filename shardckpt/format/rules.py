"""Format 3: one tensor's chunks described by a sharding rule instead of a list.

Pure, no I/O. ``docs/format.md`` section 12 specifies the records; ``engine/write_v3.py`` writes them.

A rule says: dimension ``d`` of the tensor is cut into pieces of ``block[d]`` elements, the
last one shorter (``torch.chunk``'s sizes, and DTensor ``Shard(d)``'s; a dimension that is
not split has one piece of the whole length). The non-empty pieces form a grid of
``grid[d] = ceil(shape[d] / block[d])`` pieces per dimension; its cells, numbered in
row-major (C) order, are the tensor's chunks and tile it exactly. ``runs`` say where each
cell's bytes are: consecutive cells whose file position and byte offset both step by a
constant share one run. FSDP ``Shard(0)``, TP ``Shard(1)``, a 2-D mesh and a replicated
tensor (one cell) are each a rule of a few numbers, so a manifest holds O(tensors + files)
records, not one per rank and tensor.

- :func:`compress`: a tensor's chunk list -> (rule or None, chunks the rule leaves out);
  exact: ``sorted([*expand(rule), *rest]) == sorted(chunks)``.
- :func:`expand`: every chunk of a rule (O(cells)).
- :func:`chunks_for_box`: the chunks a box of the tensor overlaps, from the rule alone, in
  O(d * (answer + log runs)) after an O(runs) index.
- :func:`parse_rule` and :func:`rule_to_json`: the JSON record, validated as hostile input
  in O(d + runs) time, with every count, index and offset bounded.
"""

from __future__ import annotations

import bisect
import itertools
import math
import reprlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shardckpt.errors import ManifestError

MAX_RULE_CELLS = 1 << 26  # cells (chunks) one rule may describe: 16384 ranks x 4096, with room
MAX_OFFSET = 1 << 62  # every shape entry, file position and byte offset is below this


@dataclass(frozen=True, order=True)
class Chunk:
    """One stored piece of a tensor: the box ``offsets``/``sizes``, held at ``byte_offset``
    of the data file at position ``file`` of the manifest's sorted ``files``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: int
    byte_offset: int


@dataclass(frozen=True)
class Run:
    """``count`` consecutive cells; the i-th (from 0) is in file ``file + i * file_step``
    at byte ``byte_offset + i * byte_step``."""

    count: int
    file: int
    file_step: int
    byte_offset: int
    byte_step: int

    def at(self, i: int) -> tuple[int, int]:
        return self.file + i * self.file_step, self.byte_offset + i * self.byte_step


@dataclass(frozen=True)
class Rule:
    """A regular sharding of one tensor of ``shape`` (see the module docstring)."""

    shape: tuple[int, ...]
    block: tuple[int, ...]
    runs: tuple[Run, ...]
    _starts: list[int] = field(init=False, repr=False, compare=False)
    _grid: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # first cell of each run, for bisect; built once, O(runs)
        object.__setattr__(self, "_starts", _run_starts(self.runs))
        # asked once per chunk a load looks up: computed once per rule
        object.__setattr__(self, "_grid", tuple(-(-n // b) for n, b in zip(self.shape, self.block, strict=True)))

    @property
    def grid(self) -> tuple[int, ...]:
        return self._grid

    @property
    def cells(self) -> int:
        return math.prod(self.grid)

    def place(self, cell: int) -> tuple[int, int]:
        """(file position, byte offset) of the cell numbered ``cell`` (row-major), O(log runs)."""
        run = bisect.bisect_right(self._starts, cell) - 1
        return self.runs[run].at(cell - self._starts[run])

    def cell_of_box(self, offsets: Sequence[int], sizes: Sequence[int]) -> int | None:
        """The row-major number of the cell whose box is exactly ``offsets``/``sizes``, else
        None. O(d): what a load in the layout of the save asks once per tensor."""
        if len(offsets) != len(self.shape) or len(sizes) != len(self.shape):
            return None
        cell = 0
        for o, s, b, n, g in zip(offsets, sizes, self.block, self.shape, self._grid):  # noqa: B905 - lengths checked
            if o < 0 or o >= n or o % b or s != min(b, n - o):
                return None
            cell = cell * g + o // b
        return cell

    def cell_chunk(self, index: tuple[int, ...], cell: int) -> Chunk:
        """The chunk of the cell at grid position ``index`` (row-major number ``cell``)."""
        file, byte_offset = self.place(cell)
        offsets = tuple(i * b for i, b in zip(index, self.block, strict=True))
        sizes = tuple(min(b, n - o) for b, n, o in zip(self.block, self.shape, offsets, strict=True))
        return Chunk(offsets, sizes, file, byte_offset)

    def cell_at(self, offsets: Sequence[int]) -> Chunk | None:
        """The chunk of the cell whose box starts at ``offsets``, or None when no cell
        starts there (wrong rank, outside the shape, not on a block boundary). O(d + log
        runs): what ``chunks_for_box(rule, offsets, (1,) * d)`` finds, filtered to the
        chunk at ``offsets``, without building the box's ranges (a load asks once per chunk)."""
        if len(offsets) != len(self.shape):
            return None
        cell = 0
        for o, b, n in zip(offsets, self.block, self.shape, strict=True):
            if o < 0 or o >= n or o % b:
                return None
            cell = cell * -(-n // b) + o // b
        return self.cell_chunk(tuple(o // b for o, b in zip(offsets, self.block, strict=True)), cell)


_NEW, _SET = object.__new__, object.__setattr__


def new_rule(
    shape: tuple[int, ...],
    block: tuple[int, ...],
    runs: Sequence[tuple[int, int, int, int, int]],
    grid: tuple[int, ...],
) -> Rule:
    """``Rule(shape, block, tuple(Run(*r) for r in runs))`` of checked values whose ``grid``
    the caller computed (``engine/rule_table.py`` has every tensor's at once), each record's
    attribute dict given whole: a save of thousands of small tensors makes one per tensor,
    7 us by the dataclasses' ``__init__`` (#18). ``tests/unit/test_v3_write.py`` compares
    it with the constructor's."""
    made = []
    for count, file, file_step, byte_offset, byte_step in runs:
        run = _NEW(Run)
        _SET(
            run,
            "__dict__",
            {"count": count, "file": file, "file_step": file_step, "byte_offset": byte_offset, "byte_step": byte_step},
        )
        made.append(run)
    rule = _NEW(Rule)
    _SET(
        rule,
        "__dict__",
        {"shape": shape, "block": block, "runs": tuple(made), "_starts": _run_starts(made), "_grid": grid},
    )
    return rule


def _run_starts(runs: Sequence[Run]) -> list[int]:
    """The first cell of each run, then the number of cells: what ``Rule.place`` bisects."""
    if len(runs) == 1:  # the common case, one run: no accumulate
        return [0, runs[0].count]
    return list(itertools.accumulate((r.count for r in runs), initial=0))


# ---------------------------------------------------------------- chunks <-> rule


def compress(shape: Sequence[int], chunks: Iterable[Chunk]) -> tuple[Rule | None, tuple[Chunk, ...]]:
    """The rule describing the non-empty ``chunks`` of a tensor of ``shape``, and the chunks
    it does not describe (the empty ones); or ``(None, chunks)`` when they are not a block
    grid (an irregular layout stays an explicit list). O(n log n) for n chunks."""
    chunks = tuple(chunks)
    shape = tuple(shape)
    full = [c for c in chunks if math.prod(c.sizes) > 0]
    empty = tuple(c for c in chunks if math.prod(c.sizes) == 0)
    if not full or not all(len(c.offsets) == len(c.sizes) == len(shape) for c in chunks):
        return None, chunks
    block = tuple(max(c.sizes[d] for c in full) for d in range(len(shape)))
    rule = Rule(shape, block, ())
    if rule.cells != len(full) or not all(0 < b <= n for b, n in zip(block, shape, strict=True)):
        return None, chunks
    placed: dict[int, Chunk] = {}
    for c in full:
        cell = rule.cell_of_box(c.offsets, c.sizes)
        if cell is None or cell in placed:
            return None, chunks
        placed[cell] = c
    # count == cells and every chunk is a distinct whole cell: the chunks tile the tensor
    runs = _runs([(placed[i].file, placed[i].byte_offset) for i in range(len(full))])
    return Rule(shape, block, runs), empty


def _runs(places: list[tuple[int, int]]) -> tuple[Run, ...]:
    """Greedy: each run takes its step from its first two cells and grows while it holds."""
    runs, i = [], 0
    while i < len(places):
        file, byte = places[i]
        if i + 1 == len(places):
            runs.append(Run(1, file, 0, byte, 0))
            break
        fs, bs = places[i + 1][0] - file, places[i + 1][1] - byte
        n = 2
        while i + n < len(places) and places[i + n] == (file + n * fs, byte + n * bs):
            n += 1
        runs.append(Run(n, file, fs, byte, bs))
        i += n
    return tuple(runs)


def expand(rule: Rule) -> list[Chunk]:
    """Every chunk of ``rule``, in row-major cell order. O(cells)."""
    indexes = itertools.product(*(range(g) for g in rule.grid))
    return [rule.cell_chunk(index, cell) for cell, index in enumerate(indexes)]


def chunks_for_box(rule: Rule, offsets: Sequence[int], sizes: Sequence[int]) -> list[Chunk]:
    """The chunks of ``rule`` that overlap the box ``offsets``/``sizes``, in row-major order.

    Computed from the rule: per dimension, the pieces the box's interval touches are a
    range found by division, so the work is O(d * (answer + log runs)), never O(cells).
    """
    if len(offsets) != len(rule.shape) or len(sizes) != len(rule.shape):
        raise ValueError(f"box {list(offsets)}+{list(sizes)} has not the {len(rule.shape)} dimensions of the tensor")
    if any(o < 0 or s < 0 or o + s > n for o, s, n in zip(offsets, sizes, rule.shape, strict=True)):
        raise ValueError(f"box {list(offsets)}+{list(sizes)} lies outside shape {list(rule.shape)}")
    if math.prod(sizes) == 0:
        return []
    ranges = [range(o // b, (o + s - 1) // b + 1) for o, s, b in zip(offsets, sizes, rule.block, strict=True)]
    grid = rule.grid
    out = []
    for index in itertools.product(*ranges):
        cell = 0
        for i, g in zip(index, grid, strict=True):
            cell = cell * g + i
        out.append(rule.cell_chunk(index, cell))
    return out


# ---------------------------------------------------------------- JSON


def rule_to_json(rule: Rule) -> dict[str, Any]:
    """The ``"rule"`` record of a format-3 tensor (``grid`` is redundant, checked by readers)."""
    return {
        "grid": list(rule.grid),
        "block": list(rule.block),
        "runs": [[r.count, r.file, r.file_step, r.byte_offset, r.byte_step] for r in rule.runs],
    }


def parse_rule(doc: Any, *, shape: Sequence[int], files: int, where: str) -> Rule:
    """Validate an untrusted ``"rule"`` record of a tensor of ``shape`` (already checked:
    at most 64 entries, each in [0, 2**62)) in a manifest with ``files`` data files.

    O(len(shape) + runs) time; ManifestError naming ``where`` and the field on any problem.
    What it proves: the cells tile the tensor, there are at most MAX_RULE_CELLS of them,
    and every cell's file position is in [0, files) and its byte offset in [0, 2**62).
    Whether a cell's bytes lie inside its file is checked by the reader per chunk it reads.
    """
    shape = tuple(shape)
    if not isinstance(doc, dict) or set(doc) != {"grid", "block", "runs"}:
        raise ManifestError(f"{where}: a rule is an object with exactly the fields grid, block, runs")
    block = _ints(doc["block"], f"{where}.block", len(shape))
    grid = _ints(doc["grid"], f"{where}.grid", len(shape))
    cells = 1
    for d, (n, b, g) in enumerate(zip(shape, block, grid, strict=True)):
        if not 0 < b <= n:
            raise ManifestError(
                f"{where}.block[{d}] = {b} must be in [1, shape[{d}] = {n}]; a tensor with an empty "
                "dimension has no rule (its chunks are listed)"
            )
        if g != -(-n // b):
            raise ManifestError(f"{where}.grid[{d}] = {g}, but shape {n} in blocks of {b} makes {-(-n // b)} pieces")
        cells *= g
        if cells > MAX_RULE_CELLS:
            raise ManifestError(f"{where}: grid {grid} has more than {MAX_RULE_CELLS} cells")
    runs = _parse_runs(doc["runs"], cells, files, f"{where}.runs")
    return Rule(shape, block, runs)


def _parse_runs(doc: Any, cells: int, files: int, where: str) -> tuple[Run, ...]:
    if not isinstance(doc, list) or not 1 <= len(doc) <= cells:
        raise ManifestError(f"{where}: expected a list of 1 to {cells} runs (one per cell at most)")
    runs, total = [], 0
    for k, r in enumerate(doc):
        count, file, file_step, byte_offset, byte_step = _ints(r, f"{where}[{k}]", 5, signed=True)
        if not 1 <= count <= cells - total:
            raise ManifestError(f"{where}[{k}]: count {count} must be in [1, {cells - total}] (cells left)")
        last_file, last_byte = file + (count - 1) * file_step, byte_offset + (count - 1) * byte_step
        if not (0 <= file < files and 0 <= last_file < files):  # affine: its ends bound it
            raise ManifestError(f"{where}[{k}]: file positions {file}..{last_file} outside the {files} files")
        if not (0 <= byte_offset < MAX_OFFSET and 0 <= last_byte < MAX_OFFSET):
            raise ManifestError(f"{where}[{k}]: byte offsets {byte_offset}..{last_byte} outside [0, 2**62)")
        total += count
        runs.append(Run(count, file, file_step, byte_offset, byte_step))
    if total != cells:
        raise ManifestError(f"{where}: the runs place {total} cells, the grid has {cells}")
    return tuple(runs)


def _ints(doc: Any, where: str, length: int, *, signed: bool = False) -> tuple[int, ...]:
    low = -MAX_OFFSET if signed else 0
    # a loop, not all() over a generator: called for every rule and run of a manifest
    ok = isinstance(doc, list) and len(doc) == length
    if ok:
        for v in doc:
            if type(v) is not int or not low <= v < MAX_OFFSET:
                ok = False
                break
    if not ok:
        kind = "integers in [-2**62, 2**62)" if signed else "integers in [0, 2**62)"
        raise ManifestError(f"{where}: expected a list of {length} {kind}, found {reprlib.repr(doc)}")
    return tuple(doc)
