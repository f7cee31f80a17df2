"""The global plan of a format-3 save from rules: each rank sends a summary of its local
plan instead of the plan, and the coordinator plans from the summaries (docs/design.md,
"First save at scale").

1. Every rank (:func:`summarize`, not collective) checks that each tensor item of its local
   plan is what a rule gives: a DTensor's item is cell ``p`` of the ``torch.chunk``-style
   split of its global shape over grid ``g`` (``g[d]``: the product of the mesh dimensions
   placed ``Shard(d)``; ``p`` from the rank's mesh coordinate; the ``Replicate`` dimensions
   make replica groups), a plain tensor's item is the whole tensor. If so it sends a
   :class:`RuleSummary`: a digest of its DTensors' table (keys, dtypes, global shapes,
   placements, key paths), its mesh coordinate per group of tensors (a mesh and its
   placements), the bytes of the items only it holds, and its plain tensors and values as
   rows with their digest (:mod:`~shardckpt.engine.rule_rows`, read only where the ranks'
   differ). O(groups + plain items) to send, O(items) to compute.
2. The coordinator (:func:`plan_from_rules`) checks that every digest is its own and that,
   per group, the ranks' coordinates are each of the mesh's exactly once (then the cells
   tile every tensor: each non-empty cell is held by one replica group). It lists the items
   several ranks hold (a replica group's cells, the ranks' empty boxes, plain tensors) and
   places them with :func:`~shardckpt.engine.placement.assign_replicated`, as the full path
   does with the same arguments: the same rank stores the same item. DCP's metadata is
   built from its own table (no chunks: a format-3 commit reads the chunks from the ranks'
   write results). O(ranks x groups + tensors + items several ranks hold).
3. Every rank gets the same :class:`RulePlan` winners and keeps its items
   (:func:`derive_plan`): its final plan is the full path's.

Anything else (a box that is no such cell, another placement, a staged shard, a digest that
differs, a coordinate twice or missing) makes :func:`plan_from_rules` return None; the
protocol then asks every rank for its full local plan (engine/protocol.py), whose checks
word any refusal.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType
from torch.distributed.tensor import DTensor, Replicate, Shard

from shardckpt.engine import rule_rows
from shardckpt.engine.placement import Key, assign_replicated
from shardckpt.engine.plan_checks import manifest_key_bytes
from shardckpt.engine.rule_grid import Spec, chunk_cell, grid_of, position_of

__all__ = [
    "Irregular",
    "RulePlan",
    "RuleSummary",
    "RuleTable",
    "TensorLayout",
    "decode_winners",
    "derive_plan",
    "encode_winners",
    "layouts_of",
    "plan_from_rules",
    "summarize",
]


@dataclass(frozen=True)
class TensorLayout:
    """What a rank knows of a DTensor: its mesh (``mesh``: an identity on this rank, to
    group tensors), the mesh's shape, the placements and this rank's coordinate."""

    mesh: Hashable
    mesh_shape: tuple[int, ...]
    spec: Spec
    coordinate: tuple[int, ...]


@dataclass(frozen=True)
class RuleSummary:
    """What a rank sends instead of its local plan: O(groups), whatever the tensors."""

    digest: str  # the DTensors' keys, dtypes, global shapes, groups and placements, key paths
    coordinates: tuple[tuple[int, ...], ...]  # this rank's mesh coordinate, per group
    single_bytes: int  # the bytes of its items that no other rank holds (non-empty cells, no replica)
    replicated: bytes = b"[]"  # its plain tensors and values (rule_rows.rows_of), read only if digests differ
    replicated_digest: str = ""  # of ``replicated``


@dataclass(frozen=True)
class Irregular:
    """What a rank sends when its items are not what rules give (the full plan follows)."""

    reason: str


@dataclass(frozen=True)
class _Tensor:
    fqn: str
    shape: tuple[int, ...]
    itemsize: int
    group: int  # index into RuleTable.groups; -1: a plain tensor, held whole by every rank


@dataclass(frozen=True)
class RuleTable:
    """A rank's table behind its summary, kept by the coordinator for :func:`plan_from_rules`."""

    plan: SavePlan  # the local plan
    tensors: tuple[_Tensor, ...]
    groups: tuple[tuple[tuple[int, ...], Spec], ...]  # (mesh shape, placements)
    values: tuple[str, ...] = ()  # the values' keys: every rank holds each, one stores it


