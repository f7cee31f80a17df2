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
from itertools import chain
from operator import attrgetter

from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItem
from torch.distributed.checkpoint.storage import WriteResult

from shardckpt.engine.datawrite import WrittenFile
from shardckpt.engine.incremental import BaseFile, ChunkLocation
from shardckpt.engine.placement import SMALL_REPLICATED_BUDGET_BYTES, SMALL_REPLICATED_BYTES
from shardckpt.engine.staging import item_bytes
from shardckpt.errors import StorageError
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
    reused: Sequence[tuple[WriteItem, ChunkLocation]],
    written: Sequence[WrittenFile],
    block_bytes: int,
    local_rank: int,
    *,
    inline_last: bool = False,
) -> RankResult:
    """Write rank ``rank``'s index record (after its data files ``written``, in number
    order, are durable) and return what the coordinator needs. Every rank, also one without
    data. ``inline_last``: the last file holds the small tensors :func:`split_inline` set
    apart. ``reused``: the chunks of an incremental save found in a format-3 base (their
    ``in_base``): no entry here (theirs is in the base's record), and each row names file
    ``len(written) + j``, the ``j``-th of ``refs``. The written files are read as the
    columns they are, no object per chunk (#18: thousands of small tensors)."""
    refs: dict[tuple[str, int, int], int] = {}
    in_base: list[BaseFile] = []
    keys: dict[str, int] = {}
    every = chain((it for it, _ in reused), chain.from_iterable(w.items for w in written))
    dims = max((len(it.index.offset or ()) for it in every), default=0)
    rows = array.array("q")
    for it, loc in reused:
        if loc.in_base is None:
            raise StorageError(f"save: rank {rank} reused {it.index.fqn!r} from a base that is not of format 3")
        k = len(written) + refs.setdefault(loc.in_base.key, len(refs))
        if k - len(written) == len(in_base):
            in_base.append(loc.in_base)
        rows.extend(_row(keys, it, k, loc.byte_offset, dims))
    files = []
    for k, w in enumerate(written):
        if w.name != layout.data_file_name(save_id, rank, k):
            raise StorageError(f"save: rank {rank}'s data file {k} is {w.name!r}; nothing was committed")
        for it, byte_offset in zip(w.items, w.byte_offsets, strict=True):
            rows.extend(_row(keys, it, k, byte_offset, dims))
        entries = [  # a chunk of 0 bytes stores nothing and has no entry (12.4)
            rank_index.IndexEntry(o, n, "".join(h), d)
            for o, n, h, d in zip(w.byte_offsets, w.byte_lengths, w.block_hashes, w.digests, strict=True)
            if n
        ]
        entries.sort(key=attrgetter("byte_offset"))  # in file order already: one pass
        files.append(rank_index.FileIndex(w.record.size, w.record.hash, tuple(entries)))
    raw = rank_index.rank_index_to_json(save_id, rank, block_bytes, files)
    write_new(storage, layout.rank_index_name(save_id, rank), raw)
    storage.sync_dir(layout.DATA_DIR)
    entry = file_table.RankEntry(len(raw), integrity.hash_hex(raw), socket.gethostname(), local_rank)
    inline = files[-1] if inline_last and files else None
    sizes = tuple(f.size for f in files)
    width = FIXED_COLUMNS + 2 * dims
    return RankResult(rank, entry, sizes, tuple(keys), width, rows.tobytes(), inline, tuple(in_base))


def _row(keys: dict[str, int], item: WriteItem, file: int, byte_offset: int, dims: int) -> tuple[int, ...]:
    """A chunk's row: its tensor's number in ``keys`` (added if new), the file's number, the
    byte offset, then the box's offsets and sizes padded to ``dims`` (offset 0, size 1)."""
    assert item.tensor_data is not None and item.index.offset is not None
    offsets, sizes = item.index.offset, item.tensor_data.chunk.sizes
    key = keys.setdefault(item.index.fqn, len(keys))
    pad = dims - len(offsets)
    if not pad:
        return (key, file, byte_offset, *offsets, *sizes)
    return (key, file, byte_offset, *offsets, *(0,) * pad, *sizes, *(1,) * pad)


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
    sizes = list(map(item_bytes, items))
    # only the candidates are sorted: on the coordinator of thousands of sharded tensors
    # every item is small and none is whole (#18: sorting them all took 40 ms a save)
    candidates = sorted(
        (n, it.index.fqn, k)
        for k, (it, n) in enumerate(zip(items, sizes, strict=True))
        if 0 < n <= SMALL_REPLICATED_BYTES and _whole(it)
    )
    chosen, budget = set(), SMALL_REPLICATED_BUDGET_BYTES
    for n, _, k in candidates:
        if n > budget:
            break  # the rest are at least as large
        chosen.add(k)
        budget -= n
    if not chosen or not any(n for k, n in enumerate(sizes) if k not in chosen):
        return items, []  # one file of data either way: no need for a copy
    small = [items[k] for _, _, k in candidates if k in chosen]
    return [it for k, it in enumerate(items) if k not in chosen], small


def _whole(item: WriteItem) -> bool:
    """A chunk that is its whole tensor (sizes compared first: a shard's differ)."""
    td = item.tensor_data
    if td is None or tuple(td.chunk.sizes) != tuple(td.size):
        return False
    return all(o == 0 for o in (item.index.offset or ()))


def rank_results(
    storage: Storage,
    plan: SavePlan,
    reused: list[WriteResult],
    written: list[WrittenFile],
    block_bytes: int,
    *,
    inline_last: bool = False,
) -> list[WriteResult]:
    """Every rank, after its ``written`` data files: :func:`finish_rank` over them and the
    chunks ``reused`` from a base (their ChunkLocations), as the one WriteResult the
    coordinator reads."""
    save_id, rank = plan.storage_data["save_id"], plan.storage_data["rank"]
    by_index = {it.index: it for it in plan.items} if reused else {}
    located = [(by_index[wr.index], wr.storage_data) for wr in reused]
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    done = finish_rank(storage, save_id, rank, located, written, block_bytes, local_rank, inline_last=inline_last)
    return [WriteResult(index=RANK_RESULT_INDEX, size_in_bytes=sum(done.file_sizes), storage_data=done)]
