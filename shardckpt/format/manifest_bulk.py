"""The quick path of the version 1-2 manifest parser: every tensor record checked at once.

A manifest of many small tensors holds tens of thousands of chunk records, and every
loading rank parses all of them (issue #18: 12,232 records took 0.19 s of CPU per rank,
a third of a small-tensor load). :func:`bulk_tensors` does the checks of
:func:`~shardckpt.format.manifest_parser._parse_tensor` with the per-chunk Python work cut
to field lookups and the record itself: integer types, ranges and block hashes are checked
once over flat lists of the whole manifest (C loops: ``map``, ``min``, ``max``, one regex,
numpy). It accepts only what the full parser accepts and builds no message: on any doubt it
returns None and the full parser runs, naming the first problem. Pure, no I/O.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shardckpt.format import datafile
from shardckpt.format.manifest_records import ChunkRecord, FileRecord, TensorRecord
from shardckpt.format.record_json import BLOCK_HASHES

_LIMIT = 2**62  # every shape, offset and size is below it (datafile.check_shape, _Reader.nonneg)
_INT = {int}  # bool is not int here, as in the full parser's checks
_HASH_CHARS = 16
_DIGEST_CHARS = 32


class _Doubt(Exception):
    """Something the quick path does not accept; the full parser will say what."""


def bulk_tensors(
    doc_tensors: Any, files: dict[str, FileRecord], block: int, *, digests: bool
) -> dict[str, TensorRecord] | None:
    """``doc_tensors`` (the manifest's "tensors" field) as records if every one passes every
    check of the full parser except the overlap check (the caller runs it on each tensor's
    chunks), else None. ``files`` and ``block`` are the manifest's, already validated."""
    if type(doc_tensors) is not dict:
        return None
    flat = _Flat()
    sizes_of = {name: f.size for name, f in files.items()}
    try:
        records = {key: _tensor(t, flat, sizes_of, block, digests) for key, t in doc_tensors.items()}
        flat.check(digests)
    except (_Doubt, TypeError, ValueError, OverflowError):
        return None
    return records


class _Flat:
    """Fields of every chunk gathered flat, for checks done once over the whole manifest."""

    def __init__(self) -> None:
        self.shapes: list[int] = []  # every tensor's dims
        self.offsets: list[Any] = []  # not type-checked yet: JSON may hold anything here
        self.sizes: list[int] = []
        self.dims: list[int] = []  # the tensor's shape, once per chunk, beside offsets/sizes
        self.hashes: list[Any] = []
        self.digests: list[Any] = []

    def check(self, digests: bool) -> None:
        if not set(map(type, self.offsets)) <= _INT:  # shapes and sizes were checked before any arithmetic
            raise _Doubt
        if self.shapes and not 0 <= min(self.shapes) <= max(self.shapes) < _LIMIT:
            raise _Doubt
        if self.offsets:  # an int of 2**63 or more: OverflowError
            offsets, sizes = np.asarray(self.offsets, dtype=np.int64), np.asarray(self.sizes, dtype=np.int64)
            ok = (offsets >= 0) & (sizes >= 0) & (offsets < _LIMIT) & (sizes < _LIMIT)
            if not bool(np.all(ok)) or not bool(np.all(offsets + sizes <= np.asarray(self.dims, dtype=np.int64))):
                raise _Doubt
        _check_hex(self.hashes, _HASH_CHARS)
        if digests:
            _check_hex(self.digests, _DIGEST_CHARS)


def _check_hex(texts: list[Any], chars: int) -> None:
    """Every item a str of exactly ``chars`` lowercase hex digits (join raises on a non-str)."""
    if not texts:
        return
    if set(map(type, texts)) != {str} or set(map(len, texts)) != {chars}:
        raise _Doubt
    if BLOCK_HASHES.fullmatch("".join(texts)) is None:  # lengths are multiples of 16
        raise _Doubt


def _tensor(t: Any, flat: _Flat, sizes_of: dict[str, int], block: int, digests: bool) -> TensorRecord:
    if type(t) is not dict:
        raise _Doubt
    dtype, shape, chunks = t.get("dtype"), t.get("shape"), t.get("chunks")
    if type(dtype) is not str or type(shape) is not list or type(chunks) is not list:
        raise _Doubt
    if not datafile.is_dtype_name(dtype) or len(shape) > datafile.MAX_NDIM:
        raise _Doubt
    if not set(map(type, shape)) <= _INT:
        raise _Doubt
    isz = datafile.itemsize(dtype)
    ndim = len(shape)
    flat.shapes += shape
    covered = 0
    out = []
    for c in chunks:
        if type(c) is not dict:
            raise _Doubt
        offsets, sizes, name = c.get("offsets"), c.get("sizes"), c.get("file")
        off, length, hashes = c.get("byte_offset"), c.get("byte_length"), c.get("block_hashes")
        if type(offsets) is not list or type(sizes) is not list or len(offsets) != ndim or len(sizes) != ndim:
            raise _Doubt
        if type(name) is not str or type(off) is not int or type(length) is not int or type(hashes) is not list:
            raise _Doubt
        if not set(map(type, sizes)) <= _INT:  # before any arithmetic: ["a", 10**12] would be a huge str
            raise _Doubt
        file_size = sizes_of.get(name)
        elements = math.prod(sizes)
        # length >= 0 and off < 2**62 follow once sizes >= 0 (checked in bulk) and the file's size < 2**62
        if file_size is None or off < 0 or length != elements * isz or off + length > file_size:
            raise _Doubt
        if len(hashes) != -(-length // block):
            raise _Doubt
        flat.offsets += offsets
        flat.sizes += sizes
        flat.dims += shape
        flat.hashes += hashes
        digest = None
        if digests:
            digest = c.get("digest")
            flat.digests.append(digest)
        covered += elements
        out.append(ChunkRecord(tuple(offsets), tuple(sizes), name, off, length, tuple(hashes), digest))
    if covered != math.prod(shape):
        raise _Doubt
    return TensorRecord(dtype, tuple(shape), tuple(out))
