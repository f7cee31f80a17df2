"""What keeps a state_dict from being filled from a checkpoint's manifest, key by key, and
the fixes that :func:`~shardckpt.engine.loading.check_target` names (no I/O; any rank)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from shardckpt.engine.state import describe
from shardckpt.format import datafile
from shardckpt.format.manifest import Manifest
from shardckpt.format.manifest_v3 import ManifestV3


def mismatch_fixes(*, castable: bool, allow_dtype_cast: bool) -> list[str]:
    """The fixes of tensors of another shape or dtype; ``castable``: some differ in a floating dtype only."""
    fixes = []
    if castable and not allow_dtype_cast:
        fixes.append(
            "Pass allow_dtype_cast=True to convert floating tensors saved in another floating dtype "
            "as they are read (the rounding of target.copy_(saved); integer and bool tensors must match)."
        )
    if allow_dtype_cast:
        fixes.append("allow_dtype_cast=True converts only between floating dtypes, and never changes a shape.")
    fixes.append(
        "Build the target with the saved shapes and dtypes (the same model configuration, e.g. "
        "model.to(dtype) before loading) and convert it after loading; `shardckpt inspect` lists what was saved."
    )
    return fixes


class Mismatch(NamedTuple):
    """Why a target value cannot be filled from a saved key: ``text`` for the message;
    ``castable`` when only the dtype differs, both floating (``allow_dtype_cast`` accepts it)."""

    text: str
    castable: bool = False


def wrong_kinds(manifest: Manifest | ManifestV3, flat: dict[str, Any]) -> dict[str, Mismatch]:
    """:func:`wrong_kind` of every key of ``flat`` that has one. A tensor of the saved shape
    and dtype is passed over here, each dtype name looked up once (#18: thousands of keys)."""
    tensors = manifest.tensors
    dtypes: dict[str, torch.dtype] = {}
    found = {}
    for key, value in flat.items():
        rec = tensors.get(key)
        if rec is not None and isinstance(value, torch.Tensor):
            dtype = dtypes.get(rec.dtype)
            if dtype is None:
                dtype = dtypes[rec.dtype] = datafile.torch_dtype(rec.dtype, where=key)
            if value.shape == rec.shape and value.dtype == dtype:
                continue
        kind = wrong_kind(manifest, key, value)
        if kind is not None:
            found[key] = kind
    return found


def wrong_kind(manifest: Manifest | ManifestV3, key: str, value: Any) -> Mismatch | None:
    """What keeps ``value`` from being filled from the saved ``key``, or None."""
    rec = manifest.tensors.get(key)
    if rec is not None:
        dtype = datafile.torch_dtype(rec.dtype, where=key)
        if not isinstance(value, torch.Tensor):
            return Mismatch(f"{key!r}: saved as a tensor, the state_dict holds {describe(value)}")
        same_shape = value.shape == rec.shape  # torch.Size equals the tuple of its sizes
        if not same_shape or value.dtype != dtype:
            text = (
                f"{key!r}: saved shape {list(rec.shape)} dtype {str(dtype).removeprefix('torch.')}, "
                f"the state_dict holds {describe(value)}"
            )
            return Mismatch(text, castable=same_shape and dtype.is_floating_point and value.dtype.is_floating_point)
    elif key in manifest.values and isinstance(value, torch.Tensor):
        return Mismatch(f"{key!r}: saved as a non-tensor value, the state_dict holds {describe(value)}")
    return None


def fresh_optimizer_hint(flat: dict[str, Any], unexpected: list[str]) -> list[str]:
    """The fix when the target holds a fresh optimizer's ``state_dict()`` (param_groups,
    but no state before the first step) where the checkpoint has optimizer state."""
    prefixes = {k.split(".param_groups.", 1)[0] for k in flat if ".param_groups." in k}
    fresh = sorted(
        p
        for p in prefixes
        if not any(k.startswith(f"{p}.state.") for k in flat) and any(u.startswith(f"{p}.state.") for u in unexpected)
    )
    if not fresh:
        return []
    return [
        f"{fresh[0]!r} looks like the state_dict() of an optimizer that has not taken a step yet (it has no "
        "state to load into): put the optimizer itself in the state_dict, with its model, e.g. "
        "{'model': model, 'optim': optim}, and load fills both in place."
    ]