@dataclass(frozen=True)
class RulePlan:
    """The coordinator's plan from rules: who stores each item several ranks hold (the same
    answer for every rank), DCP's metadata for the commit and the keys' manifest bytes."""

    winners: dict[Key, int]
    metadata: Metadata
    key_bytes: int


def layouts_of(flat: Mapping[str, Any], plan: SavePlan) -> dict[str, TensorLayout | None]:
    """The layout of each tensor item's object in the flattened state ``flat``: a
    :class:`TensorLayout` for a DTensor placed only by ``Shard``/``Replicate`` on a mesh
    holding this rank, None for a plain tensor; left out (so :func:`summarize` finds the
    plan irregular) for anything else. Not collective."""
    out: dict[str, TensorLayout | None] = {}
    coordinates: dict[int, Any] = {}
    for item in plan.items:
        fqn = item.index.fqn
        if item.type == WriteItemType.BYTE_IO or fqn in out:
            continue
        obj = flat.get(fqn)
        if type(obj) is DTensor:
            layout = _dtensor_layout(obj, coordinates)
            if layout is not None:
                out[fqn] = layout
        elif type(obj) in (torch.Tensor, torch.nn.Parameter):
            out[fqn] = None
    return out


def _dtensor_layout(dt: DTensor, coordinates: dict[int, Any]) -> TensorLayout | None:
    mesh = dt.device_mesh
    spec: list[int | None] = []
    for placement in dt.placements:
        kind = type(placement)
        if kind is Replicate:
            spec.append(None)
        elif kind is Shard:
            spec.append(placement.dim)  # type: ignore[attr-defined]
        else:
            return None
    if id(mesh) not in coordinates:
        coordinates[id(mesh)] = mesh.get_coordinate()
    coordinate = coordinates[id(mesh)]
    if coordinate is None:
        return None
    return TensorLayout(id(mesh), tuple(mesh.shape), tuple(spec), tuple(coordinate))


def summarize(plan: SavePlan, layouts: Mapping[str, TensorLayout | None]) -> tuple[RuleSummary | Irregular, RuleTable]:
    """This rank's summary of its local ``plan`` (``layouts``: :func:`layouts_of`), and the
    table the coordinator keeps. Irregular names the first item that is not what a rule
    gives. Not collective; O(items)."""
    tensors: list[_Tensor] = []
    groups: dict[tuple[Hashable, Spec], int] = {}
    coordinates: list[tuple[int, ...]] = []
    described: list[tuple[tuple[int, ...], Spec]] = []
    single = 0
    text: list[str] = []
    values: list[str] = []
    plain: list[tuple[str, str, tuple[int, ...], int]] = []  # plain tensors: key, dtype, shape, itemsize
    mappings = getattr(plan.planner_data, "mappings", None) or {}
    for item in plan.items:
        fqn = item.index.fqn
        data = item.tensor_data
        if data is None:
            values.append(fqn)
            continue
        shape, dtype = tuple(data.size), data.properties.dtype
        offsets, sizes = tuple(data.chunk.offsets), tuple(data.chunk.sizes)
        if fqn not in layouts:
            return Irregular(f"key {fqn!r} is neither a plain tensor nor a Shard/Replicate DTensor"), _empty(plan)
        layout = layouts[fqn]
        if layout is None:
            if offsets != (0,) * len(shape) or sizes != shape:
                return Irregular(f"key {fqn!r}: a plain tensor's item is not the whole tensor"), _empty(plan)
            tensors.append(_Tensor(fqn, shape, dtype.itemsize, -1))
            plain.append((fqn, str(dtype), shape, dtype.itemsize))
            continue
        cell = _cell_of(shape, layout)
        if cell is None or (offsets, sizes) != cell:
            return Irregular(f"key {fqn!r}: its box is not its cell of a torch.chunk grid"), _empty(plan)
        group = groups.setdefault((layout.mesh, layout.spec), len(groups))
        if group == len(coordinates):
            coordinates.append(layout.coordinate)
            described.append((layout.mesh_shape, layout.spec))
        if _replicas(layout) == 1 and math.prod(sizes) > 0:
            single += math.prod(sizes) * dtype.itemsize
        tensors.append(_Tensor(fqn, shape, dtype.itemsize, group))
        text.append(f"t{fqn!r}{dtype}{shape}{group}")
    rows = rule_rows.rows_of(plain, values, mappings)
    own = {t[0] for t in plain}.union(values)
    text.append(repr(described))
    text.append(repr([kv for kv in mappings.items() if kv[0] not in own]))
    digest = hashlib.blake2b("|".join(text).encode(), digest_size=16).hexdigest()
    table = RuleTable(plan, tuple(tensors), tuple(described), tuple(values))
    replicated_digest = hashlib.blake2b(rows, digest_size=16).hexdigest()
    return RuleSummary(digest, tuple(coordinates), single, rows, replicated_digest), table


