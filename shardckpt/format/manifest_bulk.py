"""The quick path of the version 1-2 manifest parser: every tensor record decoded and checked at once.

A manifest of many small tensors holds tens of thousands of chunk records, and every
loading rank parses all of them (issue #18: 12,232 records took 0.15 s of CPU per rank,
half of a small-tensor load). :func:`bulk_tensors` decodes the manifest's "tensors" field
straight into :class:`TensorRecord` and :class:`ChunkRecord` with msgspec's typed JSON
decoder (one C pass, no intermediate dicts, strict: a bool, a float or a missing field is
refused, integers of any size are exact), then does the remaining checks of
:func:`~shardckpt.format.manifest_parser._parse_tensor` column by column: each field of
every chunk is gathered into one list (``map`` with ``attrgetter``), then its ranges,
lengths and block hashes are checked by C loops over the whole manifest (``map``, ``set``,
list comparison, one regex, numpy), so no Python code runs per chunk. It accepts only
what the full parser accepts and builds no message: on any doubt it returns None and the
full parser runs on the stdlib's parse of the same text, naming the first problem.
:func:`top_fields` splits a manifest into its top-level fields' texts so that the small
ones go to ``json`` and only "tensors" to msgspec. Pure, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain, islice, repeat
from operator import add, attrgetter, floordiv, gt, mul, neg
from typing import Any, NamedTuple

import msgspec
import numpy as np

from shardckpt.format import datafile
from shardckpt.format.manifest_records import ChunkRecord, FileRecord, TensorRecord
from shardckpt.format.overlap import disjoint_slab_groups
from shardckpt.format.record_json import BLOCK_HASHES

_LIMIT = 2**62  # every shape, offset and size is below it (datafile.check_shape, _Reader.nonneg)
_HASH_CHARS = 16
_DIGEST_CHARS = 32
_TENSOR_FIELDS = ("dtype", "shape", "chunks")
_CHUNK_FIELDS = ("offsets", "sizes", "file", "byte_offset", "byte_length", "block_hashes", "digest")
# Decoders hold no state between calls (msgspec compiles the type once): constants, like a compiled regex.
_TOP_DECODER = msgspec.json.Decoder(dict[str, msgspec.Raw])
_TENSORS_DECODER = msgspec.json.Decoder(dict[str, TensorRecord])


class Bulk(NamedTuple):
    """What :func:`bulk_tensors` found: the records, and the keys of the tensors whose
    chunks it could not show disjoint in bulk (the caller runs the exact overlap check)."""

    tensors: dict[str, TensorRecord]
    unproven: list[str]


class Share(NamedTuple):
    """Which part of a manifest's chunk records one parse checks: the tensors of part
    ``part`` of ``parts`` contiguous, nearly equal parts, in the manifest's order.

    A load checks every record of a manifest, but it need not check each on every rank:
    each rank of a group checks the chunks of its own share of the tensors (and every
    tensor's key, dtype and shape, and the document's limits and other fields), and the
    ranks agree that each share passed before any rank uses a record (the load's first
    round trip, which also checks they all parsed the same bytes). Together they check
    exactly what one full parse checks: each chunk is in one share, the members of the
    whole text are counted by every rank. ``ALL`` (one share) is a full parse."""

    part: int
    parts: int

    def bounds(self, n: int) -> tuple[int, int]:
        """The share's tensors among ``n``: ``[low, high)``."""
        if not 0 <= self.part < self.parts:
            raise ValueError(f"share {self.part} of {self.parts} does not exist")
        return self.part * n // self.parts, (self.part + 1) * n // self.parts


ALL = Share(0, 1)


class _Doubt(Exception):
    """Something the quick path does not accept; the full parser will say what."""


def top_fields(raw: bytes) -> dict[str, bytes] | None:
    """The text of each top-level field of the JSON object ``raw`` (a later duplicate key
    wins, as in ``json.loads``), or None for anything else or anything msgspec refuses
    (the caller then parses ``raw`` with ``json`` alone). The texts are valid JSON."""
    try:
        if not raw.isascii():
            raw.decode("utf-8")  # msgspec does not check the UTF-8 of what it skips
        fields = _TOP_DECODER.decode(raw)
    except (UnicodeDecodeError, msgspec.MsgspecError, RecursionError):
        return None
    return {k: bytes(v) for k, v in fields.items()}


def bulk_tensors(
    text: bytes,
    files: dict[str, FileRecord],
    block: int,
    *,
    digests: bool,
    max_containers: int | None = None,
    share: Share = ALL,
) -> Bulk | None:
    """The manifest's "tensors" field (its JSON ``text``) as records if every one passes
    every check of the full parser except the overlap check (done here in bulk for the
    layouts saves write; :attr:`Bulk.unproven` names the tensors left to the exact check),
    else None. ``files`` and ``block`` are the manifest's, already validated.

    ``max_containers``: None, or how many JSON arrays and objects ``text`` may hold (what
    the document's limits leave to it): the text is then not scanned for them, as
    :func:`~shardckpt.format.datafile.json_limits_problem` would, but counted from the
    decoded records (the text holds exactly their members, :meth:`_Columns.check_members`):
    the field's object, three a tensor (its object, shape and chunks) and four a chunk (its
    object, offsets, sizes and block hashes), at most six levels deep. msgspec builds only
    records of those types from it, at most ~14x the text's size in memory (measured in
    tests/unit/test_manifest_decode.py), whatever the text holds.

    ``share``: the chunk records checked (:class:`Share`; the others are decoded only)."""
    try:
        tensors = _TENSORS_DECODER.decode(text)
    except (msgspec.MsgspecError, RecursionError):
        return None
    if max_containers is not None and 1 + 3 * len(tensors) + 4 * sum(len(t.chunks) for t in tensors.values()) > (
        max_containers
    ):
        return None
    try:
        cols = _Columns(tensors, digests, share)
        cols.check_members(text, digests)
        cols.check({name: f.size for name, f in files.items()}, block, digests)
    except (_Doubt, TypeError, ValueError, OverflowError):
        return None
    return cols.result(tensors)


