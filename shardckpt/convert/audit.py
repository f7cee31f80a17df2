"""Checkpoint audit: re-read every byte of a checkpoint and compare it with its manifest.

:func:`verify_checkpoint` is what ``shardckpt verify`` runs; :func:`describe_checkpoint`
is what ``shardckpt inspect`` prints. Both read the manifest with
:func:`shardckpt.engine.loading.read_manifest`, which raises typed errors for a path that is
missing, uncommitted or malformed. Past that point :func:`verify_checkpoint` never
stops at the first problem: every mismatch is recorded with the file and key it
concerns, so one run tells the whole damage.

Neither function is collective: call them from one process, with no process group.
Data files are read through :mod:`shardckpt.storage` in pieces of
``read_piece_bytes``; no file is ever held in memory whole. The storage refuses a data
file that is not a regular file (a FIFO, which would block the read forever) or that
is a symlink leaving the checkpoint folder (which would read a host file); verify
reports either as a problem of that file, and reads nothing of it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from shardckpt.convert.progress import byte_bar
from shardckpt.engine.loading import read_manifest
from shardckpt.errors import ManifestError, StorageError
from shardckpt.format import datafile, integrity
from shardckpt.format.manifest import ChunkRecord, FileRecord, Manifest
from shardckpt.format.values import decode_value
from shardckpt.storage import Storage, as_url, open_storage
from shardckpt.storage.datafiles import DataFiles

__all__ = ["AuditReport", "FolderShare", "Problem", "describe_checkpoint", "folder_shares", "verify_checkpoint"]

DEFAULT_READ_PIECE_BYTES = 4 * 1024 * 1024
_FIX = "restore the file from a good copy or load an earlier checkpoint"
_MAX_LISTED = 5


class Problem(NamedTuple):
    """One thing wrong with a checkpoint: the data file, the key (None when the
    problem concerns the file as a whole) and what is wrong."""

    file: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.key is None else f"{self.file}, key {self.key!r}"
        return f"{where}: {self.message}"


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


def folder_shares(manifest: Manifest, path: str) -> list[FolderShare]:
    """Where the data of the checkpoint at ``path`` lives, folder by folder: its own folder
    first (also when it holds no data file), then each base in name order."""
    own = path.rstrip("/").rsplit("/", 1)[-1]
    files: dict[str | None, list[int]] = {None: []}
    tensor_bytes: dict[str | None, int] = defaultdict(int)
    for record in manifest.files.values():
        files.setdefault(record.checkpoint, []).append(record.size)
    for t in manifest.tensors.values():
        for c in t.chunks:
            tensor_bytes[manifest.files[c.file].checkpoint] += c.byte_length
    ordered = [None, *sorted(k for k in files if k is not None)]
    return [
        FolderShare(own if k is None else k, k is None, len(files[k]), sum(files[k]), tensor_bytes[k]) for k in ordered
    ]


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


class _Chunk(NamedTuple):
    key: str
    dtype: str
    record: ChunkRecord


@dataclass
class _FileResult:
    problems: list[Problem] = field(default_factory=list)
    read: bool = False
    chunks_checked: int = 0
    bytes_hashed: int = 0


def verify_checkpoint(
    path: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    read_piece_bytes: int = DEFAULT_READ_PIECE_BYTES,
) -> AuditReport:
    """Check every data file of the checkpoint at ``path`` against its manifest.

    For each file listed in the manifest: it exists and has the recorded size; its
    safetensors header parses and lists exactly the manifest's chunks (byte ranges,
    dtypes, shapes); its whole-file xxh3 matches; and every checksum block of every
    chunk matches. Each file is read once, sequentially, ``read_piece_bytes`` at a time.

    Raises CheckpointNotFoundError / NotCommittedError / ManifestError when ``path``
    holds no readable committed manifest; damage to data files is reported in the
    returned :class:`AuditReport`, never raised. ``progress`` shows a tqdm bar of bytes
    on stderr.
    """
    path = as_url(path)
    if read_piece_bytes < 1:
        raise ValueError(f"read_piece_bytes must be positive, got {read_piece_bytes}")
    storage = open_storage(path, storage_options)
    manifest = read_manifest(storage)
    files = DataFiles(storage, manifest.files)  # a format-2 checkpoint's shared files live in its bases
    chunks = _chunks_by_file(manifest)
    total = sum(f.size for f in manifest.files.values())
    results = []
    with byte_bar(total, "verify", enabled=progress) as bar:
        for name in sorted(manifest.files):
            file_chunks = chunks.get(name, [])
            block = manifest.hash_block_bytes
            result = _audit_file(files, name, file_chunks, block, read_piece_bytes, bar)
            base = manifest.files[name].checkpoint
            if base is not None:  # say where the file is: not in this checkpoint's folder
                where = f"in base checkpoint {base!r} ({files.storage_of(name).url}): "
                result.problems = [p._replace(message=where + p.message) for p in result.problems]
            results.append(result)
    return AuditReport(
        path=path,
        files_checked=sum(r.read for r in results),
        chunks_checked=sum(r.chunks_checked for r in results),
        bytes_hashed=sum(r.bytes_hashed for r in results),
        problems=[p for r in results for p in r.problems],
        folders=folder_shares(manifest, path),
    )


def _chunks_by_file(manifest: Manifest) -> dict[str, list[_Chunk]]:
    by_file: dict[str, list[_Chunk]] = defaultdict(list)
    for key, tensor in sorted(manifest.tensors.items()):
        for c in tensor.chunks:
            by_file[c.file].append(_Chunk(key, tensor.dtype, c))
    return by_file


def _audit_file(
    files: DataFiles, name: str, chunks: list[_Chunk], block_bytes: int, piece_bytes: int, bar: Any
) -> _FileResult:
    result = _FileResult()
    storage, record = files.storage_of(name), files.files[name]
    try:
        size = storage.size(name)
        if size != record.size:
            result.problems.append(
                Problem(
                    name,
                    None,
                    f"the file is {size} bytes, the manifest says {record.size}: it was truncated or replaced; {_FIX}",
                )
            )
        # A file in a base checkpoint also holds chunks this checkpoint wrote anew.
        result.problems += _check_header(storage, name, size, record.size, chunks, shared=record.checkpoint is not None)
        file_hash = _hash_file(storage, name, size, chunks, block_bytes, piece_bytes, bar, result)
    except FileNotFoundError:
        keys = sorted({c.key for c in chunks})
        if record.checkpoint is None:
            message = f"the data file is missing; it holds {len(keys)} key(s): {_some(keys)}; {_FIX}"
        else:
            message = (
                f"the data file is missing; it holds {len(keys)} key(s) of this checkpoint: {_some(keys)}; "
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
                f"the file was modified after the save; {_FIX}",
            )
        )
    return result


def _check_header(
    storage: Storage, name: str, size: int, expected_size: int, chunks: list[_Chunk], *, shared: bool = False
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
        return [Problem(name, None, f"the safetensors header is unusable ({e}); {_FIX}")]
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
                f"the header lists tensor {x.name!r} at bytes [{begin}, {end}), which no manifest chunk uses; {_FIX}",
            )
            for x in rest
        ]
    return problems


def _claim_entry(unclaimed: dict[tuple[int, int], list[datafile.HeaderEntry]], c: _Chunk) -> str | None:
    """Remove the header entry that describes chunk ``c``; the mismatch if there is none."""
    rec = c.record
    span = (rec.byte_offset, rec.byte_offset + rec.byte_length)
    there = unclaimed.get(span, [])
    where = f"chunk at offsets {list(rec.offsets)}"
    if not there:
        return f"{where}: the header lists no tensor at bytes [{span[0]}, {span[1]}) where the manifest puts it; {_FIX}"
    match = next((e for e in there if e.dtype == c.dtype and e.shape == rec.sizes), None)
    if match is not None:
        there.remove(match)
        return None
    other = there.pop(0)
    return (
        f"{where}: the header says bytes [{span[0]}, {span[1]}) hold {other.dtype} {list(other.shape)} "
        f"(tensor {other.name!r}), the manifest says {c.dtype} {list(rec.sizes)}; {_FIX}"
    )


class _Block:
    """One checksum block of a chunk, at absolute file bytes [start, end)."""

    __slots__ = ("chunk", "end", "expected", "hasher", "index", "start")

    def __init__(self, chunk: int, index: int, start: int, end: int, expected: str) -> None:
        self.chunk, self.index, self.start, self.end, self.expected = chunk, index, start, end, expected
        self.hasher: Any = None


def _blocks(chunks: list[_Chunk], block_bytes: int) -> list[_Block]:
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
    chunks: list[_Chunk],
    block_bytes: int,
    piece_bytes: int,
    bar: Any,
    result: _FileResult,
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
                f"{where}: its bytes [{c.record.byte_offset}, {end}) run past the end of the file "
                f"({size} bytes); {_FIX}"
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
    shown = ", ".join(f"block {b.index} = file bytes [{b.start}, {b.end})" for b in bad[:_MAX_LISTED])
    more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    return (
        f"{where}: {len(bad)} of {total} checksum blocks differ from the manifest ({shown}{more}); "
        f"the tensor data was modified or corrupted after the save; {_FIX}"
    )


def _read(storage: Storage, name: str, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    storage.read_into(name, offset, memoryview(buf))
    return bytes(buf)


def _some(items: list[str]) -> str:
    shown = ", ".join(repr(k) for k in items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


# ---------------------------------------------------------------- describe


def describe_checkpoint(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-able summary of the checkpoint at ``path``, from its manifest alone.

    Reads no data file. ``bases`` and ``folders`` say where the data lives: an incremental
    checkpoint (format 2) reads unchanged tensors from base checkpoints beside it.
    Values are shown as the manifest stores them (JSON, with
    tuples and non-finite floats tagged as ``{"$tuple": ...}`` / ``{"$float": ...}``).
    Raises like :func:`shardckpt.engine.loading.read_manifest`.
    """
    path = as_url(path)
    m = read_manifest(open_storage(path, storage_options))
    keys: dict[str, dict[str, Any]] = {}
    for key, t in m.tensors.items():
        keys[key] = {
            "kind": "tensor",
            "dtype": t.dtype,
            "shape": list(t.shape),
            "chunks": len(t.chunks),
            "bytes": sum(c.byte_length for c in t.chunks),
        }
    for key, v in m.values.items():
        keys[key] = {"kind": "value", "type": _value_type(v), "value": v}
    return {
        "path": path,
        **m.provenance(),
        "hash_block_bytes": m.hash_block_bytes,
        "num_keys": len(keys),
        "num_tensors": len(m.tensors),
        "num_values": len(m.values),
        "num_files": len(m.files),
        "total_bytes": sum(f.size for f in m.files.values()),
        "tensor_bytes": m.total_tensor_bytes,
        "metadata": m.metadata,
        "bases": list(m.bases),
        "folders": [share.to_json() for share in folder_shares(m, path)],
        "files": {n: _file_summary(f) for n, f in sorted(m.files.items())},
        "keys": dict(sorted(keys.items())),
    }


def _file_summary(f: FileRecord) -> dict[str, Any]:
    """A data file in ``inspect --json``; ``checkpoint``: the base folder holding it, if not this one."""
    return {"size": f.size, "rank": f.rank, **({"checkpoint": f.checkpoint} if f.checkpoint is not None else {})}


def _value_type(encoded: Any) -> str:
    value = decode_value(encoded)
    return "null" if value is None else type(value).__name__
