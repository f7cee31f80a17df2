"""Manifest bytes of format versions 1 and 2 -> a validated :class:`Manifest`. Pure, no I/O.

:func:`parse_manifest` treats its input as hostile: every name, size and range is
checked before anything is allocated or opened.
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Any, NamedTuple

from shardckpt.errors import ManifestError, UnsupportedFormatVersionError
from shardckpt.format import datafile
from shardckpt.format.layout import check_relative_name, is_data_file_name
from shardckpt.format.manifest_bulk import ALL, Share, bulk_tensors, top_fields
from shardckpt.format.manifest_envelope import MAX_MANIFEST_BYTES, check_manifest_limits
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
from shardckpt.format.overlap import first_overlap
from shardckpt.format.record_json import DIGEST, FOLDER, HASH, manifest_json, parse_document, parse_parsed
from shardckpt.format.values import decode_value

_KEY_PARTS = {str, int}  # of a path: exactly these types (a bool is an int to isinstance)


def parse_manifest(raw: bytes, *, source: str, share: Share = ALL) -> Manifest:
    """Parse and fully validate untrusted manifest bytes read from ``source``.

    ``share``: check only that share's chunk records (:class:`Share`): the caller's group
    checks the others and agrees before any record is used. Whatever the quick path does
    not take is parsed and checked whole.

    Bounded: :func:`check_manifest_limits` refuses oversized, too deep or container-dense
    JSON before ``json`` parses it, and every later check is O(n log n) in the number of
    chunks. The quick path (:func:`_parse_quick`) checks the same limits field by field;
    whatever it does not take, ``json`` parses whole, and its checks name the problem.
    """
    quick = _parse_quick(raw, source, share)
    if quick is not None:
        return quick
    check_manifest_limits(raw, source=source)
    return parse_document(raw, source, _parse_document)


_MAX_QUICK_FIELDS = 64
"""Documents of more top-level fields take the full path (a manifest has 15)."""


class _NotQuick(Exception):
    """The quick path does not take this manifest; the full path will say why (if it is wrong)."""


def _parse_quick(raw: bytes, source: str, share: Share = ALL) -> Manifest | None:
    """The manifest, parsed and validated with its "tensors" decoded by msgspec
    (:func:`bulk_tensors`), or None for the full path: for anything that is not an object
    of at most :data:`_MAX_QUICK_FIELDS` fields msgspec reads, anything over the JSON
    limits, and anything wrong (ManifestError included), so that the full path names the
    first problem exactly as it always has. The limits of :func:`check_manifest_limits`
    are checked without scanning "tensors" (the most of a manifest's bytes): every other
    field is scanned before ``json`` parses it, and the tensors' containers are counted
    from their decoded records against what the other fields leave. Memory stays within
    the full path's bound for any input (see :func:`bulk_tensors`)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        return None
    fields = top_fields(raw)
    if fields is None or "tensors" not in fields or len(fields) > _MAX_QUICK_FIELDS:
        return None
    budget = datafile.max_json_containers(len(raw)) - 1  # the document's own object
    for k, v in fields.items():
        if k == "tensors":
            continue
        used = datafile.json_containers(v, budget, depth=1)
        if used is None:
            return None
        budget -= used
    try:
        doc = {k: _Encoded(v, budget, share) if k == "tensors" else manifest_json(v, source) for k, v in fields.items()}
        return parse_parsed(doc, source, _parse_document)
    except (ManifestError, _NotQuick):
        return None


class _Encoded(NamedTuple):
    """The "tensors" field still as its JSON text (the quick path decodes it itself), how
    many arrays and objects it may hold within the document's limits, and the share of its
    chunk records to check."""

    text: bytes
    max_containers: int
    share: Share


def _parse_document(doc: Any, source: str) -> Manifest:
    r = _Reader(doc, source)
    version, block, world_size = _parse_header(r, doc)
    bases = _parse_bases(r, doc) if version >= 2 else ()
    files = _parse_files(r, doc, version, world_size, frozenset(bases))
    tensors = _parse_tensors(r, doc, files, block, digests=version >= 2)
    values = r.get(doc, "values", dict, "")
    for k, v in values.items():
        decode_value(v, where=f"{source}, values[{k!r}]")  # RecursionError -> ManifestError above
    overlap = set(values) & set(tensors)
    if overlap:
        raise ManifestError(f"{source}: keys {sorted(overlap)} are both tensors and values")
    layout = r.get(doc, "process_layout", list, "")
    if not all(isinstance(p, dict) for p in layout):
        raise ManifestError(f"{source}: process_layout must be a list of objects")
    paths = _parse_paths(r, doc)
    metadata = doc.get("metadata", {})  # absent in manifests written before the field existed
    if not isinstance(metadata, dict):
        raise ManifestError(f"{source}: field metadata must be dict, found {type(metadata).__name__}")
    return Manifest(
        world_size=world_size,
        process_layout=tuple(layout),
        tensors=tensors,
        values=values,
        files=files,
        hash_block_bytes=block,
        created_at=r.get(doc, "created_at", str, ""),
        shardckpt_version=r.get(doc, "shardckpt_version", str, ""),
        torch_version=r.get(doc, "torch_version", str, ""),
        paths=paths,
        metadata=metadata,
        format_version=version,
        bases=bases,
    )


def _parse_tensors(
    r: _Reader, doc: Any, files: dict[str, FileRecord], block: int, *, digests: bool
) -> dict[str, TensorRecord]:
    """``tensors``: from its text by the quick path (:class:`_NotQuick` unless every record
    passes it), or, parsed by ``json``, checked record by record, naming the first problem."""
    encoded = doc.get("tensors")
    if isinstance(encoded, _Encoded):
        bulk = bulk_tensors(
            encoded.text, files, block, digests=digests, max_containers=encoded.max_containers, share=encoded.share
        )
        if bulk is None:
            raise _NotQuick  # something is wrong, or over the limits: the full path names it
        for k in bulk.unproven:  # layouts of more than one split dimension, or overlapping ones
            _check_disjoint(list(bulk.tensors[k].chunks), where=f"{r.source}, tensors[{k!r}]")
        return bulk.tensors
    doc_tensors = r.get(doc, "tensors", dict, "")
    return {k: _parse_tensor(r, k, t, files, block, digests=digests) for k, t in doc_tensors.items()}


def _parse_header(r: _Reader, doc: Any) -> tuple[int, int, int]:
    """The fields every later check depends on: (format_version, hash_block_bytes, world_size)."""
    source = r.source
    if r.get(doc, "format", str, "") != FORMAT_NAME:
        raise ManifestError(f"{source}: not a shardckpt manifest (field 'format' is not {FORMAT_NAME!r})")
    version = r.get(doc, "format_version", int, "")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedFormatVersionError(
            f"{source}: format version {version}, but this shardckpt reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}; "
            + ("upgrade shardckpt to load it" if version > FORMAT_VERSION else "the manifest is corrupt")
        )
    if r.get(doc, "hash_algorithm", str, "") != HASH_ALGORITHM:
        raise ManifestError(f"{source}: unsupported hash_algorithm; expected {HASH_ALGORITHM!r}")
    block = r.get(doc, "hash_block_bytes", int, "")
    if not (4096 <= block <= 2**30 and block % 64 == 0):
        raise ManifestError(f"{source}: hash_block_bytes {block} must be a multiple of 64 in [4096, 2**30]")
    world_size = r.nonneg(doc, "world_size", "")
    if world_size < 1:
        raise ManifestError(f"{source}: world_size must be >= 1, found {world_size}")
    return version, block, world_size


def _parse_files(
    r: _Reader, doc: Any, version: int, world_size: int, base_set: frozenset[str]
) -> dict[str, FileRecord]:
    """``files``; ``base_set`` is where each file's checkpoint is looked up: linear, not files x bases."""
    source = r.source
    files = {}
    for name, f in r.get(doc, "files", dict, "").items():
        check_relative_name(name, where=f"{source}, files")
        if not is_data_file_name(name):
            raise ManifestError(
                f"{source}: files: {name!r} is not a data file name (data/<id>-r<rank>-<k>.safetensors)"
            )
        files[name] = FileRecord(
            size=r.nonneg(f, "size", f"files[{name!r}]"),
            hash=r.hash(f, "hash", f"files[{name!r}]"),
            rank=r.nonneg(f, "rank", f"files[{name!r}]"),
            checkpoint=_file_checkpoint(r, f, name, base_set) if version >= 2 else None,
        )
        # A base's file keeps the rank that wrote it there, which may be >= this save's world_size.
        if files[name].checkpoint is None and files[name].rank >= world_size:
            raise ManifestError(f"{source}: files[{name!r}].rank {files[name].rank} >= world_size {world_size}")
    unused = base_set - {f.checkpoint for f in files.values()}
    if unused:
        raise ManifestError(f"{source}: bases {sorted(unused)} are listed but no file lives there")
    return files


def _parse_paths(r: _Reader, doc: Any) -> dict[str, list[str | int]]:
    paths: dict[str, list[str | int]] = r.get(doc, "paths", dict, "")
    entries = paths.values()
    lists = set(map(type, entries)) <= {list} and all(entries)  # non-empty lists
    if lists and set(map(type, chain.from_iterable(entries))) <= _KEY_PARTS:
        return paths  # what the loop below accepts, checked in C loops (one path per tensor and value)
    for k, p in paths.items():
        if (
            not isinstance(p, list)
            or not p
            or not all(isinstance(e, (str, int)) and not isinstance(e, bool) for e in p)
        ):
            raise ManifestError(f"{r.source}: paths[{k!r}] must be a non-empty list of str/int, found {p!r}")
    return paths


def _parse_bases(r: _Reader, doc: Any) -> tuple[str, ...]:
    """v2 ``bases``: sibling folder names (one plain path component each), sorted, unique."""
    bases = r.get(doc, "bases", list, "")
    if len(bases) > MAX_BASES:
        raise ManifestError(f"{r.source}: {len(bases)} bases, at most {MAX_BASES} allowed")
    for b in bases:
        if not isinstance(b, str) or not FOLDER.fullmatch(b) or b in (".", ".."):
            raise ManifestError(
                f"{r.source}: bases entry {b!r} is not a folder name (letters, digits, '.', '_', '-'; "
                "not '.' or '..'): a base is a checkpoint folder beside this one"
            )
    if bases != sorted(set(bases)):
        raise ManifestError(f"{r.source}: bases must be sorted and unique, found {bases[:5]}")
    return tuple(bases)


def _file_checkpoint(r: _Reader, f: Any, name: str, bases: frozenset[str]) -> str | None:
    if not isinstance(f, dict) or "checkpoint" not in f:
        return None
    folder = r.get(f, "checkpoint", str, f"files[{name!r}]")
    if folder not in bases:
        raise ManifestError(f"{r.source}: files[{name!r}].checkpoint {folder!r} is not listed under 'bases'")
    return str(folder)


def num_blocks(byte_length: int, block_bytes: int) -> int:
    return -(-byte_length // block_bytes)


def _parse_tensor(
    r: _Reader, key: str, t: Any, files: dict[str, FileRecord], block: int, *, digests: bool
) -> TensorRecord:
    where = f"tensors[{key!r}]"
    dtype = r.get(t, "dtype", str, where)
    datafile.torch_dtype(dtype, where=f"{r.source}, {where}")
    shape = datafile.check_shape(r.get(t, "shape", list, where), where=f"{r.source}, {where}")
    chunks = []
    covered = 0
    for i, c in enumerate(r.get(t, "chunks", list, where)):
        chunk = _parse_chunk(r, f"{where}.chunks[{i}]", c, shape, dtype, files, block, digests)
        covered += math.prod(chunk.sizes)
        chunks.append(chunk)
    if covered != math.prod(shape):
        raise ManifestError(f"{r.source}, {where}: chunks cover {covered} elements of {math.prod(shape)}")
    _check_disjoint(chunks, where=f"{r.source}, {where}")
    return TensorRecord(dtype, shape, tuple(chunks))


def _parse_chunk(
    r: _Reader,
    cw: str,
    c: Any,
    shape: tuple[int, ...],
    dtype: str,
    files: dict[str, FileRecord],
    block: int,
    digests: bool,
) -> ChunkRecord:
    """Chunk ``c`` (at ``cw`` in the manifest) checked field by field: ManifestError naming
    the field and the fix for the first problem."""
    offsets = datafile.check_shape(r.get(c, "offsets", list, cw), where=f"{r.source}, {cw}.offsets")
    sizes = datafile.check_shape(r.get(c, "sizes", list, cw), where=f"{r.source}, {cw}.sizes")
    if (
        len(offsets) != len(shape)
        or len(sizes) != len(shape)
        or any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True))
    ):
        raise ManifestError(f"{r.source}, {cw}: box {offsets}+{sizes} lies outside shape {shape}")
    name = check_relative_name(r.get(c, "file", str, cw), where=f"{r.source}, {cw}")
    if name not in files:
        raise ManifestError(f"{r.source}, {cw}: file {name!r} is not listed under 'files'")
    off, length = r.nonneg(c, "byte_offset", cw), r.nonneg(c, "byte_length", cw)
    if length != math.prod(sizes) * datafile.itemsize(dtype):
        raise ManifestError(f"{r.source}, {cw}: byte_length {length} does not match sizes {sizes} of {dtype}")
    if off + length > files[name].size:
        raise ManifestError(
            f"{r.source}, {cw}: byte range [{off}, {off + length}) lies beyond the end of "
            f"{name!r} ({files[name].size} bytes)"
        )
    hashes = r.get(c, "block_hashes", list, cw)
    well_formed = all(isinstance(h, str) and HASH.fullmatch(h) for h in hashes)
    if len(hashes) != num_blocks(length, block) or not well_formed:
        raise ManifestError(f"{r.source}, {cw}: expected {num_blocks(length, block)} block hashes of 16 hex digits")
    digest = None
    if digests:
        digest = r.get(c, "digest", str, cw)
        if not DIGEST.fullmatch(digest):
            raise ManifestError(f"{r.source}: field {cw}.digest must be 32 lowercase hex digits, found {digest!r}")
    return ChunkRecord(offsets, sizes, name, off, length, tuple(hashes), digest)


