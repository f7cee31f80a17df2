"""A rank's read items, with the target boxes computed here for the common targets (issue #18).

DCP's local load plan (``create_default_local_load_plan``) asks every target for its
boxes (``DTensor.__create_chunk_list__``: DTensor's general sharding code, about 25 us a
DTensor) and then runs its resharding sweep per key, even when the target box is exactly
one saved chunk: together most of a same-layout load of thousands of small tensors.
:func:`local_read_items` gives the same items, in the same order:

- the box of a plain DTensor whose placements are all exactly ``Shard`` or ``Replicate``
  comes from public attributes (:func:`~shardckpt.engine.local_items.shard_box`, as the
  save side computes it), of a plain tensor from its shape;
- when that box is exactly one saved chunk (a resume in the layout it was saved in), the
  one read item is built here, the chunk found in the manifest's record
  (:class:`ListedTensorMetadata`, whose DCP chunk list is then never built); otherwise
  DCP's public resharding step (``create_read_items_for_chunk_list``) maps the box onto
  the saved chunks;
- everything else (values, ShardedTensors, DTensor subclasses or other placements,
  tensors of another shape, DCP's error cases) goes to ``create_default_local_load_plan``.

``tests/unit/test_load_items.py`` compares the two over many layouts (uneven and empty
shards, 2-D and sub meshes, off-mesh ranks, resharding 4 -> 3, another dtype).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.tensor import DTensor

from shardckpt.engine._torch_private import is_checkpointable_tensor, whole_chunk_item
from shardckpt.engine.local_items import shard_box
from shardckpt.format import datafile
from shardckpt.format.manifest import TensorRecord

__all__ = ["ListedTensorMetadata", "PlannedItem", "WholeChunk", "local_read_items", "placed_box", "target_box"]

OFF_MESH = "off mesh"
""":func:`target_box` of a DTensor on a mesh this rank is not part of (DCP reads nothing for it)."""

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class SavedBox(Protocol):
    """A saved chunk's box: a format-1/2 ``ChunkRecord`` or a format-3 ``Chunk``."""

    @property
    def offsets(self) -> tuple[int, ...]: ...

    @property
    def sizes(self) -> tuple[int, ...]: ...


class ListedTensorMetadata(TensorStorageMetadata):
    """DCP's metadata of a tensor of a format-1 or -2 manifest, which lists its chunks
    (``saved``, the manifest's records) and its global ``shape`` (a tuple). DCP's objects
    are built when first read: ``chunks`` (two ``torch.Size`` and one
    ``ChunkStorageMetadata`` a chunk), and, for one made by :meth:`of_record`,
    ``properties`` and ``size``. A same-layout load finds its chunks in ``saved`` and
    its shape in ``shape``, and builds none of them (issue #18); DCP's planners, and
    anything else, read them as they would a plain ``TensorStorageMetadata``'s. Not
    thread-safe until each was read once."""

    def __init__(self, properties: TensorProperties, size: torch.Size, saved: Sequence[SavedBox]) -> None:
        self._properties: TensorProperties | None = properties
        self._size: torch.Size | None = size
        self._dtype, self._key = "", ""
        self.shape: tuple[int, ...] = tuple(size)
        self.saved = saved
        self._chunks: list[ChunkStorageMetadata] | None = None

    @classmethod
    def of_record(cls, key: str, record: TensorRecord) -> ListedTensorMetadata:
        """The metadata of the manifest's tensor ``key`` (``record``), built lazily."""
        return cls.lazy(key, record.dtype, record.shape, record.chunks)

    @classmethod
    def lazy(cls, key: str, dtype: str, shape: tuple[int, ...], saved: Sequence[SavedBox]) -> ListedTensorMetadata:
        """The metadata of the saved tensor ``key`` of safetensors dtype ``dtype`` (checked
        when ``properties`` is first read) and ``shape``, listing ``saved``, built lazily."""
        md = cls.__new__(cls)
        md._properties, md._size, md._dtype, md._key = None, None, dtype, key
        md.shape, md.saved, md._chunks = shape, saved, None
        return md

    def listing(self, saved: Sequence[SavedBox]) -> ListedTensorMetadata:
        """This metadata listing ``saved`` instead (a format-3 load lists, per rank, the
        chunks its boxes overlap); DCP's objects already built are shared, not rebuilt."""
        md = ListedTensorMetadata.__new__(ListedTensorMetadata)
        md._properties, md._size, md._dtype, md._key = self._properties, self._size, self._dtype, self._key
        md.shape, md.saved, md._chunks = self.shape, saved, None
        return md

    @property
    def properties(self) -> TensorProperties:
        if self._properties is None:
            self._properties = TensorProperties(dtype=datafile.torch_dtype(self._dtype, where=self._key))
        return self._properties

    @properties.setter
    def properties(self, value: TensorProperties) -> None:
        self._properties = value

    @property
    def size(self) -> torch.Size:
        if self._size is None:
            self._size = torch.Size(self.shape)
        return self._size

    @size.setter
    def size(self, value: torch.Size) -> None:
        self._size, self.shape = value, tuple(value)

    @property
    def chunks(self) -> list[ChunkStorageMetadata]:
        if self._chunks is None:
            self._chunks = [
                ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in self.saved
            ]
        return self._chunks

    @chunks.setter
    def chunks(self, value: list[ChunkStorageMetadata]) -> None:
        self._chunks = value


