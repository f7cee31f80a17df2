"""Format 3: untrusted ``manifest.json`` bytes of version 3 -> validated
:class:`~shardckpt.format.manifest_v3.ManifestV3` (every check of docs/format.md 12.5),
and :func:`parse_any_manifest`, the loader's dispatch on ``format_version`` (12.7).

Pure, no I/O; linear time in the manifest's bytes. Every refusal is a ManifestError
(UnsupportedFormatVersionError for another version) saying what was expected, what was
found and where.
"""

from __future__ import annotations

import itertools
import math
import re
import reprlib
from typing import Any

from shardckpt.errors import ManifestError, UnsupportedFormatVersionError
from shardckpt.format import datafile, rules
from shardckpt.format.file_table import FileTable, parse_file_table
from shardckpt.format.manifest import (
    FORMAT_NAME,
    HASH_ALGORITHM,
    MAX_BASES,
    SUPPORTED_VERSIONS,
    Manifest,
    check_manifest_limits,
    parse_manifest,
    unseal,
)
from shardckpt.format.manifest_bulk import ALL, Share
from shardckpt.format.manifest_v3 import JSON_BYTES_PER_CONTAINER, VERSION, Chunk, InlineIndex, ManifestV3, Tensor
from shardckpt.format.manifest_v3_bulk import ruled_tensors
from shardckpt.format.overlap import first_overlap
from shardckpt.format.rank_index import parse_file_index
from shardckpt.format.record_json import FOLDER, parse_document
from shardckpt.format.values import decode_value

_DECLARED = re.compile(rb'\{\s*"format"\s*:\s*"shardckpt"\s*,\s*"format_version"\s*:\s*3\s*,')
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


def parse_manifest_v3(raw: bytes, *, source: str) -> ManifestV3:
    """Check and parse untrusted version-3 manifest bytes read from ``source``.

    In order: the JSON limits on the bytes, the seal (``manifest_hash``), the JSON, the
    version, then every field (docs/format.md 12.5). Linear in ``len(raw)``; ManifestError
    (UnsupportedFormatVersionError for another version) saying what was expected, what was
    found and where.
    """
    check_manifest_limits(raw, source=source, bytes_per_container=JSON_BYTES_PER_CONTAINER)
    unseal(raw, source=source)
    return parse_document(raw, source, _parse)


READ_VERSIONS = (*SUPPORTED_VERSIONS, VERSION)


def parse_any_manifest(raw: bytes, *, source: str, share: Share = ALL) -> Manifest | ManifestV3:
    """A manifest of any version a load reads (:data:`READ_VERSIONS`): versions 1 and 2
    through :func:`~shardckpt.format.manifest.parse_manifest`, version 3 through
    :func:`parse_manifest_v3`. UnsupportedFormatVersionError for any other version.
    A manifest that starts as shardckpt writes format 3 goes to :func:`parse_manifest_v3`
    at once: versions 1 and 2 have a stricter container limit, checked before the version
    is read. ``share``: see :func:`~shardckpt.format.manifest.parse_manifest` (a version 3
    manifest is checked whole)."""
    if _DECLARED.match(raw, 0, 256):
        return parse_manifest_v3(raw, source=source)
    try:
        return parse_manifest(raw, source=source, share=share)
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
    files = table.total_files
    tensors = ruled_tensors(
        _field(doc, "tensors", dict, source), files, lambda k, t: _parse_tensor(t, files, f"{source}: tensors[{k!r}]")
    )
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
        if not isinstance(b, str) or not FOLDER.fullmatch(b) or b in (".", ".."):
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
