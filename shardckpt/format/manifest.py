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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from json.encoder import encode_basestring_ascii as _string
from operator import attrgetter, itemgetter
from typing import Any, cast

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

    The tensors' lines, thousands of chunk records in a large save, are formatted column by
    column (:func:`_tensor_lines`) when every field has the type the records declare; they
    are byte for byte what ``json.dumps`` writes (``tests/unit/test_format_fast.py``
    compares them over random manifests). A manifest with any other field (a bool, a float,
    a ``str`` subclass) is written by ``json.dumps`` alone."""
    v2 = m.is_v2
    if v2 and any(c.digest is None for t in m.tensors.values() for c in t.chunks):
        raise ValueError("a format-2 manifest needs a digest on every chunk")
    dump = _encoder()
    tensors = sorted(m.tensors.items())
    columns = _ChunkColumns.of([t for _, t in tensors])
    if columns.declared_types(v2=v2):
        tensor_map: _Entries | dict[str, Any] = _Entries(_tensor_lines(tensors, columns, dump, v2=v2))
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
    """``json.dumps(v, allow_nan=False, separators=(",", ":"))`` with one C encoder for all
    calls: ``json.dumps`` and ``JSONEncoder.encode`` build a new one per call, a few us each
    for every ``paths`` entry of a save of thousands of tensors (issue #18). The same C
    function writes the same bytes. Use it for one manifest: after a failure its memo of
    containers being written may hold stale entries. Without the C accelerator, ``encode``."""
    encoder = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    # c_make_encoder(markers, default, encoder, indent, key_sep, item_sep, sort_keys, skipkeys, allow_nan)
    write = make({}, encoder.default, _string, None, ":", ",", False, False, False)
    return lambda v: "".join(write(v, 0))


def _declared_types(tensors: list[TensorRecord], *, v2: bool) -> bool:
    """Whether every number of the records is exactly an ``int`` and every string exactly a
    ``str`` (see :meth:`_ChunkColumns.declared_types`)."""
    return _ChunkColumns.of(tensors).declared_types(v2=v2)


@dataclass(frozen=True)
class _ChunkColumns:
    """The tensors' fields and every chunk's, one list per field, chunks in the tensors'
    order: taken from the records once, by loops that run in C (issue #18)."""

    tensors: list[TensorRecord]
    offsets: list[tuple[int, ...]]
    sizes: list[tuple[int, ...]]
    files: list[str]
    byte_offsets: list[int]
    byte_lengths: list[int]
    block_hashes: list[tuple[str, ...]]
    digests: list[str | None]

    @classmethod
    def of(cls, tensors: list[TensorRecord]) -> _ChunkColumns:
        chunks = list(chain.from_iterable(map(attrgetter("chunks"), tensors)))

        def column(field: str) -> list[Any]:
            return list(map(attrgetter(field), chunks))

        return cls(
            tensors,
            column("offsets"),
            column("sizes"),
            column("file"),
            column("byte_offset"),
            column("byte_length"),
            column("block_hashes"),
            column("digest"),
        )

    def declared_types(self, *, v2: bool) -> bool:
        """Whether every number is exactly an ``int`` and every string exactly a ``str``:
        then ``%d`` and ``encode_basestring_ascii`` write what ``json.dumps`` would (a bool
        is an int to Python, ``true`` to JSON)."""
        numbers = chain(
            chain.from_iterable(map(attrgetter("shape"), self.tensors)),
            chain.from_iterable(self.offsets),
            chain.from_iterable(self.sizes),
            self.byte_offsets,
            self.byte_lengths,
        )
        strings = chain(
            map(attrgetter("dtype"), self.tensors),
            self.files,
            chain.from_iterable(self.block_hashes),
            self.digests if v2 else (),
        )
        return set(map(type, numbers)) <= {int} and set(map(type, strings)) <= {str}


@dataclass(frozen=True)
class _Entries:
    """A map's entries already written as JSON, ``"key": value`` each, in order."""

    lines: list[str]


def _tensor_lines(
    tensors: list[tuple[str, TensorRecord]], columns: _ChunkColumns, dump: Callable[[Any], str], *, v2: bool
) -> list[str]:
    """Each tensor's ``"key": {...}`` entry, for records whose :meth:`_ChunkColumns.declared_types`
    holds: the chunks' texts from :func:`_chunk_texts`, joined per tensor."""
    texts = iter(_chunk_texts(columns, v2=v2))
    lines = []
    for key, t in tensors:
        shape = ",".join(map(str, t.shape))
        chunks = ",".join(islice(texts, len(t.chunks)))
        lines.append(f'{dump(key)}: {{"dtype":{_string(t.dtype)},"shape":[{shape}],"chunks":[{chunks}]}}')
    return lines


def _chunk_texts(columns: _ChunkColumns, *, v2: bool) -> list[str]:
    """Every chunk record's JSON, in order: one ``%`` template per number of dimensions, fed
    by ``zip`` over the columns, so no Python line runs per chunk (a profiled save counts
    them). Each file name is escaped once; block hashes of plain ASCII letters and digits
    (what shardckpt writes), which JSON writes as they are, are joined without escaping."""
    files = {f: _string(f) for f in set(columns.files)}
    plain = "".join(chain.from_iterable(columns.block_hashes))
    # bytes.isalnum: ASCII letters and digits only, and a table lookup per byte (str's is not)
    if all(columns.block_hashes) and plain.isascii() and (plain.encode().isalnum() or not plain):
        hashes: Iterable[str] = map('","'.join, columns.block_hashes)
        quote = '"'
    else:
        hashes, quote = (",".join(map(_string, h)) for h in columns.block_hashes), ""
    tail: list[list[Any]] = [
        list(map(files.__getitem__, columns.files)),
        columns.byte_offsets,
        columns.byte_lengths,
        list(hashes),
        *([list(map(_string, cast("list[str]", columns.digests)))] if v2 else []),  # v2: never None (checked)
    ]
    dims = list(zip(map(len, columns.offsets), map(len, columns.sizes), strict=True))
    groups = set(dims)
    if len(groups) == 1:  # tensors of one number of dimensions: the columns as they are
        (d,) = groups
        return list(_formatted(d, columns.offsets, columns.sizes, tail, v2=v2, quote=quote))
    texts: list[str] = [""] * len(dims)
    for d in groups:
        at = [i for i, x in enumerate(dims) if x == d]
        offsets, sizes = [columns.offsets[i] for i in at], [columns.sizes[i] for i in at]
        picked = [[column[i] for i in at] for column in tail]
        for i, text in zip(at, _formatted(d, offsets, sizes, picked, v2=v2, quote=quote), strict=True):
            texts[i] = text
    return texts


def _formatted(
    dims: tuple[int, int],
    offsets: list[tuple[int, ...]],
    sizes: list[tuple[int, ...]],
    tail: list[list[Any]],
    *,
    v2: bool,
    quote: str,
) -> Iterator[str]:
    """The texts of chunks whose offsets and sizes have ``dims`` entries (the other fields in
    ``tail``, in the template's order)."""
    args = zip(
        *(map(itemgetter(i), offsets) for i in range(dims[0])),
        *(map(itemgetter(i), sizes) for i in range(dims[1])),
        *tail,
        strict=True,
    )
    return map(_chunk_template(*dims, v2=v2, quote=quote).__mod__, args)


def _chunk_template(offsets: int, sizes: int, *, v2: bool, quote: str) -> str:
    """A chunk record's JSON with ``%d``/``%s`` for its fields, in the order json.dumps writes
    them; ``quote`` around the block hashes' text (empty when it is already quoted)."""
    digest = ',"digest":%s' if v2 else ""
    return (
        '{"offsets":[' + ",".join(["%d"] * offsets) + '],"sizes":[' + ",".join(["%d"] * sizes) + "],"
        '"file":%s,"byte_offset":%d,"byte_length":%d,"block_hashes":[' + quote + "%s" + quote + "]" + digest + "}"
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
