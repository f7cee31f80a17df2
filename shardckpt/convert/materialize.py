"""Materialize: a standalone copy of a checkpoint that reads nothing from other folders.

An incremental checkpoint (format 2) lists data files that live in base checkpoints
beside it. :func:`materialize_checkpoint` writes a new checkpoint holding every byte it
needs: each data file (its own, and each one it reads from a base) is streamed into the
new folder, keeping only the chunks this checkpoint uses (a base's file also holds chunks
the incremental save wrote anew), with every byte checked against the manifest's block
hashes, and each whole source file checked against its file hash when all of it is kept.
The new manifest has no ``bases`` and no ``checkpoint`` fields.

A format-3 source (docs/format.md section 12) is first listed chunk by chunk
(:func:`shardckpt.convert.listed_v3.listed_manifest`: every rule expanded, each chunk's block
hashes and each file's size and hash taken from the verified index records), then copied the
same way into a format-1 (or, with digests, format-2) checkpoint. A format-3 output is refused:
its writer works from a save's plan, not from a copy.

The commit is a save's (:mod:`shardckpt.engine.writer`): the folder must be new or empty,
the save marker is created exclusively before any data byte, the data files are made
durable, and ``manifest.json`` is created exclusively last; a failure removes what this
call wrote and nothing else. Not collective: call it from one process.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from shardckpt.convert.audit import DEFAULT_READ_PIECE_BYTES, FolderShare, folder_shares
from shardckpt.convert.listed_v3 import listed_manifest
from shardckpt.convert.progress import byte_bar
from shardckpt.engine.claim import claim_folder, create_file, discard_save
from shardckpt.engine.loading import read_any_manifest
from shardckpt.engine.options import check_io_threads
from shardckpt.errors import (
    CheckpointExistsError,
    DestinationNotEmptyError,
    IntegrityError,
    ManifestError,
    StorageError,
)
from shardckpt.format import datafile, integrity, layout
from shardckpt.format.manifest import ChunkRecord, FileRecord, Manifest, TensorRecord, manifest_to_json
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.storage import Storage, as_url, folder, open_storage
from shardckpt.storage.datafiles import DataFiles

__all__ = ["MaterializeReport", "materialize_checkpoint"]


@dataclass(frozen=True)
class MaterializeReport:
    """What :func:`materialize_checkpoint` wrote: ``files`` data files of ``file_bytes``
    bytes (``tensor_bytes`` of them tensor data) at ``path``, in format ``format_version``;
    ``folders`` says where the source's bytes were read from (its own folder, its bases)."""

    source: str
    path: str
    format_version: int
    files: int
    file_bytes: int
    tensor_bytes: int
    folders: list[FolderShare]

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "path": self.path,
            "format_version": self.format_version,
            "files": self.files,
            "file_bytes": self.file_bytes,
            "tensor_bytes": self.tensor_bytes,
            "folders": [f.to_json() for f in self.folders],
        }


