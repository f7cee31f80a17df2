"""One rank's flat state as one contiguous byte image, and back into the caller's tensors.

Staging copies every tensor (plain tensors whole, DTensors their local shard) of the
flattened state (:func:`shardckpt.engine.state.flatten_with_mappings`, exactly what an
async save stages) straight into its place in a safetensors image held in the
:class:`~shardckpt.engine.staging.Stager`'s reused arena; that copy is the whole stall of
a local save, and the image is what is written to ``local_dir`` and sent to partners, so
no second copy is made. JSON values travel in the image's header
(:mod:`shardckpt.format.local_step`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from shardckpt.engine.staging import Stager
from shardckpt.engine.state import PlainState, container_at, flatten_with_mappings
from shardckpt.errors import UnsupportedValueError
from shardckpt.format import datafile, local_step
from shardckpt.format.local_step import ImageContents
from shardckpt.format.values import decode_value, encode_value


def stage_image(
    stager: Stager, state_dict: dict[str, Any], *, step: int, rank: int, world_size: int, tier: str, save_id: str
) -> torch.Tensor:
    """The image of ``state_dict`` (a uint8 view of ``stager``'s arena, valid until the
    next call), marked with the durable root's ``tier`` id and the local save's
    ``save_id``. The caller may change its tensors once this returns."""
    flat, _ = flatten_with_mappings(PlainState.of(state_dict).tree)
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    for key, obj in flat.items():
        local = obj.to_local() if isinstance(obj, DTensor) else obj
        if isinstance(local, torch.Tensor):
            tensors[key] = local.detach()
        else:
            values[key] = encode_value(obj, key=key)
    shapes = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    layout = local_step.plan_image(
        shapes, values, step=step, rank=rank, world_size=world_size, tier=tier, save_id=save_id
    )
    on_gpu = any(t.is_cuda for t in tensors.values())
    image = stager.arena(layout.total_bytes, on_gpu and torch.cuda.is_available())[: layout.total_bytes]
    head = len(layout.header)
    image[:head].copy_(torch.frombuffer(bytearray(layout.header), dtype=torch.uint8))
    for key, entry in layout.entries.items():
        src = tensors[key]
        if entry.end > entry.begin:
            dst = image[head + entry.begin : head + entry.end].view(src.dtype).view(src.shape)
            dst.copy_(src, non_blocking=src.is_cuda and image.is_pinned())
    if on_gpu:
        torch.cuda.synchronize()
    return image


def target_problem(contents: ImageContents, plain: PlainState) -> str | None:
    """Why the image cannot be loaded in place into ``plain`` (the caller's state as
    :meth:`PlainState.of` gives it, made once on every rank, since a sharded module's
    ``state_dict()`` is collective): other keys, another local shard shape or dtype, or
    None. The first difference is named."""
    flat, _ = flatten_with_mappings(plain.tree)
    saved = set(contents.entries) | set(contents.values)
    missing, extra = sorted(set(flat) - saved), sorted(saved - set(flat))
    if missing or extra:
        return f"keys differ (in the state only: {missing[:5]}, in the local step only: {extra[:5]})"
    for key, entry in contents.entries.items():
        obj = flat[key]
        local = obj.to_local() if isinstance(obj, DTensor) else obj
        if not isinstance(local, torch.Tensor):
            return f"key {key!r} is a tensor in the local step and a {type(obj).__name__} in the state"
        if _dtype_name(local) != entry.dtype or tuple(local.shape) != entry.shape:
            return (
                f"key {key!r}: local shard {tuple(local.shape)} {local.dtype} here, {entry.shape} {entry.dtype} saved"
            )
    return None


def load_image(image: torch.Tensor, contents: ImageContents, plain: PlainState) -> None:
    """Copy the image into the caller's state in place (call :func:`target_problem`
    first): tensors and DTensor local shards by ``copy_``, values replaced, Statefuls
    handed back (collective for sharded modules: every rank calls it)."""
    flat, mappings = flatten_with_mappings(plain.tree)
    base = contents.data_offset
    with torch.no_grad():
        for key, entry in contents.entries.items():
            obj = flat[key]
            local = obj.to_local() if isinstance(obj, DTensor) else obj
            if entry.end > entry.begin:
                local.copy_(image[base + entry.begin : base + entry.end].view(local.dtype).view(local.shape))
    for key, encoded in contents.values.items():
        path = mappings[key]
        container_at(plain.tree, path)[path[-1]] = decode_value(encoded)
    plain.hand_back()


def _dtype_name(t: torch.Tensor) -> str | None:
    try:
        return datafile.dtype_name(t.dtype, key="")
    except UnsupportedValueError:
        return None
