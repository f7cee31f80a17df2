"""A rank's write results packed into columns for the trip to the coordinator (formats 1 and 2).

A rank of a save of thousands of small tensors has one ``WriteResult`` per chunk, each a
``MetadataIndex`` and a :class:`~shardckpt.engine.incremental.ChunkLocation`: pickling
them on every rank and unpickling all of them on the coordinator, before its commit can
start, costs about 5 and 8 us per chunk (issue #18). :func:`pack` turns them into one
result holding :class:`ChunkColumns` (lists of plain strings, ints and tuples, which pickle
in C); :func:`located` is the coordinator's index of every rank's chunks, packed or not.
Values (and any other result) pass through unchanged. Pure: no I/O, no state.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult

from shardckpt.engine.incremental import ChunkLocation
from shardckpt.format.manifest import FileRecord

PACKED_KEY = "__shardckpt_chunks__"
"""The key of the ``MetadataIndex`` of a packed result (never looked up: one per rank)."""

Row = tuple[str, int, int, tuple[str, ...], "str | None"]
"""A chunk's file, byte offset, byte length, block hashes and digest."""


@dataclass(frozen=True)
class ChunkColumns:
    """One rank's chunks, one list per field, in the order of its results. ``file_of[i]``
    indexes ``files`` and ``records``: one entry per file name and FileRecord object."""

    fqns: list[str]
    offsets: list[tuple[int, ...]]
    file_of: list[int]
    byte_offsets: list[int]
    byte_lengths: list[int]
    block_hashes: list[tuple[str, ...]]
    digests: list[str | None]
    files: list[str]
    records: list[FileRecord]


def pack(results: list[WriteResult]) -> list[WriteResult]:
    """``results`` with every chunk (a ChunkLocation outside a format-3 base) in one result
    of :class:`ChunkColumns`, after the others; unchanged when there is no chunk."""
    chunks = [r for r in results if type(r.storage_data) is ChunkLocation and r.storage_data.in_base is None]
    if not chunks:
        return results
    rest = [r for r in results if not (type(r.storage_data) is ChunkLocation and r.storage_data.in_base is None)]
    locs: list[ChunkLocation] = list(map(attrgetter("storage_data"), chunks))
    slots: dict[tuple[str, int], int] = {}  # (name, id of its FileRecord) -> index in files/records
    files: list[str] = []
    records: list[FileRecord] = []
    file_of = []
    for loc in locs:
        key = (loc.file, id(loc.file_record))
        slot = slots.get(key)
        if slot is None:
            slot = slots[key] = len(files)
            files.append(loc.file)
            records.append(loc.file_record)
        file_of.append(slot)
    columns = ChunkColumns(
        fqns=list(map(attrgetter("index.fqn"), chunks)),
        offsets=list(map(tuple, map(attrgetter("index.offset"), chunks))),
        file_of=file_of,
        byte_offsets=list(map(attrgetter("byte_offset"), locs)),
        byte_lengths=list(map(attrgetter("byte_length"), locs)),
        block_hashes=list(map(attrgetter("block_hashes"), locs)),
        digests=list(map(attrgetter("digest"), locs)),
        files=files,
        records=records,
    )
    total = sum(columns.byte_lengths)
    return [*rest, WriteResult(index=MetadataIndex(PACKED_KEY), size_in_bytes=total, storage_data=columns)]


def located(results: list[list[WriteResult]]) -> tuple[dict[tuple[str, Any], Any], list[tuple[str, FileRecord]]]:
    """Coordinator: every rank's results by ``(key, chunk offsets)`` (offsets None for a
    value): a chunk's :data:`Row`, any other result's ``storage_data``; and each distinct
    (file name, FileRecord) pair the chunks name."""
    found: dict[tuple[str, Any], Any] = {}
    files: list[tuple[str, FileRecord]] = []
    for per_rank in results:
        for wr in per_rank:
            data = wr.storage_data
            if isinstance(data, ChunkColumns):
                names = list(map(data.files.__getitem__, data.file_of))
                rows = zip(names, data.byte_offsets, data.byte_lengths, data.block_hashes, data.digests, strict=True)
                found.update(zip(zip(data.fqns, data.offsets, strict=True), rows, strict=True))
                files += zip(data.files, data.records, strict=True)
            elif isinstance(data, ChunkLocation):
                row = (data.file, data.byte_offset, data.byte_length, data.block_hashes, data.digest)
                found[wr.index.fqn, wr.index.offset] = row
                files.append((data.file, data.file_record))
            else:
                found[wr.index.fqn, wr.index.offset] = data
    return found, files
