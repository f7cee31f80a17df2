"""The coordinator's manifest of a format-1/2 save: DCP's global metadata and every rank's
write results (:class:`~shardckpt.engine.incremental.ChunkLocation`, packed by
:mod:`~shardckpt.engine.write_results`) become one
:class:`~shardckpt.format.manifest.Manifest` and its bytes, which
:class:`~shardckpt.engine.writer.Writer` then checks and commits. Format 3's counterpart is
:mod:`shardckpt.engine.write_v3`.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
from torch.distributed.checkpoint.storage import WriteResult

from shardckpt._version import __version__
from shardckpt.engine import write_results
from shardckpt.errors import StorageError
from shardckpt.format import datafile
from shardckpt.format.manifest import FileRecord, Manifest, filled_manifest_json
from shardckpt.format.manifest_records import chunk_records, tensor_records
from shardckpt.format.manifest_text import ChunkFields, PlanText, json_encoder

Dims = tuple[int, ...]


@dataclass(frozen=True)
class BuiltManifest:
    """One save's manifest and what its bytes are made of."""

    manifest: Manifest
    text: PlanText | None
    fields: ChunkFields
    digests: list[str | None]

    def to_json(self) -> bytes:
        return filled_manifest_json(self.manifest, self.text, self.fields, self.digests)


@dataclass(frozen=True)
class _Fixed:
    """What a global plan fixes of every manifest of its saves, in the manifest's order
    (tensors sorted by key, each tensor's chunks in DCP's order)."""

    keys: list[str]
    dtypes: list[str]
    shapes: list[Dims]
    ends: list[int]  # where each tensor's chunks end in the chunk columns
    chunk_keys: list[tuple[str, Dims]]  # each chunk's (key, offsets): how write_results.located finds it
    offsets: list[Dims]
    sizes: list[Dims]
    values: list[str]
    paths: dict[str, list[Any]]
    text: PlanText | None


class ManifestBuilder:
    """The manifests of the saves of one global plan (``metadata``, DCP's). What the plan
    fixes - the tensors in the manifest's order, their dtypes, shapes and chunk boxes, the
    paths, and that half of the JSON text (:class:`~shardckpt.format.manifest.PlanText`) -
    is worked out by the first :meth:`build`; each save adds where its chunks went (issue
    #18: a commit of a save of thousands of small tensors, which every rank waits for,
    then formats only those fields). A Checkpointer's plan cache keeps one per plan
    (:class:`~shardckpt.engine.protocol.PlanCache`); one save at a time."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata
        self._fixed: _Fixed | None = None

    def build(
        self,
        results: list[list[WriteResult]],
        process_layout: list[dict[str, Any]],
        block_bytes: int,
        user_metadata: dict[str, Any],
    ) -> BuiltManifest:
        """The manifest of every rank's write ``results`` (packed or not)."""
        fixed = self._fixed = self._fixed or _fix(self.metadata)
        located, named = write_results.located(results)
        rows = list(map(located.__getitem__, fixed.chunk_keys))
        columns = [list(c) for c in zip(*rows, strict=True)] if rows else [[], [], [], [], []]
        files, byte_offsets, byte_lengths, block_hashes, digests = columns
        chunks = chunk_records(fixed.offsets, fixed.sizes, files, byte_offsets, byte_lengths, block_hashes, digests)
        per_tensor = [tuple(chunks[a:b]) for a, b in zip([0, *fixed.ends][:-1], fixed.ends, strict=True)]
        file_records = _file_records(named)
        bases = tuple(sorted({f.checkpoint for f in file_records.values() if f.checkpoint is not None}))
        m = Manifest(
            world_size=len(results),
            process_layout=tuple(process_layout),
            tensors=dict(zip(fixed.keys, tensor_records(fixed.dtypes, fixed.shapes, per_tensor), strict=True)),
            values={k: json.loads(located[k, None].json_text) for k in fixed.values},
            files=file_records,
            hash_block_bytes=block_bytes,
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            shardckpt_version=__version__,
            torch_version=torch.__version__,
            paths={k: list(v) for k, v in fixed.paths.items()},
            metadata=user_metadata,
            format_version=2 if bases or any(d is not None for d in digests) else 1,
            bases=bases,
        )
        return BuiltManifest(m, fixed.text, ChunkFields(files, byte_offsets, byte_lengths, block_hashes), digests)


def _fix(metadata: Metadata) -> _Fixed:
    tensors = []
    values = []
    for key, md in sorted(metadata.state_dict_metadata.items()):
        if isinstance(md, BytesStorageMetadata):
            values.append(key)
        else:
            tensors.append((key, md))
    keys = [k for k, _ in tensors]
    dtypes = [datafile.dtype_name(md.properties.dtype, key=k) for k, md in tensors]
    shapes = [tuple(md.size) for _, md in tensors]
    boxes = [(k, tuple(c.offsets), tuple(c.sizes)) for k, md in tensors for c in md.chunks]
    offsets = [o for _, o, _ in boxes]
    sizes = [s for _, _, s in boxes]
    counts = [len(md.chunks) for _, md in tensors]
    paths = {k: list(v) for k, v in sorted((metadata.planner_data or {}).items())}
    text = PlanText.of(keys, dtypes, shapes, counts, offsets, sizes, paths.items(), json_encoder())
    chunk_keys = [(k, o) for k, o, _ in boxes]
    return _Fixed(keys, dtypes, shapes, list(accumulate(counts)), chunk_keys, offsets, sizes, values, paths, text)


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
