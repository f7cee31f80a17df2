"""Reading a format-3 checkpoint (docs/format.md section 12.7) by the checksum chain.

:class:`RuleChunks` is the reader's chunk source (its planner, which lists each rank's chunks
from the rules, is :mod:`shardckpt.engine.plan_v3`): each chunk a rank reads is resolved with
``FileTable.locate``; the page of the rank table and the index record that cover it are
fetched and verified once per load (``parse_page``, ``parse_rank_index``), only for the
ranks whose files this rank reads; the chunk's entry (``FileIndex.entry``) gives its block
hashes, and each data file's size is checked against its index record before any read.
The file whose index the manifest carries (``inline_index``, format.md 12.8: the
coordinator's small tensors) is resolved from that sealed copy, with no page or record.

One per load and rank. :meth:`RuleChunks.prepare` runs on one thread before the reader's
threads start (it fetches pages and index records on threads of its own, each record into
its own slot); the reader threads then only look chunks up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from torch.distributed.checkpoint.planner import ReadItem

from shardckpt.engine.boxes import BoxReader
from shardckpt.engine.load_items import WholeChunk
from shardckpt.engine.plan_v3 import Cell
from shardckpt.errors import IntegrityError, ManifestError
from shardckpt.format import datafile
from shardckpt.format.file_table import FileRef, RankEntry, parse_page
from shardckpt.format.manifest import ChunkRecord, FileRecord
from shardckpt.format.manifest_records import frozen_records
from shardckpt.format.manifest_v3 import Chunk, ManifestV3, Tensor
from shardckpt.format.rank_index import FileIndex, parse_rank_index
from shardckpt.storage import Storage

_RESTORE = "Restore it from a copy of the checkpoint, or load an earlier checkpoint"


def chunk_at(rec: Tensor, offsets: tuple[int, ...], *, key: str) -> Chunk:
    """The cell of ``rec``'s rule whose box starts at ``offsets`` (a read item's storage
    index), in O(d * log runs); the listed chunks beside a rule are empty, never read."""
    c = rec.rule.cell_at(offsets) if rec.rule is not None else None
    if c is None:
        raise IntegrityError(f"key {key!r}: no chunk at offsets {list(offsets)} in the format-3 manifest")
    return Chunk(c.offsets, c.sizes, c.file, c.byte_offset, math.prod(c.sizes) * datafile.itemsize(rec.dtype))


class RuleChunks:
    """The chunks one rank reads from a format-3 checkpoint, each resolved to its data file
    and its verified index entry (see the module docstring)."""

    def __init__(
        self,
        storage: Storage,
        manifest: ManifestV3,
        *,
        verify: bool,
        where: str,
        known: Mapping[tuple[str, tuple[int, ...]], Chunk] | None = None,
    ) -> None:
        """``known``: chunks already found in ``manifest`` (:attr:`~shardckpt.engine.plan_v3.RulePlanner.found`),
        used as found instead of being looked up again."""
        self.storage = storage
        self._known = known or {}
        self.manifest = manifest
        self.verify = verify
        self.where = where
        self._pages: dict[tuple[int, int], tuple[RankEntry, ...]] = {}
        self._indexes: dict[tuple[int, int], tuple[FileIndex, ...]] = {}
        self._groups: dict[int, Storage] = {}
        self._chunks: dict[tuple[str, tuple[int, ...]], ChunkRecord] = {}
        self._files: dict[str, FileRecord] = {}
        self._listed: dict[str, dict[tuple[int, ...], Chunk]] = {}
        self._refs: dict[int, FileRef] = {}  # file position -> its place in the table, located once
        self._names: dict[int, str] = {}  # file position -> its data file's name, built once
        self.boxes = BoxReader(storage, manifest, verify=verify, where=where, files=self._files, bases=manifest.bases)
        """Reads the boxes of every chunk resolved so far (:meth:`prepare`, :meth:`chunk`)."""

    def prepare(self, items: Sequence[ReadItem], *, threads: int = 1, cells: Sequence[Cell] = ()) -> BoxReader:
        """Resolve every chunk ``items`` read, and the chunk of each of ``cells`` (read
        whole, without a ReadItem: ``plan_v3.RulePlanner.cells``; then :meth:`whole`): fetch
        the pages, then the index records, they need, once each and up to ``threads`` at a
        time (a rank may read from thousands of ranks); check the size of every data file
        they read; return the reader of their boxes."""
        wanted = sorted({(i.storage_index.fqn, tuple(i.storage_index.offset or ())) for i in items})
        located = [self._locate(key, offsets) for key, offsets in wanted]
        # the cells' chunks are the planner's own: located as they are, in the plan's order
        wanted += [(key, c.offsets) for key, c, _ in cells]
        located += [(c, self._ref(c.file)) for _, c, _ in cells]
        ranks: dict[tuple[int, int], FileRef] = {}
        for position, ref in {c.file: ref for c, ref in located}.items():  # once per data file
            if self._inline(position) is None:  # the manifest's copy needs no page nor record (12.8)
                ranks.setdefault((ref.group, ref.rank), ref)
        pages = {(ref.group, ref.page): ref for ref in ranks.values()}
        fetch_each(self._page, [pages[k] for k in sorted(pages)], threads)
        fetch_each(self._rank_index, [ranks[k] for k in sorted(ranks)], threads)
        self._resolve_all(wanted, located)
        self.boxes.check_file_sizes(self._files)
        return self.boxes

    def _resolve_all(self, wanted: list[tuple[str, tuple[int, ...]]], located: list[tuple[Chunk, FileRef]]) -> None:
        """:meth:`_resolve` each of ``wanted`` (at ``located``) not resolved yet, in one loop:
        a load of thousands of small tensors spent more in the calls per chunk than in their
        work (#18). An entry that is not there is refused by :meth:`_resolve`, worded there."""
        files: dict[int, tuple[FileIndex, str]] = {}  # file position -> its index and name
        keys: list[tuple[str, tuple[int, ...]]] = []
        attrs: list[dict[str, Any]] = []  # each record's fields, built into records at once
        resolved = self._chunks
        for (key, offsets), (c, ref) in zip(wanted, located, strict=True):
            if (key, offsets) in resolved:
                continue
            known = files.get(c.file)
            if known is None:
                known = files[c.file] = self._file(c.file, ref)
            index, name = known
            entry = index.find(c.byte_offset, c.byte_length)
            if entry is None:
                self._resolve(key, offsets, c, ref)  # raises, naming the record
                raise AssertionError("_resolve accepted what find refused")  # pragma: no cover
            hashes = entry.block_hashes
            attrs.append(
                {
                    "offsets": c.offsets,
                    "sizes": c.sizes,
                    "file": name,
                    "byte_offset": c.byte_offset,
                    "byte_length": c.byte_length,
                    "block_hashes": (hashes,) if len(hashes) == 16 else entry.hashes(),
                    "digest": entry.digest,
                }
            )
            keys.append((key, offsets))
        resolved.update(zip(keys, frozen_records(ChunkRecord, attrs), strict=True))

    def whole(self, cells: Sequence[Cell]) -> list[WholeChunk]:
        """Each of ``cells`` (prepared: :meth:`prepare`) as the reader reads a whole chunk:
        the key, its chunk's record (file name, block hashes) and the tensor it fills."""
        resolved = self._chunks
        return [(key, resolved[(key, c.offsets)], local) for key, c, local in cells]

    def chunk(self, key: str, offsets: tuple[int, ...]) -> ChunkRecord:
        """The chunk of ``key`` at ``offsets`` with its file name and block hashes (after
        :meth:`prepare` of the items that read it, a lookup)."""
        found = self._chunks.get((key, offsets))
        if found is not None:
            return found
        return self._resolve(key, offsets, *self._locate(key, offsets))

    def _resolve(self, key: str, offsets: tuple[int, ...], c: Chunk, ref: FileRef) -> ChunkRecord:
        """The record of chunk ``c`` of ``key`` (at ``ref`` in the file table), from its index entry."""
        index, name = self._file(c.file, ref)
        entry = index.find(c.byte_offset, c.byte_length)
        if entry is None:  # raises, naming the record (built only then: thousands of chunks a load)
            if self._inline(c.file) is None:
                where = f"index record {self._describe(ref, ref.index_name)} (rank {ref.rank})"
            else:
                where = f"the manifest's inline_index (rank {ref.rank}'s file)"
            index.entry(c.byte_offset, c.byte_length, where=f"{self.where}: {where}, key {key!r}, file {name!r}")
            raise AssertionError("FileIndex.entry accepted what find refused")  # pragma: no cover
        record = ChunkRecord(c.offsets, c.sizes, name, c.byte_offset, c.byte_length, entry.hashes(), entry.digest)
        self._chunks[(key, offsets)] = record
        return record

    def _file(self, position: int, ref: FileRef) -> tuple[FileIndex, str]:
        """The index and the data file name of the file at ``position`` (``ref``): from the
        manifest's inline copy or its rank's index record; its size and hash are recorded
        for :meth:`BoxReader.check_file_sizes` and the reads (its name built once)."""
        inline = self._inline(position)
        index = self._rank_index(ref)[ref.number] if inline is None else inline
        name = self._names.get(position)
        if name is None:
            name = self._names[position] = ref.name
        if name not in self._files:
            self._files[name] = FileRecord(index.size, index.hash, ref.rank, ref.checkpoint)
        return index, name

    def _inline(self, position: int) -> FileIndex | None:
        """The manifest's sealed copy of the index of the file at ``position`` (format.md
        12.8), or None: that file's chunks are then resolved through the page and the record."""
        inline = self.manifest.inline_index
        return inline.index if inline is not None and inline.file == position else None

    def _locate(self, key: str, offsets: tuple[int, ...]) -> tuple[Chunk, FileRef]:
        rec = self.manifest.tensors.get(key)
        if rec is None:
            raise IntegrityError(f"{self.where}: key {key!r} is not a tensor of the format-3 manifest")
        c = self._known.get((key, offsets))  # found in this manifest when planning the load
        if c is None:
            c = self._find(rec, key, offsets)
        return c, self._ref(c.file)

    def _ref(self, position: int) -> FileRef:
        """The place in the file table of the data file at ``position``, located once."""
        ref = self._refs.get(position)
        if ref is None:
            ref = self._refs[position] = self.manifest.file_table.locate(position)
        return ref

    def _find(self, rec: Tensor, key: str, offsets: tuple[int, ...]) -> Chunk:
        """The chunk of ``rec`` (tensor ``key``) at ``offsets``; IntegrityError if none starts there."""
        if rec.rule is not None:
            return chunk_at(rec, offsets, key=key)
        if key not in self._listed:  # an irregular tensor: its listed chunks, indexed once per load
            self._listed[key] = {c.offsets: c for c in rec.chunks if math.prod(c.sizes)}
        c = self._listed[key].get(offsets)
        if c is None:
            raise IntegrityError(f"key {key!r}: no chunk at offsets {list(offsets)} in the format-3 manifest")
        return c

    def _page(self, ref: FileRef) -> tuple[RankEntry, ...]:
        """The entries of the page holding ``ref``'s rank, fetched and verified on first use."""
        pages = self._pages.get((ref.group, ref.page))
        if pages is None:
            group = self.manifest.file_table.groups[ref.group]
            raw = self._fetch(ref, ref.page_name, group.pages[ref.page].size, "page of the rank table")
            source = f"{self.where}: {self._describe(ref, ref.page_name)}"
            pages = parse_page(raw, group=group, page=ref.page, source=source)
            self._pages[(ref.group, ref.page)] = pages
        return pages

    def _rank_index(self, ref: FileRef) -> tuple[FileIndex, ...]:
        """The index record of ``ref``'s rank (one object per file), fetched and verified
        against its page on first use."""
        indexes = self._indexes.get((ref.group, ref.rank))
        if indexes is None:
            group = self.manifest.file_table.groups[ref.group]
            entry = self._page(ref)[ref.rank - ref.page * group.ranks_per_page]
            raw = self._fetch(ref, ref.index_name, entry.index_size, f"index record of rank {ref.rank}")
            source = f"{self.where}: {self._describe(ref, ref.index_name)}"
            indexes = parse_rank_index(
                raw,
                entry=entry,
                group=group,
                rank=ref.rank,
                block_bytes=self.manifest.hash_block_bytes,
                source=source,
            )
            self._indexes[(ref.group, ref.rank)] = indexes
        return indexes

    def _fetch(self, ref: FileRef, name: str, expected: int, what: str) -> bytes:
        what = f"{what} of save {ref.save_id}"
        return read_record(
            self._group_storage(ref), name, expected, what=what, shown=self._describe(ref, name), where=self.where
        )

    def _group_storage(self, ref: FileRef) -> Storage:
        if ref.checkpoint is None:
            return self.storage
        if ref.group not in self._groups:
            self._groups[ref.group] = self.storage.sibling(ref.checkpoint)
        return self._groups[ref.group]

    @staticmethod
    def _describe(ref: FileRef, name: str) -> str:
        return repr(name) if ref.checkpoint is None else f"{name!r} of base checkpoint {ref.checkpoint!r}"


def fetch_each(fetch: Callable[[FileRef], object], refs: list[FileRef], threads: int) -> None:
    """``fetch`` each of ``refs``, up to ``threads`` at a time; the first failure in
    ``refs`` order is raised, after every fetch has ended."""
    if threads <= 1 or len(refs) <= 1:
        for ref in refs:
            fetch(ref)
        return
    with ThreadPoolExecutor(min(threads, len(refs)), thread_name_prefix="shardckpt-records") as pool:
        futures = [pool.submit(fetch, ref) for ref in refs]
    for f in futures:
        f.result()


def read_record(storage: Storage, name: str, expected: int, *, what: str, shown: str, where: str) -> bytes:
    """The bytes of a page of the rank table or an index record (``what``, shown as
    ``shown``), after checking that it exists with the ``expected`` size: a missing,
    truncated or replaced (huge) record is a ManifestError before any byte is read."""
    try:
        size = storage.size(name)
    except FileNotFoundError as e:
        raise ManifestError(f"{where}: the {what}, {shown}, is missing. {_RESTORE}.") from e
    if size != expected:
        raise ManifestError(
            f"{where}: the {what}, {shown}, has {size} bytes, the record that points to it says "
            f"{expected}; it was truncated or replaced. {_RESTORE}."
        )
    return storage.read_bytes(name)
