"""The coordinator's manifest of a format-1/2 save: DCP's global metadata and every rank's
write results (:class:`~shardckpt.engine.incremental.ChunkLocation`) become one
:class:`~shardckpt.format.manifest.Manifest`, which :class:`~shardckpt.engine.writer.Writer`
then checks and commits. Format 3's counterpart is :mod:`shardckpt.engine.write_v3`.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.storage import WriteResult

from shardckpt._version import __version__
from shardckpt.engine import write_results
from shardckpt.errors import StorageError
from shardckpt.format import datafile
from shardckpt.format.manifest import ChunkRecord, FileRecord, Manifest, TensorRecord


def build_manifest(
    metadata: Metadata, results: list[list[WriteResult]], process_layout: list[dict[str, Any]], block_bytes: int
) -> Manifest:
    """Turn DCP's global metadata and every rank's write results (packed or not:
    :mod:`~shardckpt.engine.write_results`) into our manifest."""
    # Keyed by (fqn, offsets): what MetadataIndex compares, without building one per chunk (#18).
    located, named = write_results.located(results)
    files = _file_records(named)
    tensors: dict[str, TensorRecord] = {}
    values: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            values[fqn] = json.loads(located[fqn, None].json_text)
            continue
        chunks = []
        for c in md.chunks:
            file, byte_offset, byte_length, block_hashes, digest = located[fqn, c.offsets]
            chunks.append(
                ChunkRecord(tuple(c.offsets), tuple(c.sizes), file, byte_offset, byte_length, block_hashes, digest)
            )
        dtype = datafile.dtype_name(md.properties.dtype, key=fqn)
        tensors[fqn] = TensorRecord(dtype, tuple(md.size), tuple(chunks))
    paths = {k: list(v) for k, v in (metadata.planner_data or {}).items()}
    bases = tuple(sorted({f.checkpoint for f in files.values() if f.checkpoint is not None}))
    digests = any(row[4] is not None for row in located.values() if type(row) is tuple)
    return Manifest(
        world_size=len(results),
        process_layout=tuple(process_layout),
        tensors=tensors,
        values=values,
        files=files,
        hash_block_bytes=block_bytes,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        shardckpt_version=__version__,
        torch_version=torch.__version__,
        paths=paths,
        format_version=2 if bases or digests else 1,
        bases=bases,
    )


def _file_records(named: list[tuple[str, FileRecord]]) -> dict[str, FileRecord]:
    """Each data file's record; one name given two different records fails the save."""
    files: dict[str, FileRecord] = {}
    for name, record in named:
        known = files.setdefault(name, record)
        if known is not record and known != record:
            raise StorageError(
                f"save: data file name {name} names two different files (this save's random id equals "
                "the id of a base checkpoint's save, a 1 in 2**48 chance); nothing was committed. Save again: "
                "the next save draws a new id."
            )
    return files
