"""Incremental saves: find the chunks whose bytes did not change since a base checkpoint.

A save with ``incremental=True`` (or a ``base``) records, for every tensor chunk, the
xxh3-128 digest of the chunk's bytes; before opening any data file it decides which chunks
it need not write (:func:`digest_pass`, with a pre-filter that can only say "changed"). A
chunk is *unchanged* when the base checkpoint holds a chunk of the same key, offsets,
sizes, dtype and global shape, hashed with the same checksum block size, whose recorded
digest is equal: its bytes are not written again, and the new manifest points at the file
(and byte range, and block hashes) that already holds them, in the base's folder or in the
folder the base itself pointed at (references are flattened: a manifest never points at a
reference). Everything else is written as in any save, with its digest recorded, so the new
checkpoint can be the next one's base.

Why a digest match is enough (docs/manager.md, "Incremental checkpoints"): xxh3-128 is a
non-cryptographic 128-bit hash that passes SMHasher; two different chunks collide with
probability about 2**-128 per comparison. Checksums elsewhere in shardckpt guard against
corruption, not against an adversary who chooses tensor values; neither does this.

:class:`BaseIndex` is what a rank knows about its base: built from the base's manifest
(read by every rank when the base is named by path), or from the rank's own results of the
save that committed the base (kept in memory by the Checkpointer, so consecutive saves of
a training run read no manifest). A format-3 base is
:class:`~shardckpt.engine.base_v3.BaseIndexV3`: the digests and block hashes are in its
index records, read in :meth:`BaseIndex.prefetch` for the rank's own boxes, and a reused
chunk's :class:`ChunkLocation` carries its base file (:class:`BaseFile`), from which the
coordinator builds the new file table's base groups (docs/format.md 12.7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.planner import WriteItem
from torch.distributed.checkpoint.storage import WriteResult

from shardckpt.format import datafile
from shardckpt.format.file_table import FileGroup
from shardckpt.format.integrity import digest_hex, hash_hex
from shardckpt.format.manifest import ChunkRecord, FileRecord, Manifest

ChunkKey = tuple[str, tuple[int, ...], tuple[int, ...]]  # (key, offsets, sizes)


def folder_name(location: str) -> str:
    """The last component of a storage location (``file:///runs/a/step_1`` -> ``step_1``)."""
    return location.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class BaseFile:
    """A data file of a format-3 base's group (format.md 12.3), as a format-3 save that
    reuses a chunk in it names it: the group (its ``checkpoint``: the folder beside the new
    checkpoint that holds the files), the rank that wrote the file and its number, the
    file's size and the size of that rank's index record (checked before the commit)."""

    group: FileGroup
    rank: int
    number: int
    size: int
    index_size: int

    @property
    def key(self) -> tuple[str, int, int]:
        assert self.group.checkpoint is not None
        return self.group.checkpoint, self.rank, self.number


@dataclass(frozen=True)
class ChunkLocation:
    """Where a chunk's bytes are, with their checksums: what a rank reports for each chunk
    it saved (written now, or reused from a base)."""

    file: str
    byte_offset: int
    byte_length: int
    block_hashes: tuple[str, ...]
    file_record: FileRecord  # its ``checkpoint`` names the base folder for a reused chunk
    digest: str | None = None
    in_base: BaseFile | None = None  # a chunk reused from a format-3 base: the file's group


@dataclass(frozen=True)
class BaseChunk:
    dtype: str
    shape: tuple[int, ...]
    location: ChunkLocation


class BaseIndex:
    """The chunks of one committed checkpoint that a later save may point at instead of
    writing them again. Immutable once built (a format-3 base,
    :class:`~shardckpt.engine.base_v3.BaseIndexV3`, fills itself in :meth:`prefetch`)."""

    def __init__(self, folder: str, hash_block_bytes: int, chunks: dict[ChunkKey, BaseChunk]) -> None:
        self.folder = folder  # the base checkpoint's folder name, beside the new one
        self.hash_block_bytes = hash_block_bytes
        self._chunks = chunks

    def __len__(self) -> int:
        return len(self._chunks)

    def prefetch(self, items: list[WriteItem]) -> None:
        """Called by :func:`digest_pass` with the rank's tensor items before any
        :meth:`candidate`: read what is needed to answer for them. Nothing here (a format-1/2
        base is read whole from its manifest)."""

    @classmethod
    def from_manifest(cls, m: Manifest, folder: str) -> BaseIndex:
        """Every chunk of ``m`` (the manifest of the checkpoint in ``folder``) that has a digest."""
        chunks: dict[ChunkKey, BaseChunk] = {}
        for key, t in m.tensors.items():
            for c in t.chunks:
                if c.digest is not None:
                    record = m.files[c.file]
                    chunks[(key, c.offsets, c.sizes)] = BaseChunk(t.dtype, t.shape, _relocated(c, record, folder))
        return cls(folder, m.hash_block_bytes, chunks)

    @classmethod
    def from_results(
        cls, folder: str, hash_block_bytes: int, saved: Iterable[tuple[WriteItem, ChunkLocation]]
    ) -> BaseIndex:
        """A rank's own chunks of the save that committed ``folder``, as it reported them."""
        chunks: dict[ChunkKey, BaseChunk] = {}
        for item, loc in saved:
            assert item.tensor_data is not None and item.index.offset is not None and loc.digest is not None
            dtype = datafile.dtype_name(item.tensor_data.properties.dtype, key=item.index.fqn)
            record = loc.file_record
            if record.checkpoint is None:
                loc = dataclasses.replace(loc, file_record=dataclasses.replace(record, checkpoint=folder))
            key = (item.index.fqn, tuple(item.index.offset), tuple(item.tensor_data.chunk.sizes))
            chunks[key] = BaseChunk(dtype, tuple(item.tensor_data.size), loc)
        return cls(folder, hash_block_bytes, chunks)

    def candidate(self, item: WriteItem, hash_block_bytes: int) -> ChunkLocation | None:
        """The base's chunk with this item's key, offsets, sizes, dtype and global shape,
        hashed with the same block size (so its block hashes describe the new checkpoint's
        blocks too), or None: then nothing in the base can hold this chunk's bytes."""
        assert item.tensor_data is not None and item.index.offset is not None
        if hash_block_bytes != self.hash_block_bytes:
            return None
        saved = self._chunks.get((item.index.fqn, tuple(item.index.offset), tuple(item.tensor_data.chunk.sizes)))
        if saved is None or saved.shape != tuple(item.tensor_data.size):
            return None
        if saved.dtype != datafile.dtype_name(item.tensor_data.properties.dtype, key=item.index.fqn):
            return None
        return saved.location


def _relocated(c: ChunkRecord, record: FileRecord, folder: str) -> ChunkLocation:
    """Chunk ``c`` of the checkpoint in ``folder`` as seen from a sibling: a file of the
    base's own is in ``folder``; one the base itself referenced stays where it is."""
    if record.checkpoint is None:
        record = dataclasses.replace(record, checkpoint=folder)
    return ChunkLocation(c.file, c.byte_offset, c.byte_length, c.block_hashes, record, c.digest)


@dataclass
class Prepass:
    """What the digest pass decided for one rank's tensor items."""

    reused: list[WriteResult]  # chunks found unchanged in the base: nothing to write
    to_write: list[WriteItem]
    digests: dict[Any, str]  # MetadataIndex -> digest of items to write that were hashed whole here
    held: dict[Any, torch.Tensor]  # MetadataIndex -> the resolved CPU bytes to write

    def resolve(self, item: WriteItem) -> torch.Tensor:
        """The tensor the digest pass resolved for ``item`` (each item is written once)."""
        return self.held.pop(item.index)


def digest_pass(
    items: list[WriteItem],
    resolve: Callable[[WriteItem], Any],
    release: Callable[[WriteItem], None] | None,
    *,
    base: BaseIndex | None,
    hash_block_bytes: int,
    threads: int,
    to_bytes: Callable[[torch.Tensor, WriteItem], tuple[torch.Tensor, memoryview]],
) -> Prepass:
    """Split a rank's tensor items into chunks the base already holds and chunks to write,
    before any data file is opened (``threads`` at a time; xxhash releases the GIL).

    Per item: no base chunk of the same key, box, dtype and shape -> write (nothing hashed
    here). Else, for a chunk longer than one checksum block, a pre-filter: the xxh3-64 of
    its first block against the base's first block hash; different -> the bytes differ for
    certain -> write. Only when
    it is equal is the whole chunk's xxh3-128 digest computed here, and the chunk reused iff
    it equals the base's. So the decision to skip rests on the full digest, and a save where
    everything changed hashes one block per chunk here; the digests of the chunks it writes
    are computed while they are written (:func:`shardckpt.engine.datawrite.write_file`),
    overlapped with the I/O. ``to_bytes(tensor, item)`` gives a contiguous CPU tensor and a
    byte view of it; an item to write keeps that tensor (no second copy when the writer
    gets to it), an unchanged one is released at once."""
    out = Prepass([], [], {}, {})
    if base is not None:
        base.prefetch(items)

    def one(item: WriteItem) -> tuple[WriteItem, torch.Tensor, ChunkLocation | None, str | None]:
        tensor, data = to_bytes(resolve(item), item)
        saved = base.candidate(item, hash_block_bytes) if base is not None else None
        if saved is None or saved.digest is None:
            return item, tensor, None, None
        if len(data) > hash_block_bytes and hash_hex(data[:hash_block_bytes]) != saved.block_hashes[0]:
            return item, tensor, None, None  # the first block differs: changed
        digest = digest_hex(data)  # (a chunk of one block costs the same to digest as to pre-filter)
        return item, tensor, (saved if digest == saved.digest else None), digest

    with ThreadPoolExecutor(max(1, min(threads, len(items))), thread_name_prefix="shardckpt-digest") as pool:
        for item, tensor, loc, digest in pool.map(one, items):
            if loc is None:
                out.to_write.append(item)
                if digest is not None:
                    out.digests[item.index] = digest
                out.held[item.index] = tensor
                continue
            out.reused.append(WriteResult(index=item.index, size_in_bytes=0, storage_data=loc))
            if release is not None:
                release(item)
    return out
