"""What a checkpoint can hold: the checks of a state_dict's keys and tensors before a save
writes a byte (:func:`check_savable`) and before a load fills a target (:func:`tensor_problem`).

They refuse, by type and with the key and the fix, what a checkpoint cannot hold or a
reader would refuse (sparse, nested and meta tensors, unsupported dtypes, shapes past the
readers' limits, keys UTF-8 cannot encode), before DCP's own failures, which name no key
and read as a dead peer. Split from :mod:`.state` (what enters and leaves a state_dict).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch.distributed.tensor import DTensor

from shardckpt.engine._torch_private import is_checkpointable_tensor
from shardckpt.errors import ManifestError, UnsupportedValueError
from shardckpt.format import datafile
from shardckpt.format.values import check_str


class SavedLayouts(Protocol):
    """What an earlier save of the same owner checked (:class:`~shardckpt.engine.local_items.ItemCache`)."""

    def __contains__(self, fqn: object) -> bool:
        """Whether key ``fqn`` passed every check of :func:`check_savable` then."""
        ...

    def unchanged(self, fqn: str, value: Any, local: torch.Tensor | None) -> bool:
        """Whether ``value`` has the dtype and shape it was checked with then."""
        ...


def check_savable(
    flat: dict[str, Any], locals_: dict[str, torch.Tensor] | None = None, layouts: SavedLayouts | None = None
) -> None:
    """Raise UnsupportedValueError, naming the key, what was found, the limit and the
    fix, for the first (sorted) leaf of the flattened ``flat`` that save cannot store
    in a way load accepts: a key UTF-8 cannot encode, or a tensor that is sparse,
    nested or meta, of an unsupported dtype, or whose shape the reader refuses
    (more than ``datafile.MAX_NDIM`` dimensions, a dimension too large).

    Non-tensor values are checked when encoded (``values.encode_value``). ``locals_``: the
    DTensors' local tensors by key, when the caller has them (saves a ``to_local()`` each;
    a DTensor's dtype is then read from its local tensor, whose bytes are the ones written).
    A shape (and whether a type is a ShardedTensor) is checked once per call: a model's
    thousands of tensors have a few distinct ones (issue #18); a shape that fails is never
    marked checked, so the error still names the first key (sorted) that has it.
    ``layouts``: an earlier save's checks; a key it checked skips the key check, and a
    DTensor it finds unchanged the dtype and shape checks (the tensor checks always run).
    """
    known = locals_ or {}
    shapes_ok: set[tuple[int, ...]] = set()
    sharded: dict[type, bool] = {}
    for fqn in sorted(flat):
        seen = layouts is not None and fqn in layouts
        if not seen:
            check_str(fqn, key=fqn, what="the key")
        value = flat[fqn]
        if not isinstance(value, torch.Tensor):
            continue
        local = known.get(fqn)
        problem = tensor_problem(value, loading=False, local=local)
        if problem is not None:
            raise UnsupportedValueError(f"key {fqn!r}: {problem}")
        if seen and layouts is not None and layouts.unchanged(fqn, value, local):
            continue
        is_sharded = sharded.get(type(value))
        if is_sharded is None:
            is_sharded = sharded[type(value)] = _is_sharded_tensor(value)
        if is_sharded:
            continue  # its shards were checked; DCP flattens it into chunks with the global metadata
        datafile.dtype_name(value.dtype if local is None else local.dtype, key=fqn)
        shape = tuple(value.shape)
        if shape not in shapes_ok:
            check_tensor_shape(shape, key=fqn)
            shapes_ok.add(shape)


def check_tensor_shape(shape: tuple[int, ...], *, key: str) -> None:
    """Refuse a (global) shape that the manifest and data-file readers would refuse,
    using their own check (``datafile.check_shape``) so both sides share one limit."""
    if len(shape) > datafile.MAX_NDIM:
        raise UnsupportedValueError(
            f"key {key!r}: the tensor has {len(shape)} dimensions; a checkpoint holds tensors of at most "
            f"{datafile.MAX_NDIM} dimensions (the limit of shardckpt's reader and safetensors). Reshape it "
            "before saving (e.g. t.reshape(-1)) and back after loading."
        )
    try:
        datafile.check_shape(list(shape), where=f"key {key!r}")
    except ManifestError as e:
        raise UnsupportedValueError(
            f"{e}: the checkpoint reader would refuse this shape, so save refuses it too (every dimension "
            "must be below 2**62). Reshape the tensor or save a smaller one."
        ) from None


_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
"""Types the quick answer of :func:`tensor_problem` takes as they are (no subclass hooks)."""


def _is_sharded_tensor(value: Any) -> bool:
    """A torch.distributed ShardedTensor (recognised by its method: the class is private)."""
    return callable(getattr(type(value), "local_shards", None))


def tensor_problem(tensor: torch.Tensor, *, loading: bool, local: torch.Tensor | None = None) -> str | None:
    """What keeps ``tensor`` from being saved (or, ``loading``, filled from a checkpoint),
    with the fix; None when it is a plain strided tensor with storage.

    Checked before DCP touches it: DCP's own failures for these ("unsupported memory
    format option", "Cannot copy out of meta tensor") carry no key and surface as if
    a peer had died. For a DTensor, its local shard is checked (``local``, when given;
    outside autograd a DTensor's ``to_local()`` costs 2 us, not 14).

    The common case is answered first: a plain tensor, Parameter or DTensor of one, strided,
    with storage, at a fifth of the full checks' cost (``device.type`` alone is 2 us; a save
    or load of thousands of small tensors checks each one, #18).
    """
    if local is None and type(tensor) is DTensor:
        local = tensor.to_local()
    plain = tensor if local is None else local
    if (
        type(plain) in _PLAIN_TYPES
        and not plain.is_nested
        and plain.layout == torch.strided
        and not plain.is_meta
        and not is_checkpointable_tensor(tensor)
        and not is_checkpointable_tensor(plain)
    ):
        return None
    if _is_sharded_tensor(tensor):
        # FSDP1's sharded state dicts: the object itself answers no attribute queries
        # (its __torch_function__ refuses them); its local shards are plain tensors.
        shards = tensor.local_shards()  # type: ignore[attr-defined]
        problems = (tensor_problem(shard.tensor, loading=loading) for shard in shards)
        return next((p for p in problems if p is not None), None)
    if is_checkpointable_tensor(tensor):
        return (
            "a tensor carrying DCP's CheckpointableTensor attributes (global_shape, global_offsets, "
            "local_offsets, local_sizes; torch 2.14), which shardckpt does not support. "
            + (
                "Load into a DTensor (DTensor.from_local) or a full tensor instead."
                if loading
                else "Save the shard as a DTensor (DTensor.from_local) instead, or delete those attributes "
                "to save it as a plain tensor."
            )
        )
    if local is None:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    if local.is_nested:
        return "a nested (jagged) tensor, which a checkpoint cannot hold (it stores strided tensors). " + (
            "Load into a list of its components instead."
            if loading
            else "Save its components instead (e.g. list(t.unbind())) or a padded copy "
            "(torch.nested.to_padded_tensor(t, 0.0))."
        )
    if local.layout != torch.strided:
        return (
            f"a {str(local.layout).removeprefix('torch.')} tensor, but a checkpoint holds dense (strided) tensors. "
            + (
                "Load into a dense tensor (call .to_dense() on the target) and convert it after loading."
                if loading
                else "Call .to_dense() on it before saving (and convert it back after loading)."
            )
        )
    if local.device.type == "meta":
        return "a meta tensor, which has a shape but no data: " + (
            "materialize the tensor before loading into it (e.g. model.to_empty(device='cpu'))."
            if loading
            else "materialize the tensor (e.g. model.to_empty(device=...), then initialize it) "
            "before saving, or leave the key out."
        )
    return None