def materialize_checkpoint(
    source: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    format_version: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
    read_piece_bytes: int = DEFAULT_READ_PIECE_BYTES,
    num_io_threads: int = 2,
) -> MaterializeReport:
    """Copy the checkpoint at ``source`` to the new folder ``path``, with no references.

    ``format_version``: None keeps the chunk digests when the source has them (format 2
    without bases: the copy can be the base of a later incremental save, and loads with
    shardckpt >= the version that introduced format 2); 1 drops them (format 1: every
    shardckpt reads it, but an incremental save against it writes everything again).
    A format-3 source is copied into format 1 (its saves record no digests); 3 is refused.

    ``path`` must not exist or be an empty folder (CheckpointExistsError for a
    checkpoint there, DestinationNotEmptyError for anything else); nothing at ``source``
    or in its bases is changed. A damaged or missing source byte raises IntegrityError
    naming the file (and the base holding it) before anything is committed.
    ``num_io_threads`` files are copied at once (an object store answers each request
    slowly); memory: one piece of ``read_piece_bytes`` (rounded up to whole checksum
    blocks) per thread. ``storage_options`` apply to both locations.
    """
    source, path = as_url(source, "source"), as_url(path)
    if read_piece_bytes < 1:
        raise ValueError(f"read_piece_bytes must be positive, got {read_piece_bytes}")
    check_io_threads(num_io_threads)
    if format_version == 3:
        raise ValueError(
            f"materialize {source}: format_version=3 is not written by materialize (its writer works from a save's "
            "plan); materialize writes formats 1 and 2. For a format-3 copy, load the checkpoint and save it with "
            "shardckpt.save(state_dict, path, format_version=3)"
        )
    src = open_storage(source, storage_options)
    found = read_any_manifest(src)
    manifest = listed_manifest(src, found) if isinstance(found, ManifestV3) else found
    keep_digests = _keep_digests(manifest, format_version, source)
    dst = open_storage(path, storage_options)
    if dst.location.rstrip("/").startswith(src.location.rstrip("/") + "/"):
        raise ValueError(
            f"materialize {source} to {path}: the destination is inside the checkpoint folder, which would then "
            "hold a foreign folder; materialize to a folder outside it"
        )
    _check_new_folder(dst, source)
    save_id = uuid.uuid4().hex[:12]
    claim_folder(dst, save_id, overwrite=False, what="materialize")
    try:
        copy = _Copy(DataFiles(src, manifest.files), dst, manifest, save_id, keep_digests, read_piece_bytes)
        with byte_bar(manifest.total_tensor_bytes, "materialize", enabled=progress) as bar:
            copy.run(bar, num_io_threads)
        result = copy.manifest()
        if result.files:  # a checkpoint of values only has no data folder
            dst.sync_dir(layout.DATA_DIR)
        _check_sizes(dst, result)
        create_file(
            dst,
            layout.MANIFEST_NAME,
            manifest_to_json(result),
            overwrite=False,
            lost_race="another save committed this folder first; the copy was not committed. "
            "Materialize into a new folder.",
            what="materialize",
        )
    except BaseException:
        discard_save(dst, save_id)
        raise
    return MaterializeReport(
        source=source,
        path=path,
        format_version=2 if result.is_v2 else 1,
        files=len(result.files),
        file_bytes=sum(f.size for f in result.files.values()),
        tensor_bytes=result.total_tensor_bytes,
        folders=folder_shares(manifest, source),
    )


def _keep_digests(manifest: Manifest, format_version: int | None, source: str) -> bool:
    has_digests = any(c.digest is not None for t in manifest.tensors.values() for c in t.chunks)
    if format_version is None:
        return has_digests
    if format_version == 1:
        return False
    if format_version == 2 and (has_digests or not manifest.tensors):
        return True
    if format_version == 2:
        raise ValueError(
            f"{source} has no chunk digests (a save without incremental=True), so a format-2 copy cannot be "
            "made; leave the format version unset (the copy is then format 1, like the source)"
        )
    raise ValueError(f"format_version must be 1, 2 or None (keep the source's digests), got {format_version!r}")


def _check_new_folder(dst: Storage, source: str) -> None:
    """The copy goes into a new or empty folder only: never over a checkpoint, never into a user's folder."""
    found = folder.contents(dst)
    if found.is_empty:
        return
    what = f"materialize {source} to {dst.url}: the destination"
    if found.is_ours:
        raise CheckpointExistsError(
            f"{what} already holds a shardckpt checkpoint (or an interrupted save); materialize never replaces "
            "one. Pick a new folder."
        )
    shown = ", ".join(repr(n) for n in found.foreign[:5])
    raise DestinationNotEmptyError(
        f"{what} is not empty ({shown}); materialize writes only into a new or empty folder, so it never "
        "deletes or overwrites your files. Pick a new folder."
    )


def _check_sizes(dst: Storage, m: Manifest) -> None:
    """Before the commit, as a save does: every listed file is there with its size."""
    for name, record in sorted(m.files.items()):
        size = dst.size(name)
        if size != record.size:
            raise StorageError(
                f"materialize to {dst.url}: data file {name} has {size} bytes, expected {record.size}; something "
                "changed it while the copy ran. Nothing was committed; materialize again into a new folder."
            )


