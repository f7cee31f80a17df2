"""The fast recovery tier's files: one rank's shard of one step, on a node's ``local_dir``. Pure, no I/O.

Every file of the tier lies in the folder of the durable root it belongs to,
``<local_dir>/root_<tier id>/`` (:func:`root_dir_name`): the tier id binds the local steps to
one durable root, so a job with another root (or the same URL after the root was removed
and made again) never sees, nor deletes, another root's local steps. The tier id is
:func:`tier_id` of the root's canonical location and the random id in the root's
``.shardckpt-local-root.json`` (:data:`ROOT_RECORD_NAME`), which the coordinator creates
once, exclusively, the first time a writing manager with a ``local_dir`` opens the root.

A local step is a folder ``root_<tier id>/step_<N>/`` (:func:`shardckpt.format.layout.step_dir_name`)
holding, for each shard the node keeps (its ranks' own, and replicas of other nodes' ranks)::

    shard_r<rank:05d>_h<holder:05d>.safetensors   the shard image: a safetensors data file
    shard_r<rank:05d>_h<holder:05d>.json          its index, written last: it commits the shard
    .shard_r..._h....{safetensors,json}.tmp-<hex> either one while being written

``rank`` is whose shard it is, ``holder`` the rank that wrote it (the rank itself, or the
partner keeping a replica). A shard exists if and only if its index parses and names the
data file's exact size; its checksum (:func:`image_digest`, xxh3-64 over 8 MiB blocks) is
checked while it is copied, and a copy that fails it is never used. Its index also
names the tier id and the save id, one per local save and the same on every rank (a
hash of a nonce the coordinator drew when the tier opened and of the count of its saves):
a step is restored only from shards of one save of one root.

The image is plain safetensors: tensors sorted by item size (largest first, so every
tensor starts aligned for its dtype with no padding between them) and the rank's JSON
values, step, rank, world size, tier id and save id in the header's ``__metadata__`` under
:data:`META_KEY`, so the data file alone says what it holds and a replica is a byte copy.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from shardckpt.errors import ManifestError
from shardckpt.format import datafile, integrity

FORMAT = "shardckpt-local-shard"
VERSION = 2  # 2: bound to a durable root and a save (tier_id, save_id); version 1 indices are ignored
META_KEY = "shardckpt.local"
MAX_INDEX_BYTES = 4096  # an index is ~200 bytes; anything larger is not ours

_SHARD = re.compile(r"^shard_r([0-9]{5,})_h([0-9]{5,})\.(safetensors|json)$")
_TEMP = re.compile(r"^\.shard_r([0-9]{5,})_h([0-9]{5,})\.(safetensors|json)\.tmp-[0-9a-f]{12}$")
BLOCK_BYTES = 8 * 1024 * 1024  # the image's checksum is over blocks of this size, hashed apart

_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_ROOT_DIR = re.compile(r"^root_([0-9a-f]{16})$")

ROOT_RECORD_NAME = ".shardckpt-local-root.json"  # in the durable root: its id for the fast tier
ROOT_RECORD_FORMAT = "shardckpt-local-root"


def root_record(record_id: str) -> bytes:
    """The bytes of the durable root's record; ``record_id``: 32 lowercase hex digits, random."""
    return json.dumps({"format": ROOT_RECORD_FORMAT, "version": 1, "id": record_id}, sort_keys=True).encode()


def parse_root_record(raw: bytes, *, where: str) -> str:
    """The id in an untrusted root record; ManifestError saying what is wrong."""
    if len(raw) > MAX_INDEX_BYTES:
        raise ManifestError(f"{where}: {len(raw)} bytes, more than a root record can be ({MAX_INDEX_BYTES})")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"{where}: not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != ROOT_RECORD_FORMAT or doc.get("version") != 1:
        raise ManifestError(f"{where}: not a {ROOT_RECORD_FORMAT} record of version 1")
    if not isinstance(doc.get("id"), str) or not _HEX32.match(doc["id"]):
        raise ManifestError(f"{where}: 'id' must be 32 lowercase hex digits")
    return str(doc["id"])