class _Columns:
    """The fields of every tensor and of the chunks of ``share``'s tensors, one list per
    field, in order. msgspec has checked every type (ints are ints of any size, never bools), so
    the arithmetic below runs on ints only; ranges are checked before products."""

    def __init__(self, tensors: dict[str, TensorRecord], digests: bool, share: Share) -> None:
        keys, records = list(tensors), list(tensors.values())
        dtypes, shapes, chunk_lists = (list(map(attrgetter(k), records)) for k in _TENSOR_FIELDS)
        # what every rank checks of every tensor: its key, dtype and shape (a load compares them with its target)
        if not all(map(datafile.is_dtype_name, set(dtypes))):
            raise _Doubt
        ndims = list(map(len, shapes))
        dims = list(chain.from_iterable(shapes))
        if max(ndims, default=0) > datafile.MAX_NDIM or (dims and not 0 <= min(dims) <= max(dims) < _LIMIT):
            raise _Doubt
        self.all_keys, self.all_chunks = keys, sum(map(len, chunk_lists))
        # the chunks of this share's tensors
        low, high = share.bounds(len(keys))
        self.keys, self.dtypes, self.shapes, self.ndims = (
            keys[low:high],
            dtypes[low:high],
            shapes[low:high],
            ndims[low:high],
        )
        self.counts = list(map(len, chunk_lists[low:high]))
        chunks: list[ChunkRecord] = list(chain.from_iterable(chunk_lists[low:high]))
        self.fields: list[list[Any]] = [list(map(attrgetter(k), chunks)) for k in _CHUNK_FIELDS]
        # format 1 has no digests (the full parser ignores one there); format 2 has one on every chunk
        if (None in self.fields[6]) if digests else (set(self.fields[6]) - {None}):
            raise _Doubt
        offsets, sizes = self.fields[:2]
        self.chunk_ndims = list(self._per_chunk(self.ndims))
        if list(map(len, offsets)) != self.chunk_ndims or list(map(len, sizes)) != self.chunk_ndims:
            raise _Doubt
        self.flat_offsets, self.flat_sizes = list(chain.from_iterable(offsets)), list(chain.from_iterable(sizes))

    def check_members(self, text: bytes, digests: bool) -> None:
        """No member in ``text`` but the fields of the records, each once. msgspec skips the
        members a record does not define, and takes the last of a repeated one, as ``json``
        does; but it does not convert the numbers it skips, which ``json`` refuses when they
        overflow a float or have over 4,300 digits. So the quick path takes only text with
        exactly one ":" outside strings per field of the records. Every member counted is
        required (a format-2 chunk without its digest was refused above), so the text holds
        at least these; one more is a member too many. Without a backslash in the text, the
        JSON of every string is its value, and only the tensors' keys may hold a ":" (no
        file name, dtype or hash does): counting the bytes is exact; with one, the strings
        are told apart byte by byte (:func:`datafile.count_outside_strings`, ~5x the time)."""
        per_chunk = len(_CHUNK_FIELDS) if digests else len(_CHUNK_FIELDS) - 1
        members = len(self.all_keys) * (1 + len(_TENSOR_FIELDS)) + per_chunk * self.all_chunks
        if b"\\" in text:
            found = datafile.count_outside_strings(text, ord(":"))
        else:
            found = text.count(b":") - sum(map(str.count, self.all_keys, repeat(":")))
        if found != members:
            raise _Doubt

    def _per_chunk(self, per_tensor: Iterable[Any]) -> Any:
        """Each tensor's value once per chunk of the tensor."""
        return chain.from_iterable(map(repeat, per_tensor, self.counts))

    def check(self, file_sizes: dict[str, int], block: int, digests: bool) -> None:
        """Every range, length and hash of the full parser's checks but the overlap check."""
        _, sizes, names, byte_offsets, lengths, hashes = self.fields[:6]
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
        if digests:
            _check_hex(self.fields[6], _DIGEST_CHARS)

    def result(self, tensors: dict[str, TensorRecord]) -> Bulk:
        """The checked records, and the tensors not shown disjoint in bulk."""
        ndims, counts = np.asarray(self.chunk_ndims, dtype=np.int64), np.asarray(self.counts, dtype=np.int64)
        proven = disjoint_slab_groups(self.offset_array, self.size_array, ndims, counts)
        unproven = [k for k, ok in zip(self.keys, proven.tolist(), strict=True) if not ok]
        return Bulk(tensors, unproven)


def _check_hex(texts: list[Any], chars: int) -> None:
    """Every item a str of exactly ``chars`` lowercase hex digits (join raises on a non-str)."""
    if not texts:
        return
    if set(map(type, texts)) != {str} or set(map(len, texts)) != {chars}:
        raise _Doubt
    if BLOCK_HASHES.fullmatch("".join(texts)) is None:  # lengths are multiples of 16
        raise _Doubt
