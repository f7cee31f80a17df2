"""Format 3: one rank's index record (docs/format.md 12.4), pure, no I/O: each data file
the rank wrote, with its size, whole-file xxh3-64 and its chunks' block hashes (and the
xxh3-128 digests of an incremental base). The last step of the checksum chain in
:mod:`shardckpt.format.file_table`, before the data bytes.

- :func:`parse_rank_index` / :func:`rank_index_to_json`: one rank's index record.
- :func:`parse_file_index` / :func:`file_index_to_json`: one file object of it, as the
  manifest's ``inline_index`` copies it (12.8).

The parsers take untrusted input: linear time in its bytes, ManifestError naming what and where.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import add, le
from typing import Any

from shardckpt.errors import ManifestError
from shardckpt.format.file_table import VERSION, FileGroup, Page, RankEntry
from shardckpt.format.manifest_records import frozen_records
from shardckpt.format.record_json import BLOCK_HASHES, DIGEST, HASH, check_head, check_int, show, verified_json

INDEX_FORMAT = "shardckpt-index"


@dataclass(frozen=True)
class IndexEntry:
    """One chunk stored in a data file: its bytes and their block hashes (section 7)."""

    byte_offset: int
    byte_length: int
    block_hashes: str  # 16 hex digits per block, concatenated
    digest: str | None = None  # xxh3-128 when the index has digests (an incremental base)

    def block_hash(self, i: int) -> str:
        return self.block_hashes[16 * i : 16 * i + 16]

    def hashes(self) -> tuple[str, ...]:
        """Every block's hash, in order (what a ChunkRecord's ``block_hashes`` holds)."""
        text = self.block_hashes
        if len(text) == 16:  # one block: most chunks of small tensors
            return (text,)
        return tuple(text[i : i + 16] for i in range(0, len(text), 16))


@dataclass(frozen=True)
class FileIndex:
    """One data file of a rank: size, whole-file hash, its chunks sorted by byte offset."""

    size: int
    hash: str
    entries: tuple[IndexEntry, ...]
    _offsets: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_offsets", [e.byte_offset for e in self.entries])

    def without_digests(self) -> FileIndex:
        """This file object as the manifest's ``inline_index`` copies it (12.8: no digests)."""
        if all(e.digest is None for e in self.entries):
            return self
        entries = tuple(IndexEntry(e.byte_offset, e.byte_length, e.block_hashes) for e in self.entries)
        return FileIndex(self.size, self.hash, entries)

    def find(self, byte_offset: int, byte_length: int) -> IndexEntry | None:
        """The entry of the chunk at ``byte_offset`` if it has ``byte_length`` bytes, else
        None (:meth:`entry` says what is wrong). Binary search, no message built."""
        i = bisect.bisect_left(self._offsets, byte_offset)
        if i < len(self.entries):
            found = self.entries[i]
            if found.byte_offset == byte_offset and found.byte_length == byte_length:
                return found
        return None

    def entry(self, byte_offset: int, byte_length: int, *, where: str) -> IndexEntry:
        """The entry of the chunk at ``byte_offset`` (binary search); ManifestError if the
        index has none there or its length differs from what the manifest says."""
        i = bisect.bisect_left(self._offsets, byte_offset)
        if i == len(self.entries) or self.entries[i].byte_offset != byte_offset:
            raise ManifestError(
                f"{where}: the index record has no chunk at byte {byte_offset}; the checkpoint is corrupt"
            )
        if self.entries[i].byte_length != byte_length:
            raise ManifestError(
                f"{where}: the chunk at byte {byte_offset} has {self.entries[i].byte_length} bytes in the index "
                f"record, {byte_length} by the manifest; the checkpoint is corrupt"
            )
        return self.entries[i]


def rank_index_to_json(save_id: str, rank: int, block_bytes: int, files: Sequence[FileIndex]) -> bytes:
    """One rank's index record; ``digests: true`` when its entries carry digests (all or none)."""
    digests = any(e.digest is not None for f in files for e in f.entries)
    if digests and any(e.digest is None for f in files for e in f.entries):
        raise ValueError(f"rank {rank}'s index record: some entries have a digest and some not; all or none")
    doc = {
        "format": INDEX_FORMAT,
        "format_version": VERSION,
        "save_id": save_id,
        "rank": rank,
        "hash_block_bytes": block_bytes,
        "digests": digests,
        "files": [
            {
                "size": f.size,
                "hash": f.hash,
                "entries": [
                    [e.byte_offset, e.byte_length, e.block_hashes, *([e.digest] if digests else [])] for e in f.entries
                ],
            }
            for f in files
        ],
    }
    return (json.dumps(doc, separators=(",", ":"), ensure_ascii=True) + "\n").encode()


def file_index_to_json(f: FileIndex) -> dict[str, Any]:
    """One file object of an index record (12.4), without digests (the manifest's
    ``inline_index`` copies one, 12.8)."""
    return {
        "size": f.size,
        "hash": f.hash,
        "entries": [[e.byte_offset, e.byte_length, e.block_hashes] for e in f.entries],
    }


def parse_file_index(doc: Any, *, block_bytes: int, where: str) -> FileIndex:
    """Validate an untrusted file object without digests (format.md 12.4): entries sorted,
    disjoint, inside the file, the right number of block hashes. O(its size)."""
    return _file_index(doc, block_bytes, False, where)