def tier_id(root_location: str, record_id: str) -> str:
    """The id that binds local steps to one durable root: its canonical location (a copy of
    the root elsewhere is another root) and its record's random id (a root removed and made
    again at the same place is another root)."""
    return hashlib.sha256(f"{root_location}\0{record_id}".encode()).hexdigest()[:16]


def root_dir_name(tier: str) -> str:
    """The folder of ``local_dir`` holding the local steps of the root with tier id ``tier``."""
    if not _HEX16.match(tier):
        raise ValueError(f"a tier id is 16 lowercase hex digits, got {tier!r}")
    return f"root_{tier}"


def parse_root_dir_name(name: str) -> str | None:
    """The tier id of a :func:`root_dir_name`, None for any other name."""
    m = _ROOT_DIR.match(name)
    return None if m is None else m.group(1)


def is_tier_id(value: str) -> bool:
    """Whether ``value`` is a tier id or a save id (16 lowercase hex digits)."""
    return bool(_HEX16.match(value))


def shard_stem(rank: int, holder: int) -> str:
    return f"shard_r{rank:05d}_h{holder:05d}"


def data_name(rank: int, holder: int) -> str:
    return shard_stem(rank, holder) + ".safetensors"


def index_name(rank: int, holder: int) -> str:
    return shard_stem(rank, holder) + ".json"


def temp_name(final: str, token: str) -> str:
    """Where ``final`` is written before its rename; ``token``: 12 lowercase hex digits."""
    return f".{final}.tmp-{token}"


def parse_index_name(name: str) -> tuple[int, int] | None:
    """(rank, holder) of an index file name, None for any other name."""
    m = _SHARD.match(name)
    if m is None or m.group(3) != "json":
        return None
    return int(m.group(1)), int(m.group(2))


def holder_of(name: str) -> int | None:
    """The holder rank of any name the tier writes (data, index or temp), else None."""
    m = _SHARD.match(name) or _TEMP.match(name)
    return None if m is None else int(m.group(2))


def image_digest(block_digests: list[str]) -> str:
    """An image's checksum (the index's ``xxh3``): xxh3-64 of the concatenated xxh3-64 hex
    digests of its :data:`BLOCK_BYTES` blocks (the last may be shorter), so that several
    threads can verify the blocks they copy, each on its own."""
    return integrity.hash_hex("".join(block_digests).encode())


def digest_of(image: memoryview) -> str:
    """:func:`image_digest` of a whole image in memory."""
    return image_digest(integrity.block_hashes(image, BLOCK_BYTES))


@dataclass(frozen=True)
class ShardIndex:
    """What the index of a committed shard says."""

    step: int
    rank: int
    world_size: int
    holder: int
    data_bytes: int
    xxh3: str
    tier_id: str  # the durable root's (:func:`tier_id`)
    save_id: str  # the local save's, the same on every rank of that save

    def to_json(self) -> bytes:
        doc = {"format": FORMAT, "version": VERSION, **self.__dict__}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def parse_index(raw: bytes, *, where: str) -> ShardIndex:
    """Parse an untrusted index; ManifestError saying what is wrong."""
    if len(raw) > MAX_INDEX_BYTES:
        raise ManifestError(f"{where}: {len(raw)} bytes, more than an index can be ({MAX_INDEX_BYTES})")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"{where}: not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ManifestError(f"{where}: not a {FORMAT} index of version {VERSION}")
    ints = ("step", "rank", "world_size", "holder", "data_bytes")
    if not all(type(doc.get(k)) is int and doc[k] >= 0 for k in ints) or doc["world_size"] < 1:
        raise ManifestError(f"{where}: {', '.join(ints)} must be non-negative integers (world_size >= 1)")
    if doc["rank"] >= doc["world_size"] or doc["holder"] >= doc["world_size"]:
        raise ManifestError(f"{where}: rank {doc['rank']} or holder {doc['holder']} outside world {doc['world_size']}")
    for key in ("xxh3", "tier_id", "save_id"):
        if not isinstance(doc.get(key), str) or not _HEX16.match(doc[key]):
            raise ManifestError(f"{where}: {key} must be 16 lowercase hex digits")
    return ShardIndex(
        doc["step"],
        doc["rank"],
        doc["world_size"],
        doc["holder"],
        doc["data_bytes"],
        doc["xxh3"],
        doc["tier_id"],
        doc["save_id"],
    )


