"""Every tensor's chunks compressed into sharding rules at once: the coordinator's step of a
format-3 save (docs/format.md section 12.2), over one int64 table of all ranks' chunks.

:func:`compress_table` gives, for each tensor, what :func:`shardckpt.format.rules.compress`
gives for its chunk list (the same rule, the same chunks left to list), but in whole-table
vector operations: a fixed few dozen of them for the whole save, plus Python steps per
tensor and per run, never per chunk: ~1.5 CPU seconds for the 3.5 million chunks of a 7B model
with AdamW at 4096 ranks (docs/benchmarks.md). Compressing tensor by tensor costs a fixed
~1 ms of vector calls per tensor (2 s for its 1164 tensors even at 64 ranks); a Python loop
over chunks 4-8 us per chunk (13.5-38 s at 4096 ranks). ``tests/unit/test_v3_write.py``
checks the equality with ``rules.compress`` by property.

The table: one row per chunk, with its tensor beside it, in any order: ``file`` (a position in the file table),
``byte_offset``, then the box's offsets and sizes padded to ``D`` dimensions (offset 0,
size 1; a tensor's shape is padded with 1 the same way, so padding is one whole piece).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shardckpt.format import rules


@dataclass(frozen=True)
class Compressed:
    """Per tensor: its rule or None; and the rows (indices into the table) to list."""

    rules: list[rules.Rule | None]
    listed: list[list[int]]


def compress_table(shapes: Sequence[tuple[int, ...]], tid: torch.Tensor, table: torch.Tensor) -> Compressed:
    """Row ``i`` of ``table`` is a chunk of tensor ``tid[i]`` (of ``shapes[tid[i]]``), in any order."""
    n_rows, width = table.shape
    dims = (width - 2) // 2
    n_t = len(shapes)
    offsets, sizes = table[:, 2 : 2 + dims], table[:, 2 + dims :]
    shape = torch.tensor([[*s, *(1,) * (dims - len(s))] for s in shapes], dtype=torch.int64).reshape(n_t, dims)
    full = (sizes > 0).all(dim=1)
    rows, ft, o, s = _select(full, torch.arange(n_rows), tid, offsets, sizes)
    block = torch.zeros((n_t, dims), dtype=torch.int64)
    block.scatter_reduce_(0, ft[:, None].expand(-1, dims), s, reduce="amax")
    fulls = torch.bincount(ft, minlength=n_t)
    ok = (fulls > 0) & (block > 0).all(dim=1) & (block <= shape).all(dim=1)
    block = block.clamp(min=1)
    grid = (shape + block - 1) // block
    cells = torch.ones(n_t, dtype=torch.int64)
    for d in range(dims):  # one dimension at a time, so the product never overflows
        cells = torch.minimum(cells * grid[:, d], fulls + 1)
    ok &= cells == fulls
    strides = torch.ones((n_t, dims), dtype=torch.int64)
    for d in range(dims - 2, -1, -1):
        strides[:, d] = strides[:, d + 1] * grid[:, d + 1]
    # every full chunk must be exactly one cell of its tensor's block grid (one gather per row)
    per_row = torch.cat([block, shape, strides], dim=1)[ft]
    b, n, stride = per_row[:, :dims], per_row[:, dims : 2 * dims], per_row[:, 2 * dims :]
    piece = o.div(b, rounding_mode="floor")
    regular = ((o >= 0) & (piece * b == o) & (o < n) & (s == torch.minimum(b, n - o))).all(dim=1)
    ok &= torch.bincount(ft[~regular], minlength=n_t) == 0
    cell = (piece * stride).sum(dim=1)
    rows, ft, cell = _select(ok[ft], rows, ft, cell)
    # A tensor still ok has as many rows as cells, each row one cell in [0, cells): its cells
    # are 0, 1, ..., cells - 1 iff none is held twice. Each row's slot in (tensor, cell)
    # order is then its tensor's first slot + its cell: placed there, no sort needed.
    seg = torch.bincount(ft, minlength=n_t)
    slot = (torch.cumsum(seg, 0) - seg)[ft] + cell
    twice = torch.bincount(slot, minlength=slot.numel())[slot] != 1
    ok &= torch.bincount(ft[twice], minlength=n_t) == 0
    placed = torch.zeros_like(slot)
    placed[slot] = torch.arange(slot.numel())  # slots of tensors not ok are dropped below
    slots_ok = torch.repeat_interleave(ok, seg)
    rows, ft = _select(slots_ok, rows[placed], ft[placed])
    out_rules = _rules(shapes, ok.tolist(), block.tolist(), grid.tolist(), table[:, 0][rows], table[:, 1][rows], ft)
    listed_rows = torch.nonzero(~full | ~ok[tid]).flatten()
    listed_rows = listed_rows[torch.sort(tid[listed_rows], stable=True).indices]
    listed: list[list[int]] = [[] for _ in shapes]
    for r, t in zip(listed_rows.tolist(), tid[listed_rows].tolist(), strict=True):
        listed[t].append(r)
    return Compressed(out_rules, listed)


def _select(mask: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows of each column where ``mask`` holds; no copy when it holds everywhere (the
    usual case: every chunk full, every tensor a rule)."""
    if bool(mask.all()):
        return columns
    return tuple(c[mask] for c in columns)


