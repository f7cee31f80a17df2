"""The quick path of the version 1-2 manifest parser: every tensor record checked at once.

A manifest of many small tensors holds tens of thousands of chunk records, and every
loading rank parses all of them (issue #18: 12,232 records took 0.19 s of CPU per rank,
a third of a small-tensor load). :func:`bulk_tensors` does the checks of
:func:`~shardckpt.format.manifest_parser._parse_tensor` column by column: each field of
every chunk is gathered into one list (``map`` with ``itemgetter``), then its types,
ranges, lengths and block hashes are checked by C loops over the whole manifest
(``map``, ``set``, list comparison, one regex, numpy), so no Python code runs per chunk.
It accepts only what the full parser accepts and builds no message: on any doubt it
returns None and the full parser runs, naming the first problem. Pure, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain, islice, repeat
from operator import add, floordiv, gt, itemgetter, mul, neg
from typing import Any, NamedTuple

import numpy as np

from shardckpt.format import datafile
from shardckpt.format.manifest_records import FileRecord, TensorRecord, chunk_records, tensor_records
from shardckpt.format.overlap import disjoint_slab_groups
from shardckpt.format.record_json import BLOCK_HASHES

_LIMIT = 2**62  # every shape, offset and size is below it (datafile.check_shape, _Reader.nonneg)
_HASH_CHARS = 16
_DIGEST_CHARS = 32
_TENSOR_FIELDS = itemgetter("dtype", "shape", "chunks")
# A chunk's fields as the format writes them (docs/format.md); a chunk with any other key
# set, which the full parser accepts and ignores, takes the full parser.
_CHUNK_KEYS = ("offsets", "sizes", "file", "byte_offset", "byte_length", "block_hashes")
_V2_CHUNK_KEYS = (*_CHUNK_KEYS, "digest")


class Bulk(NamedTuple):
    """What :func:`bulk_tensors` found: the records, and the keys of the tensors whose
    chunks it could not show disjoint in bulk (the caller runs the exact overlap check)."""

    tensors: dict[str, TensorRecord]
    unproven: list[str]


class _Doubt(Exception):
    """Something the quick path does not accept; the full parser will say what."""


def bulk_tensors(doc_tensors: Any, files: dict[str, FileRecord], block: int, *, digests: bool) -> Bulk | None:
    """``doc_tensors`` (the manifest's "tensors" field) as records if every one passes every
    check of the full parser except the overlap check (done here in bulk for the layouts
    saves write; :attr:`Bulk.unproven` names the tensors left to the exact check), else None.
    ``files`` and ``block`` are the manifest's, already validated."""
    if type(doc_tensors) is not dict:
        return None
    try:
        cols = _Columns(doc_tensors, digests)
        cols.check({name: f.size for name, f in files.items()}, block)
    except (_Doubt, KeyError, TypeError, ValueError, OverflowError):
        return None
    return cols.records()


def _only(values: Any, typ: type) -> None:
    """Every value exactly of type ``typ`` (a bool is not an int here, as in the full parser)."""
    if not set(map(type, values)) <= {typ}:
        raise _Doubt


class _Columns:
    """The fields of every tensor and chunk of a manifest, one list per field, in order.

    Only type checks run while gathering, each before any arithmetic on its values
    (``["a", 10**12]`` as sizes would be a terabyte-long string if multiplied)."""

    def __init__(self, doc_tensors: dict[str, Any], digests: bool) -> None:
        self.keys, tensors = list(doc_tensors), list(doc_tensors.values())
        _only(tensors, dict)
        heads = list(map(_TENSOR_FIELDS, tensors))  # KeyError: a field is missing
        self.dtypes, self.shapes, chunk_lists = (list(c) for c in zip(*heads, strict=True)) if heads else ([], [], [])
        _only(self.dtypes, str)
        _only(self.shapes, list)
        _only(chunk_lists, list)
        if not all(map(datafile.is_dtype_name, set(self.dtypes))):
            raise _Doubt
        self.ndims, self.counts = list(map(len, self.shapes)), list(map(len, chunk_lists))
        self.chunks = list(chain.from_iterable(chunk_lists))
        _only(self.chunks, dict)
        keys = _V2_CHUNK_KEYS if digests else _CHUNK_KEYS
        if not set(map(len, self.chunks)) <= {len(keys)}:
            raise _Doubt
        # one C pass a field (KeyError: a field is missing; with the count above, no other key is set)
        self.fields: list[list[Any]] = [list(map(itemgetter(k), self.chunks)) for k in keys]
        types: tuple[type, ...] = (list, list, str, int, int, list)  # a digest: the hex check
        for values, typ in zip(self.fields, types, strict=False):
            _only(values, typ)
        offsets, sizes = self.fields[:2]
        self.chunk_ndims = list(self._per_chunk(self.ndims))
        if list(map(len, offsets)) != self.chunk_ndims or list(map(len, sizes)) != self.chunk_ndims:
            raise _Doubt
        self.dims = list(chain.from_iterable(self.shapes))
        self.flat_offsets, self.flat_sizes = list(chain.from_iterable(offsets)), list(chain.from_iterable(sizes))
        for values in (self.dims, self.flat_offsets, self.flat_sizes):
            _only(values, int)

    def _per_chunk(self, per_tensor: Iterable[Any]) -> Any:
        """Each tensor's value once per chunk of the tensor."""
        return chain.from_iterable(map(repeat, per_tensor, self.counts))

    def check(self, file_sizes: dict[str, int], block: int) -> None:
        """Every range, length and hash of the full parser's checks but the overlap check."""
        _, sizes, names, byte_offsets, lengths, hashes = self.fields[:6]
        if max(self.ndims, default=0) > datafile.MAX_NDIM or (
            self.dims and not 0 <= min(self.dims) <= max(self.dims) < _LIMIT
        ):
            raise _Doubt
        self.offset_array = np.asarray(self.flat_offsets, dtype=np.int64)  # >= 2**63: OverflowError
        self.size_array = np.asarray(self.flat_sizes, dtype=np.int64)
        dims = np.asarray(list(chain.from_iterable(self._per_chunk(self.shapes))), dtype=np.int64)
        off, size = self.offset_array, self.size_array
        if len(off) and not (off.min() >= 0 and size.min() >= 0 and off.max() < _LIMIT and size.max() < _LIMIT):
            raise _Doubt
        if not bool(np.all(off + size <= dims)):
            raise _Doubt
        self.elements = list(map(math.prod, sizes))
        if list(map(mul, self.elements, self._per_chunk(map(datafile.itemsize, self.dtypes)))) != lengths:
            raise _Doubt
        # length >= 0 and offset < 2**62 follow: sizes >= 0 and every file's size < 2**62
        file_size: list[Any] = list(map(file_sizes.get, names))
        if (
            None in file_size
            or min(byte_offsets, default=0) < 0
            or any(map(gt, map(add, byte_offsets, lengths), file_size))
        ):
            raise _Doubt
        if list(map(len, hashes)) != list(map(neg, map(floordiv, map(neg, lengths), repeat(block)))):
            raise _Doubt
        elements = iter(self.elements)
        if [sum(islice(elements, n)) for n in self.counts] != list(map(math.prod, self.shapes)):
            raise _Doubt
        _check_hex(list(chain.from_iterable(hashes)), _HASH_CHARS)
        if len(self.fields) > 6:
            _check_hex(self.fields[6], _DIGEST_CHARS)

    def records(self) -> Bulk:
        """The records of the checked columns, and the tensors not shown disjoint in bulk."""
        offsets, sizes, names, byte_offsets, lengths, hashes = self.fields[:6]
        digests = self.fields[6] if len(self.fields) > 6 else [None] * len(names)
        tuples = [list(map(tuple, column)) for column in (offsets, sizes, hashes)]
        chunks = iter(chunk_records(tuples[0], tuples[1], names, byte_offsets, lengths, tuples[2], digests))
        by_tensor = [tuple(islice(chunks, n)) for n in self.counts]
        tensors = tensor_records(self.dtypes, list(map(tuple, self.shapes)), by_tensor)
        ndims, counts = np.asarray(self.chunk_ndims, dtype=np.int64), np.asarray(self.counts, dtype=np.int64)
        proven = disjoint_slab_groups(self.offset_array, self.size_array, ndims, counts)
        unproven = [k for k, ok in zip(self.keys, proven.tolist(), strict=True) if not ok]
        return Bulk(dict(zip(self.keys, tensors, strict=True)), unproven)


def _check_hex(texts: list[Any], chars: int) -> None:
    """Every item a str of exactly ``chars`` lowercase hex digits (join raises on a non-str)."""
    if not texts:
        return
    if set(map(type, texts)) != {str} or set(map(len, texts)) != {chars}:
        raise _Doubt
    if BLOCK_HASHES.fullmatch("".join(texts)) is None:  # lengths are multiples of 16
        raise _Doubt
