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
from shardckpt.engine.incremental import ChunkLocation
from shardckpt.errors import StorageError
from shardckpt.format import datafile
from shardckpt.format.manifest import ChunkRecord, FileRecord, Manifest, TensorRecord


def build_manifest(
    metadata: Metadata, results: list[list[WriteResult]], process_layout: list[dict[str, Any]], block_bytes: int
) -> Manifest:
    """Turn DCP's global metadata and every rank's write results into our manifest."""
    # Keyed by (fqn, offsets): what MetadataIndex compares, without building one per chunk (#18).
    located: dict[tuple[str, Any], Any] = {
        (wr.index.fqn, wr.index.offset): wr.storage_data for per_rank in results for wr in per_rank
    }
    tensors: dict[str, TensorRecord] = {}
    values: dict[str, Any] = {}
    files: dict[str, FileRecord] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            values[fqn] = json.loads(located[fqn, None].json_text)
            continue
        chunks = []
        for c in md.chunks:
            loc: ChunkLocation = located[fqn, c.offsets]
            known = files.setdefault(loc.file, loc.file_record)
            if known is not loc.file_record and known != loc.file_record:
                raise StorageError(
                    f"save: data file name {loc.file} names two different files (this save's random id equals "
                    "the id of a base checkpoint's save, a 1 in 2**48 chance); nothing was committed. Save again: "
                    "the next save draws a new id."
                )
            chunks.append(
                ChunkRecord(
                    tuple(c.offsets),
                    tuple(c.sizes),
                    loc.file,
                    loc.byte_offset,
                    loc.byte_length,
                    loc.block_hashes,
                    loc.digest,
                )
            )
        dtype = datafile.dtype_name(md.properties.dtype, key=fqn)
        tensors[fqn] = TensorRecord(dtype, tuple(md.size), tuple(chunks))
    paths = {k: list(v) for k, v in (metadata.planner_data or {}).items()}
    bases = tuple(sorted({f.checkpoint for f in files.values() if f.checkpoint is not None}))
    digests = any(c.digest is not None for t in tensors.values() for c in t.chunks)
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
