"""``shardckpt verify`` and ``inspect`` of a format-3 checkpoint (docs/format.md section 12).

:func:`verify_v3` walks the whole checksum chain: every page of the rank table of every group
of the file table, every index record those pages point to, and every byte of every data
file those records describe, through the same per-file checks as formats 1 and 2
(:func:`shardckpt.convert.file_audit.audit_file`: size, safetensors header against the
manifest's chunks, whole-file xxh3, every checksum block). The manifest's chunks are the
cells of its rules and its listed chunks; each must have an entry of its length in the
index record of its file; the manifest's copy of one file's index (``inline_index``, 12.8)
must equal that file's object in its record. Problems are recorded, never raised, so one run tells the whole
damage; a page or index record that cannot be trusted is one problem, and the files it
would have verified are not read.

:func:`describe_v3` is ``inspect``'s summary from the manifest alone: file sizes live in the
index records, so it reports tensor bytes and the file table, not file bytes.

Not collective; call from one process. Expanding the rules is O(cells): ``verify`` reads
every byte anyway.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import Any

from shardckpt.convert.file_audit import AuditedChunk, AuditReport, FileResult, FolderShare, Problem, audit_file
from shardckpt.convert.progress import byte_bar
from shardckpt.engine.load_v3 import read_record
from shardckpt.errors import ManifestError
from shardckpt.format import datafile, layout, rules
from shardckpt.format.file_table import FileGroup, RankEntry, parse_page
from shardckpt.format.manifest import ChunkRecord, FileRecord
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.format.rank_index import FileIndex, IndexEntry, parse_rank_index
from shardckpt.format.values import decode_value
from shardckpt.storage import Storage
from shardckpt.storage.datafiles import DataFiles

_Placed = tuple[str, str, tuple[int, ...], tuple[int, ...], int, int]  # key, dtype, offsets, sizes, byte offset, length


def verify_v3(
    storage: Storage, manifest: ManifestV3, path: str, *, progress: bool, read_piece_bytes: int
) -> AuditReport:
    """Check every page, index record and data byte of the format-3 checkpoint in ``storage``."""
    placed = _chunks_by_position(manifest)
    problems: list[Problem] = []
    records: dict[str, FileRecord] = {}
    chunks: dict[str, list[AuditedChunk]] = {}
    for g, group in enumerate(manifest.file_table.groups):
        group_storage = storage if group.checkpoint is None else storage.sibling(group.checkpoint)
        for rank, files in _walk_group(group, group_storage, manifest.hash_block_bytes, path, problems):
            for k, index in enumerate(files):
                name = layout.data_file_name(group.save_id, rank, k)
                records[name] = FileRecord(index.size, index.hash, rank, group.checkpoint)
                position = manifest.file_table.position(g, rank, k)
                _check_inline(manifest, position, name, index, problems)
                mine = placed.pop(position, [])
                chunks[name] = _match_index(name, mine, index, problems, own=group.checkpoint is None)
    data = DataFiles(storage, records)
    results: list[FileResult] = []
    with byte_bar(sum(r.size for r in records.values()), "verify", enabled=progress) as bar:
        for name in sorted(records):
            result = audit_file(data, name, chunks[name], manifest.hash_block_bytes, read_piece_bytes, bar)
            # a file's size and hash come from its index record here, not from the manifest
            said = [
                p._replace(message=p.message.replace("the manifest says", "its index record says"))
                for p in result.problems
            ]
            result.problems = said
            results.append(result)
    return AuditReport(
        path=path,
        files_checked=sum(r.read for r in results),
        chunks_checked=sum(r.chunks_checked for r in results),
        bytes_hashed=sum(r.bytes_hashed for r in results),
        problems=problems + [p for r in results for p in r.problems],
        folders=_folders(manifest, path, records, chunks),
    )


def _check_inline(manifest: ManifestV3, position: int, name: str, index: FileIndex, problems: list[Problem]) -> None:
    """The manifest's copy of a file's index (``inline_index``, format.md 12.8) must equal
    the file object of the rank's index record (less its digests, which the copy never has):
    a loader trusts the copy alone."""
    inline = manifest.inline_index
    index = index.without_digests()
    if inline is None or inline.file != position or inline.index == index:
        return
    copy = inline.index
    if (copy.size, copy.hash) != (index.size, index.hash):
        what = f"size {copy.size} and hash {copy.hash}, the record size {index.size} and hash {index.hash}"
    else:
        pairs = itertools.zip_longest(copy.entries, index.entries)
        at = next(i for i, (a, b) in enumerate(pairs) if a != b)
        what = f"{len(copy.entries)} entries, the record {len(index.entries)}; they first differ at entry {at}"
    problems.append(
        Problem(
            name,
            None,
            f"ManifestError: the manifest's inline_index (format.md 12.8) differs from this file's object in its "
            f"index record (the copy: {what}); the manifest or the record was altered after the save, and a "
            "load trusts the copy. Restore the checkpoint from a copy, or load an earlier checkpoint.",
        )
    )


def _by_index(p: Problem) -> Problem:
    return p._replace(message=p.message.replace("the manifest says", "its index record says"))


def _chunks_by_position(manifest: ManifestV3) -> dict[int, list[_Placed]]:
    """Every chunk of the manifest (rule cells and listed chunks), by file position. A listed
    empty chunk (the writer lists a rank's empty DTensor piece beside the rule, and writes its
    header entry) claims that entry; it has no bytes and no index entry."""
    by_file: dict[int, list[_Placed]] = defaultdict(list)
    for key, t in sorted(manifest.tensors.items()):
        size = datafile.itemsize(t.dtype)
        cells = rules.expand(t.rule) if t.rule is not None else []
        boxes = [(c.offsets, c.sizes, c.file, c.byte_offset) for c in cells]
        boxes += [(c.offsets, c.sizes, c.file, c.byte_offset) for c in t.chunks]
        for offsets, sizes, file, byte_offset in boxes:
            by_file[file].append((key, t.dtype, offsets, sizes, byte_offset, math.prod(sizes) * size))
    return by_file


def _walk_group(
    group: FileGroup, storage: Storage, block_bytes: int, path: str, problems: list[Problem]
) -> list[tuple[int, tuple[FileIndex, ...]]]:
    """Each rank of ``group`` whose page and index record verify, with its files' index;
    a page or record that does not is recorded in ``problems``."""
    out = []
    for p, page in enumerate(group.pages):
        name = layout.rank_page_name(group.save_id, p)
        try:
            raw = read_record(storage, name, page.size, what="page of the rank table", shown=repr(name), where=path)
            entries = parse_page(raw, group=group, page=p, source=path)
        except ManifestError as e:
            first = p * group.ranks_per_page
            last = min(first + group.ranks_per_page, group.ranks) - 1
            problems.append(Problem(name, None, f"{e} The data files of ranks {first}..{last} were not checked."))
            continue
        for i, entry in enumerate(entries):
            rank = p * group.ranks_per_page + i
            files = _rank_index(group, storage, rank, entry, block_bytes, path, problems)
            if files is not None:
                out.append((rank, files))
    return out


def _rank_index(
    group: FileGroup,
    storage: Storage,
    rank: int,
    entry: RankEntry,
    block_bytes: int,
    path: str,
    problems: list[Problem],
) -> tuple[FileIndex, ...] | None:
    name = layout.rank_index_name(group.save_id, rank)
    try:
        raw = read_record(
            storage, name, entry.index_size, what=f"index record of rank {rank}", shown=repr(name), where=path
        )
        return parse_rank_index(raw, entry=entry, group=group, rank=rank, block_bytes=block_bytes, source=path)
    except ManifestError as e:
        problems.append(Problem(name, None, f"{e} The data files of rank {rank} were not checked."))
        return None


def _match_index(
    name: str, placed: list[_Placed], index: FileIndex, problems: list[Problem], *, own: bool
) -> list[AuditedChunk]:
    """The chunks the manifest places in file ``name``, each with the block hashes of its
    entry in the file's index record; a chunk without one, and (in this checkpoint's own
    files) an entry no chunk uses, are problems."""
    out, used = [], set()
    for key, dtype, offsets, sizes, offset, length in placed:
        if not length:  # an empty chunk: only its header entry to claim
            out.append(AuditedChunk(key, dtype, ChunkRecord(offsets, sizes, name, offset, 0, ())))
            continue
        try:
            e: IndexEntry = index.entry(offset, length, where=f"chunk at offsets {list(offsets)}")
        except ManifestError as err:
            problems.append(Problem(name, key, str(err)))
            continue
        used.add(offset)
        hashes = tuple(e.block_hash(i) for i in range(len(e.block_hashes) // 16))
        out.append(AuditedChunk(key, dtype, ChunkRecord(offsets, sizes, name, offset, length, hashes, e.digest)))
    if own:
        for e in index.entries:
            if e.byte_offset not in used and e.byte_length:
                problems.append(
                    Problem(
                        name,
                        None,
                        f"its index record lists a chunk at bytes [{e.byte_offset}, {e.byte_offset + e.byte_length}) "
                        "that no tensor of the manifest uses; the index record or the manifest was altered",
                    )
                )
    return out


def _folders(
    manifest: ManifestV3, path: str, records: dict[str, FileRecord], chunks: dict[str, list[AuditedChunk]]
) -> list[FolderShare]:
    """Which bytes live in which folder: the own group's first, then each base's."""
    own = path.rstrip("/").rsplit("/", 1)[-1]
    shares = []
    for group in manifest.file_table.groups:
        names = [n for n, r in records.items() if r.checkpoint == group.checkpoint]
        stored = sum(c.record.byte_length for n in names for c in chunks[n])
        size = sum(records[n].size for n in names)
        shares.append(FolderShare(group.checkpoint or own, group.checkpoint is None, len(names), size, stored))
    return shares


def describe_v3(manifest: ManifestV3, path: str) -> dict[str, Any]:
    """``inspect``'s summary of a format-3 manifest (see the module docstring)."""
    keys: dict[str, dict[str, Any]] = {}
    tensor_bytes = 0
    for key, t in manifest.tensors.items():
        n = math.prod(t.shape) * datafile.itemsize(t.dtype)
        tensor_bytes += n
        cells = t.rule.cells if t.rule is not None else 0
        listed = sum(1 for c in t.chunks if math.prod(c.sizes))
        keys[key] = {
            "kind": "tensor",
            "dtype": t.dtype,
            "shape": list(t.shape),
            "chunks": cells + listed,
            "bytes": n,
            "by_rule": t.rule is not None,
        }
    for key, v in manifest.values.items():
        keys[key] = {"kind": "value", "type": _value_type(v), "value": v}
    groups = manifest.file_table.groups
    return {
        "path": path,
        "format_version": 3,
        "shardckpt_version": manifest.shardckpt_version,
        "torch_version": manifest.torch_version,
        "created_at": manifest.created_at,
        "world_size": manifest.world_size,
        "hash_block_bytes": manifest.hash_block_bytes,
        "num_keys": len(keys),
        "num_tensors": len(manifest.tensors),
        "num_values": len(manifest.values),
        "num_files": manifest.file_table.total_files,
        "total_bytes": None,  # in the index records, not the manifest: `shardckpt verify` reads them
        "tensor_bytes": tensor_bytes,
        "metadata": manifest.metadata,
        "bases": list(manifest.bases),
        "file_table": [
            {
                "save_id": g.save_id,
                **({"checkpoint": g.checkpoint} if g.checkpoint is not None else {}),
                "ranks": g.ranks,
                "files": g.total_files,
                "pages": len(g.pages),
            }
            for g in groups
        ],
        "folders": [
            {
                "folder": g.checkpoint or path.rstrip("/").rsplit("/", 1)[-1],
                "own": g.checkpoint is None,
                "files": g.total_files,
                "file_bytes": None,
                "tensor_bytes": None,
            }
            for g in groups
        ],
        "keys": dict(sorted(keys.items())),
    }


def _value_type(encoded: Any) -> str:
    value = decode_value(encoded)
    return "null" if value is None else type(value).__name__
