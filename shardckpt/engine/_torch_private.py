"""The one boundary between shardckpt and torch's private (underscore) API (issue #14).

Every private torch name shardckpt depends on is imported here and nowhere else
(``tests/unit/test_torch_private.py`` walks the package's source and fails otherwise), and
each is re-exported through a thin wrapper whose docstring says what we use it for, the
torch it was checked against and what breaks if it changes. The same test module checks
each one's behaviour on the installed torch, so an upgrade that changes one fails there,
naming it, rather than somewhere deep in a save.

Besides imports, :class:`shardckpt.engine.planner.SavePlanner` overrides two private hooks of
DCP's ``DefaultSavePlanner`` (:data:`SAVE_PLANNER_HOOKS`). Overriding cannot fail at
import time, so the planner checks at run time that DCP called them
(:func:`hook_skipped_error`).

Also here: :func:`is_checkpointable_tensor`, a public DCP name that only some torch
releases have (2.14 added it) and whose presence changes how DCP plans a plain tensor.

Checked against torch 2.13 and 2.14 (``TESTED_TORCH``; ``.ci/torch_compat`` runs the
private-surface tests on 2.14); pyproject allows ``torch>=2.13,<2.15``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as _dcp_public
from torch.distributed.checkpoint._nested_dict import (
    flatten_state_dict as _dcp_flatten_state_dict,
)
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem, WriteItem
from torch.distributed.checkpoint.planner_helpers import (
    _create_chunk_list as _dcp_create_chunk_list,
)
from torch.distributed.checkpoint.planner_helpers import (
    _create_write_items as _dcp_create_write_items,
)

from shardckpt.errors import ShardckptError

__all__ = [
    "SAVE_PLANNER_HOOKS",
    "TESTED_TORCH",
    "create_write_items",
    "flatten_state_dict",
    "hook_skipped_error",
    "is_checkpointable_tensor",
    "local_chunks",
]

TESTED_TORCH = "2.13 and 2.14"

# DefaultSavePlanner's private methods that SavePlanner overrides, with what they carry.
# DCP 2.13 and 2.14: create_global_plan() -> self._create_global_plan() -> self._dedup_save_plans();
# our _create_global_plan calls _dedup_save_plans itself, so only the first is DCP's call.
SAVE_PLANNER_HOOKS: dict[str, str] = {
    "_create_global_plan": "the cross-rank checks (values and tensors agree across ranks, manifest size, "
    "shards tile each tensor) and our global-plan validation",
    "_dedup_save_plans": "the balanced placement of replicated items (balance_replicated)",
}


def flatten_state_dict(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[Any, ...]]]:
    """DCP's flattening: ``({"a.b.0": leaf}, {"a.b.0": ("a", "b", 0)})``.

    Private: ``torch.distributed.checkpoint._nested_dict.flatten_state_dict`` (checked on
    torch 2.13 and 2.14). We use it so the keys we stage, check and record in the manifest are
    exactly the keys DCP's planners (which call the same function) plan with. We rely on:
    dict keys joined with ``.``, list indices as ints in the path, a ``ValueError``
    whose text contains ``"duplicated flatten key"`` on a collision, and recursion (so
    deep nesting raises ``RecursionError``). If any of these changes, async staging keys
    diverge from the planner's and collisions/too-deep states lose their clear errors.
    """
    return _dcp_flatten_state_dict(state_dict)


def create_write_items(fqn: str, obj: Any) -> list[WriteItem]:
    """DCP's write items for one state_dict entry (for a DTensor: its local shard's
    chunk, offsets and the global shape).

    Private: ``torch.distributed.checkpoint.planner_helpers._create_write_items``
    (checked on torch 2.13 and 2.14). Async staging computes a DTensor's items with it before the
    DTensor is replaced by a host copy, so the planner later plans the copy exactly as
    it would have planned the DTensor. We read ``index`` (fqn, offset), ``type`` and
    ``tensor_data`` (``chunk.offsets``/``chunk.sizes``, ``properties.dtype``, ``size``).
    If it changes, staged async saves of DTensors plan wrong or fail.
    """
    return _dcp_create_write_items(fqn, obj)


def local_chunks(obj: Any) -> list[ChunkStorageMetadata]:
    """The boxes of the global tensor that this rank holds of ``obj`` (a tensor: the whole
    of it; a DTensor: its local shard's offsets and sizes), as DCP's load planner computes them.

    Private: ``torch.distributed.checkpoint.planner_helpers._create_chunk_list`` (checked on
    torch 2.13 and 2.14). The format-3 load planner (``engine/plan_v3.py``) asks the manifest's
    rules only for these boxes, so it must see exactly the boxes DCP's planner then reads
    into. We read ``offsets`` and ``sizes``. If it changes, format-3 loads of DTensors plan
    from the wrong boxes and fail (a read item without a chunk) or fill the wrong rows.
    """
    return list(_dcp_create_chunk_list(obj))


# DCP's CheckpointableTensor protocol (public, torch >= 2.14); None on a torch without it.
_CHECKPOINTABLE_TENSOR: type | None = getattr(_dcp_public, "CheckpointableTensor", None)


def is_checkpointable_tensor(obj: Any) -> bool:
    """Whether the installed DCP plans ``obj`` as shards of a larger global tensor through
    its CheckpointableTensor protocol: a plain tensor that carries ``global_shape``,
    ``global_offsets``, ``local_offsets`` and ``local_sizes``.

    Public but version-dependent: ``torch.distributed.checkpoint.CheckpointableTensor``
    (torch 2.14; a ``runtime_checkable`` Protocol, tested as DCP's own private
    ``_is_checkpointable_tensor`` tests it). Always False on torch 2.13, whose DCP plans
    such a tensor as a plain one. shardckpt does not support the protocol (async staging
    copies plain tensors without those attributes, so DCP would plan the copy as one
    replicated tensor and keep a single rank's shard): save and load refuse such tensors
    (``savable.tensor_problem``). If DCP's test changes, they are saved wrong or refused
    wrongly; ``tests/unit/test_torch_private.py`` checks it agrees with DCP's planning.
    """
    return (
        _CHECKPOINTABLE_TENSOR is not None and isinstance(obj, torch.Tensor) and isinstance(obj, _CHECKPOINTABLE_TENSOR)
    )


def hook_skipped_error(hook: str, torch_version: str) -> ShardckptError:
    """The error for a save in which DCP did not call our override of ``hook``
    (one of :data:`SAVE_PLANNER_HOOKS`): saving on would silently skip what it carries."""
    return ShardckptError(
        f"torch {torch_version}'s DCP no longer calls DefaultSavePlanner.{hook} on the coordinator; "
        f"shardckpt's {SAVE_PLANNER_HOOKS[hook]} would be skipped, so the save was refused. "
        f"Pin torch to a tested version (shardckpt was tested with torch {TESTED_TORCH}) "
        "or upgrade shardckpt."
    )


_new, _set = object.__new__, object.__setattr__
_TENSOR = LoadItemType.TENSOR  # an Enum member's look-up is a class attribute's, 0.2 us


def whole_chunk_item(fqn: str, offsets: torch.Size, sizes: torch.Size, index: int, origin: torch.Size) -> ReadItem:
    """The ReadItem of DCP's resharding step for a target box that is exactly the saved
    chunk number ``index`` of ``fqn`` (``origin``: zeros, one per dimension), equal to
    DCP's in every field, hints included. Built by filling the instances' ``__dict__``:
    DCP's frozen dataclasses set each field through ``object.__setattr__`` and convert
    ``offset`` to a ``torch.Size`` again, 6 us an item where this is 2 (#18); each
    ``__dict__`` is given whole, a fresh dict literal (one step, not a keyword update).

    Private in kind though every name is public: it relies on ``ReadItem`` and
    ``MetadataIndex`` being dataclasses without slots whose fields are exactly these
    (checked against torch 2.13 and 2.14). If DCP's classes gain slots or fields, the
    comparisons with DCP's own items in ``tests/unit/test_torch_private.py``,
    ``test_load_items.py`` and ``test_load_plan_fast.py`` fail."""
    dest, storage, item = _new(MetadataIndex), _new(MetadataIndex), _new(ReadItem)
    _set(dest, "__dict__", {"fqn": fqn, "offset": offsets, "index": 0})
    _set(storage, "__dict__", {"fqn": fqn, "offset": offsets, "index": index})
    _set(
        item,
        "__dict__",
        {
            "type": _TENSOR,
            "dest_index": dest,
            "dest_offsets": origin,
            "storage_index": storage,
            "storage_offsets": origin,
            "lengths": sizes,
        },
    )
    return item
