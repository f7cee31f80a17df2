"""The on-disk format: ``manifest.json`` as dataclasses <-> JSON. Pure, no I/O.

The manifest is the whole truth about a checkpoint: which keys exist, their global
shapes and dtypes, where every chunk's bytes live and their checksums, the
non-tensor values inline, and every data file's size and checksum. Its presence
commits a checkpoint. ``docs/format.md`` specifies it; ``manifest.schema.json``
is its JSON Schema; ``tests/unit/test_format.py`` pins it.

The records live in :mod:`~shardckpt.format.manifest_records`, the size limits and the
checksum seal in :mod:`~shardckpt.format.manifest_envelope`, the parser of untrusted bytes
in :mod:`~shardckpt.format.manifest_parser`; this module writes the JSON and is where the
rest of shardckpt imports all of them from.
"""

from __future__ import annotations

import json
from typing import Any

from shardckpt.format.manifest_envelope import MAX_MANIFEST_BYTES, check_manifest_limits, seal, unseal
from shardckpt.format.manifest_parser import _parse_document as _parse_document
from shardckpt.format.manifest_parser import num_blocks, parse_manifest
from shardckpt.format.manifest_records import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HASH_ALGORITHM,
    MAX_BASES,
    SUPPORTED_VERSIONS,
    ChunkRecord,
    FileRecord,
    Manifest,
    TensorRecord,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HASH_ALGORITHM",
    "MAX_BASES",
    "MAX_MANIFEST_BYTES",
    "SUPPORTED_VERSIONS",
    "ChunkRecord",
    "FileRecord",
    "Manifest",
    "TensorRecord",
    "check_manifest_limits",
    "manifest_to_json",
    "num_blocks",
    "parse_manifest",
    "seal",
    "unseal",
]


def manifest_to_json(m: Manifest) -> bytes:
    """The manifest's bytes: format version 1 unless it uses a version-2 feature (so a save
    that is not incremental stays readable by every shardckpt)."""
    v2 = m.is_v2
    if v2 and any(c.digest is None for t in m.tensors.values() for c in t.chunks):
        raise ValueError("a format-2 manifest needs a digest on every chunk")
    doc = {
        "format": FORMAT_NAME,
        **m.provenance(),
        "format_version": 2 if v2 else 1,
        "hash_algorithm": HASH_ALGORITHM,
        "hash_block_bytes": m.hash_block_bytes,
        **({"bases": sorted(m.bases)} if v2 else {}),
        "tensors": {
            k: {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "chunks": [
                    {
                        "offsets": list(c.offsets),
                        "sizes": list(c.sizes),
                        "file": c.file,
                        "byte_offset": c.byte_offset,
                        "byte_length": c.byte_length,
                        "block_hashes": list(c.block_hashes),
                        **({"digest": c.digest} if v2 else {}),
                    }
                    for c in t.chunks
                ],
            }
            for k, t in sorted(m.tensors.items())
        },
        "values": dict(sorted(m.values.items())),
        "files": {n: _file_doc(f) for n, f in sorted(m.files.items())},
        "paths": dict(sorted(m.paths.items())),
        "metadata": m.metadata,
    }
    raw = seal(_dumps_two_levels(doc).encode())
    check_manifest_limits(raw, source="the manifest being written", writing=True)
    return raw


def _file_doc(f: FileRecord) -> dict[str, Any]:
    doc: dict[str, Any] = {"size": f.size, "hash": f.hash, "rank": f.rank}
    if f.checkpoint is not None:
        doc["checkpoint"] = f.checkpoint
    return doc


def _dumps_two_levels(doc: dict[str, Any]) -> str:
    """JSON with one line per top-level field and per key of the big maps: diffable, compact."""

    def dump(v: Any) -> str:
        return json.dumps(v, allow_nan=False, separators=(",", ":"))

    lines = []
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            inner = ",\n".join(f"  {dump(ik)}: {dump(iv)}" for ik, iv in v.items())
            lines.append(f" {dump(k)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {dump(k)}: {dump(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"
