"""Format 3: a whole ``manifest.json`` of version 3, JSON text <-> validated records.

Pure, no I/O; ``docs/format.md`` section 12 specifies it, ``manifest_v3.schema.json`` is
its JSON Schema, ``tests/unit/golden/manifest_v3_draft.json`` an example. Saves write it
with ``format_version=3`` (:func:`manifest_v3_to_json` is what ``engine/write_v3.py``
commits); the loader reads it through :func:`parse_any_manifest` (section 12.7).

A version-3 manifest has sharding rules (:mod:`~shardckpt.format.rules`) and explicit
chunks only for irregular tensors, no checksums but its own seal, and the compact file table
of :mod:`~shardckpt.format.file_table` instead of one record per data file and per rank. So
it holds O(tensors + runs + groups + pages) records, and :func:`parse_manifest_v3` takes
time linear in its bytes (every check of section 12.5; the overlap check of listed chunks
is :func:`~shardckpt.format.overlap.first_overlap`, O(n log n) and bounded).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any

from shardckpt.errors import ManifestError, UnsupportedFormatVersionError
from shardckpt.format import datafile, rules
from shardckpt.format.file_table import FileTable, file_table_to_json, parse_file_table
from shardckpt.format.manifest import (
    FORMAT_NAME,
    HASH_ALGORITHM,
    MAX_BASES,
    SUPPORTED_VERSIONS,
    Manifest,
    check_manifest_limits,
    parse_manifest,
    seal,
    unseal,
)
from shardckpt.format.overlap import first_overlap
from shardckpt.format.rank_index import FileIndex, file_index_to_json, parse_file_index
from shardckpt.format.values import decode_value

VERSION = 3
JSON_BYTES_PER_CONTAINER = 8
"""Format 3's container limit (format.md 12.5 item 1): one JSON array or object per 8 bytes
(versions 1 and 2: 16). A rule record is 8 containers in ~100 bytes plus its key and its
path's line, so thousands of tensors with short keys ("t0".."t9999") stay under it, while
json.loads of the densest document it admits ('{"a":0}' repeated) peaks at ~24x its bytes
(the 16-byte limit: ~20x; the whole parse ~25x); tests/unit/test_v3_json_limits.py
checks both."""
_DECLARED = re.compile(rb'\{\s*"format"\s*:\s*"shardckpt"\s*,\s*"format_version"\s*:\s*3\s*,')
_FOLDER = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
_TOP = (
    "format",
    "format_version",
    "shardckpt_version",
    "torch_version",
    "created_at",
    "world_size",
    "hash_algorithm",
    "hash_block_bytes",
    "bases",
    "tensors",
    "values",
    "file_table",
    "paths",
    "metadata",
)
_CHUNK_FIELDS = {"offsets", "sizes", "file", "byte_offset", "byte_length"}


@dataclass(frozen=True)
class Chunk:
    """A listed box (irregular tensors, and empty boxes beside a rule): ``file`` is a
    position in the file table."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: int
    byte_offset: int
    byte_length: int


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    rule: rules.Rule | None
    chunks: tuple[Chunk, ...]

    def chunks_for_box(self, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> list[Chunk]:
        """The stored boxes that hold part of ``offsets``/``sizes``: from the rule in
        O(d * (answer + log runs)), plus the listed ones that overlap (irregular tensors)."""
        if math.prod(sizes) == 0:
            return []
        itemsize = datafile.itemsize(self.dtype)
        out = [
            Chunk(c.offsets, c.sizes, c.file, c.byte_offset, math.prod(c.sizes) * itemsize)
            for c in (rules.chunks_for_box(self.rule, offsets, sizes) if self.rule is not None else ())
        ]
        for listed in self.chunks:
            if math.prod(listed.sizes) and all(
                o < bo + bs and bo < o + s
                for o, s, bo, bs in zip(listed.offsets, listed.sizes, offsets, sizes, strict=True)
            ):
                out.append(listed)
        return out


@dataclass(frozen=True)
class InlineIndex:
    """The manifest's sealed copy of one own-group file's index (format.md 12.8): the
    coordinator's file of small tensors, so no loading rank fetches rank 0's records for it."""

    file: int  # a position in the file table, in the own group
    index: FileIndex


@dataclass(frozen=True, repr=False)
class ManifestV3:
    world_size: int
    hash_block_bytes: int
    bases: tuple[str, ...]
    file_table: FileTable
    tensors: dict[str, Tensor]
    values: dict[str, Any]  # encoded (values.encode_value); decode_value gives the Python value
    paths: dict[str, list[str | int]]
    created_at: str
    shardckpt_version: str
    torch_version: str
    metadata: dict[str, Any] = field(default_factory=dict)
    inline_index: InlineIndex | None = None

    @property
    def total_tensor_bytes(self) -> int:
        """Bytes of every tensor's stored chunks (a replicated tensor once), as Manifest's."""
        return sum(
            math.prod(t.shape) * datafile.itemsize(t.dtype)
            if t.rule is not None
            else sum(c.byte_length for c in t.chunks)
            for t in self.tensors.values()
        )

    def __repr__(self) -> str:
        ruled = sum(1 for t in self.tensors.values() if t.rule is not None)
        return (
            f"ManifestV3(world_size={self.world_size}, tensors={len(self.tensors)} ({ruled} by rule), "
            f"values={len(self.values)}, files={self.file_table.total_files}, created_at={self.created_at!r})"
        )


# ---------------------------------------------------------------- JSON out


def manifest_v3_to_json(m: ManifestV3) -> bytes:
    """The sealed bytes, laid out like versions 1 and 2 (one line per tensor, value, path)."""
    doc = {
        "format": FORMAT_NAME,
        "format_version": VERSION,
        "shardckpt_version": m.shardckpt_version,
        "torch_version": m.torch_version,
        "created_at": m.created_at,
        "world_size": m.world_size,
        "hash_algorithm": HASH_ALGORITHM,
        "hash_block_bytes": m.hash_block_bytes,
        "bases": sorted(m.bases),
        "tensors": {k: _tensor_doc(t) for k, t in sorted(m.tensors.items())},
        "values": dict(sorted(m.values.items())),
        "file_table": file_table_to_json(m.file_table),
        **({} if m.inline_index is None else {"inline_index": _inline_doc(m.inline_index)}),
        "paths": dict(sorted(m.paths.items())),
        "metadata": m.metadata,
    }
    lines = []
    for k, v in doc.items():
        if k in ("tensors", "values", "paths", "metadata") and isinstance(v, dict) and v:
            inner = ",\n".join(f"  {_dump(ik)}: {_dump(iv)}" for ik, iv in v.items())
            lines.append(f" {_dump(k)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {_dump(k)}: {_dump(v)}")
    raw = seal(("{\n" + ",\n".join(lines) + "\n}\n").encode())
    check_manifest_limits(
        raw, source="the format-3 manifest being written", writing=True, bytes_per_container=JSON_BYTES_PER_CONTAINER
    )
    return raw


def _inline_doc(inline: InlineIndex) -> dict[str, Any]:
    return {"file": inline.file, **file_index_to_json(inline.index)}


def _dump(v: Any) -> str:
    return json.dumps(v, allow_nan=False, separators=(",", ":"))


def _tensor_doc(t: Tensor) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "dtype": t.dtype,
        "shape": list(t.shape),
        "chunks": [
            {
                "offsets": list(c.offsets),
                "sizes": list(c.sizes),
                "file": c.file,
                "byte_offset": c.byte_offset,
                "byte_length": c.byte_length,
            }
            for c in t.chunks
        ],
    }
    if t.rule is not None:
        doc["rule"] = rules.rule_to_json(t.rule)
    return doc