class _Copy:
    """The copy of one checkpoint's data files, a file per task on a thread pool;
    :meth:`manifest` then describes the copy. Each task holds one piece buffer."""

    def __init__(
        self, files: DataFiles, dst: Storage, m: Manifest, save_id: str, keep_digests: bool, piece_bytes: int
    ) -> None:
        self.files, self.dst, self.m, self.save_id, self.keep_digests = files, dst, m, save_id, keep_digests
        block = m.hash_block_bytes
        self.piece_bytes = max(1, piece_bytes // block) * block  # whole blocks: each is verified as read
        self.chunks: dict[str, list[tuple[str, str, ChunkRecord]]] = defaultdict(list)
        for key, t in m.tensors.items():
            for c in t.chunks:
                self.chunks[c.file].append((key, t.dtype, c))
        self.moved: dict[tuple[str, tuple[int, ...]], ChunkRecord] = {}
        self.new_files: dict[str, FileRecord] = {}
        self._cancel = threading.Event()
        self._lock = threading.Lock()  # the progress bar and the results above

    def run(self, bar: Any, threads: int) -> None:
        """Copy every file; the first failure stops the others at their next piece and is raised."""
        jobs: list[tuple[str, str]] = []
        per_rank: dict[int, int] = defaultdict(int)
        for name in sorted(self.chunks):
            rank = self.m.files[name].rank
            jobs.append((name, layout.data_file_name(self.save_id, rank, per_rank[rank])))
            per_rank[rank] += 1
        pool = ThreadPoolExecutor(max(1, min(threads, len(jobs))), thread_name_prefix="shardckpt-materialize")
        try:
            for f in [pool.submit(self._copy_file, name, out, bar) for name, out in jobs]:
                f.result()
        except BaseException:
            self._cancel.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def manifest(self) -> Manifest:
        tensors = {
            key: TensorRecord(t.dtype, t.shape, tuple(self.moved[(key, c.offsets)] for c in t.chunks))
            for key, t in self.m.tensors.items()
        }
        return dataclasses.replace(self.m, tensors=tensors, files=dict(self.new_files), bases=())

    def _copy_file(self, name: str, out: str, bar: Any) -> None:
        """Stream the chunks of source file ``name`` this checkpoint uses into ``out``."""
        record = self.m.files[name]
        where = f"data file {self.files.describe(name)}"
        try:
            size = self.files.size(name)
        except FileNotFoundError as e:
            raise IntegrityError(f"{where} is missing; {self.files.missing_hint(name)}") from e
        if size != record.size:
            raise IntegrityError(
                f"{where} is {size} bytes, the manifest says {record.size}: it was truncated or replaced; "
                "restore it from a good copy"
            )
        head, entries, meta = self._read_header(name, size, where)
        chunks = sorted(self.chunks[name], key=lambda kc: kc[2].byte_offset)
        kept = _claim(entries, len(head), chunks, where)
        # All of the file kept, back to back: hashing what is read checks the whole-file hash too.
        whole = len(kept) == len(entries) and _tiles(len(head), size, [c for _, _, c in chunks])
        version = "2" if self.keep_digests else "1"
        header, new_entries = _packed(kept, {**meta, "save_id": self.save_id, "format_version": version})
        src_hasher, out_hasher = integrity.new_file_hasher(), integrity.new_file_hasher()
        src_hasher.update(head)
        out_hasher.update(header)
        moved: dict[tuple[str, tuple[int, ...]], ChunkRecord] = {}
        stream = self.dst.open_write(out)
        try:
            stream.write(header)
            for (key, _dtype, c), entry in zip(chunks, new_entries, strict=True):
                for piece in self._pieces(name, key, c):
                    src_hasher.update(piece)
                    out_hasher.update(piece)
                    stream.write(piece)
                    with self._lock:
                        bar.update(len(piece))
                offset = len(header) + entry.begin
                moved[(key, c.offsets)] = c.replace(
                    file=out, byte_offset=offset, digest=c.digest if self.keep_digests else None
                )
            if whole and src_hasher.hexdigest() != record.hash:
                raise IntegrityError(
                    f"{where}: whole-file xxh3 is {src_hasher.hexdigest()}, the manifest says {record.hash}: the "
                    "file was modified after the save; restore it from a good copy"
                )
            stream.finish()
        except BaseException:
            stream.abort()
            raise
        with self._lock:
            self.moved.update(moved)
            out_size = len(header) + (new_entries[-1].end if new_entries else 0)
            self.new_files[out] = FileRecord(size=out_size, hash=out_hasher.hexdigest(), rank=record.rank)

    def _read_header(
        self, name: str, size: int, where: str
    ) -> tuple[bytes, list[datafile.HeaderEntry], dict[str, str]]:
        """The file's raw header bytes (length prefix included), its entries and metadata."""
        prefix = self._read(name, 0, min(size, datafile.HEADER_LEN_BYTES))
        try:
            n = datafile.header_length(prefix, file=name, file_size=size)
            raw = self._read(name, datafile.HEADER_LEN_BYTES, n)
            entries, meta = datafile.parse_header(raw, file=name, file_size=size)
        except ManifestError as e:
            raise IntegrityError(
                f"{where}: the safetensors header is unusable ({e}); restore it from a good copy"
            ) from e
        return prefix + raw, entries, meta

    def _pieces(self, name: str, key: str, c: ChunkRecord) -> Any:
        """Chunk ``c``'s bytes, one piece (whole checksum blocks) at a time, each verified."""
        block = self.m.hash_block_bytes
        buf = memoryview(bytearray(min(self.piece_bytes, c.byte_length)))
        for lo in range(0, c.byte_length, self.piece_bytes):
            if self._cancel.is_set():
                raise _Cancelled(f"copy of {name} stopped: another file of the copy failed")
            piece = buf[: min(self.piece_bytes, c.byte_length - lo)]
            self.files.read_into(name, c.byte_offset + lo, piece)
            integrity.verify_blocks(
                piece,
                first_block=lo // block,
                block_bytes=block,
                expected=c.block_hashes,
                where=f"{self.files.describe(name)}, key {key!r}, chunk at {list(c.offsets)}",
            )
            yield piece

    def _read(self, name: str, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.files.read_into(name, offset, memoryview(buf))
        return bytes(buf)


class _Cancelled(Exception):
    """A copy thread stopped because another one failed (that failure is what is raised)."""


def _claim(
    entries: list[datafile.HeaderEntry], header_bytes: int, chunks: list[tuple[str, str, ChunkRecord]], where: str
) -> list[datafile.HeaderEntry]:
    """The header entry of each chunk (in the chunks' order); IntegrityError when the
    header does not describe a chunk where the manifest puts it."""
    by_span: dict[tuple[int, int], list[datafile.HeaderEntry]] = defaultdict(list)
    for e in entries:
        by_span[(header_bytes + e.begin, header_bytes + e.end)].append(e)
    kept = []
    for key, dtype, c in chunks:
        there = by_span.get((c.byte_offset, c.byte_offset + c.byte_length), [])
        match = next((e for e in there if e.dtype == dtype and e.shape == c.sizes), None)
        if match is None:
            raise IntegrityError(
                f"{where}: its header lists no {dtype} {list(c.sizes)} tensor at bytes "
                f"[{c.byte_offset}, {c.byte_offset + c.byte_length}) where the manifest puts key {key!r}, chunk at "
                f"{list(c.offsets)}; the file was replaced, restore it from a good copy"
            )
        there.remove(match)
        kept.append(match)
    return kept


def _packed(kept: list[datafile.HeaderEntry], meta: dict[str, str]) -> tuple[bytes, list[datafile.HeaderEntry]]:
    """A new file's header and entries: the ``kept`` entries, in order, back to back."""
    packed, begin = [], 0
    for entry in kept:
        packed.append(dataclasses.replace(entry, begin=begin, end=begin + entry.end - entry.begin))
        begin += entry.end - entry.begin
    return datafile.build_header(packed, meta), packed


def _tiles(start: int, size: int, chunks: list[ChunkRecord]) -> bool:
    """Whether ``chunks`` (sorted) cover bytes [start, size) back to back."""
    for c in chunks:
        if c.byte_offset != start:
            return False
        start += c.byte_length
    return start == size