Meshes = dict[int, tuple[Sequence[int] | None, tuple[int, ...]]]
"""id(mesh) -> (this rank's coordinate, the mesh's shape), filled as meshes are met: one
look-up of each per mesh and call (``DeviceMesh.shape`` alone is 5-9 us a call; #18)."""

# (sizes, offsets) of the box of the global tensor that this rank fills, the local tensor
# holding it, and the global tensor's shape (``obj.shape``, 1.4 us a DTensor: read once)
PlacedBox = tuple[tuple[int, ...], tuple[int, ...], torch.Tensor, torch.Size]


def placed_box(obj: Any, meshes: Meshes) -> PlacedBox | str | None:
    """The box of the global tensor that this rank fills of ``obj``, as tuples, the local
    tensor that holds it, and ``obj.shape``: a plain tensor's whole self; a plain DTensor of
    Shard/Replicate placements, its shard (``to_local()``: call under ``torch.no_grad()``,
    where it is the local tensor itself, not a view through autograd; a tenth of the cost).
    :data:`OFF_MESH` when this rank is not on the DTensor's mesh; None for DCP to ask
    ``obj`` (anything else)."""
    kind = type(obj)
    if kind in _PLAIN_TENSORS and not is_checkpointable_tensor(obj):
        shape = obj.shape
        return tuple(shape), (0,) * len(shape), obj, shape
    if kind is not DTensor:
        return None
    local = obj.to_local()  # the local tensor itself, if the caller turned autograd off
    if hasattr(local, "__create_chunk_list__") or hasattr(local, "__get_tensor_shard__"):
        return None  # a local tensor that plans itself
    mesh = obj.device_mesh
    known = meshes.get(id(mesh))
    if known is None:
        known = meshes[id(mesh)] = (mesh.get_coordinate(), tuple(mesh.shape))
    coordinate, mesh_shape = known
    if coordinate is None:
        return OFF_MESH
    shape = obj.shape
    box = shard_box(shape, mesh_shape, coordinate, obj.placements)
    if box is None:
        return None
    return tuple(box[0]), tuple(box[1]), local, shape


def target_box(obj: Any, meshes: Meshes) -> tuple[ChunkStorageMetadata, torch.Tensor] | str | None:
    """:func:`placed_box` with the box as DCP's ``ChunkStorageMetadata``."""
    found = placed_box(obj, meshes)
    if found is None or isinstance(found, str):
        return found
    sizes, offsets, local, _ = found
    return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)), local


class _Seen:
    """What one :func:`local_read_items` call keeps from key to key (not thread-safe; one
    call's): each mesh's coordinate and shape (:data:`Meshes`), each rank's box origin
    (``torch.Size`` zeros by ndim, shared by the items) and where the last key's chunk sat
    in its saved list (the chunk of the next key is most often at the same place), and
    where the whole chunks go (``whole`` of :func:`local_read_items`)."""

    __slots__ = ("chunk_index", "meshes", "whole", "zeros")

    def __init__(self) -> None:
        self.meshes: Meshes = {}
        self.zeros: dict[int, torch.Size] = {}
        self.chunk_index = 0
        self.whole: list[WholeChunk] | None = None  # local_read_items's ``whole``

    def find(self, chunks: Sequence[SavedBox | ChunkStorageMetadata], offsets: Any, sizes: Any) -> int:
        """The index of the chunk of ``chunks`` that is exactly the box (``sizes`` at
        ``offsets``, tuples or ``torch.Size``), or -1; looked for first where the last
        key's was, which it then remembers."""
        index = self.chunk_index
        if index < len(chunks) and chunks[index].offsets == offsets and chunks[index].sizes == sizes:
            return index
        index = next((i for i, c in enumerate(chunks) if c.offsets == offsets and c.sizes == sizes), -1)
        if index >= 0:
            self.chunk_index = index
        return index

    def origin(self, ndim: int) -> torch.Size:
        found = self.zeros.get(ndim)
        if found is None:
            found = self.zeros[ndim] = torch.Size((0,) * ndim)
        return found