@dataclass(frozen=True)
class ImageLayout:
    """Where each tensor of a shard image lies: ``header`` (length prefix included) and,
    per key, its entry (offsets relative to the end of the header)."""

    header: bytes
    entries: dict[str, datafile.HeaderEntry]

    @property
    def total_bytes(self) -> int:
        return len(self.header) + max((e.end for e in self.entries.values()), default=0)


def plan_image(
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    values: dict[str, Any],
    *,
    step: int,
    rank: int,
    world_size: int,
    tier: str,
    save_id: str,
) -> ImageLayout:
    """The layout of one rank's image: ``tensors`` (key -> dtype, shape), ``values``
    (key -> the value's JSON form, :func:`shardckpt.format.values.encode_value`)."""
    order = sorted(tensors, key=lambda k: (-tensors[k][0].itemsize, k))
    entries: dict[str, datafile.HeaderEntry] = {}
    offset = 0
    for key in order:
        dtype, shape = tensors[key]
        n = dtype.itemsize
        for d in shape:
            n *= d
        entries[key] = datafile.HeaderEntry(key, datafile.dtype_name(dtype, key=key), shape, offset, offset + n)
        offset += n
    meta = {"step": step, "rank": rank, "world_size": world_size, "tier_id": tier, "save_id": save_id, "values": values}
    header = datafile.build_header(list(entries.values()), {META_KEY: json.dumps(meta, allow_nan=False)})
    return ImageLayout(header, entries)


@dataclass(frozen=True)
class ImageContents:
    """What a verified image holds: tensor entries by key, JSON values by key, and the
    byte offset of the data section."""

    entries: dict[str, datafile.HeaderEntry]
    values: dict[str, Any]
    data_offset: int
    step: int
    rank: int
    world_size: int
    tier_id: str
    save_id: str


def read_image(image: bytes | memoryview, *, where: str, size: int | None = None) -> ImageContents:
    """Parse the header of an image; ManifestError if it is not ours. ``image``: the whole
    image, or its start (header included) with the whole ``size``."""
    size = len(image) if size is None else size
    n = datafile.header_length(bytes(image[: datafile.HEADER_LEN_BYTES]), file=where, file_size=size)
    raw = bytes(image[datafile.HEADER_LEN_BYTES : datafile.HEADER_LEN_BYTES + n])
    entries, meta = datafile.parse_header(raw, file=where, file_size=size)
    try:
        doc = json.loads(meta[META_KEY])
    except (KeyError, ValueError, RecursionError) as e:
        raise ManifestError(f"{where}: no valid {META_KEY!r} metadata: not a local-tier shard image") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("values"), dict):
        raise ManifestError(f"{where}: {META_KEY!r} metadata must be an object with 'values'")
    if not all(type(doc.get(k)) is int for k in ("step", "rank", "world_size")):
        raise ManifestError(f"{where}: {META_KEY!r} metadata must give integer step, rank and world_size")
    if not all(isinstance(doc.get(k), str) for k in ("tier_id", "save_id")):
        raise ManifestError(f"{where}: {META_KEY!r} metadata must give tier_id and save_id (a shard of version 1?)")
    return ImageContents(
        {e.name: e for e in entries},
        doc["values"],
        datafile.HEADER_LEN_BYTES + n,
        doc["step"],
        doc["rank"],
        doc["world_size"],
        doc["tier_id"],
        doc["save_id"],
    )
