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

import msgspec

from shardckpt.format.units import human_bytes

FORMAT_NAME = "shardckpt"
FORMAT_VERSION = 2  # the newest version this shardckpt reads and writes
SUPPORTED_VERSIONS = (1, 2)
HASH_ALGORITHM = "xxh3_64"
MAX_BASES = 4096
_R = TypeVar("_R")


class ChunkRecord(msgspec.Struct, frozen=True, gc=False):
    """One saved chunk of a tensor: a box of the global tensor, stored contiguously.

    A msgspec ``Struct`` (immutable, slotted, hashable, compared by value like the frozen
    dataclasses around it): a manifest of small tensors holds tens of thousands of these,
    and msgspec decodes the manifest's JSON straight into them (17 ms for 12,232 against
    36-43 into slotted dataclasses), builds them from columns 5x faster, and keeps them
    out of the cyclic garbage collector (``gc=False``: a record refers only to numbers,
    strings and tuples of them, so it can never be part of a cycle). Issue #18's
    small-tensor load. :meth:`replace` is ``dataclasses.replace`` for it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    byte_offset: int  # absolute offset inside ``file``
    byte_length: int
    block_hashes: tuple[str, ...]  # xxh3-64 of each hash_block_bytes piece of the chunk
    digest: str | None = None  # v2: xxh3-128 of the chunk's bytes (what incremental saves compare)

    def replace(self, **changes: Any) -> ChunkRecord:
        """A copy with ``changes`` (field name -> value)."""
        return msgspec.structs.replace(self, **changes)


class TensorRecord(msgspec.Struct, frozen=True, gc=False):
    """One saved tensor: its dtype, global shape and chunks (a ``Struct`` as :class:`ChunkRecord`)."""

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
    """``ChunkRecord``s of the columns (one list per field, in the order of the fields).
    The caller has checked the values (the records are immutable from here on)."""
    return list(map(ChunkRecord, offsets, sizes, files, byte_offsets, byte_lengths, block_hashes, digests))


def tensor_records(
    dtypes: list[str], shapes: list[tuple[int, ...]], chunks: list[tuple[ChunkRecord, ...]]
) -> list[TensorRecord]:
    """``TensorRecord``s of the columns, as :func:`chunk_records` builds chunks."""
    return list(map(TensorRecord, dtypes, shapes, chunks))


def frozen_records(cls: type[_R], attrs: list[dict[str, Any]]) -> list[_R]:
    """Instances of ``cls``, each from its attribute dict, which holds every field (the
    caller has checked the values). A frozen dataclass (not slotted) is given each dict
    whole, without a call per field; a ``Struct`` (:class:`ChunkRecord`) is built from the
    dicts' columns by one ``map`` of its constructor."""
    if issubclass(cls, msgspec.Struct):
        columns = (list(map(itemgetter(n), attrs)) for n in cls.__struct_fields__)
        return list(map(cls, *columns))
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
