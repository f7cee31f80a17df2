"""Format 3, every rank's side of the write (docs/format.md 12.4, 12.7 step 1): after its data
files are durable, a rank writes its index record and reports a :class:`RankResult` to the
coordinator, which builds the pages and the manifest from them (:mod:`shardckpt.engine.write_v3`).
The coordinator also sets its small whole tensors apart for a last file of their own
(:func:`split_inline`) before the writer splits its items into files.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItem
from torch.distributed.checkpoint.storage import WriteResult

from shardckpt.engine.incremental import BaseFile, ChunkLocation
from shardckpt.engine.placement import SMALL_REPLICATED_BUDGET_BYTES, SMALL_REPLICATED_BYTES
from shardckpt.engine.staging import item_bytes
from shardckpt.format import file_table, integrity, layout, rank_index
from shardckpt.storage import Storage

RANK_RESULT_INDEX = MetadataIndex("")  # the index of the one WriteResult carrying a RankResult
FIXED_COLUMNS = 3  # columns of a row before the box: tensor, file number, byte offset


@dataclass(frozen=True)
class RankResult:
    """What one rank reports to the coordinator after writing (format 3).

    ``rows``: int64 in native byte order (little-endian wherever torch runs), ``width``
    columns per chunk: the tensor (an index into ``keys``), the data file's number among
    the rank's files, the byte offset, then the chunk's offsets and sizes, each padded to
    ``(width - 3) // 2`` dimensions (offset 0, size 1)."""

    rank: int
    entry: file_table.RankEntry
    file_sizes: tuple[int, ...]
    keys: tuple[str, ...]
    width: int
    rows: bytes
    inline: rank_index.FileIndex | None = None
    """The index of the rank's last file when it holds the coordinator's small tensors
    (:func:`split_inline`): the manifest copies it (format.md 12.8)."""
    refs: tuple[BaseFile, ...] = ()
    """The files of format-3 bases holding chunks this rank reused (an incremental save):
    a row's file number ``len(file_sizes) + j`` names ``refs[j]``."""


def finish_rank(
    storage: Storage,
    save_id: str,
    rank: int,
    located: Sequence[tuple[WriteItem, ChunkLocation]],
    names: Sequence[str],
    block_bytes: int,
    local_rank: int,
    *,
    inline_last: bool = False,
) -> RankResult:
    """Write rank ``rank``'s index record (after its data files ``names``, in number order,
    are durable) and return what the coordinator needs. Every rank, also one without data.
    ``inline_last``: the last file holds the small tensors :func:`split_inline` set apart.
    A chunk reused from a format-3 base (its ``in_base``) has no entry here (its entry is in
    the base's record) and its row names file ``len(names) + j``, the ``j``-th of ``refs``."""
    number = {name: k for k, name in enumerate(names)}
    per_file: list[list[rank_index.IndexEntry]] = [[] for _ in names]
    records: list[Any] = [None] * len(names)
    refs: dict[tuple[str, int, int], int] = {}
    in_base: list[BaseFile] = []
    keys: dict[str, int] = {}
    dims = max((len(it.index.offset or ()) for it, _ in located), default=0)
    rows = array.array("q")
    for it, loc in located:
        if loc.in_base is not None:
            k = len(names) + refs.setdefault(loc.in_base.key, len(refs))
            if k - len(names) == len(in_base):
                in_base.append(loc.in_base)
        else:
            k = number[loc.file]
            records[k] = loc.file_record
            if loc.byte_length:  # a chunk of 0 bytes stores nothing and has no entry (12.4)
                hashes = "".join(loc.block_hashes)
                per_file[k].append(rank_index.IndexEntry(loc.byte_offset, loc.byte_length, hashes, loc.digest))
        assert it.tensor_data is not None and it.index.offset is not None
        offsets, sizes = tuple(it.index.offset), tuple(it.tensor_data.chunk.sizes)
        pad = dims - len(offsets)
        rows.extend((keys.setdefault(it.index.fqn, len(keys)), k, loc.byte_offset))
        rows.extend((*offsets, *(0,) * pad, *sizes, *(1,) * pad))
    files = [
        rank_index.FileIndex(rec.size, rec.hash, tuple(sorted(entries, key=lambda e: e.byte_offset)))
        for rec, entries in zip(records, per_file, strict=True)
    ]
    raw = rank_index.rank_index_to_json(save_id, rank, block_bytes, files)
    write_new(storage, layout.rank_index_name(save_id, rank), raw)
    storage.sync_dir(layout.DATA_DIR)
    entry = file_table.RankEntry(len(raw), integrity.hash_hex(raw), socket.gethostname(), local_rank)
    inline = files[-1] if inline_last and files else None
    sizes = tuple(f.size for f in files)
    width = FIXED_COLUMNS + 2 * dims
    return RankResult(rank, entry, sizes, tuple(keys), width, rows.tobytes(), inline, tuple(in_base))


def write_new(storage: Storage, name: str, raw: bytes) -> None:
    """Create ``name`` (never replacing a file: the stream is an exclusive create) durably."""
    stream = storage.open_write(name)
    try:
        stream.write(raw)
        stream.finish()
    except BaseException:
        stream.abort()
        raise


def split_inline(items: list[WriteItem], *, rank: int) -> tuple[list[WriteItem], list[WriteItem]]:
    """The coordinator's items of a format-3 save, split into (the rest, the small tensors
    for a last data file of their own whose index the manifest copies, format.md 12.8).

    Small: a whole tensor (one box covering it) of more than 0 and at most
    ``SMALL_REPLICATED_BYTES`` (the replicated ones ``balance_replicated`` places on the
    coordinator, and any other such tensor it writes), smallest first while their sum stays
    within ``SMALL_REPLICATED_BUDGET_BYTES``. So the copy has at most one entry per tensor.
    Other ranks, and a coordinator with nothing small or nothing else to write, keep every
    item (one split as before, no copy). Pure; called by the writer before it splits files."""
    if rank != 0:
        return items, []
    small, rest, budget = [], [], SMALL_REPLICATED_BUDGET_BYTES
    for it in sorted(items, key=lambda i: (item_bytes(i), i.index.fqn)):
        n = item_bytes(it)
        if 0 < n <= min(SMALL_REPLICATED_BYTES, budget) and _whole(it):
            small.append(it)
            budget -= n
        else:
            rest.append(it)
    if not small or not any(item_bytes(it) for it in rest):
        return items, []  # one file of data either way: no need for a copy
    chosen = {id(it) for it in small}
    return [it for it in items if id(it) not in chosen], small


def _whole(item: WriteItem) -> bool:
    td = item.tensor_data
    return td is not None and all(o == 0 for o in (item.index.offset or ())) and tuple(td.chunk.sizes) == tuple(td.size)


def rank_results(
    storage: Storage,
    plan: SavePlan,
    results: list[WriteResult],
    files: int,
    block_bytes: int,
    *,
    inline_last: bool = False,
) -> list[WriteResult]:
    """Every rank, after its ``files`` data files: :func:`finish_rank` over the rank's tensor
    ``results`` (ChunkLocations), as the one WriteResult the coordinator reads."""
    save_id, rank = plan.storage_data["save_id"], plan.storage_data["rank"]
    by_index = {it.index: it for it in plan.items}
    located = [(by_index[wr.index], wr.storage_data) for wr in results]
    names = [layout.data_file_name(save_id, rank, k) for k in range(files)]
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    done = finish_rank(storage, save_id, rank, located, names, block_bytes, local_rank, inline_last=inline_last)
    return [WriteResult(index=RANK_RESULT_INDEX, size_in_bytes=sum(done.file_sizes), storage_data=done)]
