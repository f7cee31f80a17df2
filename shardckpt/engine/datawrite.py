"""Writing one rank's tensors into safetensors data files, hashed while written.

:func:`split_by_bytes` spreads a rank's chunks over its writer threads; :func:`write_file`
streams one thread's chunks into one file (header first, then each chunk block by block:
its checksum blocks, the whole-file hash and, for incremental saves, its digest computed on
the way) and makes it durable. Small chunks are gathered into one buffer and written a few
MiB at a time (:class:`_Batch`); the bytes on disk are the same. Used by :class:`shardckpt.engine.writer.Writer`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.checkpoint.storage import WriteResult

from shardckpt.engine.incremental import ChunkLocation
from shardckpt.engine.staging import item_bytes
from shardckpt.errors import UnsupportedValueError
from shardckpt.format import datafile, integrity
from shardckpt.format.manifest import FileRecord
from shardckpt.storage import Storage, WriteStream

BATCH_BYTES = 4 * 2**20
"""Chunks of at most :data:`SMALL_CHUNK_BYTES` are copied into a buffer of this size and
written (and added to the file hash) once per buffer: thousands of small tensors cost a
few writes instead of one write, one hash update and one GIL hand-off each (issue #18)."""
SMALL_CHUNK_BYTES = 1 * 2**20
_NUMPY_DTYPES = frozenset(
    {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8}
    | {torch.bool}
)
"""dtypes whose tensors ``Tensor.numpy()`` exposes directly (bfloat16 and float8 it cannot)."""


class _Cancelled(Exception):
    """A writer thread stopped because the save was interrupted or failed elsewhere."""


class _Batch:
    """Consecutive small pieces of one file gathered into one buffer. ``flush`` writes what
    it holds and adds it to the file hash, so the file's bytes and hash are those of
    writing each piece in turn. Not thread-safe: one per :func:`write_file` call.
    ``buffer``: :data:`BATCH_BYTES` or more to gather into (kept by the caller for the
    next file: fresh memory is slow on first touch), else a new one."""

    def __init__(self, stream: WriteStream, file_hasher: Any, buffer: bytearray | None = None) -> None:
        self._stream, self.file_hasher = stream, file_hasher
        self._view = memoryview(buffer if buffer is not None and len(buffer) >= BATCH_BYTES else bytearray(BATCH_BYTES))
        self._used = 0

    def add(self, data: memoryview) -> None:
        """Copy ``data`` in (the caller may reuse its memory at once), writing first when
        it would not fit; a piece larger than the buffer is written straight through."""
        n, used = len(data), self._used
        if used + n > BATCH_BYTES:
            self.flush()
            used = 0
        if n > BATCH_BYTES:
            self.file_hasher.update(data)
            self._stream.write(data)
            return
        self._view[used : used + n] = data
        self._used = used + n

    def flush(self) -> None:
        if self._used:
            piece = self._view[: self._used]
            self.file_hasher.update(piece)
            self._stream.write(piece)
            self._used = 0


def _hash_blocks(data: memoryview, block_bytes: int, digester: Any) -> tuple[str, ...]:
    """The block hashes of one chunk (and its digest, when ``digester`` is given)."""
    if digester is not None:
        digester.update(data)
    if 0 < len(data) <= block_bytes:  # one block, the common case: no list of slices
        return (integrity.hash_hex(data),)
    return tuple(integrity.block_hashes(data, block_bytes))


def _write_blocks(
    stream: WriteStream,
    data: memoryview,
    block_bytes: int,
    file_hasher: Any,
    digester: Any,
    cancel: threading.Event | None,
    name: str,
) -> tuple[str, ...]:
    """Write one large chunk block by block, hashing each block on the way; stops at the
    next block once ``cancel`` is set."""
    hashes = []
    for i in range(0, len(data), block_bytes):
        if cancel is not None and cancel.is_set():
            raise _Cancelled(f"write of {name} cancelled")
        piece = data[i : i + block_bytes]
        hashes.append(integrity.hash_hex(piece))
        file_hasher.update(piece)
        if digester is not None:
            digester.update(piece)
        stream.write(piece)
    return tuple(hashes)


@dataclass(frozen=True)
class WrittenFile:
    """One data file :func:`write_file` wrote: its record and, per item (in file order),
    where its bytes are, their block hashes and (incremental saves) digest. Columns, not
    one object per chunk: formats 1 and 2 send them on as they are (write_results.pack)."""

    name: str
    record: FileRecord
    items: list[WriteItem]
    byte_offsets: list[int]  # absolute, in the file
    byte_lengths: list[int]
    block_hashes: list[tuple[str, ...]]
    digests: list[str | None]

    def results(self) -> list[WriteResult]:
        """One WriteResult per item (format 3's index record and the next incremental
        save's base take them one by one)."""
        return [
            WriteResult(index=it.index, size_in_bytes=n, storage_data=ChunkLocation(self.name, o, n, h, self.record, d))
            for it, o, n, h, d in zip(
                self.items, self.byte_offsets, self.byte_lengths, self.block_hashes, self.digests, strict=True
            )
        ]


def split_by_bytes(items: list[WriteItem], n: int) -> list[list[WriteItem]]:
    """Up to ``n`` non-empty buckets of roughly equal byte counts (largest item first)."""
    buckets: list[list[WriteItem]] = [[] for _ in range(min(n, len(items)))]
    sizes = [0] * len(buckets)
    measured = [(item_bytes(it), it) for it in items]  # once per item, not once per use
    measured.sort(key=lambda pair: -pair[0])  # stable: equal sizes keep the plan's order
    for size, it in measured:
        k = sizes.index(min(sizes))
        buckets[k].append(it)
        sizes[k] += size
    return [b for b in buckets if b]


def _entry_name(item: WriteItem) -> str:
    """Name inside the safetensors header: the key for a whole tensor, ``key@o1,o2`` for a
    chunk. Keys containing ``@`` (or named ``__metadata__``) always get the suffix, so the
    last ``@`` unambiguously separates key and offsets and no two entries collide."""
    assert item.index.offset is not None and item.tensor_data is not None
    fqn = item.index.fqn
    whole = not any(item.index.offset) and tuple(item.tensor_data.chunk.sizes) == tuple(item.tensor_data.size)
    if whole and "@" not in fqn and fqn != "__metadata__":
        return fqn
    return f"{fqn}@{','.join(map(str, item.index.offset))}"


def tensor_and_bytes(tensor: torch.Tensor, item: WriteItem) -> tuple[torch.Tensor, memoryview]:
    """``tensor`` as a contiguous CPU tensor (a copy only if it is not one) and its bytes."""
    assert item.tensor_data is not None
    # detach() releases the GIL, a hand-off per chunk between the writer threads (#18):
    # only a tensor that requires grad needs it (numpy() refuses those).
    t = tensor.detach() if tensor.requires_grad else tensor
    planned = item.tensor_data.chunk.sizes
    if t.shape != planned and tuple(t.shape) != tuple(planned):
        raise UnsupportedValueError(
            f"key {item.index.fqn!r}: planned chunk shape {tuple(item.tensor_data.chunk.sizes)} "
            f"but resolved tensor has shape {tuple(t.shape)}"
        )
    if not t.is_cpu:
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype in _NUMPY_DTYPES and t.numel():
        # numpy's buffer, cast to bytes: a third of the torch calls of the general path
        # below, per chunk of thousands (issue #18); the same bytes in the same order.
        return t, memoryview(t.numpy()).cast("B")  # type: ignore[arg-type]
    return t, memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def write_file(
    storage: Storage,
    name: str,
    items: list[WriteItem],
    resolve: Any,
    *,
    release: Callable[[WriteItem], None] | None = None,
    rank: int,
    block_bytes: int,
    metadata: dict[str, str],
    cancel: threading.Event | None = None,
    digests: dict[Any, str] | None = None,
    buffer: bytearray | None = None,
    direct: bool = False,
) -> WrittenFile:
    """Stream ``items`` into one safetensors file; return where each item's bytes are.

    Runs on a writer thread; ``resolve(item)`` gives the tensor and ``release(item)``, if
    given, is told when its bytes have been written (not yet durable). The header is built
    from the plan before any data, then each tensor is hashed block by block as it is
    written, and the file is fsynced (finish) before this returns. ``cancel``, when set
    by another thread, stops the write at the next block (the partial file is removed).
    ``digests`` (incremental saves): each item's digest from the digest pass, recorded.
    ``buffer``: where small chunks are gathered (see :class:`_Batch`); its contents are
    overwritten, and it is not used once this returns.
    ``direct``: through :meth:`Storage.open_write_direct` (``IOOptions.direct_writes``).
    """
    columns = _header_columns(items)
    header = datafile.build_header_columns(columns, metadata)
    file_hasher = integrity.new_file_hasher()
    stream = storage.open_write_direct(name) if direct else storage.open_write(name)
    try:
        batch = _Batch(stream, file_hasher, buffer)
        batch.add(memoryview(header))
        hashes, found = _write_chunks(stream, batch, items, resolve, release, block_bytes, cancel, name, digests)
        batch.flush()
        stream.finish()
    except BaseException:
        stream.abort()
        raise
    at = len(header)
    return WrittenFile(
        name,
        FileRecord(size=at + (columns.ends[-1] if items else 0), hash=file_hasher.hexdigest(), rank=rank),
        items,
        [at + b for b in columns.begins],
        [e - b for b, e in zip(columns.begins, columns.ends, strict=True)],
        hashes,
        found,
    )


def _header_columns(items: list[WriteItem]) -> datafile.HeaderColumns:
    """The header's entries of ``items``, laid end to end in their order."""
    dtypes: dict[torch.dtype, tuple[str, int]] = {}  # name and item size, looked up once per dtype
    names, dtype_names, shapes, ends, end = [], [], [], [], 0
    for it in items:
        assert it.tensor_data is not None
        dtype = dtypes.get(it.tensor_data.properties.dtype)
        if dtype is None:
            known = datafile.dtype_name(it.tensor_data.properties.dtype, key=it.index.fqn)
            dtype = dtypes[it.tensor_data.properties.dtype] = (known, datafile.itemsize(known))
        sizes = tuple(it.tensor_data.chunk.sizes)
        end += math.prod(sizes) * dtype[1]
        names.append(_entry_name(it))
        dtype_names.append(dtype[0])
        shapes.append(sizes)
        ends.append(end)
    return datafile.HeaderColumns(names, dtype_names, shapes, [0, *ends[:-1]] if ends else [], ends)


def _write_chunks(
    stream: WriteStream,
    batch: _Batch,
    items: list[WriteItem],
    resolve: Any,
    release: Callable[[WriteItem], None] | None,
    block_bytes: int,
    cancel: threading.Event | None,
    name: str,
    digests: dict[Any, str] | None,
) -> tuple[list[tuple[str, ...]], list[str | None]]:
    """Each item's bytes written (small ones through ``batch``); their block hashes and digests."""
    hash_hex, small = integrity.hash_hex, min(SMALL_CHUNK_BYTES, block_bytes)
    hashed: list[tuple[str, ...]] = []
    found: list[str | None] = []
    for it in items:
        if cancel is not None and cancel.is_set():
            raise _Cancelled(f"write of {name} cancelled")
        data = tensor_and_bytes(resolve(it), it)[1]
        if digests is None and 0 < len(data) <= small:  # the common case of many small chunks
            hashed.append((hash_hex(data),))
            found.append(None)
            batch.add(data)
        else:
            hashes, digest = _write_chunk(stream, batch, data, it, block_bytes, cancel, name, digests)
            hashed.append(hashes)
            found.append(digest)
        del data
        if release is not None:
            release(it)
    return hashed, found


def _write_chunk(
    stream: WriteStream,
    batch: _Batch,
    data: memoryview,
    item: WriteItem,
    block_bytes: int,
    cancel: threading.Event | None,
    name: str,
    digests: dict[Any, str] | None,
) -> tuple[tuple[str, ...], str | None]:
    """One chunk's bytes written, with its digest: a digest the digest pass did not compute
    (incremental saves) is computed here, piece by piece, while the other writer threads wait on I/O."""
    digester = integrity.new_digester() if digests is not None and item.index not in digests else None
    if len(data) <= SMALL_CHUNK_BYTES:
        hashes = _hash_blocks(data, block_bytes, digester)
        batch.add(data)
    else:
        batch.flush()
        hashes = _write_blocks(stream, data, block_bytes, batch.file_hasher, digester, cancel, name)
    if digester is not None:
        return hashes, digester.hexdigest()
    return hashes, None if digests is None else digests[item.index]
