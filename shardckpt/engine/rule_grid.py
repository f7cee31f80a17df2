"""The geometry of a ``torch.chunk``-style split of a tensor over a device mesh, as a
format-3 save's plan from rules (:mod:`shardckpt.engine.rule_plan`) checks it: how many
parts each tensor dimension has, which cell a mesh coordinate holds, and that cell's
offsets and sizes as DCP records them. Pure arithmetic, no torch."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Spec", "chunk_cell", "grid_of", "position_of"]

Spec = tuple[int | None, ...]
"""A DTensor's placements, per mesh dimension: ``d`` for ``Shard(d)``, None for ``Replicate``."""


def grid_of(shape: tuple[int, ...], mesh_shape: tuple[int, ...], spec: Spec) -> tuple[int, ...] | None:
    """Parts per tensor dimension, or None when a placement names a dimension the tensor
    does not have."""
    grid = [1] * len(shape)
    for n, d in zip(mesh_shape, spec, strict=True):
        if d is not None:
            if not 0 <= d < len(shape):
                return None
            grid[d] *= n
    return tuple(grid)


def position_of(coordinate: tuple[int, ...], mesh_shape: tuple[int, ...], spec: Spec, ndim: int) -> list[int]:
    """The cell along each tensor dimension: the coordinates of the mesh dimensions that
    shard it, outermost first."""
    p = [0] * ndim
    for c, n, d in zip(coordinate, mesh_shape, spec, strict=True):
        if d is not None:
            p[d] = p[d] * n + c
    return p


def chunk_cell(
    shape: tuple[int, ...], grid: tuple[int, ...], p: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of cell ``p`` of the ``torch.chunk`` split of ``shape`` over ``grid``
    as DCP records it: an empty cell's offset along an empty dimension is its global size."""
    offsets, sizes = [], []
    for n, g, i in zip(shape, grid, p, strict=True):
        block = -(-n // g)
        start = min(n, block * i)
        size = max(0, min(n, start + block) - start)
        offsets.append(n if size == 0 else start)
        sizes.append(size)
    return tuple(offsets), tuple(sizes)
