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

from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Any, cast

from shardckpt.format import datafile
from shardckpt.format.manifest_bulk import ALL, Share
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
from shardckpt.format.manifest_text import ChunkFields, PlanText, json_encoder

__all__ = [
    "ALL",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HASH_ALGORITHM",
    "MAX_BASES",
    "MAX_MANIFEST_BYTES",
    "SUPPORTED_VERSIONS",
    "ChunkFields",
    "ChunkRecord",
    "FileRecord",
    "Manifest",
    "PlanText",
    "Share",
    "TensorRecord",
    "check_manifest_limits",
    "filled_manifest_json",
    "manifest_to_json",
    "num_blocks",
    "parse_manifest",
    "seal",
    "unseal",
]


def manifest_to_json(m: Manifest) -> bytes:
    """The manifest's bytes: format version 1 unless it uses a version-2 feature (so a save
    that is not incremental stays readable by every shardckpt).

    The tensors' entries, thousands of chunk records in a large save, are formatted column
    by column (:mod:`~shardckpt.format.manifest_text`) when every field has the type the
    records declare; they are byte for byte what ``json.dumps`` writes
    (``tests/unit/test_format_fast.py`` compares them over random manifests). A manifest
    with any other field (a bool, a float, a ``str`` subclass) is written by ``json.dumps``
    alone."""
    dump = json_encoder()
    tensors = sorted(m.tensors.items())
    records = [t for _, t in tensors]
    chunks = list(chain.from_iterable(map(attrgetter("chunks"), records)))

    def column(field: str, of: list[Any] = chunks) -> list[Any]:
        return list(map(attrgetter(field), of))

    text = PlanText.of(
        [k for k, _ in tensors],
        column("dtype", records),
        column("shape", records),
        [len(t.chunks) for t in records],
        column("offsets"),
        column("sizes"),
        sorted(m.paths.items()),
        dump,
    )
    fields = ChunkFields(column("file"), column("byte_offset"), column("byte_length"), column("block_hashes"))
    return filled_manifest_json(m, text, fields, column("digest"), dump=dump)


def filled_manifest_json(
    m: Manifest,
    text: PlanText | None,
    fields: ChunkFields,
    digests: list[str | None],
    *,
    dump: Callable[[Any], str] | None = None,
) -> bytes:
    """:func:`manifest_to_json` of ``m`` given its fixed half ``text`` (made for the keys,
    dtypes, shapes, chunk boxes and paths of ``m``, or None to write them with json.dumps)
    and its chunks' ``fields`` and ``digests`` in the manifest's order: the caller's
    promise, which the coordinator keeps by building ``m`` from the same columns
    (:class:`~shardckpt.engine.manifest_builder.ManifestBuilder`)."""
    dump = dump or json_encoder()
    v2 = bool(m.bases) or any(d is not None for d in digests)
    if v2 and any(d is None for d in digests):
        raise ValueError("a format-2 manifest needs a digest on every chunk")
    every = cast("list[str] | None", digests if v2 else None)  # v2: never None (checked)
    filled = None if text is None else text.tensors(fields, every)
    doc = {
        "format": FORMAT_NAME,
        **m.provenance(),
        "format_version": 2 if v2 else 1,
        "hash_algorithm": HASH_ALGORITHM,
        "hash_block_bytes": m.hash_block_bytes,
        **({"bases": sorted(m.bases)} if v2 else {}),
        "tensors": _tensor_map(m, v2) if filled is None else _Entries(filled),
        "values": dict(sorted(m.values.items())),
        "files": {n: _file_doc(f) for n, f in sorted(m.files.items())},
        "paths": dict(sorted(m.paths.items())) if text is None else _Entries(text.paths),
        "metadata": m.metadata,
    }
    raw = seal(_dumps_two_levels(doc, dump).encode())
    if filled is None or text is None or not _template_within_limits(doc, dump, len(raw), len(m.tensors), text):
        check_manifest_limits(raw, source="the manifest being written", writing=True)  # names the problem
    return raw


def _template_within_limits(
    doc: dict[str, Any], dump: Callable[[Any], str], size: int, tensors: int, text: PlanText
) -> bool:
    """Whether a manifest of ``size`` bytes whose "tensors" entries are ``text``'s template
    (:class:`~shardckpt.format.manifest_text.PlanText`, filled) is within the limits readers
    enforce (:func:`check_manifest_limits`), without scanning those entries: they hold exactly
    three arrays and objects a tensor and four a chunk, at most six levels deep, so only the
    rest of the document is scanned (a save of thousands of small tensors scanned megabytes
    of its own template on the commit every rank waits for, #18). False: the caller scans it all."""
    if size > MAX_MANIFEST_BYTES:
        return False
    rest = _dumps_two_levels({**doc, "tensors": _Entries("")}, dump).encode()
    budget = datafile.max_json_containers(size) - 3 * tensors - 4 * text.chunks
    return budget >= 0 and datafile.json_containers(rest, budget, depth=0) is not None


def _tensor_map(m: Manifest, v2: bool) -> dict[str, Any]:
    return {k: _tensor_doc(t, v2=v2) for k, t in sorted(m.tensors.items())}


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


@dataclass(frozen=True)
class _Entries:
    """A map's entries already written as JSON: the text inside its braces, one
    ``"key": value`` line each (indented, comma-separated), or empty."""

    text: str


def _dumps_two_levels(doc: dict[str, Any], dump: Callable[[Any], str] | None = None) -> str:
    """JSON with one line per top-level field and per key of the big maps: diffable, compact.
    ``benchmarks/rules_projection.py`` calls it too (without ``dump``)."""
    dump = dump or json_encoder()
    lines = []
    for k, v in doc.items():
        if isinstance(v, _Entries):
            lines.append(f" {dump(k)}: {{\n{v.text}\n }}" if v.text else f" {dump(k)}: {{}}")
        elif isinstance(v, dict) and v:
            inner = ",\n".join(f"  {dump(ik)}: {dump(iv)}" for ik, iv in v.items())
            lines.append(f" {dump(k)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {dump(k)}: {dump(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"