def _empty(plan: SavePlan) -> RuleTable:
    return RuleTable(plan, (), ())


def _replicas(layout: TensorLayout) -> int:
    return math.prod(n for n, s in zip(layout.mesh_shape, layout.spec, strict=True) if s is None)


def _cell_of(shape: tuple[int, ...], layout: TensorLayout) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if len(layout.coordinate) != len(layout.mesh_shape) or len(layout.spec) != len(layout.mesh_shape):
        return None
    grid = grid_of(shape, layout.mesh_shape, layout.spec)
    if grid is None:
        return None
    return chunk_cell(shape, grid, position_of(layout.coordinate, layout.mesh_shape, layout.spec, len(shape)))


def plan_from_rules(
    summaries: Sequence[RuleSummary | Irregular | None], table: RuleTable, *, small_to: int | None
) -> RulePlan | None:
    """Coordinator: the plan from every rank's summary (rank order) and its own ``table``,
    or None when the full plans are needed (a rank irregular, a digest not its own, a group
    whose coordinates are not the mesh's each once). Pure; not collective."""
    own = [s for s in summaries if isinstance(s, RuleSummary)]
    if len(own) != len(summaries) or not own or any(s.digest != own[0].digest for s in own):
        return None
    world = len(own)
    members = _group_members(own, table.groups, world)
    if members is None:
        return None
    load = [s.single_bytes for s in own]
    everyone = list(range(world))
    shared: dict[Key, list[int]] = {}
    sizes: dict[Key, int] = {}
    boxes: dict[tuple[int, tuple[int, ...]], list[tuple[tuple[int, ...], int, list[int]]]] = {}
    metadata, key_bytes = _metadata(table.plan), manifest_key_bytes([table.plan])
    by_key = any(s.replicated_digest != own[0].replicated_digest for s in own)
    if by_key:
        # ranks hold different plain tensors or values (per-rank keys): place them by key
        placed = rule_rows.place(own, load, shared, sizes, metadata)
        if placed is None:
            return None
        key_bytes += placed
    else:
        for fqn in table.values:  # a value's item has no bytes: it counts 1, as in the full path
            if world == 1:
                load[0] += 1
            else:
                shared[(fqn, None)], sizes[(fqn, None)] = everyone, 1
    for t in table.tensors:
        if t.group < 0:
            if by_key:
                continue  # placed by rule_rows.place
            key = (t.fqn, torch.Size((0,) * len(t.shape)))
            nbytes = math.prod(t.shape) * t.itemsize or 1
            if world == 1:
                load[0] += nbytes
            else:
                shared[key], sizes[key] = everyone, nbytes
            continue
        cells = boxes.get((t.group, t.shape))
        if cells is None:
            cells = boxes[(t.group, t.shape)] = _shared_cells(t.shape, table.groups[t.group], members[t.group])
        for offsets, numel, ranks in cells:
            nbytes = numel * t.itemsize or 1
            if len(ranks) == 1:
                load[ranks[0]] += nbytes  # an empty box only this rank holds
            else:
                key = (t.fqn, torch.Size(offsets))
                shared[key], sizes[key] = ranks, nbytes
    winners = assign_replicated(shared, sizes.__getitem__, load, small_to=small_to)
    return RulePlan(winners, metadata, key_bytes)


