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
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from json.encoder import encode_basestring_ascii as _string
from operator import attrgetter
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
    that is not incremental stays readable by every shardckpt).

    The tensors' lines, thousands of chunk records in a large save, are formatted from
    templates (:func:`_tensor_lines`) when every field has the type the records declare;
    they are byte for byte what ``json.dumps`` writes (``tests/unit/test_format_fast.py``
    compares them over random manifests). A manifest with any other field (a bool, a float,
    a ``str`` subclass) is written by ``json.dumps`` alone."""
    v2 = m.is_v2
    if v2 and any(c.digest is None for t in m.tensors.values() for c in t.chunks):
        raise ValueError("a format-2 manifest needs a digest on every chunk")
    dump = _encoder()
    tensors = sorted(m.tensors.items())
    if _declared_types([t for _, t in tensors], v2=v2):
        tensor_map: _Entries | dict[str, Any] = _Entries(_tensor_lines(tensors, dump, v2=v2))
    else:
        tensor_map = {k: _tensor_doc(t, v2=v2) for k, t in tensors}
    doc = {
        "format": FORMAT_NAME,
        **m.provenance(),
        "format_version": 2 if v2 else 1,
        "hash_algorithm": HASH_ALGORITHM,
        "hash_block_bytes": m.hash_block_bytes,
        **({"bases": sorted(m.bases)} if v2 else {}),
        "tensors": tensor_map,
        "values": dict(sorted(m.values.items())),
        "files": {n: _file_doc(f) for n, f in sorted(m.files.items())},
        "paths": dict(sorted(m.paths.items())),
        "metadata": m.metadata,
    }
    raw = seal(_dumps_two_levels(doc, dump).encode())
    check_manifest_limits(raw, source="the manifest being written", writing=True)
    return raw


def _file_doc(f: FileRecord) -> dict[str, Any]:
    doc: dict[str, Any] = {"size": f.size, "hash": f.hash, "rank": f.rank}
    if f.checkpoint is not None:
        doc["checkpoint"] = f.checkpoint
    return doc


def _tensor_doc(t: TensorRecord, *, v2: bool) -> dict[str, Any]:
    """A tensor record as the plain JSON document its line stands for (the reference)."""
    return {
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


def _encoder() -> Callable[[Any], str]:
    """``json.dumps(v, allow_nan=False, separators=(",", ":"))`` without building an encoder
    per call (``json.dumps`` does, for any non-default argument)."""
    return json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def _declared_types(tensors: list[TensorRecord], *, v2: bool) -> bool:
    """Whether every number of the records is exactly an ``int`` and every string exactly a
    ``str``: then ``%d`` and ``encode_basestring_ascii`` write what ``json.dumps`` would (a
    bool is an int to Python, ``true`` to JSON). The loops run in C (issue #18)."""
    chunks = list(chain.from_iterable(map(attrgetter("chunks"), tensors)))
    numbers = chain(
        chain.from_iterable(map(attrgetter("shape"), tensors)),
        chain.from_iterable(map(attrgetter("offsets"), chunks)),
        chain.from_iterable(map(attrgetter("sizes"), chunks)),
        map(attrgetter("byte_offset"), chunks),
        map(attrgetter("byte_length"), chunks),
    )
    strings = chain(
        map(attrgetter("dtype"), tensors),
        map(attrgetter("file"), chunks),
        chain.from_iterable(map(attrgetter("block_hashes"), chunks)),
        map(attrgetter("digest"), chunks) if v2 else (),
    )
    return set(map(type, numbers)) <= {int} and set(map(type, strings)) <= {str}


@dataclass(frozen=True)
class _Entries:
    """A map's entries already written as JSON, ``"key": value`` each, in order."""

    lines: list[str]


def _tensor_lines(tensors: list[tuple[str, TensorRecord]], dump: Callable[[Any], str], *, v2: bool) -> list[str]:
    """Each tensor's ``"key": {...}`` entry, for records that :func:`_declared_types` passed:
    a ``%`` template per number of dimensions, each file name escaped once, and no Python
    call per chunk (a profiled save counts them)."""
    chunks = list(chain.from_iterable(t.chunks for _, t in tensors))
    files = {f: _string(f) for f in set(map(attrgetter("file"), chunks))}
    dims = set(
        zip(map(len, map(attrgetter("offsets"), chunks)), map(len, map(attrgetter("sizes"), chunks)), strict=True)
    )
    tmpl = {d: _chunk_template(*d, v2=v2) for d in dims}
    lines = []
    for key, t in tensors:
        texts = [
            tmpl[len(c.offsets), len(c.sizes)]
            % (
                *c.offsets,
                *c.sizes,
                files[c.file],
                c.byte_offset,
                c.byte_length,
                ",".join(map(_string, c.block_hashes)),
                *((_string(c.digest or ""),) if v2 else ()),  # never None in v2: manifest_to_json checked
            )
            for c in t.chunks
        ]
        shape = ",".join(map(str, t.shape))
        lines.append(f'{dump(key)}: {{"dtype":{_string(t.dtype)},"shape":[{shape}],"chunks":[{",".join(texts)}]}}')
    return lines


def _chunk_template(offsets: int, sizes: int, *, v2: bool) -> str:
    """A chunk record's JSON with ``%d``/``%s`` for its fields, in the order json.dumps writes them."""
    digest = ',"digest":%s' if v2 else ""
    return (
        '{"offsets":[' + ",".join(["%d"] * offsets) + '],"sizes":[' + ",".join(["%d"] * sizes) + "],"
        '"file":%s,"byte_offset":%d,"byte_length":%d,"block_hashes":[%s]' + digest + "}"
    )


def _dumps_two_levels(doc: dict[str, Any], dump: Callable[[Any], str] | None = None) -> str:
    """JSON with one line per top-level field and per key of the big maps: diffable, compact.
    ``benchmarks/rules_projection.py`` calls it too (without ``dump``)."""
    dump = dump or _encoder()
    lines = []
    for k, v in doc.items():
        if isinstance(v, _Entries):
            inner = ",\n  ".join(v.lines)
            lines.append(f" {dump(k)}: {{\n  {inner}\n }}" if v.lines else f" {dump(k)}: {{}}")
        elif isinstance(v, dict) and v:
            inner = ",\n".join(f"  {dump(ik)}: {dump(iv)}" for ik, iv in v.items())
            lines.append(f" {dump(k)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {dump(k)}: {dump(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"
