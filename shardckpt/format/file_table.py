"""Format 3: the compact file table, its rank pages and the per-rank index records.

Pure, no I/O. ``docs/format.md`` sections 12.3 and 12.4 specify the records; ``engine/write_v3.py``
writes them (``save(..., format_version=3)``).

Versions 1 and 2 list every data file with its size, hashes and rank: ~151 bytes per file,
the term of a format-3 manifest that still grew with ranks. Here the data files of one save
are described by rule: the names follow from the save id, the rank and the file's number
(``layout.data_file_name``), and how many files each rank wrote is a run-length list. What is
per rank (each rank's index record's size and hash, its host) lives in *pages* of the rank
table, written by the coordinator beside the data; the manifest keeps each page's size and
hash, so it holds O(groups + runs + ranks / ranks_per_page) numbers, ~flat in the ranks.

The checksum chain a reader walks, each step verified before the next is trusted::

    manifest.json (sealed: manifest_hash)
      -> file_table.groups[g].pages[p]  = size, xxh3-64 of page p
        -> page p's entry for rank r     = size, xxh3-64 of rank r's index record
          -> rank r's index record       = each data file's size, xxh3-64, block hashes
            -> the data bytes

- :func:`parse_file_table` / :func:`file_table_to_json`: the manifest's ``file_table``.
- :class:`FileTable`: a file position (what rules and chunks name) <-> group, rank, number.
- :func:`parse_page` / :func:`page_to_json`: one page of a group's rank table.
- :mod:`shardckpt.format.rank_index`: one rank's index record.

Every parser takes untrusted input: linear time in its bytes, nothing allocated per rank or
per file that the input does not itself spell out, ManifestError naming what and where.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from shardckpt.errors import ManifestError
from shardckpt.format import layout
from shardckpt.format.record_json import (
    FOLDER,
    HASH,
    MAX_RECORD_BYTES,
    SAVE_ID,
    check_head,
    check_int,
    show,
    verified_json,
)

PAGE_FORMAT = "shardckpt-ranks"
VERSION = 3
MAX_GROUP_RANKS = 1 << 24  # ranks of one save: 16.7 million
MAX_FILES_PER_RANK = 1 << 12  # data files of one rank (one per writer thread)
MAX_RANKS_PER_PAGE = 1 << 16
DEFAULT_RANKS_PER_PAGE = 1024


@dataclass(frozen=True)
class Page:
    """Size and xxh3-64 of one page record of a rank table."""

    size: int
    hash: str


@dataclass(frozen=True)
class FileGroup:
    """The data files of one save in one folder: rank ``r`` wrote files ``0 .. n_r - 1``,
    where ``files`` is run-length encoded as ``(ranks, files_each)`` pairs."""

    save_id: str
    checkpoint: str | None  # None: this checkpoint's own folder; else a base beside it
    ranks: int
    files: tuple[tuple[int, int], ...]
    ranks_per_page: int
    pages: tuple[Page, ...]
    _rank_starts: list[int] = field(init=False, repr=False, compare=False)
    _file_starts: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        counts = [n for n, _ in self.files]
        per_run = [n * k for n, k in self.files]
        object.__setattr__(self, "_rank_starts", list(itertools.accumulate(counts, initial=0)))
        object.__setattr__(self, "_file_starts", list(itertools.accumulate(per_run, initial=0)))

    @property
    def total_files(self) -> int:
        return self._file_starts[-1]

    def rank_files(self, rank: int) -> tuple[int, int]:
        """(position of the rank's first file within the group, how many files it wrote)."""
        if not 0 <= rank < self.ranks:
            raise ValueError(f"rank {rank} outside the group's {self.ranks} ranks")
        run = bisect.bisect_right(self._rank_starts, rank) - 1
        each = self.files[run][1]
        return self._file_starts[run] + (rank - self._rank_starts[run]) * each, each

    def locate(self, position: int) -> tuple[int, int]:
        """(rank, file number) of the file at ``position`` within the group. O(log runs)."""
        if not 0 <= position < self.total_files:
            raise ValueError(f"file position {position} outside the group's {self.total_files} files")
        run = bisect.bisect_right(self._file_starts, position) - 1  # never a run without files
        rank, k = divmod(position - self._file_starts[run], self.files[run][1])
        return self._rank_starts[run] + rank, k

    def page_of(self, rank: int) -> int:
        return rank // self.ranks_per_page


@dataclass(frozen=True)
class FileRef:
    """Where the file at one position is and which records verify it."""

    group: int
    save_id: str
    checkpoint: str | None
    rank: int
    number: int  # k: the file's number among its rank's files
    page: int

    @property
    def name(self) -> str:
        return layout.data_file_name(self.save_id, self.rank, self.number)

    @property
    def index_name(self) -> str:
        return layout.rank_index_name(self.save_id, self.rank)

    @property
    def page_name(self) -> str:
        return layout.rank_page_name(self.save_id, self.page)


@dataclass(frozen=True)
class FileTable:
    """Every data file of a format-3 manifest; positions run over the groups in order,
    within a group rank by rank, within a rank by file number."""

    groups: tuple[FileGroup, ...]
    _starts: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts = list(itertools.accumulate((g.total_files for g in self.groups), initial=0))
        object.__setattr__(self, "_starts", starts)

    @property
    def total_files(self) -> int:
        return self._starts[-1]

    def locate(self, position: int) -> FileRef:
        """The file at ``position`` (what a rule's run or a chunk's ``file`` names). O(log)."""
        if not 0 <= position < self.total_files:
            raise ValueError(f"file position {position} outside the table's {self.total_files} files")
        g = bisect.bisect_right(self._starts, position) - 1  # never a group without files
        group = self.groups[g]
        rank, number = group.locate(position - self._starts[g])
        return FileRef(g, group.save_id, group.checkpoint, rank, number, group.page_of(rank))

    def position(self, group: int, rank: int, number: int) -> int:
        """The position of file ``number`` of ``rank`` in group ``group`` (writers)."""
        first, count = self.groups[group].rank_files(rank)
        if not 0 <= number < count:
            raise ValueError(f"rank {rank} wrote {count} files, there is no file {number}")
        return self._starts[group] + first + number


# ---------------------------------------------------------------- the manifest's file_table


def file_table_to_json(table: FileTable) -> dict[str, Any]:
    return {"groups": [_group_doc(g) for g in table.groups]}


def _group_doc(g: FileGroup) -> dict[str, Any]:
    return {
        "save_id": g.save_id,
        **({"checkpoint": g.checkpoint} if g.checkpoint is not None else {}),
        "ranks": g.ranks,
        "files": [list(r) for r in g.files],
        "ranks_per_page": g.ranks_per_page,
        "pages": [[p.size, p.hash] for p in g.pages],
    }


def parse_file_table(doc: Any, *, bases: Sequence[str], world_size: int, where: str) -> FileTable:
    """Validate an untrusted ``file_table``. O(groups + runs + pages), nothing per rank.

    Groups: the own group (no ``checkpoint``) first if present, then exactly one per entry
    of ``bases``, in that order; the own group has ``world_size`` ranks.
    """
    if not isinstance(doc, dict) or set(doc) != {"groups"} or not isinstance(doc["groups"], list):
        raise ManifestError(f"{where}: expected an object with exactly the field groups (a list), found {show(doc)}")
    groups = tuple(_parse_group(g, f"{where}.groups[{i}]") for i, g in enumerate(doc["groups"]))
    folders = [g.checkpoint for g in groups]
    own = [i for i, f in enumerate(folders) if f is None]
    if own not in ([], [0]) or folders[len(own) :] != list(bases):
        raise ManifestError(
            f"{where}.groups: expected this checkpoint's own group (no checkpoint) first, if any, then one "
            f"group per base in the order of bases {list(bases)[:5]}; found checkpoints {folders[:6]}"
        )
    if own and groups[0].ranks != world_size:
        raise ManifestError(
            f"{where}.groups[0]: the own save's group has {groups[0].ranks} ranks, world_size is {world_size}"
        )
    return FileTable(groups)


def _parse_group(doc: Any, where: str) -> FileGroup:
    keys = {"save_id", "ranks", "files", "ranks_per_page", "pages"}
    if not isinstance(doc, dict) or not keys <= set(doc) <= keys | {"checkpoint"}:
        raise ManifestError(f"{where}: expected an object with the fields {sorted(keys)} and optionally checkpoint")
    save_id = doc["save_id"]
    if not isinstance(save_id, str) or not SAVE_ID.fullmatch(save_id):
        raise ManifestError(f"{where}.save_id: expected 1 to 32 lowercase hex digits, found {show(save_id)}")
    checkpoint = doc.get("checkpoint")
    if checkpoint is not None and (
        not isinstance(checkpoint, str) or not FOLDER.fullmatch(checkpoint) or checkpoint in (".", "..")
    ):
        raise ManifestError(
            f"{where}.checkpoint: expected a folder name beside this checkpoint (letters, digits, '.', '_', '-'; "
            f"not '.' or '..'), found {show(checkpoint)}"
        )
    ranks = check_int(doc["ranks"], f"{where}.ranks", 1, MAX_GROUP_RANKS)
    per_page = check_int(doc["ranks_per_page"], f"{where}.ranks_per_page", 1, MAX_RANKS_PER_PAGE)
    runs = doc["files"]
    if not isinstance(runs, list) or not 1 <= len(runs) <= ranks:
        raise ManifestError(f"{where}.files: expected a list of 1 to {ranks} runs [ranks, files_each]")
    files, total = [], 0
    for k, run in enumerate(runs):
        if not isinstance(run, list) or len(run) != 2:
            raise ManifestError(f"{where}.files[{k}]: expected [ranks, files_each], found {show(run)}")
        count = check_int(run[0], f"{where}.files[{k}][0]", 1, ranks - total)
        each = check_int(run[1], f"{where}.files[{k}][1]", 0, MAX_FILES_PER_RANK)
        total += count
        files.append((count, each))
    if total != ranks:
        raise ManifestError(f"{where}.files: the runs cover {total} ranks, the group has {ranks}")
    pages = doc["pages"]
    expected = -(-ranks // per_page)
    if not isinstance(pages, list) or len(pages) != expected:
        raise ManifestError(
            f"{where}.pages: expected {expected} pages ({ranks} ranks, {per_page} per page), found {show(pages)}"
        )
    return FileGroup(
        save_id,
        checkpoint,
        ranks,
        tuple(files),
        per_page,
        tuple(_page(p, f"{where}.pages[{i}]") for i, p in enumerate(pages)),
    )


def _page(doc: Any, where: str) -> Page:
    if not isinstance(doc, list) or len(doc) != 2 or not isinstance(doc[1], str) or not HASH.fullmatch(doc[1]):
        raise ManifestError(f"{where}: expected [size, xxh3-64 as 16 lowercase hex digits], found {show(doc)}")
    return Page(check_int(doc[0], f"{where}[0]", 1, MAX_RECORD_BYTES), doc[1])


# ---------------------------------------------------------------- pages of the rank table


@dataclass(frozen=True)
class RankEntry:
    """One rank's line of a page: its index record's size and hash, where it ran."""

    index_size: int
    index_hash: str
    host: str
    local_rank: int


def page_to_json(save_id: str, first_rank: int, entries: Sequence[RankEntry]) -> bytes:
    doc = {
        "format": PAGE_FORMAT,
        "format_version": VERSION,
        "save_id": save_id,
        "first_rank": first_rank,
        "ranks": [[e.index_size, e.index_hash, e.host, e.local_rank] for e in entries],
    }
    return (json.dumps(doc, separators=(",", ":"), ensure_ascii=True) + "\n").encode()


def parse_page(raw: bytes, *, group: FileGroup, page: int, source: str) -> tuple[RankEntry, ...]:
    """Verify page ``page`` of ``group`` read from ``source`` against the manifest, then parse it.

    Size and hash first (nothing of an unverified page is parsed), then the JSON limits, then
    one pass over its entries. Entry ``i`` is rank ``page * ranks_per_page + i``.
    """
    doc = verified_json(raw, group.pages[page], source, "page of the rank table")
    first = page * group.ranks_per_page
    count = min(group.ranks_per_page, group.ranks - first)
    head = {"format": PAGE_FORMAT, "format_version": VERSION, "save_id": group.save_id, "first_rank": first}
    check_head(doc, head, {"ranks"}, source)
    lines = doc["ranks"]
    if not isinstance(lines, list) or len(lines) != count:
        raise ManifestError(
            f"{source}: expected {count} rank entries (ranks {first}..{first + count - 1}), found {show(lines)}"
        )
    out = []
    for i, e in enumerate(lines):
        w = f"{source}: ranks[{i}] (rank {first + i})"
        if not isinstance(e, list) or len(e) != 4 or not isinstance(e[1], str) or not HASH.fullmatch(e[1]):
            raise ManifestError(f"{w}: expected [index_size, index_hash, host, local_rank], found {show(e)}")
        if not isinstance(e[2], str):
            raise ManifestError(f"{w}: the host must be a string, found {show(e[2])}")
        out.append(
            RankEntry(
                check_int(e[0], f"{w}[0]", 1, MAX_RECORD_BYTES), e[1], e[2], check_int(e[3], f"{w}[3]", 0, 1 << 62)
            )
        )
    return tuple(out)
