"""A manifest's ``"tensors"`` and ``"paths"`` entries as JSON text, in two halves (issue #18).

What a save's plan fixes - each tensor's key, dtype and shape, each chunk's offsets and
sizes, the paths - is formatted once into a ``%`` template (:meth:`PlanText.of`); what each
save's writes decide - every chunk's file, byte offset, byte length, block hashes and
format 2's digest - is filled in by one ``%`` over all of them (:meth:`PlanText.tensors`).
:func:`~shardckpt.format.manifest.manifest_to_json` does both for any manifest; a
coordinator that saves again with the same plan keeps the template
(:class:`~shardckpt.engine.manifest_builder.ManifestBuilder`), so its commit formats only
the second half. Pure, no I/O.

The text is byte for byte what ``json.dumps`` writes for the same records
(``tests/unit/test_format_fast.py`` compares them over random manifests) when every
number is exactly an ``int`` and every string exactly a ``str``: then ``%d`` and
``encode_basestring_ascii`` write what ``json.dumps`` would (a bool is an int to Python,
``true`` to JSON). Any other field makes :meth:`PlanText.of` or :meth:`PlanText.tensors`
give None, and the caller writes the records with ``json.dumps``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice, repeat
from json.encoder import encode_basestring_ascii as _string
from operator import itemgetter
from typing import Any

Dims = tuple[int, ...]


@dataclass(frozen=True)
class ChunkFields:
    """What a save decides of each chunk, one list per field, in the manifest's order (the
    tensors sorted by key, each tensor's chunks in its record's order)."""

    files: Sequence[str]
    byte_offsets: Sequence[int]
    byte_lengths: Sequence[int]
    block_hashes: Sequence[tuple[str, ...]]


@dataclass(frozen=True)
class PlanText:
    """The fixed half: ``entries`` is the text inside ``"tensors": {...}`` with five
    ``%`` fields per chunk (file, byte offset, byte length, block hashes, digest) and every
    other ``%`` doubled; ``paths`` the text inside ``"paths": {...}``."""

    entries: str
    chunks: int
    paths: str

    @classmethod
    def of(
        cls,
        keys: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Dims],
        counts: Sequence[int],
        offsets: Sequence[Dims],
        sizes: Sequence[Dims],
        paths: Iterable[tuple[str, Any]],
        dump: Callable[[Any], str],
    ) -> PlanText | None:
        """The template of tensors ``keys`` (sorted, as the manifest writes them) with
        ``counts[i]`` chunks each, the chunks' ``offsets`` and ``sizes`` in that order;
        ``paths`` sorted. ``dump`` is the manifest's JSON encoder. None when a field is not
        of its declared type."""
        numbers = chain(chain.from_iterable(shapes), chain.from_iterable(offsets), chain.from_iterable(sizes))
        if not set(map(type, numbers)) <= {int} or not set(map(type, dtypes)) <= {str}:
            return None
        texts = iter(_chunk_texts(offsets, sizes))
        lines = []
        for key, dtype, shape, count in zip(keys, dtypes, shapes, counts, strict=True):
            head = f'{dump(key)}: {{"dtype":{_string(dtype)},"shape":[{",".join(map(str, shape))}],"chunks":['
            lines.append(head.replace("%", "%%") + ",".join(islice(texts, count)) + "]}")
        path_text = ",\n".join(f"  {dump(k)}: {dump(v)}" for k, v in paths)
        return cls("  " + ",\n  ".join(lines) if lines else "", len(offsets), path_text)

    def tensors(self, fields: ChunkFields, digests: Sequence[str] | None) -> str | None:
        """The entries with each chunk's ``fields`` filled in (``digests`` None: format 1,
        none written); None when a field is not of its declared type."""
        files, byte_offsets, byte_lengths = fields.files, fields.byte_offsets, fields.byte_lengths
        block_hashes = fields.block_hashes
        if len(files) != self.chunks:
            raise ValueError(f"a template of {self.chunks} chunks was given {len(files)} chunks' fields")
        numbers = chain(byte_offsets, byte_lengths)
        strings = chain(files, chain.from_iterable(block_hashes), digests or ())
        if not set(map(type, numbers)) <= {int} or not set(map(type, strings)) <= {str}:
            return None
        names = {f: _string(f) for f in set(files)}
        tails: Iterable[str] = (
            [""] * len(files) if digests is None else map(',"digest":%s'.__mod__, map(_string, digests))
        )
        every = zip(
            map(names.__getitem__, files), byte_offsets, byte_lengths, _hash_texts(block_hashes), tails, strict=True
        )
        return self.entries % tuple(chain.from_iterable(every))


def _hash_texts(block_hashes: Sequence[tuple[str, ...]]) -> Iterable[str]:
    """Each chunk's block hashes as the text inside its JSON array. Hashes of plain ASCII
    letters and digits (what shardckpt writes), which JSON writes as they are, are joined
    without escaping."""
    plain = "".join(chain.from_iterable(block_hashes))
    # bytes.isalnum: ASCII letters and digits only, and a table lookup per byte (str's is not)
    if all(block_hashes) and plain.isascii() and (plain.encode().isalnum() or not plain):
        return map('"%s"'.__mod__, map('","'.join, block_hashes))
    return (",".join(map(_string, h)) for h in block_hashes)


def _chunk_texts(offsets: Sequence[Dims], sizes: Sequence[Dims]) -> list[str]:
    """Every chunk's template, in order: one ``%`` format per number of dimensions, fed by
    ``zip`` over the columns, so no Python line runs per chunk (a profiled save counts them)."""
    dims = list(zip(map(len, offsets), map(len, sizes), strict=True))
    groups = set(dims)
    if len(groups) == 1:  # chunks of one number of dimensions: the columns as they are
        (d,) = groups
        return list(_formatted(d, offsets, sizes))
    texts: list[str] = [""] * len(dims)
    for d in groups:
        at = [i for i, x in enumerate(dims) if x == d]
        picked = _formatted(d, [offsets[i] for i in at], [sizes[i] for i in at])
        for i, text in zip(at, picked, strict=True):
            texts[i] = text
    return texts


def _formatted(dims: tuple[int, int], offsets: Sequence[Dims], sizes: Sequence[Dims]) -> Iterator[str]:
    """The templates of chunks whose offsets and sizes have ``dims`` entries."""
    columns = [
        *(map(itemgetter(i), offsets) for i in range(dims[0])),
        *(map(itemgetter(i), sizes) for i in range(dims[1])),
    ]
    args = zip(*columns, strict=True) if columns else repeat((), len(offsets))  # scalars: no column
    return map(_chunk_template(*dims).__mod__, args)


def _chunk_template(offsets: int, sizes: int) -> str:
    """A chunk record's JSON in the order json.dumps writes its fields: ``%d`` for its
    offsets and sizes, and after those are filled, ``%s``/``%d`` for the fields a save fills
    (the last ``%s`` is format 2's ``,"digest":...`` or nothing)."""
    return (
        '{"offsets":[' + ",".join(["%d"] * offsets) + '],"sizes":[' + ",".join(["%d"] * sizes) + "],"
        '"file":%%s,"byte_offset":%%d,"byte_length":%%d,"block_hashes":[%%s]%%s}'
    )


def json_encoder() -> Callable[[Any], str]:
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