WholeChunk = tuple[str, Any, torch.Tensor]
"""A key whose target box is exactly one saved chunk of a format-1 or -2 manifest: the key,
that chunk (the manifest's ``ChunkRecord``) and the local tensor it fills whole. What
:func:`local_read_items` hands the reader instead of a ReadItem when asked (a same-layout
load of thousands of small tensors spent more on each ReadItem, and on finding its chunk
and its target again, than on reading the tensor; #18)."""

PlannedItem = tuple[ReadItem | None, torch.Tensor]
"""The one read item of a key whose target box is exactly one saved chunk, and the local
tensor it fills: planned before :func:`local_read_items` (a format-3 load finds the chunk
of each box while listing its chunks, ``plan_v3.needed_metadata``). No item (None): the
reader reads that chunk whole into the tensor itself (``plan_v3.RulePlanner.cells``)."""


@torch.no_grad()  # for target_box's to_local()
def local_read_items(
    flat: dict[str, Any],
    metadata: Metadata,
    targets: dict[str, torch.Tensor] | None = None,
    planned: Mapping[str, PlannedItem] | None = None,
    whole: list[WholeChunk] | None = None,
) -> list[ReadItem]:
    """The items of DCP's ``create_default_local_load_plan(flat, metadata, strict=False)``,
    in its order (see the module docstring). ``targets``: filled with the local tensor of
    each key planned here, the tensor DCP's ``resolve_tensor`` would find for its items.
    ``planned``: keys already planned (:data:`PlannedItem`), taken as they are.
    ``whole``: None, or a list that takes, in place of its ReadItem, each key of a format-1
    or -2 manifest (listed chunks, :class:`ListedTensorMetadata` as ``manifest_to_metadata``
    builds it) whose target box is exactly one saved chunk (:data:`WholeChunk`); the caller
    then reads those itself (``reader.read_runs``).
    Not collective; the keys of ``metadata`` the state lacks are skipped, as DCP skips them."""
    saved = metadata.state_dict_metadata
    seen = _Seen()
    seen.whole = whole
    ours: dict[str, list[ReadItem]] = {}
    rest: dict[str, Any] = {}
    planned = planned or {}
    for fqn, obj in flat.items():
        md = saved.get(fqn)
        if md is None:
            continue
        known = planned.get(fqn)
        if known is not None:
            item = known[0]
            ours[fqn] = [] if item is None else [item]
            if targets is not None and item is not None:
                targets[fqn] = known[1]
            continue
        if type(obj) is DTensor and type(md) is ListedTensorMetadata and md._chunks is None:
            items = _listed_dtensor_items(fqn, obj, md, seen, targets)  # the common case, inline (#18)
        else:
            items = _tensor_items(fqn, obj, md, seen, targets)
        if items is None:
            rest[fqn] = obj  # DCP plans it (and raises its own errors)
        else:
            ours[fqn] = items
    if not rest:
        return [item for items in ours.values() for item in items]
    theirs: dict[str, list[ReadItem]] = {}
    for item in create_default_local_load_plan(rest, metadata, False).items:
        theirs.setdefault(item.dest_index.fqn, []).append(item)
    return [item for fqn in flat for item in (ours[fqn] if fqn in ours else theirs.get(fqn, ()))]


