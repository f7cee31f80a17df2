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
from typing import Any

from shardckpt.convert.audit_v3 import describe_v3, verify_v3
from shardckpt.convert.file_audit import AuditedChunk, AuditReport, FolderShare, Problem, audit_file
from shardckpt.convert.progress import byte_bar
from shardckpt.engine.loading import read_any_manifest
from shardckpt.format.manifest import FileRecord, Manifest
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.format.values import decode_value
from shardckpt.storage import as_url, open_storage
from shardckpt.storage.datafiles import DataFiles

__all__ = ["AuditReport", "FolderShare", "Problem", "describe_checkpoint", "folder_shares", "verify_checkpoint"]

DEFAULT_READ_PIECE_BYTES = 4 * 1024 * 1024


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
    manifest = read_any_manifest(storage)
    if isinstance(manifest, ManifestV3):
        return verify_v3(storage, manifest, path, progress=progress, read_piece_bytes=read_piece_bytes)
    files = DataFiles(storage, manifest.files)  # a format-2 checkpoint's shared files live in its bases
    chunks = _chunks_by_file(manifest)
    total = sum(f.size for f in manifest.files.values())
    results = []
    with byte_bar(total, "verify", enabled=progress) as bar:
        for name in sorted(manifest.files):
            file_chunks = chunks.get(name, [])
            block = manifest.hash_block_bytes
            result = audit_file(files, name, file_chunks, block, read_piece_bytes, bar)
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


def _chunks_by_file(manifest: Manifest) -> dict[str, list[AuditedChunk]]:
    by_file: dict[str, list[AuditedChunk]] = defaultdict(list)
    for key, tensor in sorted(manifest.tensors.items()):
        for c in tensor.chunks:
            by_file[c.file].append(AuditedChunk(key, tensor.dtype, c))
    return by_file


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
    m = read_any_manifest(open_storage(path, storage_options))
    if isinstance(m, ManifestV3):
        return describe_v3(m, path)
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