# ---------------------------------------------------------------- JSON in


def parse_manifest_v3(raw: bytes, *, source: str) -> ManifestV3:
    """Check and parse untrusted version-3 manifest bytes read from ``source``.

    In order: the JSON limits on the bytes, the seal (``manifest_hash``), the JSON, the
    version, then every field (docs/format.md 12.5). Linear in ``len(raw)``; ManifestError
    (UnsupportedFormatVersionError for another version) saying what was expected, what was
    found and where.
    """
    check_manifest_limits(raw, source=source, bytes_per_container=JSON_BYTES_PER_CONTAINER)
    unseal(raw, source=source)
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"{source}: manifest is not valid JSON ({e}); the checkpoint is corrupt") from e
    try:
        return _parse(doc, source)
    except RecursionError as e:
        raise ManifestError(f"{source}: manifest nests too deeply; the checkpoint is corrupt or hostile") from e


READ_VERSIONS = (*SUPPORTED_VERSIONS, VERSION)


def parse_any_manifest(raw: bytes, *, source: str) -> Manifest | ManifestV3:
    """A manifest of any version a load reads (:data:`READ_VERSIONS`): versions 1 and 2
    through :func:`~shardckpt.format.manifest.parse_manifest`, version 3 through
    :func:`parse_manifest_v3`. UnsupportedFormatVersionError for any other version.
    A manifest that starts as shardckpt writes format 3 goes to :func:`parse_manifest_v3`
    at once: versions 1 and 2 have a stricter container limit, checked before the version
    is read."""
    if _DECLARED.match(raw, 0, 256):
        return parse_manifest_v3(raw, source=source)
    try:
        return parse_manifest(raw, source=source)
    except UnsupportedFormatVersionError as first:
        try:
            return parse_manifest_v3(raw, source=source)
        except UnsupportedFormatVersionError:
            shown = ", ".join(map(str, READ_VERSIONS))
            raise UnsupportedFormatVersionError(
                str(first).replace(
                    f"reads versions {', '.join(map(str, SUPPORTED_VERSIONS))}", f"reads versions {shown}"
                )
            ) from None