def _rules(
    shapes: Sequence[tuple[int, ...]],
    ok: list[bool],
    block: list[list[int]],
    grid: list[list[int]],
    files: torch.Tensor,
    byte_offsets: torch.Tensor,
    ft: torch.Tensor,
) -> list[rules.Rule | None]:
    """The rules of the tensors marked ``ok``, whose cells are ``files``/``byte_offsets`` in
    (tensor, cell) order: ``rules._runs``' greedy runs (each takes its step from its first two
    cells and grows while it holds), found from where the steps change, O(runs) Python."""
    m = files.numel()
    df, db = files[1:] - files[:-1], byte_offsets[1:] - byte_offsets[:-1]
    # change at j: step j differs from step j - 1 (both inside one tensor or not)
    changes = (torch.nonzero((df[1:] != df[:-1]) | (db[1:] != db[:-1])).flatten() + 1).tolist()
    seg = torch.bincount(ft, minlength=len(shapes)).tolist() if m else [0] * len(shapes)
    starts: list[int] = []  # each run: first cell's row, count
    counts: list[int] = []
    first = 0
    per_tensor: list[tuple[int, int]] = []
    for t, count in enumerate(seg):
        begin = len(starts)
        i, end_t = first, first + count
        while i < end_t:
            if i == end_t - 1:
                starts.append(i)
                counts.append(1)
                break
            nxt = bisect.bisect_right(changes, i)
            end = min(changes[nxt] - 1 if nxt < len(changes) else m - 2, end_t - 2)  # last step equal to step i
            starts.append(i)
            counts.append(end - i + 2)
            i = end + 2
        per_tensor.append((begin, len(starts)))
        first = end_t
        del t
    idx = torch.tensor(starts, dtype=torch.int64)
    nxt_idx = (idx + 1).clamp(max=max(m - 1, 0))
    f0, b0 = files[idx].tolist(), byte_offsets[idx].tolist()
    fs = (files[nxt_idx] - files[idx]).tolist() if m else []
    bs = (byte_offsets[nxt_idx] - byte_offsets[idx]).tolist() if m else []
    out: list[rules.Rule | None] = []
    for t, shape in enumerate(shapes):
        if not ok[t]:
            out.append(None)
            continue
        lo, hi = per_tensor[t]
        runs = [
            (counts[k], f0[k], fs[k] if counts[k] > 1 else 0, b0[k], bs[k] if counts[k] > 1 else 0)
            for k in range(lo, hi)
        ]
        d = len(shape)
        out.append(rules.new_rule(tuple(shape), tuple(block[t][:d]), runs, tuple(grid[t][:d])))
    return out
