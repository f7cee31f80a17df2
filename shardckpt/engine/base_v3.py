"""A format-3 checkpoint as the base of an incremental format-3 save (docs/format.md 12.7).

A format-3 manifest holds no checksums: each chunk's block hashes and xxh3-128 digest are in
the index record of the rank that wrote it (12.4, ``digests: true``), verified through the
chain manifest -> page -> index record. :class:`BaseIndexV3` reads, for the chunks this rank
is about to save, only the pages and index records of the ranks that stored the same boxes
in the base (with an unchanged layout: its own; in a chain, the record in the folder that
holds the bytes, since the base's file table is flattened), each once, verified as a load
verifies them. What it finds becomes :class:`~shardckpt.engine.incremental.ChunkLocation`\\ s
carrying the base group (:class:`~shardckpt.engine.incremental.BaseFile`), from which the
new manifest's file table gets one group per base folder it reads.

Built on every rank while the save plans (:meth:`SavedChunks.base_index
<shardckpt.engine.saved_chunks.SavedChunks.base_index>`); filled by :meth:`prefetch` in the
digest pass, before any data file is opened. Not thread-safe while it prefetches; read-only
afterwards. Not collective.
"""

from __future__ import annotations

import dataclasses
import math

from torch.distributed.checkpoint.planner import WriteItem

from shardckpt.engine.incremental import BaseChunk, BaseFile, BaseIndex, ChunkLocation
from shardckpt.engine.load_v3 import fetch_each, read_record
from shardckpt.format import datafile
from shardckpt.format.file_table import FileRef, RankEntry, parse_page
from shardckpt.format.manifest import FileRecord
from shardckpt.format.manifest_v3 import Chunk, ManifestV3
from shardckpt.format.rank_index import FileIndex, parse_rank_index
from shardckpt.storage import Storage

FETCH_THREADS = 4  # pages and index records read at once (a resharded base may need many ranks')


class BaseIndexV3(BaseIndex):
    """The chunks of the format-3 checkpoint in ``folder`` (opened as ``storage``, with the
    parsed ``manifest``) that an incremental format-3 save beside it may point at."""

    def __init__(self, storage: Storage, manifest: ManifestV3, folder: str) -> None:
        super().__init__(folder, manifest.hash_block_bytes, {})
        self.storage = storage
        self.manifest = manifest
        self.where = f"incremental save against base {folder!r} ({storage.url})"
        # Each group as the new checkpoint names it: the base's own group gets its folder.
        self.groups = tuple(
            g if g.checkpoint is not None else dataclasses.replace(g, checkpoint=folder)
            for g in manifest.file_table.groups
        )
        self._pages: dict[tuple[int, int], tuple[RankEntry, ...]] = {}
        self._indexes: dict[tuple[int, int], tuple[FileIndex, ...]] = {}

    def prefetch(self, items: list[WriteItem]) -> None:
        """Find the base's chunk of the same box for each tensor item, then fetch and verify
        the pages, then the index records, of the ranks that stored them (once each), and
        record each such chunk that has a digest. O(items * log runs + records read)."""
        found: list[tuple[str, tuple[int, ...], tuple[int, ...], Chunk, FileRef]] = []
        for item in items:
            same = self._same_box(item)
            if same is not None:
                found.append((*same, self.manifest.file_table.locate(same[3].file)))
        ranks = {(ref.group, ref.rank): ref for *_, ref in found}
        pages = {(ref.group, ref.page): ref for ref in ranks.values()}
        fetch_each(self._page, [pages[k] for k in sorted(pages)], FETCH_THREADS)
        fetch_each(self._rank_index, [ranks[k] for k in sorted(ranks)], FETCH_THREADS)
        for key, offsets, sizes, c, ref in found:
            loc = self._location(key, c, ref)
            if loc is not None:
                t = self.manifest.tensors[key]
                self._chunks[(key, offsets, sizes)] = BaseChunk(t.dtype, t.shape, loc)

    def _same_box(self, item: WriteItem) -> tuple[str, tuple[int, ...], tuple[int, ...], Chunk] | None:
        """The base's stored chunk with exactly ``item``'s box, in a tensor of the same dtype
        and shape, or None (then nothing of the base can hold its bytes)."""
        td, key = item.tensor_data, item.index.fqn
        t = self.manifest.tensors.get(key)
        if td is None or item.index.offset is None or t is None or t.shape != tuple(td.size):
            return None
        if t.dtype != datafile.dtype_name(td.properties.dtype, key=key):
            return None
        offsets, sizes = tuple(item.index.offset), tuple(td.chunk.sizes)
        if math.prod(sizes) == 0:
            return None
        for c in t.chunks_for_box(offsets, sizes):
            if c.offsets == offsets and c.sizes == sizes:
                return key, offsets, sizes, c
        return None

    def _location(self, key: str, c: Chunk, ref: FileRef) -> ChunkLocation | None:
        group = self.groups[ref.group]
        index = self._indexes[(ref.group, ref.rank)][ref.number]
        shown = f"{self.where}: index record {ref.index_name!r} of {group.checkpoint!r} (rank {ref.rank}), key {key!r}"
        entry = index.entry(c.byte_offset, c.byte_length, where=shown)
        if entry.digest is None:  # a base saved without digests: nothing to compare with
            return None
        page = self._pages[(ref.group, ref.page)]
        index_size = page[ref.rank - ref.page * group.ranks_per_page].index_size
        hashes = tuple(entry.block_hash(i) for i in range(len(entry.block_hashes) // 16))
        record = FileRecord(index.size, index.hash, ref.rank, group.checkpoint)
        in_base = BaseFile(group, ref.rank, ref.number, index.size, index_size)
        return ChunkLocation(ref.name, c.byte_offset, c.byte_length, hashes, record, entry.digest, in_base)

    def _page(self, ref: FileRef) -> None:
        group = self.manifest.file_table.groups[ref.group]
        raw = self._fetch(ref, ref.page_name, group.pages[ref.page].size, "page of the rank table")
        source = f"{self.where}: {ref.page_name!r} of {self.groups[ref.group].checkpoint!r}"
        self._pages[(ref.group, ref.page)] = parse_page(raw, group=group, page=ref.page, source=source)

    def _rank_index(self, ref: FileRef) -> None:
        group = self.manifest.file_table.groups[ref.group]
        entry = self._pages[(ref.group, ref.page)][ref.rank - ref.page * group.ranks_per_page]
        raw = self._fetch(ref, ref.index_name, entry.index_size, f"index record of rank {ref.rank}")
        source = f"{self.where}: {ref.index_name!r} of {self.groups[ref.group].checkpoint!r}"
        block = self.manifest.hash_block_bytes
        self._indexes[(ref.group, ref.rank)] = parse_rank_index(
            raw, entry=entry, group=group, rank=ref.rank, block_bytes=block, source=source
        )

    def _fetch(self, ref: FileRef, name: str, expected: int, what: str) -> bytes:
        folder = self.groups[ref.group].checkpoint
        storage = self.storage if ref.checkpoint is None else self.storage.sibling(ref.checkpoint)
        shown = f"{name!r} of base checkpoint {folder!r}"
        return read_record(storage, name, expected, what=f"{what} of save {ref.save_id}", shown=shown, where=self.where)
