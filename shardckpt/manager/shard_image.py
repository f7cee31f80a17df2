"""One rank's flat state as one contiguous byte image, and back into the caller's tensors.

Staging copies every tensor (plain tensors whole, DTensors their local shard) of the
flattened state (:func:`shardckpt.engine.state.flatten_with_mappings`, exactly what an
async save stages) straight into its place in a safetensors image held in the
:class:`~shardckpt.engine.staging.Stager`'s reused arena; that copy is the whole stall of
a local save, and the image is what is written to ``local_dir`` and sent to partners, so
no second copy is made. JSON values travel in the image's header
(:mod:`shardckpt.format.local_step`).

Loading reads the image straight into the caller's tensors: the image's 8 MiB blocks are
spread over several threads, each reading its block's pieces (``pread`` from the file, or a
copy from a received buffer) into their final place and hashing them there, so the bytes
are touched once and verified on the way (:func:`fill_state`). A CPU tensor that is not
contiguous, or a GPU tensor, goes through a host buffer of its own first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from shardckpt.engine.staging import Stager
from shardckpt.engine.state import PlainState, container_at, flatten_with_mappings
from shardckpt.errors import IntegrityError, UnsupportedValueError
from shardckpt.format import datafile, integrity, local_step
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


_CACHE_BYTES = 1 << 20  # read and hash in pieces this large, so the hash reads from the cache

# Fill a uint8 CPU tensor with the image's bytes from an offset (threads call it at once).
Read = Callable[[int, torch.Tensor], None]


@contextmanager
def file_reader(path: str) -> Iterator[Read]:
    """A :data:`Read` of the file ``path`` (``pread``, no mapping: on a RAM disk a mapped
    read faulted every page in and was slower than the copy itself); OSError as raised."""
    fd = os.open(path, os.O_RDONLY)

    def read(offset: int, out: torch.Tensor) -> None:
        view = memoryview(out.numpy())  # type: ignore[arg-type]  # ndarray implements the buffer protocol
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise EOFError(f"{path}: ends at byte {offset + done}, before the image does")
            done += n

    try:
        yield read
    finally:
        os.close(fd)


def buffer_reader(image: torch.Tensor) -> Read:
    """A :data:`Read` of an image in memory (a received copy)."""

    def read(offset: int, out: torch.Tensor) -> None:
        out.copy_(image[offset : offset + out.numel()])

    return read


def copy_verified(read: Read, segments: list[torch.Tensor], expected: str, *, where: str, threads: int) -> None:
    """Fill ``segments`` (uint8 CPU tensors that tile the image in order) through ``read``,
    hashing each block where it lands, on ``threads`` threads; IntegrityError if the
    image's checksum is not ``expected`` (the segments then hold unverified bytes)."""
    blocks: list[list[tuple[int, torch.Tensor]]] = [[]]
    offset = 0
    for seg in segments:
        done = 0
        while done < seg.numel():
            room = local_step.BLOCK_BYTES - (offset + done) % local_step.BLOCK_BYTES
            n = min(room, seg.numel() - done)
            blocks[-1].append((offset + done, seg[done : done + n]))
            done += n
            if n == room:
                blocks.append([])
        offset += seg.numel()
    if not blocks[-1]:
        blocks.pop()

    def one(pieces: list[tuple[int, torch.Tensor]]) -> str:
        h = integrity.new_file_hasher()
        for at, out in pieces:
            for i in range(0, out.numel(), _CACHE_BYTES):  # hashed while still in the CPU's cache
                part = out[i : i + _CACHE_BYTES]
                read(at + i, part)
                h.update(memoryview(part.numpy()))  # type: ignore[arg-type]
        return h.hexdigest()

    with ThreadPoolExecutor(max(1, min(threads, len(blocks))), thread_name_prefix="shardckpt-local-read") as pool:
        got = local_step.image_digest(list(pool.map(one, blocks)))
    if got != expected:
        raise IntegrityError(
            f"{where}: checksum mismatch (expected xxh3 {expected}, computed {got}); the copy is corrupt and "
            "is not used"
        )


def read_verified(read: Read, size: int, expected: str, *, where: str, threads: int) -> torch.Tensor:
    """The whole image, verified (IntegrityError if not), in a new buffer."""
    image = torch.empty(size, dtype=torch.uint8)
    copy_verified(read, [image], expected, where=where, threads=threads)
    return image


def fill_state(
    read: Read, contents: ImageContents, size: int, plain: PlainState, expected: str, *, where: str, threads: int
) -> None:
    """Read the image's tensors straight into ``plain``'s tensors (call :func:`target_problem`
    first), verified on the way: IntegrityError if the image is damaged, and then the
    tensors hold part of it. Values and Statefuls are left to :func:`finish_load`."""
    flat, _ = flatten_with_mappings(plain.tree)
    segments = [torch.empty(contents.data_offset, dtype=torch.uint8)]  # the header, read again
    staged: list[tuple[torch.Tensor, torch.Tensor]] = []  # (bounce buffer, target) where not in place
    with torch.no_grad():
        end = 0
        for key, entry in sorted(contents.entries.items(), key=lambda kv: kv[1].begin):
            if entry.begin != end:
                raise IntegrityError(f"{where}: tensor {key!r} starts at byte {entry.begin}, not {end}: not our image")
            end = entry.end
            obj = flat[key]
            local = obj.to_local() if isinstance(obj, DTensor) else obj
            if entry.end == entry.begin:
                continue
            if local.device.type == "cpu" and local.is_contiguous():
                segments.append(local.view(-1).view(torch.uint8))
            else:
                staged.append((torch.empty(entry.end - entry.begin, dtype=torch.uint8), local))
                segments.append(staged[-1][0])
        if sum(s.numel() for s in segments) != size:
            raise IntegrityError(f"{where}: its tensors do not tile the image of {size} bytes")
        copy_verified(read, segments, expected, where=where, threads=threads)
        for buf, local in staged:
            local.copy_(buf.view(local.dtype).view(local.shape))


def finish_load(contents: ImageContents, plain: PlainState) -> None:
    """After :func:`fill_state` on every rank: values replaced, Statefuls handed back
    (collective for sharded modules: every rank calls it)."""
    _, mappings = flatten_with_mappings(plain.tree)
    for key, encoded in contents.values.items():
        path = mappings[key]
        container_at(plain.tree, path)[path[-1]] = decode_value(encoded)
    plain.hand_back()


def _dtype_name(t: torch.Tensor) -> str | None:
    try:
        return datafile.dtype_name(t.dtype, key="")
    except UnsupportedValueError:
        return None
