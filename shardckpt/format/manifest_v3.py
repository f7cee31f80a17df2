"""Format 3: a whole ``manifest.json`` of version 3, JSON text <-> validated records.

Pure, no I/O; ``docs/format.md`` section 12 specifies it, ``manifest_v3.schema.json`` is
its JSON Schema, ``tests/unit/golden/manifest_v3_draft.json`` an example. Saves write it
with ``format_version=3`` (:func:`manifest_v3_to_json` is what ``engine/write_v3.py``
commits); the loader reads it through
:func:`~shardckpt.format.manifest_v3_parser.parse_any_manifest` (section 12.7).

A version-3 manifest has sharding rules (:mod:`~shardckpt.format.rules`) and explicit
chunks only for irregular tensors, no checksums but its own seal, and the compact file table
of :mod:`~shardckpt.format.file_table` instead of one record per data file and per rank. So
it holds O(tensors + runs + groups + pages) records, and
:func:`~shardckpt.format.manifest_v3_parser.parse_manifest_v3` takes time linear in its
bytes (every check of section 12.5; the overlap check of listed chunks is
:func:`~shardckpt.format.overlap.first_overlap`, O(n log n) and bounded).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from json.encoder import encode_basestring_ascii as _string
from operator import attrgetter
from typing import Any

from shardckpt.format import datafile, rules
from shardckpt.format.file_table import FileTable, file_table_to_json
from shardckpt.format.manifest import (
    FORMAT_NAME,
    HASH_ALGORITHM,
    check_manifest_limits,
    seal,
)
from shardckpt.format.manifest_text import json_encoder
from shardckpt.format.rank_index import FileIndex, file_index_to_json

VERSION = 3
JSON_BYTES_PER_CONTAINER = 8
"""Format 3's container limit (format.md 12.5 item 1): one JSON array or object per 8 bytes
(versions 1 and 2: 16). A rule record is 8 containers in ~100 bytes plus its key and its
path's line, so thousands of tensors with short keys ("t0".."t9999") stay under it, while
json.loads of the densest document it admits ('{"a":0}' repeated) peaks at ~24x its bytes
(the 16-byte limit: ~20x; the whole parse ~25x); tests/unit/test_v3_json_limits.py
checks both."""


@dataclass(frozen=True)
class Chunk:
    """A listed box (irregular tensors, and empty boxes beside a rule): ``file`` is a
    position in the file table."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: int
    byte_offset: int
    byte_length: int


_NEW, _SET = object.__new__, object.__setattr__


def new_chunk(offsets: tuple[int, ...], sizes: tuple[int, ...], file: int, byte_offset: int, byte_length: int) -> Chunk:
    """``Chunk(offsets, sizes, file, byte_offset, byte_length)`` of checked values, given its
    attribute dict whole (as ``manifest_records.frozen_records`` builds records): a load
    makes one per small tensor (#18)."""
    chunk = _NEW(Chunk)
    _SET(
        chunk,
        "__dict__",
        {"offsets": offsets, "sizes": sizes, "file": file, "byte_offset": byte_offset, "byte_length": byte_length},
    )
    return chunk


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    rule: rules.Rule | None
    chunks: tuple[Chunk, ...]

    def chunks_for_box(self, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> list[Chunk]:
        """The stored boxes that hold part of ``offsets``/``sizes``: from the rule in
        O(d * (answer + log runs)), plus the listed ones that overlap (irregular tensors)."""
        if self.rule is not None:
            # A box that is exactly one cell (a load in the layout of the save): O(d + log
            # runs), no ranges. Chunks listed beside a rule are empty: none overlaps a box.
            cell = self.rule.cell_of_box(offsets, sizes)
            if cell is not None:
                file, byte_offset = self.rule.place(cell)
                length = math.prod(sizes) * datafile.itemsize(self.dtype)
                return [Chunk(tuple(offsets), tuple(sizes), file, byte_offset, length)]
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


def manifest_v3_to_json(
    m: ManifestV3, *, lines: Sequence[str] | None = None, paths: Sequence[str] | None = None
) -> bytes:
    """The sealed bytes, laid out like versions 1 and 2 (one line per tensor, value, path).
    ``lines`` and ``paths``: :func:`tensor_lines` of ``m.tensors`` and :func:`path_lines`
    of ``m.paths`` when the caller kept them (the coordinator's repeated save of one plan,
    ``engine/plan_records.py``)."""
    dump = json_encoder()
    doc: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": VERSION,
        "shardckpt_version": m.shardckpt_version,
        "torch_version": m.torch_version,
        "created_at": m.created_at,
        "world_size": m.world_size,
        "hash_algorithm": HASH_ALGORITHM,
        "hash_block_bytes": m.hash_block_bytes,
        "bases": sorted(m.bases),
        "tensors": tensor_lines(m.tensors) if lines is None else lines,
        "values": dict(sorted(m.values.items())),
        "file_table": file_table_to_json(m.file_table),
        **({} if m.inline_index is None else {"inline_index": _inline_doc(m.inline_index)}),
        "paths": path_lines(m.paths) if paths is None else paths,
        "metadata": m.metadata,
    }
    text: list[str] = []
    for k, v in doc.items():
        if k in ("tensors", "paths"):  # their lines, formatted
            text.append(f" {dump(k)}: {{\n" + ",\n".join(v) + "\n }" if v else f" {dump(k)}: {{}}")
        elif k in ("values", "metadata") and isinstance(v, dict) and v:
            inner = ",\n".join(f"  {dump(ik)}: {dump(iv)}" for ik, iv in v.items())
            text.append(f" {dump(k)}: {{\n{inner}\n }}")
        else:
            text.append(f" {dump(k)}: {dump(v)}")
    raw = seal(("{\n" + ",\n".join(text) + "\n}\n").encode())
    check_manifest_limits(
        raw, source="the format-3 manifest being written", writing=True, bytes_per_container=JSON_BYTES_PER_CONTAINER
    )
    return raw


