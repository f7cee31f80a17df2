"""A rank's write items, with the DTensor geometry computed here for the common placements.

DCP's local save plan asks every DTensor for its items (``DTensor.__create_write_items__``),
which goes through DTensor's general sharding code: about half a millisecond per
DTensor with 4 ranks on 2 cores, most of a save's time for thousands of small tensors
(issue #18). For a DTensor whose placements are all exactly ``Shard`` or ``Replicate``,
:func:`local_write_items` computes the same item from public attributes only
(``shape``, ``placements``, ``device_mesh.shape``, ``device_mesh.get_coordinate()``,
``to_local()``) and one coordinate look-up per mesh; everything else (``_StridedShard``,
``Partial``, DTensor subclasses, plain tensors, values, staged shards) is planned by
DCP's own ``create_default_local_save_plan``. ``tests/unit/test_local_items.py`` compares
the two over many layouts (uneven and empty shards, 2-D meshes, a dimension sharded
twice) on the installed torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import create_default_local_save_plan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor, Replicate, Shard

__all__ = ["ItemCache", "local_shards", "local_write_items", "resolved_shards", "shard_box"]


def shard_box(
    global_shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int], placements: Sequence[Any]
) -> tuple[list[int], list[int]] | None:
    """(sizes, offsets) of the box of a global tensor that the rank at ``coordinate`` of a
    mesh holds, or None when a placement is anything but exactly ``Shard`` or ``Replicate``.

    As DCP computes it: mesh dimensions apply left to right, each ``Shard(d)`` splitting
    the rank's current extent along ``d`` as ``torch.chunk`` does (chunks of
    ``ceil(n / parts)``, the last ones short or empty). An empty shard's offset along
    ``d`` is the global size of ``d`` (DCP's convention; a box at the end, holding nothing).
    """
    sizes, offsets = list(global_shape), [0] * len(global_shape)
    for mesh_dim, placement in enumerate(placements):
        kind = type(placement)
        if kind is Replicate:
            continue
        if kind is not Shard:
            return None
        dim = placement.dim  # a pybind11 property: read once (#18)
        if not 0 <= dim < len(sizes):
            return None
        extent = sizes[dim]
        chunk = -(-extent // mesh_shape[mesh_dim])  # torch.chunk's: ceil(extent / parts)
        start = chunk * coordinate[mesh_dim]
        if start >= extent:  # an empty shard
            sizes[dim], offsets[dim] = 0, global_shape[dim]
        else:
            sizes[dim] = min(chunk, extent - start)
            offsets[dim] += start
    return sizes, offsets


def local_shards(flat: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every DTensor's local tensor by flattened key: ``to_local()`` outside autograd, which
    returns the local tensor itself instead of a differentiable view (a tenth of the cost)."""
    with torch.no_grad():
        return {fqn: obj.to_local() for fqn, obj in flat.items() if isinstance(obj, DTensor)}


def resolved_shards(flat: dict[str, Any], locals_: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors DCP's ``resolve_data`` would give for the DTensors of ``flat``, by key:
    a plain DTensor's one item resolves to its local tensor (``__get_tensor_shard__``
    returns ``to_local()``), so the writer threads need not ask each DTensor again."""
    return {
        fqn: local
        for fqn, local in locals_.items()
        if type(flat[fqn]) is DTensor and not hasattr(local, "__get_tensor_shard__")
    }


class ItemCache:
    """This rank's items of plain DTensors from the last save, by key, each with what it
    was computed from (mesh, global shape, placements, the local tensor's properties), so
    the next save of the same layout reuses them instead of building thousands of items
    again (issue #18). Owned by one :class:`~shardckpt.engine.Checkpointer`; used by one
    save at a time; ``clear()`` empties it.

    It also lets the next save's checks skip what cannot have changed
    (:func:`~shardckpt.engine.savable.check_savable`'s ``layouts``). A save's planning calls
    :meth:`start` first and :meth:`mark_checked` once every item passed its checks; then,
    in the next save (:attr:`trusted`), a key in the cache passed the key, dtype and shape
    checks, and its item the item checks, and a DTensor whose properties (:func:`_entry_key`)
    still equal its entry's passes them again. :meth:`unchanged` answers that and keeps the
    entry for :func:`local_write_items`, which then reads no property of that DTensor a
    second time; :attr:`reused` names the items it took from the cache."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._hits: dict[str, _Entry] = {}  # this save's keys found unchanged, for local_write_items
        self.reused: set[int] = set()  # ids of the items local_write_items took from the cache, this save
        self._checked = False  # every item in _entries passed the planner's checks
        self.trusted = False  # this save: the entries were checked (by the last save)

    def clear(self) -> None:
        self._entries, self._hits, self.reused = {}, {}, set()
        self._checked = self.trusted = False

    def __len__(self) -> int:
        return len(self._entries)

    def start(self) -> None:
        """A save's planning begins: nothing of an earlier, unfinished one is kept."""
        self._hits, self.reused = {}, set()
        self.trusted, self._checked = self._checked, False

    def mark_checked(self) -> None:
        """Every item of this save's plan passed the planner's checks."""
        self._checked = True

    def __contains__(self, fqn: object) -> bool:
        """Whether the last save checked key ``fqn`` (and this save trusts it)."""
        return self.trusted and fqn in self._entries

    def unchanged(self, fqn: str, value: Any, local: torch.Tensor | None) -> bool:
        """Whether ``value`` (``local``: its local tensor) is a plain DTensor whose item the
        last save made, and checked, from the same properties. Call after
        :func:`~shardckpt.engine.savable.tensor_problem` found nothing wrong with it."""
        last = self._entries.get(fqn) if self.trusted else None
        if last is None or type(value) is not DTensor or local is None or hasattr(local, "__create_write_items__"):
            return False
        if _entry_key(value, local, torch.is_grad_enabled())[0] != last[0]:
            return False
        self._hits[fqn] = last
        return True


def _entry_key(obj: DTensor, local: torch.Tensor, grad: bool) -> tuple[tuple[Any, ...], Any]:
    """What a plain DTensor's item is computed from, and its mesh. ``grad``: whether autograd
    is on where DCP would call ``to_local()`` (its result then requires grad as the DTensor
    does; DCP records that in the properties)."""
    mesh = obj.device_mesh
    requires_grad = obj.requires_grad if grad else local.requires_grad
    return (id(mesh), obj.shape, obj.placements, local.dtype, local.layout, requires_grad, local.is_pinned()), mesh


# (what the item was computed from, the item, the mesh). The entry keeps the mesh alive,
# so the id(mesh) in its key cannot be reused by another mesh while the entry exists.
_Entry = tuple[tuple[Any, ...], WriteItem, Any]


def local_write_items(
    flat: dict[str, Any], locals_: dict[str, torch.Tensor], is_coordinator: bool, cache: ItemCache | None = None
) -> list[WriteItem]:
    """The items of DCP's local save plan of the flattened ``flat``, in its order
    (``locals_``: :func:`local_shards` of it). ``cache``: the items of the last save, reused
    where nothing they were computed from changed, and replaced by this save's. Not collective."""
    coordinates: dict[int, Sequence[int] | None] = {}  # id(mesh) -> coordinate, for this call
    previous = cache._entries if cache is not None else {}
    hits = cache._hits if cache is not None else {}  # found unchanged by ItemCache.unchanged, this save
    entries: dict[str, _Entry] = {}
    rest: dict[str, Any] = {}
    grad = torch.is_grad_enabled()
    for fqn, obj in flat.items():
        entry = hits.get(fqn)
        if entry is None:
            entry = _dtensor_entry(fqn, obj, locals_.get(fqn), previous.get(fqn), coordinates, grad)
        if entry is None:
            rest[fqn] = obj
        else:
            entries[fqn] = entry
    if cache is not None:
        cache._entries, cache._hits = entries, {}
        cache.reused = {id(e[1]) for k, e in entries.items() if e is previous.get(k)}
    if not rest:
        return [item for _, item, _ in entries.values() if item is not _OFF_MESH]
    by_key: dict[str, list[WriteItem]] = {}
    for it in create_default_local_save_plan(rest, is_coordinator).items:
        by_key.setdefault(it.index.fqn, []).append(it)
    items: list[WriteItem] = []
    for fqn in flat:
        if fqn in entries:
            if entries[fqn][1] is not _OFF_MESH:
                items.append(entries[fqn][1])
        else:
            items += by_key.get(fqn, ())
    return items


# A DTensor on a mesh this rank is not part of: DCP plans no item for it.
_OFF_MESH = WriteItem(index=MetadataIndex("<off mesh>"), type=WriteItemType.BYTE_IO)


def _dtensor_entry(
    fqn: str,
    obj: Any,
    local: torch.Tensor | None,
    last: _Entry | None,
    coordinates: dict[int, Sequence[int] | None],
    grad: bool,
) -> _Entry | None:
    """DCP's write item of ``obj`` if it is a plain DTensor (``_OFF_MESH`` when this rank is
    not on its mesh), with what it was computed from: ``last``'s item when that matches. None
    for DCP to plan it (not a DTensor, placements other than Shard/Replicate, a local tensor
    with its own items). ``grad``: whether autograd was on where DCP would call ``to_local()``
    (its result then requires grad as the DTensor does; DCP records that in the properties)."""
    if type(obj) is not DTensor or local is None or hasattr(local, "__create_write_items__"):
        return None
    key, mesh = _entry_key(obj, local, grad)
    if last is not None and last[0] == key:
        return last
    item = _dtensor_item(fqn, obj, mesh, key, coordinates)
    return None if item is None else (key, item, mesh)


def _dtensor_item(
    fqn: str, dt: DTensor, mesh: Any, key: tuple[Any, ...], coordinates: dict[int, Sequence[int] | None]
) -> WriteItem | None:
    """The item of :func:`_dtensor_entry` (``key``: its properties), or None for DCP."""
    if id(mesh) not in coordinates:
        coordinates[id(mesh)] = mesh.get_coordinate()
    coordinate = coordinates[id(mesh)]
    if coordinate is None:
        return _OFF_MESH
    shape = dt.shape
    box = shard_box(shape, mesh.shape, coordinate, dt.placements)
    if box is None:
        return None
    sizes, offsets = torch.Size(box[0]), torch.Size(box[1])
    return WriteItem(
        index=MetadataIndex(fqn, offsets),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
            properties=TensorProperties(
                dtype=key[3],
                layout=key[4],
                requires_grad=key[5],
                memory_format=torch.contiguous_format,
                pin_memory=key[6],
            ),
            size=shape,
        ),
    )
