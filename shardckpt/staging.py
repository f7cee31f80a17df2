"""Device -> host copies for async saves, into buffers allocated once and reused.

:class:`Stager` keeps one host buffer per key (pinned when the source lives on a
GPU). Staging a state copies every tensor into its buffer (plain tensors whole,
DTensors their local shard) and freezes non-tensor values through their JSON form, so
training may mutate everything the moment staging returns. Buffers are reused by the
next save when the key's shape and dtype are unchanged; the caller must not stage
again while a save still reads the buffers (``async_save`` waits for it first).

Memory cost: one host copy of the rank's shard, kept between saves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.checkpoint.planner_helpers import _create_write_items
from torch.distributed.tensor import DTensor

from shardckpt.errors import UnsupportedValueError
from shardckpt.values import decode_value, encode_value


@dataclass
class StagedShard:
    """A DTensor's local shard, staged on the host, that DCP's planner can still plan.

    DCP asks objects with ``__create_write_items__`` for their write items; we answer
    with the items computed from the original DTensor, and the planner resolves the
    data to ``local`` (see :class:`shardckpt.planner.SavePlanner`).
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

    @property
    def staged_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

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
        return staged

    def _write_items(self, fqn: str, obj: DTensor) -> list[WriteItem]:
        """DCP's write items for a DTensor's local shard, computed once per layout: they
        depend only on the key, global shape, dtype, mesh and placements, and computing
        them for every tensor of a large model costs tens of ms per save."""
        if obj.device_mesh.get_coordinate() is None:
            return []
        layout = (tuple(obj.shape), obj.dtype, id(obj.device_mesh), tuple(obj.placements), obj.requires_grad)
        cached = self._items.get(fqn)
        if cached is None or cached[0] != layout:
            cached = (layout, _create_write_items(fqn, obj))
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
