"""A rank's write results packed into columns for the trip to the coordinator (formats 1 and 2).

A rank of a save of thousands of small tensors has one ``WriteResult`` per chunk, each a
``MetadataIndex`` and a :class:`~shardckpt.engine.incremental.ChunkLocation`: pickling
them on every rank and unpickling all of them on the coordinator, before its commit can
start, costs about 5 us per chunk each way (issue #18; as columns about 1). :func:`pack`
turns them, or the :class:`~shardckpt.engine.datawrite.WrittenFile` columns, into one
result holding :class:`ChunkColumns` (lists of plain strings, ints and tuples, which pickle
in C); :func:`located` is the coordinator's index of every rank's chunks, packed or not.
Values (and any other result) pass through unchanged. Pure: no I/O, no state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.storage import WriteResult

from shardckpt.engine.datawrite import WrittenFile
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


def pack(results: list[WriteResult], written: Sequence[WrittenFile] = ()) -> list[WriteResult]:
    """``results`` with every chunk (a ChunkLocation outside a format-3 base, and every item
    of the ``written`` files) in one result of :class:`ChunkColumns`, after the others;
    ``results`` unchanged when there is no chunk."""
    loose = [r for r in results if _is_chunk(r)]
    if not loose and not written:
        return results
    locs: list[ChunkLocation] = list(map(attrgetter("storage_data"), loose))
    columns = ChunkColumns(
        fqns=list(map(attrgetter("index.fqn"), loose)),
        offsets=list(map(tuple, map(attrgetter("index.offset"), loose))),
        file_of=[],
        byte_offsets=list(map(attrgetter("byte_offset"), locs)),
        byte_lengths=list(map(attrgetter("byte_length"), locs)),
        block_hashes=list(map(attrgetter("block_hashes"), locs)),
        digests=list(map(attrgetter("digest"), locs)),
        files=[],
        records=[],
    )
    slots: dict[tuple[str, int], int] = {}  # (name, id of its FileRecord) -> index in files/records
    for loc in locs:
        columns.file_of.append(_slot(columns, slots, loc.file, loc.file_record))
    for w in written:
        columns.fqns.extend(map(attrgetter("index.fqn"), w.items))
        columns.offsets.extend(map(tuple, map(attrgetter("index.offset"), w.items)))
        columns.file_of.extend([_slot(columns, slots, w.name, w.record)] * len(w.items))
        columns.byte_offsets.extend(w.byte_offsets)
        columns.byte_lengths.extend(w.byte_lengths)
        columns.block_hashes.extend(w.block_hashes)
        columns.digests.extend(w.digests)
    packed = WriteResult(index=MetadataIndex(PACKED_KEY), size_in_bytes=sum(columns.byte_lengths), storage_data=columns)
    return [*(r for r in results if not _is_chunk(r)), packed]


def _is_chunk(result: WriteResult) -> bool:
    data = result.storage_data
    return type(data) is ChunkLocation and data.in_base is None


def _slot(columns: ChunkColumns, slots: dict[tuple[str, int], int], name: str, record: FileRecord) -> int:
    """The index of (``name``, ``record``) in the columns' files, added if new."""
    key = (name, id(record))
    slot = slots.get(key)
    if slot is None:
        slot = slots[key] = len(columns.files)
        columns.files.append(name)
        columns.records.append(record)
    return slot


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