def _tensor_items(
    fqn: str, obj: Any, md: Any, seen: _Seen, targets: dict[str, torch.Tensor] | None
) -> list[ReadItem] | None:
    """The read items of the saved ``fqn`` (``md``) for the target ``obj``, or None for DCP to
    plan them: :func:`placed_box`'s box mapped onto the saved chunks (``targets``: see
    :func:`local_read_items`)."""
    if not isinstance(md, TensorStorageMetadata):
        return None
    found = placed_box(obj, seen.meshes)
    if found is None or _saved_shape(md) != (obj.shape if isinstance(found, str) else found[3]):
        return None
    if isinstance(found, str):  # OFF_MESH
        return []
    sizes, offsets, local, _ = found
    if (
        seen.whole is not None
        and isinstance(md, ListedTensorMetadata)
        and md._chunks is None
        and _whole_chunk(fqn, md.saved, sizes, offsets, local, seen)
    ):
        return []
    if targets is not None:
        targets[fqn] = local
    return _items_for_box(fqn, md, torch.Size(sizes), torch.Size(offsets), seen)


def _listed_dtensor_items(
    fqn: str, obj: DTensor, md: ListedTensorMetadata, seen: _Seen, targets: dict[str, torch.Tensor] | None
) -> list[ReadItem] | None:
    """:func:`_tensor_items` of a DTensor whose saved chunks are the manifest's records,
    with :func:`placed_box`'s steps inline: thousands of small DTensors spent more in the
    calls and conversions between those functions than in their work (#18)."""
    local = obj.to_local()  # the local tensor itself: the caller turned autograd off
    if hasattr(local, "__create_chunk_list__") or hasattr(local, "__get_tensor_shard__"):
        return None  # a local tensor that plans itself
    shape = obj.shape
    if shape != md.shape:
        return None
    mesh = obj.device_mesh
    known = seen.meshes.get(id(mesh))
    if known is None:
        known = seen.meshes[id(mesh)] = (mesh.get_coordinate(), tuple(mesh.shape))
    coordinate, mesh_shape = known
    if coordinate is None:
        return []  # OFF_MESH
    box = shard_box(shape, mesh_shape, coordinate, obj.placements)
    if box is None:
        return None
    if seen.whole is not None and _whole_chunk(fqn, md.saved, box[0], box[1], local, seen):
        return []
    if targets is not None:
        targets[fqn] = local
    return _items_for_box(fqn, md, torch.Size(box[0]), torch.Size(box[1]), seen)


def _whole_chunk(
    fqn: str, saved: Sequence[SavedBox], sizes: Any, offsets: Any, local: torch.Tensor, seen: _Seen
) -> bool:
    """Whether the box (``sizes`` at ``offsets``, sequences of ints) is exactly one saved
    chunk of the listed ``saved``; if so, it went to ``seen.whole`` with ``local``. The
    chunk is looked for as :meth:`_Seen.find` does. An empty box is not (it reads
    nothing; DCP's path plans no item for it), nor one that ``local`` does not have the
    shape of (a DTensor built from a local tensor that its placements do not describe:
    DCP's path narrows and then fails on it)."""
    assert seen.whole is not None
    sizes, offsets = tuple(sizes), tuple(offsets)
    if 0 in sizes or local.shape != sizes:
        return False
    index = seen.find(saved, offsets, sizes)
    if index < 0:
        return False
    seen.whole.append((fqn, saved[index], local))
    return True


def _saved_shape(md: TensorStorageMetadata) -> tuple[int, ...]:
    """The global shape of a saved tensor, without building its ``torch.Size`` when listed."""
    return md.shape if isinstance(md, ListedTensorMetadata) else md.size


def _items_for_box(
    fqn: str, md: TensorStorageMetadata, sizes: torch.Size, offsets: torch.Size, seen: _Seen
) -> list[ReadItem]:
    """DCP's read items for one target box (``sizes`` at ``offsets``): built here when a
    saved chunk is exactly the box (saved chunks are disjoint, so no other one overlaps
    it; an empty box reads nothing, as DCP's overlap test finds), else DCP's resharding
    step. The chunk is looked for first where the last key's was (``seen``)."""
    if 0 in sizes:
        return []
    chunks: Sequence[SavedBox | ChunkStorageMetadata] = (
        md.saved if isinstance(md, ListedTensorMetadata) and md._chunks is None else md.chunks
    )
    index = seen.find(chunks, offsets, sizes)
    if index < 0:
        return create_read_items_for_chunk_list(fqn, md, [ChunkStorageMetadata(offsets=offsets, sizes=sizes)])
    return [whole_chunk_item(fqn, offsets, sizes, index, seen.origin(len(sizes)))]
