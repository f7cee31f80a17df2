"""Writing format 3 (docs/format.md section 12): each rank's index record, the coordinator's
pages of the rank table and its manifest of sharding rules.

Called by :class:`shardckpt.engine.writer.Writer` when a save asks for ``format_version=3``,
in the order of the write protocol (format.md section 3, 12.7):

1. every rank, after its data files are durable:
   :func:`~shardckpt.engine.rank_result.finish_rank` writes the rank's index
   record ``data/<save_id>-r<rank>.index.json`` (each file's size and hash, each chunk's
   block hashes, computed while writing) and returns the rank's :class:`RankResult`: its
   index record's size and hash, host and local rank, its data files' sizes, and one row of
   integers per chunk (tensor, file number, byte offset, box). No block hash travels.
2. the coordinator, once every rank succeeded: :func:`assemble` builds the pages and the
   manifest from the ranks' results (pure, no I/O, what ``benchmarks/planning_scale.py``
   times), :func:`commit` writes the pages, checks that every page, index record and data
   file is there with its size, and creates ``manifest.json`` exclusively.

The rows of all ranks become one int64 table (ranks holding the same tensors converted
together) whose tensors are compressed all at once (:mod:`~shardckpt.engine.rule_table`, the
same rules as :func:`shardckpt.format.rules.compress`, which ``tests/unit/test_v3_write.py``
checks): O(chunks) work in vector operations, Python steps only per tensor, per run and per
group of ranks, so 4096 ranks of a 7B model with AdamW (3.5 million chunks) build in about
2 CPU seconds (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.storage import WriteResult

from shardckpt._version import __version__
from shardckpt.engine.plan_records import PlanRecords
from shardckpt.engine.rank_result import FIXED_COLUMNS, RankResult, write_new
from shardckpt.engine.rule_table import compress_table
from shardckpt.errors import StorageError
from shardckpt.format import datafile, file_table, integrity, layout, rules
from shardckpt.format import manifest_v3 as mv3
from shardckpt.storage import Storage

V3_HASH_BLOCK_BYTES = 1 << 18
"""Block size of format-3 saves unless ``hash_block_bytes`` says otherwise: a resharded
read is rounded out to whole blocks at both ends of each piece it reads, so the extra bytes
scale with the block: 8 MiB read 1.38x the bytes needed for 4 -> 3 ranks, 1 MiB 1.055x
(worst rank 1.096x; issue #18 asks <= 1.05x), 256 KiB about a quarter of that, for 64 bytes
of index record per MiB of data, in records only the readers of those bytes fetch
(format.md 12.4)."""


def finish(
    storage: Storage,
    metadata: Metadata,
    results: list[list[WriteResult]],
    save_id: str,
    options: Any,
    create: Callable[[str, bytes], None],
    records: PlanRecords | None = None,
) -> mv3.ManifestV3:
    """The coordinator's finish of a format-3 save (``options``: the WriterOptions): the
    pages and the manifest (:func:`assemble`), then :func:`commit`. Returns the manifest.
    ``records``: what the plan's last save built, kept for this one (None: built anew)."""
    values, ranks = split_results(results)
    built = assemble(
        tensors_of(metadata),
        values,
        {k: list(v) for k, v in (metadata.planner_data or {}).items()},
        ranks,
        save_id=save_id,
        block_bytes=options.hash_block_bytes,
        metadata=dict(options.metadata),
        records=records,
    )
    built = with_inline_index(built, ranks)
    if records is None:
        commit(storage, built, ranks, create)
    else:
        m = built.manifest
        commit(storage, built, ranks, create, lines=records.lines(m.tensors), paths=records.path_lines(m.paths))
    return built.manifest


@dataclass(frozen=True)
class Assembled:
    """The coordinator's format-3 records of one save: the manifest and its pages' bytes."""

    manifest: mv3.ManifestV3
    pages: tuple[bytes, ...]


def assemble(
    tensors: dict[str, tuple[str, tuple[int, ...]]],
    values: dict[str, Any],
    paths: dict[str, list[str | int]],
    ranks: Sequence[RankResult],
    *,
    save_id: str,
    block_bytes: int,
    metadata: dict[str, Any],
    records: PlanRecords | None = None,
) -> Assembled:
    """The pages and the manifest of a save whose rank ``r`` reported ``ranks[r]``; tensors:
    fqn -> (dtype name, shape). Pure. O(chunks) in vector operations, O(ranks + tensors +
    runs) in Python steps; with ``records``, the tensor records of the plan's last save
    when its table of chunks was equal (:class:`~shardckpt.engine.plan_records.PlanRecords`)."""
    per_page = file_table.DEFAULT_RANKS_PER_PAGE
    pages = tuple(
        file_table.page_to_json(save_id, first, [r.entry for r in ranks[first : first + per_page]])
        for first in range(0, len(ranks), per_page)
    )
    counts = [len(r.file_sizes) for r in ranks]
    group = file_table.FileGroup(
        save_id,
        None,
        len(ranks),
        tuple((len(list(g)), k) for k, g in itertools.groupby(counts)),
        per_page,
        tuple(file_table.Page(len(p), integrity.hash_hex(p)) for p in pages),
    )
    bases = base_groups(ranks)
    files = file_table.FileTable((group, *bases.values()))
    table, tid = _table(list(tensors), ranks, _positions(files, ranks, list(bases)))
    m = mv3.ManifestV3(
        world_size=len(ranks),
        hash_block_bytes=block_bytes,
        bases=tuple(bases),
        file_table=files,
        tensors=_tensors(tensors, table, tid) if records is None else records.records(tensors, table, tid, _tensors),
        values=values,
        paths=paths,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        shardckpt_version=__version__,
        torch_version=torch.__version__,
        metadata=metadata,
    )
    return Assembled(m, pages)


def with_inline_index(built: Assembled, ranks: Sequence[RankResult]) -> Assembled:
    """``built`` with the manifest's copy of the coordinator's small-tensor file's index
    (format.md 12.8) when rank 0 wrote one (:func:`~shardckpt.engine.rank_result.split_inline`); else unchanged."""
    if not ranks or ranks[0].inline is None:
        return built
    m = built.manifest
    position = m.file_table.position(0, 0, len(ranks[0].file_sizes) - 1)
    inline = mv3.InlineIndex(position, ranks[0].inline.without_digests())
    return Assembled(dataclasses.replace(m, inline_index=inline), built.pages)


def base_groups(ranks: Sequence[RankResult]) -> dict[str, file_table.FileGroup]:
    """The groups of the base folders whose files the ranks reused (an incremental save),
    by folder name, sorted: the manifest's ``bases`` and its file table after the own group
    (format.md 12.3). Every rank read them from the same base manifest; a disagreement is a
    StorageError (nothing is committed). O(refs)."""
    found: dict[str, file_table.FileGroup] = {}
    for r in ranks:
        for ref in r.refs:
            folder = ref.group.checkpoint
            assert folder is not None
            if found.setdefault(folder, ref.group) != ref.group:
                raise StorageError(
                    f"save: rank {r.rank} read another file table group for base {folder!r} than rank 0..{r.rank - 1} "
                    f"did (was {folder!r} saved again while this save ran?); nothing was committed. Save again."
                )
    return dict(sorted(found.items()))


def _positions(files: file_table.FileTable, ranks: Sequence[RankResult], bases: list[str]) -> list[torch.Tensor]:
    """Per rank, the file position of each file number its rows name: its own files in the
    own group (group 0: positions ``firsts[r] ..``, a view of one arange), then each of its
    ``refs`` in its base's group. O(ranks + refs) Python steps."""
    group_of = {b: g for g, b in enumerate(bases, start=1)}
    own = torch.arange(files.groups[0].total_files if files.groups else 0, dtype=torch.int64)
    out = []
    first = 0
    for r in ranks:
        mine = own[first : first + len(r.file_sizes)]
        first += len(r.file_sizes)
        if r.refs:
            try:
                reused = [files.position(group_of[str(f.group.checkpoint)], f.rank, f.number) for f in r.refs]
            except ValueError as e:
                raise StorageError(f"save: rank {r.rank} reused a file its base's file table lacks ({e})") from e
            mine = torch.cat([mine, torch.tensor(reused, dtype=torch.int64)])
        out.append(mine)
    return out


def _table(
    keys: list[str], ranks: Sequence[RankResult], positions: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's rows as one int64 table (file position, byte offset, box padded to the
    largest rank's dimensions) and each row's tensor (an index into ``keys``). Ranks that
    sent the same key list (FSDP: all of them) are converted together: O(chunks) in vector
    operations, O(ranks + distinct key lists) in Python. ``positions[r]``: the file position
    of each file number in rank ``r``'s rows (:func:`_positions`)."""
    ids = {k: i for i, k in enumerate(keys)}
    dims = max(((r.width - FIXED_COLUMNS) // 2 for r in ranks), default=0)
    alike: dict[tuple[tuple[str, ...], int], list[RankResult]] = {}
    for r in ranks:
        if r.rows:
            alike.setdefault((r.keys, r.width), []).append(r)
    total = sum(len(r.rows) // (8 * r.width) for r in ranks)
    table = torch.empty((total, 2 + 2 * dims), dtype=torch.int64)
    tid = torch.empty(total, dtype=torch.int64)
    at = 0
    for (held, width), same in alike.items():
        unknown = [k for k in held if k not in ids]
        if unknown:
            raise StorageError(
                f"save: rank {same[0].rank} wrote chunks of {unknown[:3]}, which the global plan does not hold; "
                "nothing was committed (a shardckpt bug: please report it)"
            )
        own = torch.frombuffer(bytearray().join(r.rows for r in same), dtype=torch.int64).view(-1, width)
        per_rank = torch.tensor([len(r.rows) // (8 * width) for r in same], dtype=torch.int64)
        lookup = torch.cat([positions[r.rank] for r in same])
        starts = torch.tensor([0, *itertools.accumulate(len(positions[r.rank]) for r in same)][:-1], dtype=torch.int64)
        d = (width - FIXED_COLUMNS) // 2
        out = table[at : at + own.shape[0]]
        torch.index_select(lookup, 0, own[:, 1] + torch.repeat_interleave(starts, per_rank), out=out[:, 0])
        out[:, 1] = own[:, 2]
        out[:, 2 : 2 + d] = own[:, FIXED_COLUMNS : FIXED_COLUMNS + d]
        out[:, 2 + d : 2 + dims] = 0
        out[:, 2 + dims : 2 + dims + d] = own[:, FIXED_COLUMNS + d :]
        out[:, 2 + dims + d :] = 1
        torch.index_select(
            torch.tensor([ids[k] for k in held], dtype=torch.int64), 0, own[:, 0], out=tid[at : at + own.shape[0]]
        )
        at += own.shape[0]
    return table, tid


def _tensors(
    tensors: dict[str, tuple[str, tuple[int, ...]]], table: torch.Tensor, tid: torch.Tensor
) -> dict[str, mv3.Tensor]:
    """Every tensor's record from the table: its rule (compress_table) and listed chunks."""
    dims = (table.shape[1] - 2) // 2
    done = compress_table([shape for _, shape in tensors.values()], tid, table)
    out = {}
    for t, (key, (dtype, shape)) in enumerate(tensors.items()):
        out[key] = mv3.Tensor(dtype, shape, done.rules[t], _listed(table, done.listed[t], dtype, len(shape), dims))
    return out


def _listed(table: torch.Tensor, rows: list[int], dtype: str, d: int, dims: int) -> tuple[mv3.Chunk, ...]:
    """The chunks of ``table``'s ``rows`` (one tensor's, of ``d`` dimensions), as listed
    chunks; most tensors have a rule and none (no indexing of the table for them)."""
    if not rows:
        return ()
    itemsize = datafile.itemsize(dtype)
    boxes = [(row[0], row[1], row[2 : 2 + d], row[2 + dims : 2 + dims + d]) for row in table[rows].tolist()]
    return tuple(mv3.Chunk(tuple(o), tuple(s), f, b, math.prod(s) * itemsize) for f, b, o, s in boxes)


def compress_rows(
    shape: tuple[int, ...], offsets: torch.Tensor, sizes: torch.Tensor, files: torch.Tensor, byte_offsets: torch.Tensor
) -> tuple[rules.Rule | None, list[int]]:
    """:func:`shardckpt.format.rules.compress` of one tensor's chunks given as columns (row i:
    box ``offsets[i]``/``sizes[i]`` at ``byte_offsets[i]`` of file position ``files[i]``):
    the rule or None, and the rows to list. :func:`compress_table` for one tensor."""
    table = torch.cat([files[:, None], byte_offsets[:, None], offsets, sizes], dim=1)
    done = compress_table([tuple(shape)], torch.zeros(files.numel(), dtype=torch.int64), table)
    return done.rules[0], done.listed[0]


def tensors_of(metadata: Metadata) -> dict[str, tuple[str, tuple[int, ...]]]:
    """DCP's global metadata as fqn -> (dtype name, shape), tensors only, sorted."""
    return {
        fqn: (datafile.dtype_name(md.properties.dtype, key=fqn), tuple(md.size))
        for fqn, md in sorted(metadata.state_dict_metadata.items())
        if not isinstance(md, BytesStorageMetadata)
    }


def split_results(results: list[list[WriteResult]]) -> tuple[dict[str, Any], list[RankResult]]:
    """Every rank's write results -> (the values, decoded from their inline JSON; each
    rank's RankResult in rank order)."""
    values: dict[str, Any] = {}
    ranks: list[RankResult] = []
    for r, per_rank in enumerate(results):
        mine = [wr.storage_data for wr in per_rank if isinstance(wr.storage_data, RankResult)]
        if len(mine) != 1 or mine[0].rank != r:
            raise StorageError(f"save: rank {r} sent {len(mine)} format-3 results; nothing was committed")
        ranks.append(mine[0])
        for wr in per_rank:
            if not isinstance(wr.storage_data, RankResult):
                values[wr.index.fqn] = json.loads(wr.storage_data.json_text)
    return dict(sorted(values.items())), ranks


def commit(
    storage: Storage,
    built: Assembled,
    ranks: Sequence[RankResult],
    create: Callable[[str, bytes], None],
    *,
    lines: Sequence[str] | None = None,
    paths: Sequence[str] | None = None,
) -> None:
    """Coordinator, after every rank wrote its data and index record: write the pages,
    check that every file the manifest reaches is there with its size, then ``create``
    ``manifest.json`` (the exclusive commit). ``lines``, ``paths``: the manifest's tensor
    and path lines, if kept (:class:`PlanRecords`)."""
    m = built.manifest
    save_id = m.file_table.groups[0].save_id
    for p, raw in enumerate(built.pages):
        write_new(storage, layout.rank_page_name(save_id, p), raw)
    storage.sync_dir(layout.DATA_DIR)
    expected = {layout.rank_page_name(save_id, p): (len(raw), "the coordinator") for p, raw in enumerate(built.pages)}
    for r in ranks:
        expected[layout.rank_index_name(save_id, r.rank)] = (r.entry.index_size, f"rank {r.rank}")
        for k, size in enumerate(r.file_sizes):
            expected[layout.data_file_name(save_id, r.rank, k)] = (size, f"rank {r.rank}")
    for name, (size, writer) in sorted(expected.items()):
        found = _size(storage, name)
        if found != size:
            what = "is missing" if found is None else f"has {found} bytes"
            raise StorageError(
                f"save to {storage.url}: {name}, written by {writer}, {what}, expected {size} bytes. Something "
                "removed or changed it while the save ran (another job writing to the same path?). Nothing was "
                "committed; save again to a new path."
            )
    _check_bases(storage, ranks)
    create(layout.MANIFEST_NAME, mv3.manifest_v3_to_json(m, lines=lines, paths=paths))


def _size(storage: Storage, name: str) -> int | None:
    try:
        return storage.size(name)
    except FileNotFoundError:
        return None


def _check_bases(storage: Storage, ranks: Sequence[RankResult]) -> None:
    """Before the commit of an incremental save: every base file the ranks reused, the
    index record of the rank that wrote it and that rank's page are there with their sizes
    (format.md 11.5: checked, then marked), then each base folder gets the referenced
    marker (created once, kept as it is), so no tool removes or overwrites it."""
    expected: dict[tuple[str, str], int] = {}
    for r in ranks:
        for f in r.refs:
            g, folder = f.group, str(f.group.checkpoint)
            expected[(folder, layout.data_file_name(g.save_id, f.rank, f.number))] = f.size
            expected[(folder, layout.rank_index_name(g.save_id, f.rank))] = f.index_size
            page = g.page_of(f.rank)
            expected[(folder, layout.rank_page_name(g.save_id, page))] = g.pages[page].size
    folders = {folder: storage.sibling(folder) for folder, _ in expected}
    for (folder, name), size in sorted(expected.items()):
        found = _size(folders[folder], name)
        if found != size:
            what = "is missing" if found is None else f"has {found} bytes"
            raise StorageError(
                f"save to {storage.url}: {name!r} of base checkpoint {folder!r}, which this incremental save reuses, "
                f"{what}, expected {size} bytes: the base was deleted or changed while the save ran. Nothing was "
                "committed; save again (without a base for a full save)."
            )
    for base in sorted(folders.values(), key=lambda s: s.location):
        try:
            base.create_exclusive(layout.REFERENCED_NAME, layout.referenced_marker())
        except FileExistsError:
            pass
