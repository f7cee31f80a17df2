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

__all__ = ["local_shards", "local_write_items", "resolved_shards", "shard_box"]


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
        if kind is not Shard or not 0 <= placement.dim < len(sizes):
            return None
        dim, parts, index = placement.dim, mesh_shape[mesh_dim], coordinate[mesh_dim]
        extent = sizes[dim]
        chunk = extent // parts if extent % parts == 0 else -(-extent // parts)
        start = min(extent, chunk * index)
        size = max(0, min(extent, start + chunk) - start)
        sizes[dim] = size
        offsets[dim] = global_shape[dim] if size == 0 else offsets[dim] + start
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


def local_write_items(flat: dict[str, Any], locals_: dict[str, torch.Tensor], is_coordinator: bool) -> list[WriteItem]:
    """The items of DCP's local save plan of the flattened ``flat``, in its order
    (``locals_``: :func:`local_shards` of it). Not collective."""
    coordinates: dict[int, tuple[Any, Sequence[int] | None]] = {}  # id(mesh) -> (mesh, coordinate)
    fast: dict[str, WriteItem] = {}
    rest: dict[str, Any] = {}
    grad = torch.is_grad_enabled()
    for fqn, obj in flat.items():
        item = _dtensor_item(fqn, obj, locals_.get(fqn), coordinates, grad) if type(obj) is DTensor else None
        if item is None:
            rest[fqn] = obj
        elif item is not _OFF_MESH:
            fast[fqn] = item
    if not rest:
        return list(fast.values())
    by_key: dict[str, list[WriteItem]] = {}
    for it in create_default_local_save_plan(rest, is_coordinator).items:
        by_key.setdefault(it.index.fqn, []).append(it)
    items: list[WriteItem] = []
    for fqn in flat:
        if fqn in fast:
            items.append(fast[fqn])
        else:
            items += by_key.get(fqn, ())
    return items


# A DTensor on a mesh this rank is not part of: DCP plans no item for it.
_OFF_MESH = WriteItem(index=MetadataIndex("<off mesh>"), type=WriteItemType.BYTE_IO)


def _dtensor_item(
    fqn: str,
    dt: DTensor,
    local: torch.Tensor | None,
    coordinates: dict[int, tuple[Any, Sequence[int] | None]],
    grad: bool,
) -> WriteItem | None:
    """DCP's write item of ``dt`` (``_OFF_MESH`` when this rank is not on its mesh), or
    None for DCP to plan it (placements other than Shard/Replicate, a local tensor with
    its own items). ``grad``: whether autograd was on where DCP would call ``to_local()``
    (its result then requires grad as ``dt`` does; DCP records that in the properties)."""
    if local is None or hasattr(local, "__create_write_items__"):
        return None
    mesh = dt.device_mesh
    if id(mesh) not in coordinates:  # the mesh is kept with it, so its id is not reused
        coordinates[id(mesh)] = (mesh, mesh.get_coordinate())
    coordinate = coordinates[id(mesh)][1]
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
                dtype=local.dtype,
                layout=local.layout,
                requires_grad=dt.requires_grad if grad else local.requires_grad,
                memory_format=torch.contiguous_format,
                pin_memory=local.is_pinned(),
            ),
            size=shape,
        ),
    )
