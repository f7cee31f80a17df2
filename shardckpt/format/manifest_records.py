"""A manifest's records: ``Manifest``, its tensors, chunks and files, and the format's identity.

Pure data, no parsing: :mod:`~shardckpt.format.manifest_parser` builds these from untrusted
bytes, :func:`~shardckpt.format.manifest.manifest_to_json` writes them. ``docs/format.md``
specifies every field.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import Any, TypeVar

from shardckpt.format.units import human_bytes

FORMAT_NAME = "shardckpt"
FORMAT_VERSION = 2  # the newest version this shardckpt reads and writes
SUPPORTED_VERSIONS = (1, 2)
HASH_ALGORITHM = "xxh3_64"
MAX_BASES = 4096
_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """One saved chunk of a tensor: a box of the global tensor, stored contiguously.
    Slotted: a manifest of small tensors holds tens of thousands (88 bytes each, against
    272 for a dataclass's attribute dict alone)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    byte_offset: int  # absolute offset inside ``file``
    byte_length: int
    block_hashes: tuple[str, ...]  # xxh3-64 of each hash_block_bytes piece of the chunk
    digest: str | None = None  # v2: xxh3-128 of the chunk's bytes (what incremental saves compare)


@dataclass(frozen=True, slots=True)
class TensorRecord:
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]
    chunks: tuple[ChunkRecord, ...]


def chunk_records(
    offsets: list[tuple[int, ...]],
    sizes: list[tuple[int, ...]],
    files: list[str],
    byte_offsets: list[int],
    byte_lengths: list[int],
    block_hashes: list[tuple[str, ...]],
    digests: list[str | None],
) -> list[ChunkRecord]:
    """``ChunkRecord``s of the columns (one list per field, in the order of the fields): what
    ``map(ChunkRecord, ...)`` gives, at a fraction of the cost for the tens of thousands of
    records of a small-tensor manifest (issue #18): :func:`slotted_records`. The caller has
    checked the values (the records are immutable from here on)."""
    columns = (offsets, sizes, files, byte_offsets, byte_lengths, block_hashes, digests)
    return slotted_records(ChunkRecord, dict(zip(ChunkRecord.__slots__, columns, strict=True)))


def tensor_records(
    dtypes: list[str], shapes: list[tuple[int, ...]], chunks: list[tuple[ChunkRecord, ...]]
) -> list[TensorRecord]:
    """``TensorRecord``s of the columns, built as :func:`chunk_records` builds chunks."""
    return slotted_records(TensorRecord, {"dtype": dtypes, "shape": shapes, "chunks": chunks})


def slotted_records(cls: type[_R], columns: dict[str, list[Any]]) -> list[_R]:
    """Instances of the frozen slotted dataclass ``cls``, each field set from its column
    (all of the same length, one per field, ``init=False`` ones too) by the slot's own
    descriptor: one C loop a field, where the constructor makes a call per field of every
    record. The caller has checked the values."""
    names: tuple[str, ...] = cls.__slots__  # type: ignore[attr-defined]
    if set(columns) != set(names):
        raise ValueError(f"{cls.__name__} has the fields {sorted(names)}, given {sorted(columns)}")
    count = len(next(iter(columns.values()), ()))
    if any(len(c) != count for c in columns.values()):
        raise ValueError(f"the columns of {cls.__name__}s differ in length")
    records = list(map(object.__new__, repeat(cls, count)))
    for name, values in columns.items():
        deque(map(getattr(cls, name).__set__, records, values), maxlen=0)
    return records


def frozen_records(cls: type[_R], attrs: list[dict[str, Any]]) -> list[_R]:
    """Instances of the frozen dataclass ``cls``, each from its attribute dict: what its
    constructor would set, without a call per field. Not slotted: each is given its dict
    whole; slotted: :func:`slotted_records` of the dicts' columns. The caller has checked
    the values and includes every field (``init=False`` ones too)."""
    if "__slots__" in cls.__dict__:
        return slotted_records(cls, {n: list(map(itemgetter(n), attrs)) for n in cls.__slots__})  # type: ignore[attr-defined]
    records = list(map(object.__new__, repeat(cls, len(attrs))))
    deque(map(object.__setattr__, records, repeat("__dict__"), attrs), maxlen=0)  # a C loop
    return records


@dataclass(frozen=True)
class FileRecord:
    size: int
    hash: str  # xxh3-64 of the whole file, header included
    rank: int
    checkpoint: str | None = None  # v2: the sibling checkpoint folder holding the file; None: this one


@dataclass(frozen=True, repr=False)
class Manifest:
    """A checkpoint's manifest, parsed. Its repr is one short line (counts and sizes, not
    the records: a large model's manifest holds megabytes of them); the fields hold all."""

    world_size: int
    process_layout: tuple[dict[str, Any], ...]
    tensors: dict[str, TensorRecord]
    values: dict[str, Any]  # encoded with encode_value; decode_value gives the Python value
    files: dict[str, FileRecord]
    hash_block_bytes: int
    created_at: str
    shardckpt_version: str
    torch_version: str
    paths: dict[str, list[str | int]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)  # the caller's JSON (e.g. the manager's step, metrics)
    format_version: int = 1  # 2 when it has digests or bases (manifest_to_json decides)
    bases: tuple[str, ...] = ()  # v2: sibling checkpoint folders whose data files this one reads

    @property
    def is_v2(self) -> bool:
        """Whether it uses a format-2 feature (chunk digests, files in base checkpoints)."""
        return bool(self.bases) or any(c.digest is not None for t in self.tensors.values() for c in t.chunks)

    @property
    def total_tensor_bytes(self) -> int:
        return sum(c.byte_length for t in self.tensors.values() for c in t.chunks)

    def __repr__(self) -> str:
        data_bytes = sum(f.size for f in self.files.values())
        return (
            f"Manifest(format_version={self.format_version}, world_size={self.world_size}, "
            f"tensors={len(self.tensors)}, values={len(self.values)}, files={len(self.files)}, "
            f"bytes={human_bytes(data_bytes)}, created_at={self.created_at!r})"
        )

    def provenance(self) -> dict[str, Any]:
        """Which format, software and processes wrote the checkpoint, and when, in the
        order the manifest's JSON gives them (``inspect --json`` shows the same fields)."""
        return {
            "format_version": self.format_version,
            "shardckpt_version": self.shardckpt_version,
            "torch_version": self.torch_version,
            "created_at": self.created_at,
            "world_size": self.world_size,
            "process_layout": list(self.process_layout),
        }
