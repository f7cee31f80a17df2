"""What a state_dict may hold, and how Stateful objects enter and leave it.

Like DCP, only top-level values are treated as Stateful (objects with both
``state_dict()`` and ``load_state_dict()``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.stateful import Stateful


def to_plain_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Shallow copy with every top-level Stateful replaced by its ``state_dict()``."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state_dict.items()}


def apply_loaded_stateful(state_dict: dict[str, Any], plain: dict[str, Any]) -> None:
    """After a load filled ``plain``, hand each Stateful its part back and copy
    top-level plain values (which the load replaced in ``plain``) into ``state_dict``."""
    for k, v in state_dict.items():
        if isinstance(v, Stateful):
            v.load_state_dict(plain[k])
        elif plain[k] is not v:
            state_dict[k] = plain[k]


def flatten_with_mappings(plain: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """DCP's flattening: ``{"a.b.0": leaf}`` and the mapping back to each leaf's path."""
    try:
        return flatten_state_dict(plain)
    except ValueError as e:
        if "duplicated flatten key" not in str(e):
            raise
        from shardckpt.planner import flatten_collision

        raise flatten_collision(e) from e


def flat_keys(plain: dict[str, Any]) -> dict[str, Any]:
    """Flattened view (``a.b.0``) of a state_dict, exactly as DCP's planners key it."""
    flat, _ = flatten_state_dict(plain)
    return flat


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {list(value.shape)} and dtype {str(value.dtype).removeprefix('torch.')}"
    return f"a {type(value).__name__} value"