def tensor_lines(tensors: dict[str, Tensor]) -> list[str]:
    """The manifest's line of each tensor (``  "key": {...}``), sorted by key."""
    dump = json_encoder()
    keys, records = zip(*sorted(tensors.items()), strict=True) if tensors else ((), ())
    texts = _tensor_texts(records)
    if texts is None:  # a field not exactly of its type: json.dumps writes what it is
        texts = list(map(dump, map(_tensor_doc, records)))
    return [f"  {dump(k)}: {text}" for k, text in zip(keys, texts, strict=True)]


def path_lines(paths: dict[str, list[str | int]]) -> list[str]:
    """The manifest's line of each path (``  "key": [...]``), sorted by key."""
    dump = json_encoder()
    return [f"  {dump(k)}: {dump(v)}" for k, v in sorted(paths.items())]


def _inline_doc(inline: InlineIndex) -> dict[str, Any]:
    return {"file": inline.file, **file_index_to_json(inline.index)}


_CHUNK = '{"offsets":[%s],"sizes":[%s],"file":%d,"byte_offset":%d,"byte_length":%d}'
_RUN = "[%d,%d,%d,%d,%d]"
_HEAD = '{"dtype":%s,"shape":[%s],"chunks":[%s]'
_RULE = '%s,"rule":{"grid":[%s],"block":[%s],"runs":[%s]}}'


def _tensor_texts(records: Sequence[Tensor]) -> list[str] | None:
    """Each record's JSON as ``json.dumps(_tensor_doc(t))`` with the manifest's separators
    writes it, by ``%`` templates (a third of the encoder's time for thousands of small
    tensors, #18): the same bytes when every number is exactly an ``int`` and the dtype
    exactly a ``str`` (``%d`` of a bool or a float is not its JSON), else None.
    ``tests/unit/test_format_v3.py`` compares the two over random manifests."""
    ruled = [t.rule for t in records if t.rule is not None]
    runs = [run for rule in ruled for run in rule.runs]
    chunks = [c for t in records if t.chunks for c in t.chunks]
    numbers = chain(
        chain.from_iterable(t.shape for t in records),
        chain.from_iterable(rule.block for rule in ruled),
        chain.from_iterable(rule.grid for rule in ruled),
        chain.from_iterable(map(attrgetter("count", "file", "file_step", "byte_offset", "byte_step"), runs)),
        chain.from_iterable(c.offsets for c in chunks),
        chain.from_iterable(c.sizes for c in chunks),
        chain.from_iterable(map(attrgetter("file", "byte_offset", "byte_length"), chunks)),
    )
    if not set(map(type, numbers)) <= {int} or not {type(t.dtype) for t in records} <= {str}:
        return None
    texts = []
    for t in records:
        listed = ",".join(
            [_CHUNK % (_ints(c.offsets), _ints(c.sizes), c.file, c.byte_offset, c.byte_length) for c in t.chunks]
        )
        head = _HEAD % (_string(t.dtype), _ints(t.shape), listed)
        rule = t.rule
        if rule is None:
            texts.append(head + "}")
            continue
        steps = ",".join([_RUN % (r.count, r.file, r.file_step, r.byte_offset, r.byte_step) for r in rule.runs])
        texts.append(_RULE % (head, _ints(rule.grid), _ints(rule.block), steps))
    return texts


def _ints(values: Iterable[int]) -> str:
    return ",".join(map(str, values))


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