def _check_disjoint(chunks: list[ChunkRecord], *, where: str) -> None:
    """Refuse overlapping chunk boxes (with the element count, that means an exact tiling)."""
    boxes = [(c.offsets, c.sizes) for c in chunks]
    if boxes and not boxes[0][0]:
        if sum(1 for c in chunks if math.prod(c.sizes) > 0) > 1:
            raise ManifestError(f"{where}: a 0-d tensor has {len(boxes)} chunks")
        return
    try:
        pair = first_overlap(boxes)
    except ManifestError as e:
        raise ManifestError(f"{where}: {e}") from e
    if pair is not None:
        a, b = pair
        raise ManifestError(f"{where}: chunks at {list(boxes[a][0])} and {list(boxes[b][0])} overlap")


class _Reader:
    """Typed field access with errors that name the manifest and the field."""

    def __init__(self, doc: Any, source: str) -> None:
        if not isinstance(doc, dict):
            raise ManifestError(f"{source}: manifest must be a JSON object")
        self.source = source

    def get(self, obj: Any, name: str, typ: type, where: str) -> Any:
        if not isinstance(obj, dict) or name not in obj:
            raise ManifestError(f"{self.source}: missing field {where + '.' if where else ''}{name}")
        value = obj[name]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ManifestError(
                f"{self.source}: field {where + '.' if where else ''}{name} must be {typ.__name__}, "
                f"found {type(value).__name__}"
            )
        return value

    def hash(self, obj: Any, name: str, where: str) -> str:
        v = self.get(obj, name, str, where)
        if not HASH.fullmatch(v):
            raise ManifestError(f"{self.source}: field {where}.{name} must be 16 lowercase hex digits, found {v!r}")
        return str(v)

    def nonneg(self, obj: Any, name: str, where: str) -> int:
        v = self.get(obj, name, int, where)
        if v < 0 or v >= 2**62:
            raise ManifestError(f"{self.source}: field {where}.{name} = {v} out of range")
        return int(v)
