"""Device -> host copies for async saves, into buffers allocated once and reused.

:class:`Stager` keeps one host buffer per key (pinned when the source lives on a
GPU). Staging a state copies every tensor into its buffer (plain tensors whole,
DTensors their local shard) and freezes non-tensor values through their JSON form, so
training may mutate everything the moment staging returns. Buffers are reused by the
next save when the key's shape and dtype are unchanged; the caller must not stage
again while a save still reads the buffers (``async_save`` waits for it first).

Memory cost: one host copy of the rank's shard, kept between saves.

Hosts that cannot afford that copy use :class:`BoundedSource` instead
(``async_save(..., max_staging_bytes=B)``): the background writer streams the live
tensors to storage while the caller waits, and as soon as the bytes still to be written
fit in ``B`` they are copied into a reused ``B``-byte arena and the caller is released.
The caller then waits for the time it takes to write all but the last ``B`` bytes;
``B`` = the shard size gives the plain async save, ``B`` = 0 a synchronous one.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType
from torch.distributed.tensor import DTensor

from shardckpt.engine._torch_private import create_write_items
from shardckpt.errors import UnsupportedValueError
from shardckpt.format.values import decode_value, encode_value


@dataclass
class StagedShard:
    """A DTensor's local shard, staged on the host, that DCP's planner can still plan.

    DCP asks objects with ``__create_write_items__`` for their write items; we answer
    with the items computed from the original DTensor, and the planner resolves the
    data to ``local`` (see :class:`shardckpt.engine.planner.SavePlanner`).
    """

    write_items: list[WriteItem]
    local: torch.Tensor

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return self.write_items


@dataclass
class Stager:
    """Reusable host buffers, one per flattened key. Not thread-safe: one save at a time."""

    pin_memory: bool = field(default_factory=lambda: torch.cuda.is_available())
    _buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    _items: dict[str, tuple[Any, list[WriteItem]]] = field(default_factory=dict)
    allocations: int = 0  # how many buffers were (re)allocated, for tests and benchmarks

    _arena: torch.Tensor | None = None

    @property
    def staged_bytes(self) -> int:
        """Host memory held for staging now (per-key buffers, or the bounded arena)."""
        arena = 0 if self._arena is None else self._arena.numel()
        return arena + sum(b.numel() * b.element_size() for b in self._buffers.values())

    def stage(self, flat: dict[str, Any]) -> dict[str, Any]:
        """Copy of ``flat`` (a flattened state_dict) whose tensors live in our buffers."""
        staged: dict[str, Any] = {}
        synchronize = False
        for fqn, obj in flat.items():
            if isinstance(obj, DTensor):
                items = self._write_items(fqn, obj)
                local = obj.to_local()
                staged[fqn] = StagedShard(items, self._copy(fqn, local))
                synchronize |= local.is_cuda
            elif isinstance(obj, torch.Tensor):
                staged[fqn] = self._copy(fqn, obj)
                synchronize |= obj.is_cuda
            else:
                staged[fqn] = _frozen(obj, fqn)
        if synchronize:
            torch.cuda.synchronize()
        for fqn in set(self._buffers) - set(flat):
            del self._buffers[fqn]  # keys that left the state: free their memory
            self._items.pop(fqn, None)
        self._arena = None  # a full copy is staged: the bounded mode's arena is not needed
        return staged

    def stage_live(self, flat: dict[str, Any]) -> dict[str, Any]:
        """Like :meth:`stage`, but tensors are left in place (DTensors wrapped with their
        write items): for :class:`BoundedSource`, which copies only the tail. Frees the
        per-key buffers, since a bounded save is chosen where they do not fit."""
        self._buffers.clear()
        live: dict[str, Any] = {}
        for fqn, obj in flat.items():
            if isinstance(obj, DTensor):
                live[fqn] = StagedShard(self._write_items(fqn, obj), obj.to_local().detach())
            elif isinstance(obj, torch.Tensor):
                live[fqn] = obj.detach()
            else:
                live[fqn] = _frozen(obj, fqn)
        self._items = {k: v for k, v in self._items.items() if k in flat}
        return live

    def arena(self, nbytes: int, pin_memory: bool) -> torch.Tensor:
        """A reused host byte buffer of at least ``nbytes`` (grown, never shrunk, while
        the budget stays the same)."""
        if self._arena is None or self._arena.numel() < nbytes or self._arena.is_pinned() != pin_memory:
            self._arena = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin_memory)
            self.allocations += 1
        return self._arena

    def _write_items(self, fqn: str, obj: DTensor) -> list[WriteItem]:
        """DCP's write items for a DTensor's local shard, computed once per layout: they
        depend only on the key, global shape, dtype, mesh and placements, and computing
        them for every tensor of a large model costs tens of ms per save."""
        if obj.device_mesh.get_coordinate() is None:
            return []
        layout = (tuple(obj.shape), obj.dtype, id(obj.device_mesh), tuple(obj.placements), obj.requires_grad)
        cached = self._items.get(fqn)
        if cached is None or cached[0] != layout:
            cached = (layout, create_write_items(fqn, obj))
            self._items[fqn] = cached
        return cached[1]

    def _copy(self, fqn: str, src: torch.Tensor) -> torch.Tensor:
        src = src.detach()
        buf = self._buffers.get(fqn)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=self.pin_memory and src.is_cuda)
            self._buffers[fqn] = buf
            self.allocations += 1
        buf.copy_(src, non_blocking=src.is_cuda and buf.is_pinned())
        return buf


def _frozen(value: Any, fqn: str) -> Any:
    """A deep, immutable-by-construction copy: the value as it will be loaded back."""
    encoded = encode_value(value, key=fqn)
    try:
        json.dumps(encoded, allow_nan=False)
    except (TypeError, ValueError) as e:  # pragma: no cover - encode_value already refuses these
        raise UnsupportedValueError(f"key {fqn!r}: {e}") from e
    return decode_value(encoded)


_ALIGN = 64  # arena slices start on 64-byte boundaries, so every dtype can view them


def tensor_bytes(flat: dict[str, Any]) -> int:
    """Bytes of every tensor (a DTensor's local shard) in a flattened state."""
    total = 0
    for obj in flat.values():
        t = obj.to_local() if isinstance(obj, DTensor) else obj
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


class BoundedSource:
    """Hands the writer its tensors for a save staged under a byte budget.

    Thread-safe: the writer's I/O threads call :meth:`resolve` and :meth:`written`
    concurrently. While more than ``budget_bytes`` remain unwritten, ``resolve`` gives
    the live tensor (the caller is blocked, so it cannot change). Once what remains fits,
    every remaining item is copied into the arena; :attr:`released` is set when those
    copies are done and no live tensor is still being written, so the caller may go on.
    Call order: :meth:`expect` (the rank's final plan), then ``resolve``/``written`` per
    item; :meth:`release` unconditionally when the save ends, failed or not.
    """

    def __init__(self, budget_bytes: int, arena: Callable[[int, bool], torch.Tensor]) -> None:
        """``arena(nbytes, pin_memory)`` returns a reused host byte buffer (``Stager.arena``)."""
        self.budget_bytes = budget_bytes
        self.released = threading.Event()
        self.live_bytes = 0  # written straight from the caller's tensors
        self.staged_bytes = 0  # copied into the arena (the tail)
        self._arena = arena
        self._lock = threading.Lock()
        self._pending: dict[MetadataIndex, WriteItem] = {}
        self._pending_bytes = 0
        self._lookup: Callable[[WriteItem], torch.Tensor] | None = None
        self._staged: dict[MetadataIndex, torch.Tensor] = {}
        self._in_flight: set[MetadataIndex] = set()
        self._tail_staged = False

    def expect(self, items: list[WriteItem], lookup: Callable[[WriteItem], torch.Tensor]) -> None:
        """The items this rank will write, and how to find each one's live tensor."""
        with self._lock:
            self._lookup = lookup
            self._pending = {it.index: it for it in items if it.type != WriteItemType.BYTE_IO}
            self._pending_bytes = sum(item_bytes(it) for it in self._pending.values())
            self._advance()

    def resolve(self, item: WriteItem, live: torch.Tensor) -> torch.Tensor:
        with self._lock:
            staged = self._staged.pop(item.index, None)
            if staged is not None:
                return staged
            if self._pending.pop(item.index, None) is not None:
                self._pending_bytes -= item_bytes(item)
            self._in_flight.add(item.index)
            self.live_bytes += item_bytes(item)
            self._advance()
            return live

    def written(self, item: WriteItem) -> None:
        with self._lock:
            self._in_flight.discard(item.index)
            self._advance()

    def release(self) -> None:
        self.released.set()

    def _advance(self) -> None:
        if not self._tail_staged and self._lookup is not None and self._pending_bytes <= self.budget_bytes:
            self._stage_tail()
        if self._tail_staged and not self._in_flight:
            self.released.set()

    def _stage_tail(self) -> None:
        assert self._lookup is not None
        tail = list(self._pending.values())
        sizes = [-(-item_bytes(it) // _ALIGN) * _ALIGN for it in tail]
        sources = [self._lookup(it) for it in tail]
        pin = any(s.is_cuda for s in sources) and torch.cuda.is_available()
        arena = self._arena(sum(sizes), pin) if tail else None
        offset, synchronize = 0, False
        for it, size, src in zip(tail, sizes, sources, strict=True):
            assert arena is not None
            n = src.numel() * src.element_size()
            dst = arena[offset : offset + n].view(src.dtype).view(src.shape)
            dst.copy_(src, non_blocking=src.is_cuda and pin)
            synchronize |= src.is_cuda
            self._staged[it.index] = dst
            offset += size
        if synchronize:
            torch.cuda.synchronize()
        self.staged_bytes = self._pending_bytes
        self._pending.clear()
        self._pending_bytes = 0
        self._tail_staged = True


def item_bytes(item: WriteItem) -> int:
    """Bytes this item writes: its chunk's, not the whole tensor's (DCP's
    ``WriteItem.tensor_storage_size()`` is the whole tensor's, for every shard)."""
    if item.tensor_data is None:
        return 0
    # dtype.itemsize is public since torch 2.1 (we used a private element-size helper before).
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize
