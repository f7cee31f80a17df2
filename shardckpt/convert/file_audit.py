"""One data file of a checkpoint read front to back and checked against what the checkpoint
records for it: size, safetensors header, whole-file xxh3 and every checksum block of every chunk.

Shared by ``shardckpt verify`` of every format: :mod:`shardckpt.convert.audit` (formats 1 and
2, the chunks and files listed in the manifest) and :mod:`shardckpt.convert.audit_v3` (format 3,
the chunks from the rules and the sizes and hashes from the index records). Each problem is
recorded with the file and key it concerns, never raised, so one run tells the whole damage.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from shardckpt.errors import ManifestError, StorageError
from shardckpt.format import datafile, integrity
from shardckpt.format.manifest import ChunkRecord
from shardckpt.storage import Storage
from shardckpt.storage.datafiles import DataFiles

FIX = "restore the file from a good copy or load an earlier checkpoint"
MAX_LISTED = 5


class Problem(NamedTuple):
    """One thing wrong with a checkpoint: the data file, the key (None when the
    problem concerns the file as a whole) and what is wrong."""

    file: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.key is None else f"{self.file}, key {self.key!r}"
        return f"{where}: {self.message}"


class AuditedChunk(NamedTuple):
    key: str
    dtype: str
    record: ChunkRecord


@dataclass
class FileResult:
    problems: list[Problem] = field(default_factory=list)
    read: bool = False
    chunks_checked: int = 0
    bytes_hashed: int = 0


def audit_file(
    files: DataFiles, name: str, chunks: list[AuditedChunk], block_bytes: int, piece_bytes: int, bar: Any
) -> FileResult:
    result = FileResult()
    storage, record = files.storage_of(name), files.files[name]
    try:
        size = storage.size(name)
        if size != record.size:
            result.problems.append(
                Problem(
                    name,
                    None,
                    f"the file is {size} bytes, the manifest says {record.size}: it was truncated or replaced; {FIX}",
                )
            )
        # A file in a base checkpoint also holds chunks this checkpoint wrote anew.
        result.problems += _check_header(storage, name, size, record.size, chunks, shared=record.checkpoint is not None)
        file_hash = _hash_file(storage, name, size, chunks, block_bytes, piece_bytes, bar, result)
    except FileNotFoundError:
        keys = sorted({c.key for c in chunks})
        if record.checkpoint is None:
            message = f"the data file is missing; it holds {len(keys)} key(s): {some_keys(keys)}; {FIX}"
        else:
            message = (
                f"the data file is missing; it holds {len(keys)} key(s) of this checkpoint: {some_keys(keys)}; "
                + files.missing_hint(name)
            )
        result.problems.append(Problem(name, None, message))
        bar.update(record.size)
        return result
    except (OSError, EOFError) as e:
        if isinstance(e, StorageError) and e.errno is None:
            # The storage refused the file for what it is (a FIFO, a link leaving the
            # folder) or the store answered with a reason: its message says what was
            # found and what to do; running verify again would change nothing.
            message = str(e)
        else:
            message = f"reading the file failed ({type(e).__name__}: {e}); check the storage and run verify again"
        result.problems.append(Problem(name, None, message))
        return result
    result.read = True
    if size == record.size and file_hash != record.hash:
        result.problems.append(
            Problem(
                name,
                None,
                f"whole-file xxh3 is {file_hash}, the manifest says {record.hash}: "
                f"the file was modified after the save; {FIX}",
            )
        )
    return result


def _check_header(
    storage: Storage, name: str, size: int, expected_size: int, chunks: list[AuditedChunk], *, shared: bool = False
) -> list[Problem]:
    """Problems where the file's safetensors header disagrees with the manifest's chunks.
    ``shared``: the file is in a base checkpoint, so header entries no chunk uses are fine."""
    try:
        prefix = _read(storage, name, 0, min(size, datafile.HEADER_LEN_BYTES))
        n = datafile.header_length(prefix, file=name, file_size=size)
        # Validated against the size the manifest records: a truncated data section is
        # reported once, by the size check, not again as a bad header.
        entries, _meta = datafile.parse_header(
            _read(storage, name, datafile.HEADER_LEN_BYTES, n), file=name, file_size=expected_size
        )
    except ManifestError as e:
        return [Problem(name, None, f"the safetensors header is unusable ({e}); {FIX}")]
    data_start = datafile.HEADER_LEN_BYTES + n
    unclaimed: dict[tuple[int, int], list[datafile.HeaderEntry]] = defaultdict(list)
    for entry in entries:
        unclaimed[(data_start + entry.begin, data_start + entry.end)].append(entry)
    problems = []
    for c in chunks:
        problem = _claim_entry(unclaimed, c)
        if problem is not None:
            problems.append(Problem(name, c.key, problem))
    if shared:
        return problems
    for (begin, end), rest in sorted(unclaimed.items()):
        problems += [
            Problem(
                name,
                None,
                f"the header lists tensor {x.name!r} at bytes [{begin}, {end}), which no manifest chunk uses; {FIX}",
            )
            for x in rest
        ]
    return problems


def _claim_entry(unclaimed: dict[tuple[int, int], list[datafile.HeaderEntry]], c: AuditedChunk) -> str | None:
    """Remove the header entry that describes chunk ``c``; the mismatch if there is none."""
    rec = c.record
    span = (rec.byte_offset, rec.byte_offset + rec.byte_length)
    there = unclaimed.get(span, [])
    where = f"chunk at offsets {list(rec.offsets)}"
    if not there:
        return f"{where}: the header lists no tensor at bytes [{span[0]}, {span[1]}) where the manifest puts it; {FIX}"
    match = next((e for e in there if e.dtype == c.dtype and e.shape == rec.sizes), None)
    if match is not None:
        there.remove(match)
        return None
    other = there.pop(0)
    return (
        f"{where}: the header says bytes [{span[0]}, {span[1]}) hold {other.dtype} {list(other.shape)} "
        f"(tensor {other.name!r}), the manifest says {c.dtype} {list(rec.sizes)}; {FIX}"
    )


class _Block:
    """One checksum block of a chunk, at absolute file bytes [start, end)."""

    __slots__ = ("chunk", "end", "expected", "hasher", "index", "start")

    def __init__(self, chunk: int, index: int, start: int, end: int, expected: str) -> None:
        self.chunk, self.index, self.start, self.end, self.expected = chunk, index, start, end, expected
        self.hasher: Any = None


def _blocks(chunks: list[AuditedChunk], block_bytes: int) -> list[_Block]:
    found = []
    for i, c in enumerate(chunks):
        rec = c.record
        for b, expected in enumerate(rec.block_hashes):
            start = rec.byte_offset + b * block_bytes
            end = min(start + block_bytes, rec.byte_offset + rec.byte_length)
            found.append(_Block(i, b, start, end, expected))
    return sorted(found, key=lambda blk: blk.start)


def _hash_file(
    storage: Storage,
    name: str,
    size: int,
    chunks: list[AuditedChunk],
    block_bytes: int,
    piece_bytes: int,
    bar: Any,
    result: FileResult,
) -> str:
    """Read ``name`` once, front to back; record chunk problems in ``result``; return the file's xxh3."""
    blocks = _blocks(chunks, block_bytes)
    bad: dict[int, list[_Block]] = defaultdict(list)
    file_hasher = integrity.new_file_hasher()
    buf = memoryview(bytearray(min(piece_bytes, size)))
    active: list[_Block] = []
    upcoming = 0
    for p0 in range(0, size, piece_bytes):
        piece = buf[: min(piece_bytes, size - p0)]
        storage.read_into(name, p0, piece)
        file_hasher.update(piece)
        while upcoming < len(blocks) and blocks[upcoming].start < p0 + len(piece):
            active.append(blocks[upcoming])
            upcoming += 1
        active = [b for b in active if not _feed(b, piece, p0, bad)]
        result.bytes_hashed += len(piece)
        bar.update(len(piece))
    cut = {b.chunk for b in active} | {b.chunk for b in blocks[upcoming:]}
    for i, c in enumerate(chunks):
        where = f"chunk at offsets {list(c.record.offsets)}"
        if i in cut:
            end = c.record.byte_offset + c.record.byte_length
            message = (
                f"{where}: its bytes [{c.record.byte_offset}, {end}) run past the end of the file ({size} bytes); {FIX}"
            )
            result.problems.append(Problem(name, c.key, message))
        else:
            result.chunks_checked += 1
        if bad[i]:
            result.problems.append(Problem(name, c.key, _bad_blocks_message(where, bad[i], len(c.record.block_hashes))))
    return str(file_hasher.hexdigest())


def _feed(b: _Block, piece: memoryview, p0: int, bad: dict[int, list[_Block]]) -> bool:
    """Hash the part of block ``b`` inside ``piece`` (file bytes from ``p0``); True once ``b`` is complete."""
    p1 = p0 + len(piece)
    part = piece[max(b.start, p0) - p0 : min(b.end, p1) - p0]
    if b.hasher is None and b.start >= p0 and b.end <= p1:
        got = integrity.hash_hex(part)
    else:
        # The block straddles pieces: the streaming hasher gives the same digest as hash_hex.
        if b.hasher is None:
            b.hasher = integrity.new_file_hasher()
        b.hasher.update(part)
        if b.end > p1:
            return False
        got = b.hasher.hexdigest()
    if got != b.expected:
        bad[b.chunk].append(b)
    return True


def _bad_blocks_message(where: str, bad: list[_Block], total: int) -> str:
    shown = ", ".join(f"block {b.index} = file bytes [{b.start}, {b.end})" for b in bad[:MAX_LISTED])
    more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return (
        f"{where}: {len(bad)} of {total} checksum blocks differ from the manifest ({shown}{more}); "
        f"the tensor data was modified or corrupted after the save; {FIX}"
    )


def _read(storage: Storage, name: str, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    storage.read_into(name, offset, memoryview(buf))
    return bytes(buf)


def some_keys(items: list[str]) -> str:
    shown = ", ".join(repr(k) for k in items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


@dataclass(frozen=True)
class FolderShare:
    """The part of a checkpoint's data that lives in one checkpoint folder: its own, or a
    base beside it that an incremental save shares unchanged tensors with (format 2).

    ``file_bytes`` sums the data files read from there (a base's file may also hold
    chunks this checkpoint wrote anew: they count here, and are never read);
    ``tensor_bytes`` sums this checkpoint's chunks stored there."""

    folder: str
    own: bool
    files: int
    file_bytes: int
    tensor_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "own": self.own,
            "files": self.files,
            "file_bytes": self.file_bytes,
            "tensor_bytes": self.tensor_bytes,
        }


@dataclass(frozen=True)
class AuditReport:
    """What :func:`verify_checkpoint` found.

    ``files_checked`` counts the data files that were present and read through,
    ``chunks_checked`` the chunks whose every checksum block was re-hashed, and
    ``bytes_hashed`` the bytes read from storage and hashed. ``folders``: which bytes live
    in which checkpoint folder (more than one for an incremental checkpoint: its own and
    the bases it reads unchanged tensors from), see :func:`folder_shares`.
    """

    path: str
    files_checked: int
    chunks_checked: int
    bytes_hashed: int
    problems: list[Problem] = field(default_factory=list)
    folders: list[FolderShare] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "files_checked": self.files_checked,
            "chunks_checked": self.chunks_checked,
            "bytes_hashed": self.bytes_hashed,
            "problems": [p._asdict() for p in self.problems],
            "folders": [f.to_json() for f in self.folders],
        }
