"""Planning a format-3 load (docs/format.md section 12.7) from the manifest's rules.

:class:`RulePlanner` (a :class:`~shardckpt.engine.planner.LoadPlanner`) plugs into the one
load path of :mod:`shardckpt.engine.loading`: before DCP plans a rank's reads, it asks the
manifest's ``Tensor.chunks_for_box`` for the chunks each box of this rank's state_dict
overlaps, and hands DCP a metadata holding only those. So a rank never enumerates the other
ranks' chunks: O(d * (answer + log runs)) per box it loads. A box that is exactly one cell
(a load in the layout of the save) gets its read item here too, and is not planned again.
The chunks it finds go to the reader's :class:`~shardckpt.engine.load_v3.RuleChunks`, which
resolves them through the checksum chain.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.tensor import DTensor

from shardckpt.engine._torch_private import is_checkpointable_tensor, local_chunks, whole_chunk_item
from shardckpt.engine.load_items import ListedTensorMetadata, Meshes, PlannedItem, placed_box
from shardckpt.engine.local_items import shard_box
from shardckpt.engine.planner import LoadPlanner
from shardckpt.format import datafile
from shardckpt.format.manifest import Manifest
from shardckpt.format.manifest_v3 import Chunk, ManifestV3, Tensor, new_chunk

__all__ = ["Cell", "RulePlanner", "load_planner", "needed_metadata"]

Cell = tuple[str, Chunk, torch.Tensor]
"""A key whose box is exactly one cell of its rule: the key, that cell's chunk (a position
in the file table, not yet resolved to its data file and block hashes) and the local
tensor it fills whole (``RulePlanner.cells``)."""


class RulePlanner(LoadPlanner):
    """The load planner of a format-3 manifest (see the module docstring)."""

    lists_records = False  # its metadata lists cells of rules; whole ones go to ``cells``

    def __init__(
        self,
        manifest: ManifestV3,
        *,
        allow_partial_load: bool,
        flattened: tuple[dict[str, Any], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(allow_partial_load=allow_partial_load, flattened=flattened)
        self.manifest3 = manifest
        self.found: dict[tuple[str, tuple[int, ...]], Chunk] = {}
        """(key, offsets) -> the chunk there, of every chunk planning found for this rank's
        boxes: handed to :class:`RuleChunks` so that no chunk is looked up twice."""
        self.cells: list[Cell] = []
        """The keys whose box is exactly one cell, read whole without a ReadItem (when
        :attr:`~shardckpt.engine.planner.LoadPlanner.reads_whole_chunks`): the reader
        resolves each cell's record (``RuleChunks.whole``) and reads it with the plan's items."""

    def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        assert self.metadata is not None
        self.found, self.cells = {}, []
        cells = self.cells if self.plans_whole_chunks() else None
        flat, found = self.state_dict, self.found
        self.metadata = needed_metadata(self.metadata, self.manifest3, flat, found, self._planned, cells)


def load_planner(
    manifest: Manifest | ManifestV3, *, flattened: tuple[dict[str, Any], dict[str, Any]] | None = None
) -> LoadPlanner:
    """The planner of a load of ``manifest`` (partial loads allowed: ``check_target``
    decides which keys must match); ``flattened``: see :class:`LoadPlanner`."""
    if isinstance(manifest, ManifestV3):
        return RulePlanner(manifest, allow_partial_load=True, flattened=flattened)
    return LoadPlanner(allow_partial_load=True, flattened=flattened)


@torch.no_grad()  # for placed_box's to_local()
def needed_metadata(
    metadata: Metadata,
    manifest: ManifestV3,
    flat: dict[str, Any],
    found_chunks: dict[tuple[str, tuple[int, ...]], Chunk] | None = None,
    planned: dict[str, PlannedItem] | None = None,
    cells: list[Cell] | None = None,
) -> Metadata:
    """``metadata`` (a format-3 manifest's, with no chunks) where each tensor this rank
    loads lists the chunks that its boxes overlap, and only those; ``found_chunks``, if
    given, gets each of those chunks under (key, offsets); ``planned``, if given, the read
    item of each key whose box is exactly one cell of its rule (a load in the layout of the
    save: the item is DCP's, made here instead of planning the box a second time; #18).
    ``cells``, if given (with ``planned``), takes those keys instead (:data:`Cell`), each
    planned with no item at all (``planned`` marks it so: the reader reads it whole)."""
    sd = dict(metadata.state_dict_metadata)
    meshes: Meshes = {}
    origins: dict[int, torch.Size] = {}
    itemsizes: dict[str, int] = {}
    tensors = manifest.tensors
    for fqn, obj in flat.items():
        md, rec = sd.get(fqn), tensors.get(fqn)
        if rec is None or not isinstance(md, TensorStorageMetadata) or not isinstance(obj, torch.Tensor):
            continue  # values, keys the checkpoint lacks; check_target refused the rest already
        cell = _one_cell(obj, rec, meshes) if rec.rule is not None and type(obj) in _ONE_CELL_KINDS else None
        if cell is not None:  # the common case, a load in the layout of the save: one chunk, one item
            sizes, offsets, local, file, byte_offset = cell
            size = itemsizes.get(rec.dtype)
            if size is None:
                size = itemsizes[rec.dtype] = datafile.itemsize(rec.dtype)
            chunk = new_chunk(offsets, sizes, file, byte_offset, math.prod(sizes) * size)
            if planned is not None and cells is not None and sizes == local.shape and 0 not in sizes:
                # read whole (#18): no ReadItem, and nothing for DCP to plan (its metadata lists no chunk)
                cells.append((fqn, chunk, local))
                planned[fqn] = (None, local)
                continue
            if found_chunks is not None:
                found_chunks[(fqn, offsets)] = chunk
            sd[fqn] = _listing(md, [chunk])
            if planned is not None:
                origin = origins.get(len(sizes))
                if origin is None:
                    origin = origins[len(sizes)] = torch.Size((0,) * len(sizes))
                item = whole_chunk_item(fqn, torch.Size(offsets), torch.Size(sizes), 0, origin)
                planned[fqn] = (item, local)
            continue
        boxes = _boxes(obj, rec, meshes)
        if boxes is None:
            continue  # off its mesh (DCP reads nothing), or refused by check_target
        seen: dict[tuple[int, ...], Chunk] = {}
        for offsets, sizes in boxes:
            for c in rec.chunks_for_box(offsets, sizes):
                if c.offsets not in seen:
                    seen[c.offsets] = c
                    if found_chunks is not None:
                        found_chunks[(fqn, c.offsets)] = c
        # DCP's chunk list built only if DCP plans the key (a box not exactly one chunk; #18)
        sd[fqn] = _listing(md, list(seen.values()))
    return Metadata(state_dict_metadata=sd, planner_data=metadata.planner_data, storage_data=metadata.storage_data)


_ONE_CELL_KINDS = (DTensor, torch.Tensor, torch.nn.Parameter)
"""The types of target :func:`_one_cell` plans (exactly these: a subclass is planned by DCP)."""


def _one_cell(
    obj: torch.Tensor, rec: Tensor, meshes: Meshes
) -> tuple[tuple[int, ...], tuple[int, ...], torch.Tensor, int, int] | None:
    """(sizes, offsets, local tensor, file position, byte offset) of this rank's box of
    ``obj`` (a plain tensor, or a DTensor of Shard/Replicate placements) when that box is
    exactly one cell of ``rec``'s rule, else None (:func:`_boxes` then plans it):
    :func:`placed_box`'s steps for the two kinds of target that thousands of small tensors
    are (#18). Under ``torch.no_grad()``."""
    if type(obj) is not DTensor:  # a plain tensor or parameter: its whole self, as placed_box
        if is_checkpointable_tensor(obj):
            return None
        shape = obj.shape
        sizes, offsets, local = tuple(shape), (0,) * len(shape), obj
    else:
        local = obj.to_local()  # the local tensor itself: autograd is off
        if type(local) is not torch.Tensor:
            return None  # a subclass may plan itself (__create_chunk_list__)
        mesh = obj.device_mesh
        known = meshes.get(id(mesh))
        if known is None:
            known = meshes[id(mesh)] = (mesh.get_coordinate(), tuple(mesh.shape))
        coordinate, mesh_shape = known
        shape = obj.shape
        if coordinate is None:
            return None
        box = shard_box(shape, mesh_shape, coordinate, obj.placements)
        if box is None:
            return None
        sizes, offsets = tuple(box[0]), tuple(box[1])
    if shape != rec.shape:
        return None
    rule = rec.rule
    assert rule is not None
    cell = rule.cell_of_box(offsets, sizes)
    if cell is None:
        return None
    return (sizes, offsets, local, *rule.place(cell))


def _boxes(obj: torch.Tensor, rec: Tensor, meshes: Meshes) -> list[tuple[tuple[int, ...], tuple[int, ...]]] | None:
    """(offsets, sizes) of each box of ``obj`` that this rank loads; None when it loads
    none (off the DTensor's mesh) or when ``obj`` is not of the saved shape (refused by
    ``check_target``; DCP's planning would say so too)."""
    found = placed_box(obj, meshes)  # the box of a plain (D)Tensor, from public attributes (#18)
    if isinstance(found, str):
        return None  # not on this DTensor's mesh: DCP reads nothing for it
    if found is not None:
        sizes, offsets, _, shape = found
        return [(offsets, sizes)] if shape == rec.shape else None
    if tuple(obj.shape) != rec.shape or (isinstance(obj, DTensor) and obj.device_mesh.get_coordinate() is None):
        return None
    return [(tuple(box.offsets), tuple(box.sizes)) for box in local_chunks(obj)]


def _listing(md: TensorStorageMetadata, saved: list[Chunk]) -> ListedTensorMetadata:
    """``md`` listing ``saved``, its DCP objects built only if DCP plans the key."""
    if isinstance(md, ListedTensorMetadata):
        return md.listing(saved)
    return ListedTensorMetadata(md.properties, md.size, saved)