def _group_members(
    summaries: Sequence[RuleSummary], groups: Sequence[tuple[tuple[int, ...], Spec]], world: int
) -> list[list[tuple[int, ...]]] | None:
    """Per group, each rank's coordinate, if they are the mesh's coordinates each once."""
    out: list[list[tuple[int, ...]]] = []
    for g, (mesh_shape, _) in enumerate(groups):
        coords = [s.coordinates[g] if g < len(s.coordinates) else () for s in summaries]
        if math.prod(mesh_shape) != world or len(set(coords)) != world:
            return None
        if any(
            len(c) != len(mesh_shape) or not all(0 <= i < n for i, n in zip(c, mesh_shape, strict=True)) for c in coords
        ):
            return None
        out.append(coords)
    if any(len(s.coordinates) != len(groups) for s in summaries):
        return None
    return out


def _shared_cells(
    shape: tuple[int, ...], group: tuple[tuple[int, ...], Spec], coords: list[tuple[int, ...]]
) -> list[tuple[tuple[int, ...], int, list[int]]]:
    """The boxes of one tensor shape in ``group`` that are not a non-empty cell of one rank
    alone: (offsets, elements, holders in rank order). Empty when every cell is non-empty
    and no dimension of the mesh replicates (FSDP, TP: nothing to list)."""
    mesh_shape, spec = group
    grid = grid_of(shape, mesh_shape, spec)
    assert grid is not None  # every rank's summary checked its cell
    replicated = any(s is None and n > 1 for n, s in zip(mesh_shape, spec, strict=True))
    if not replicated and all(-(-n // g) * (g - 1) < n for n, g in zip(shape, grid, strict=True)):
        return []
    held: dict[tuple[int, ...], tuple[int, list[int]]] = {}
    for rank, c in enumerate(coords):
        offsets, sizes = chunk_cell(shape, grid, position_of(c, mesh_shape, spec, len(shape)))
        numel = math.prod(sizes)
        if numel > 0 and not replicated:
            continue
        entry = held.get(offsets)
        if entry is None:
            held[offsets] = (numel, [rank])
        else:
            entry[1].append(rank)
    return [(offsets, numel, ranks) for offsets, (numel, ranks) in held.items()]


def _metadata(plan: SavePlan) -> Metadata:
    """DCP's metadata of the save from the coordinator's own local plan (every rank holds
    the same keys, dtypes and shapes: the digests agree): what a format-3 commit reads (each
    tensor's dtype and shape, the key paths), no chunks."""
    md: dict[str, Any] = {}
    for item in plan.items:
        fqn = item.index.fqn
        if fqn in md:
            continue
        if item.tensor_data is None:
            md[fqn] = BytesStorageMetadata()
        else:
            md[fqn] = TensorStorageMetadata(item.tensor_data.properties, item.tensor_data.size, [])
    mappings = getattr(plan.planner_data, "mappings", None)
    return Metadata(md, planner_data=dict(mappings) if mappings is not None else None)


def encode_winners(winners: Mapping[Key, int]) -> bytes:
    """The winners as JSON, encoded once by the coordinator for every rank's answer (the
    exchange then copies bytes per rank instead of pickling every key again)."""
    rows = [[fqn, None if offsets is None else list(offsets), rank] for (fqn, offsets), rank in winners.items()]
    return json.dumps(rows, separators=(",", ":")).encode()


def decode_winners(data: bytes) -> dict[Key, int]:
    """:func:`encode_winners` read back: keys ``(fqn, offsets tuple or None)``, which equal
    and hash as the items' ``(fqn, torch.Size)``."""
    return {(fqn, None if offsets is None else tuple(offsets)): rank for fqn, offsets, rank in json.loads(data)}


def derive_plan(local: SavePlan, winners: Mapping[Key, int], rank: int, storage_data: Any) -> SavePlan:
    """This rank's final plan from the coordinator's winners: its local plan without the
    items another rank stores (the full path's plan, item for item). Not collective."""
    mappings = getattr(local.planner_data, "mappings", None)
    items = [it for it in local.items if winners.get((it.index.fqn, it.index.offset), rank) == rank]
    kept = local if len(items) == len(local.items) else dataclasses.replace(local, items=items)
    return dataclasses.replace(kept, planner_data=mappings, storage_data=storage_data)