def _parse(doc: Any, source: str) -> ManifestV3:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ManifestError(f"{source}: not a shardckpt manifest (expected an object with format {FORMAT_NAME!r})")
    version = doc.get("format_version")
    if type(version) is not int or version != VERSION:
        raise UnsupportedFormatVersionError(
            f"{source}: format version {reprlib.repr(version)}; this parser reads the format-3 draft only "
            "(versions 1 and 2: shardckpt.format.manifest.parse_manifest)"
        )
    missing = [k for k in _TOP if k not in doc]
    if missing:
        raise ManifestError(f"{source}: missing fields {missing} of a format-3 manifest (docs/format.md 12.1)")
    if doc["hash_algorithm"] != HASH_ALGORITHM:
        raise ManifestError(
            f"{source}: hash_algorithm {reprlib.repr(doc['hash_algorithm'])}, expected {HASH_ALGORITHM!r}"
        )
    block = doc["hash_block_bytes"]
    if type(block) is not int or not (4096 <= block <= 2**30 and block % 64 == 0):
        raise ManifestError(
            f"{source}: hash_block_bytes must be a multiple of 64 in [4096, 2**30], found {reprlib.repr(block)}"
        )
    world_size = doc["world_size"]
    if type(world_size) is not int or not 1 <= world_size < 2**62:
        raise ManifestError(f"{source}: world_size must be an integer in [1, 2**62), found {reprlib.repr(world_size)}")
    strings = [_field(doc, k, str, source) for k in ("created_at", "shardckpt_version", "torch_version")]
    bases = _parse_bases(doc["bases"], source)
    table = parse_file_table(doc["file_table"], bases=bases, world_size=world_size, where=f"{source}: file_table")
    tensors = {
        k: _parse_tensor(t, table.total_files, f"{source}: tensors[{k!r}]")
        for k, t in _field(doc, "tensors", dict, source).items()
    }
    values = _field(doc, "values", dict, source)
    for k, v in values.items():
        decode_value(v, where=f"{source}, values[{k!r}]")
    both = set(values) & set(tensors)
    if both:
        raise ManifestError(f"{source}: keys {sorted(both)[:5]} are both tensors and values; a key is one or the other")
    paths = _field(doc, "paths", dict, source)
    for k, p in paths.items():
        if not isinstance(p, list) or not p or not all(type(e) is str or type(e) is int for e in p):
            raise ManifestError(
                f"{source}: paths[{k!r}] must be a non-empty list of strings and integers, found {reprlib.repr(p)}"
            )
    inline = _parse_inline(doc.get("inline_index"), table, len(tensors), block, f"{source}: inline_index")
    return ManifestV3(
        world_size=world_size,
        hash_block_bytes=block,
        bases=bases,
        file_table=table,
        tensors=tensors,
        values=values,
        paths=paths,
        created_at=strings[0],
        shardckpt_version=strings[1],
        torch_version=strings[2],
        metadata=_field(doc, "metadata", dict, source),
        inline_index=inline,
    )


def _parse_inline(doc: Any, table: FileTable, tensors: int, block: int, where: str) -> InlineIndex | None:
    """The optional copy of one own-group file's index (format.md 12.8, 12.5 item 8)."""
    if doc is None:
        return None
    if not isinstance(doc, dict) or "file" not in doc:
        raise ManifestError(
            f"{where}: expected an object with file, size, hash and entries (format.md 12.8), found {reprlib.repr(doc)}"
        )
    own = table.groups[0].total_files if table.groups and table.groups[0].checkpoint is None else 0
    position = doc["file"]
    if type(position) is not int or not 0 <= position < own:
        raise ManifestError(
            f"{where}.file: expected the position of a file of this checkpoint's own group, in [0, {own}), found "
            f"{reprlib.repr(position)}; the manifest is corrupt or hostile"
        )
    entries = doc.get("entries")
    if isinstance(entries, list) and len(entries) > tensors:
        raise ManifestError(
            f"{where}.entries: {len(entries)} entries, more than the manifest's {tensors} tensors (at most one each)"
        )
    rest = {k: v for k, v in doc.items() if k != "file"}
    return InlineIndex(position, parse_file_index(rest, block_bytes=block, where=where))