def parse_rank_index(
    raw: bytes, *, entry: RankEntry, group: FileGroup, rank: int, block_bytes: int, source: str
) -> tuple[FileIndex, ...]:
    """Verify rank ``rank``'s index record against its page ``entry``, then parse it: one
    file record per file the table gives the rank, entries sorted, disjoint, inside the file,
    ``ceil(byte_length / block_bytes)`` block hashes each. O(len(raw))."""
    doc = verified_json(raw, Page(entry.index_size, entry.index_hash), source, "index record")
    head = {"format": INDEX_FORMAT, "format_version": VERSION, "save_id": group.save_id, "rank": rank}
    check_head(doc, {**head, "hash_block_bytes": block_bytes}, {"digests", "files"}, source)
    digests = doc["digests"]
    _, count = group.rank_files(rank)
    if not isinstance(digests, bool) or not isinstance(doc["files"], list) or len(doc["files"]) != count:
        raise ManifestError(
            f"{source}: expected digests (true/false) and the {count} file records the file table gives "
            f"rank {rank}, found {show(doc['files'])}"
        )
    return tuple(_file_index(f, block_bytes, digests, f"{source}: files[{k}]") for k, f in enumerate(doc["files"]))


def _file_index(doc: Any, block_bytes: int, digests: bool, where: str) -> FileIndex:
    if not isinstance(doc, dict) or set(doc) != {"size", "hash", "entries"} or not isinstance(doc["entries"], list):
        raise ManifestError(f"{where}: expected an object with exactly size, hash, entries (a list), found {show(doc)}")
    size = check_int(doc["size"], f"{where}.size", 0, (1 << 62) - 1)
    if not isinstance(doc["hash"], str) or not HASH.fullmatch(doc["hash"]):
        raise ManifestError(f"{where}.hash: expected 16 lowercase hex digits, found {show(doc['hash'])}")
    quick = _entries_in_bulk(doc["entries"], size, block_bytes, digests)
    if quick is not None:
        return FileIndex(size, doc["hash"], quick)
    entries, end = [], 0
    width = 4 if digests else 3
    for i, e in enumerate(doc["entries"]):
        w = f"{where}.entries[{i}]"
        if not isinstance(e, list) or len(e) != width:
            raise ManifestError(
                f"{w}: expected [byte_offset, byte_length, block_hashes{', digest' if digests else ''}], "
                f"found {show(e)}"
            )
        offset = check_int(e[0], f"{w}[0]", end, size)
        length = check_int(e[1], f"{w}[1]", 0, size - offset)
        blocks = -(-length // block_bytes)
        if not isinstance(e[2], str) or len(e[2]) != 16 * blocks or not BLOCK_HASHES.fullmatch(e[2]):
            raise ManifestError(f"{w}[2]: expected {blocks} block hashes of 16 lowercase hex digits, concatenated")
        digest = None
        if digests:
            if not isinstance(e[3], str) or not DIGEST.fullmatch(e[3]):
                raise ManifestError(
                    f"{w}[3]: expected an xxh3-128 digest of 32 lowercase hex digits, found {show(e[3])}"
                )
            digest = e[3]
        end = offset + length
        entries.append(IndexEntry(offset, length, e[2], digest))
    return FileIndex(size, doc["hash"], tuple(entries))


def _entries_in_bulk(docs: list[Any], size: int, block_bytes: int, digests: bool) -> tuple[IndexEntry, ...] | None:
    """The entries of a file object, if every one passes every check of :func:`_file_index`'s
    loop, checked column by column (C loops over the whole list: thousands of entries for a
    rank of small tensors, issue #18); None on any doubt, and that loop names the problem."""
    width = 4 if digests else 3
    if not docs:
        return ()
    if set(map(type, docs)) != {list} or set(map(len, docs)) != {width}:
        return None
    columns = list(zip(*docs, strict=True))
    offsets, lengths, hashes = list(columns[0]), list(columns[1]), list(columns[2])
    if set(map(type, offsets)) != {int} or set(map(type, lengths)) != {int} or set(map(type, hashes)) != {str}:
        return None
    ends = list(map(add, offsets, lengths))
    # each entry: end of the previous <= offset <= size, 0 <= length <= size - offset
    if not (min(lengths) >= 0 and all(map(le, [0, *ends[:-1]], offsets)) and max(ends) <= size):
        return None
    if list(map(len, hashes)) != [16 * -(-n // block_bytes) for n in lengths]:
        return None
    if BLOCK_HASHES.fullmatch("".join(hashes)) is None:  # each a multiple of 16 characters: split alike
        return None
    found: list[Any] = [None] * len(docs)
    if digests:
        found = list(columns[3])
        if set(map(type, found)) != {str} or set(map(len, found)) != {32}:
            return None
        if BLOCK_HASHES.fullmatch("".join(found)) is None:  # 32 = 2 x 16 lowercase hex digits each
            return None
    attrs = [
        {"byte_offset": o, "byte_length": n, "block_hashes": h, "digest": d}
        for o, n, h, d in zip(offsets, lengths, hashes, found, strict=True)
    ]
    return tuple(frozen_records(IndexEntry, attrs))