def _parse_bases(doc: Any, source: str) -> tuple[str, ...]:
    if not isinstance(doc, list) or len(doc) > MAX_BASES:
        raise ManifestError(
            f"{source}: bases must be a list of at most {MAX_BASES} folder names, found {reprlib.repr(doc)}"
        )
    for b in doc:
        if not isinstance(b, str) or not _FOLDER.fullmatch(b) or b in (".", ".."):
            raise ManifestError(
                f"{source}: bases entry {reprlib.repr(b)} is not a folder name beside this checkpoint "
                "(letters, digits, '.', '_', '-'; not '.' or '..')"
            )
    if any(a >= b for a, b in itertools.pairwise(doc)):  # linear: sorted and unique
        raise ManifestError(f"{source}: bases must be sorted by code point without duplicates, found {doc[:5]}")
    return tuple(doc)


def _parse_tensor(doc: Any, files: int, where: str) -> Tensor:
    if not isinstance(doc, dict) or not {"dtype", "shape", "chunks"} <= set(doc) <= {
        "dtype",
        "shape",
        "chunks",
        "rule",
    }:
        raise ManifestError(
            f"{where}: expected an object with dtype, shape, chunks and optionally rule, found {reprlib.repr(doc)}"
        )
    dtype = doc["dtype"]
    datafile.torch_dtype(dtype, where=where)
    shape = datafile.check_shape(doc["shape"], where=f"{where}.shape")
    rule = rules.parse_rule(doc["rule"], shape=shape, files=files, where=f"{where}.rule") if "rule" in doc else None
    if not isinstance(doc["chunks"], list):
        raise ManifestError(f"{where}.chunks: expected a list, found {reprlib.repr(doc['chunks'])}")
    chunks = tuple(_parse_chunk(c, shape, dtype, files, f"{where}.chunks[{i}]") for i, c in enumerate(doc["chunks"]))
    covered = sum(math.prod(c.sizes) for c in chunks)
    if rule is not None:
        if covered:
            first = next(i for i, c in enumerate(chunks) if math.prod(c.sizes))
            raise ManifestError(
                f"{where}.chunks[{first}]: a tensor with a rule lists only empty chunks (the rule's cells cover "
                f"every element), found a box of {math.prod(chunks[first].sizes)} elements"
            )
        return Tensor(dtype, shape, rule, chunks)
    if covered != math.prod(shape):
        raise ManifestError(f"{where}: the chunks cover {covered} elements of the tensor's {math.prod(shape)}")
    if len(shape) == 0 and sum(1 for c in chunks if math.prod(c.sizes)) > 1:
        raise ManifestError(f"{where}: a 0-d tensor has more than one non-empty chunk")
    if shape:
        pair = first_overlap([(c.offsets, c.sizes) for c in chunks])
        if pair is not None:
            a, b = pair
            raise ManifestError(f"{where}: chunks[{a}] and chunks[{b}] overlap; the listed boxes must tile the tensor")
    return Tensor(dtype, shape, None, chunks)


def _parse_chunk(doc: Any, shape: tuple[int, ...], dtype: str, files: int, where: str) -> Chunk:
    if not isinstance(doc, dict) or set(doc) != _CHUNK_FIELDS:
        raise ManifestError(
            f"{where}: expected an object with exactly {sorted(_CHUNK_FIELDS)}, found {reprlib.repr(doc)}"
        )
    offsets = datafile.check_shape(doc["offsets"], where=f"{where}.offsets")
    sizes = datafile.check_shape(doc["sizes"], where=f"{where}.sizes")
    if (
        len(offsets) != len(shape)
        or len(sizes) != len(shape)
        or any(o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True))
    ):
        raise ManifestError(f"{where}: box {list(offsets)}+{list(sizes)} lies outside shape {list(shape)}")
    file, offset, length = doc["file"], doc["byte_offset"], doc["byte_length"]
    if type(file) is not int or not 0 <= file < files:
        raise ManifestError(f"{where}.file: expected a file position in [0, {files}), found {reprlib.repr(file)}")
    expected = math.prod(sizes) * datafile.itemsize(dtype)
    if type(length) is not int or length != expected:
        raise ManifestError(
            f"{where}.byte_length: expected {expected} ({list(sizes)} of {dtype}), found {reprlib.repr(length)}"
        )
    if type(offset) is not int or not 0 <= offset < 2**62 - length:
        raise ManifestError(
            f"{where}.byte_offset: expected an integer in [0, 2**62 - byte_length), found {reprlib.repr(offset)}"
        )
    return Chunk(offsets, sizes, file, offset, length)


def _field(doc: dict[str, Any], name: str, typ: type, source: str) -> Any:
    v = doc[name]
    if not isinstance(v, typ):
        raise ManifestError(f"{source}: field {name} must be {typ.__name__}, found {type(v).__name__}")
    return v


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows a float")
    return value
