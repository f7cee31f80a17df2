"""The on-disk format: ``manifest.json`` as dataclasses <-> JSON. Pure, no I/O.

The manifest is the whole truth about a checkpoint: which keys exist, their global
shapes and dtypes, where every chunk's bytes live and their checksums, the
non-tensor values inline, and every data file's size and checksum. Its presence
commits a checkpoint. ``docs/format.md`` specifies it; ``manifest.schema.json``
is its JSON Schema; ``tests/unit/test_format.py`` pins it.

:func:`parse_manifest` treats its input as hostile: every name, size and range is
checked before anything is allocated or opened.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardckpt.errors import ManifestError, UnsupportedFormatVersionError
from shardckpt.format import datafile, integrity
from shardckpt.format.layout import check_relative_name, is_data_file_name
from shardckpt.format.units import human_bytes
from shardckpt.format.values import decode_value

FORMAT_NAME = "shardckpt"
FORMAT_VERSION = 1
HASH_ALGORITHM = "xxh3_64"
MAX_MANIFEST_BYTES = 2 * 1024**3
_HASH = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class ChunkRecord:
    """One saved chunk of a tensor: a box of the global tensor, stored contiguously."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    byte_offset: int  # absolute offset inside ``file``
    byte_length: int
    block_hashes: tuple[str, ...]  # xxh3-64 of each hash_block_bytes piece of the chunk


@dataclass(frozen=True)
class TensorRecord:
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]
    chunks: tuple[ChunkRecord, ...]


@dataclass(frozen=True)
class FileRecord:
    size: int
    hash: str  # xxh3-64 of the whole file, header included
    rank: int


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
    format_version: int = FORMAT_VERSION

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


# ---------------------------------------------------------------- JSON out


def manifest_to_json(m: Manifest) -> bytes:
    doc = {
        "format": FORMAT_NAME,
        **m.provenance(),
        "hash_algorithm": HASH_ALGORITHM,
        "hash_block_bytes": m.hash_block_bytes,
        "tensors": {
            k: {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "chunks": [
                    {
                        "offsets": list(c.offsets),
                        "sizes": list(c.sizes),
                        "file": c.file,
                        "byte_offset": c.byte_offset,
                        "byte_length": c.byte_length,
                        "block_hashes": list(c.block_hashes),
                    }
                    for c in t.chunks
                ],
            }
            for k, t in sorted(m.tensors.items())
        },
        "values": dict(sorted(m.values.items())),
        "files": {n: {"size": f.size, "hash": f.hash, "rank": f.rank} for n, f in sorted(m.files.items())},
        "paths": dict(sorted(m.paths.items())),
        "metadata": m.metadata,
    }
    raw = seal(_dumps_two_levels(doc).encode())
    check_manifest_limits(raw, source="the manifest being written", writing=True)
    return raw


def check_manifest_limits(raw: bytes, *, source: str, writing: bool = False) -> None:
    """Raise ManifestError if ``raw`` exceeds a limit that :func:`parse_manifest` enforces.

    The limits (datafile.json_limits_problem): at most MAX_MANIFEST_BYTES bytes, JSON
    nesting at most datafile.MAX_JSON_DEPTH deep, at most datafile.max_json_containers(
    len(raw)) arrays and objects. Checked on the bytes in linear time and constant memory,
    before anything is parsed. :func:`manifest_to_json` calls it with ``writing=True``, so
    a save never commits a manifest that readers would refuse; the hint then says what to
    shrink instead of calling the file hostile.
    """
    problem = datafile.json_limits_problem(raw, max_bytes=MAX_MANIFEST_BYTES)
    if problem is None:
        return
    if writing:
        hint = (
            "Readers refuse such manifests, so the save stops before committing it: make the "
            "non-tensor values or the metadata smaller or flatter (store big lists as tensors), "
            "or write fewer chunk records and block hashes (fewer shards, a larger hash_block_bytes)."
        )
    else:
        hint = (
            "shardckpt refuses to write such manifests, so this file is corrupt or hostile; load an earlier checkpoint."
        )
    raise ManifestError(f"{source}: manifest {problem}. {hint}")


_SEAL_MARKER = b',\n "manifest_hash": "'
_SEAL_END = b'"\n}\n'


def seal(document: bytes) -> bytes:
    """Append the manifest's own checksum as its last field, ``"manifest_hash"``.

    The hash is xxh3-64 over every byte of the file before ``,\n "manifest_hash"``, so a
    flipped bit anywhere in the manifest - an inline value, a data-file hash - is caught
    before the JSON is trusted. ``document`` is the JSON text without the field.
    """
    head = document.rstrip()
    if head.endswith(b"}"):
        head = head[:-1].rstrip()
    return head + _SEAL_MARKER + integrity.hash_hex(head).encode() + _SEAL_END


def unseal(raw: bytes, *, source: str) -> bytes:
    """Check the ``manifest_hash`` written by :func:`seal`; return the bytes it covers.

    Raises ManifestError naming ``source`` when the field is missing or does not match.
    """
    at = raw.rfind(_SEAL_MARKER)
    digest = raw[at + len(_SEAL_MARKER) : at + len(_SEAL_MARKER) + 16] if at >= 0 else b""
    if at < 0 or raw[at + len(_SEAL_MARKER) + 16 :] != _SEAL_END:
        raise ManifestError(
            f'{source}: the manifest does not end with its checksum field "manifest_hash"; it is '
            "truncated, corrupted, or was not written by shardckpt. Load an earlier checkpoint."
        )
    computed = integrity.hash_hex(raw[:at])
    if computed.encode() != digest:
        raise ManifestError(
            f"{source}: manifest checksum mismatch (manifest_hash {digest.decode(errors='replace')!r}, "
            f"computed {computed!r}): the manifest was corrupted or edited after the save. Load an "
            "earlier checkpoint, or restore manifest.json from a good copy."
        )
    return raw[:at]


def _dumps_two_levels(doc: dict[str, Any]) -> str:
    """JSON with one line per top-level field and per key of the big maps: diffable, compact."""

    def dump(v: Any) -> str:
        return json.dumps(v, allow_nan=False, separators=(",", ":"))

    lines = []
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            inner = ",\n".join(f"  {dump(ik)}: {dump(iv)}" for ik, iv in v.items())
            lines.append(f" {dump(k)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {dump(k)}: {dump(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


# ---------------------------------------------------------------- JSON in


def parse_manifest(raw: bytes, *, source: str) -> Manifest:
    """Parse and fully validate untrusted manifest bytes read from ``source``.

    Bounded: :func:`check_manifest_limits` refuses oversized, too deep or container-dense
    JSON before it is parsed, and every later check is O(n log n) in the number of chunks.
    """
    check_manifest_limits(raw, source=source)
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"{source}: manifest is not valid JSON ({e}); the checkpoint is corrupt") from e
    try:
        return _parse_document(doc, source)
    except RecursionError as e:
        raise ManifestError(f"{source}: manifest nests too deeply; the checkpoint is corrupt or hostile") from e


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows a float")
    return value


def _parse_document(doc: Any, source: str) -> Manifest:
    r = _Reader(doc, source)
    if r.get(doc, "format", str, "") != FORMAT_NAME:
        raise ManifestError(f"{source}: not a shardckpt manifest (field 'format' is not {FORMAT_NAME!r})")
    version = r.get(doc, "format_version", int, "")
    if version != FORMAT_VERSION:
        raise UnsupportedFormatVersionError(
            f"{source}: format version {version}, but this shardckpt reads version {FORMAT_VERSION}; "
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
        )
        if files[name].rank >= world_size:
            raise ManifestError(f"{source}: files[{name!r}].rank {files[name].rank} >= world_size {world_size}")
    tensors = {k: _parse_tensor(r, k, t, files, block) for k, t in r.get(doc, "tensors", dict, "").items()}
    values = r.get(doc, "values", dict, "")
    for k, v in values.items():
        decode_value(v, where=f"{source}, values[{k!r}]")  # RecursionError -> ManifestError above
    overlap = set(values) & set(tensors)
    if overlap:
        raise ManifestError(f"{source}: keys {sorted(overlap)} are both tensors and values")
    layout = r.get(doc, "process_layout", list, "")
    if not all(isinstance(p, dict) for p in layout):
        raise ManifestError(f"{source}: process_layout must be a list of objects")
    paths = r.get(doc, "paths", dict, "")
    for k, p in paths.items():
        if (
            not isinstance(p, list)
            or not p
            or not all(isinstance(e, (str, int)) and not isinstance(e, bool) for e in p)
        ):
            raise ManifestError(f"{source}: paths[{k!r}] must be a non-empty list of str/int, found {p!r}")
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
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def num_blocks(byte_length: int, block_bytes: int) -> int:
    return -(-byte_length // block_bytes)


def _parse_tensor(r: _Reader, key: str, t: Any, files: dict[str, FileRecord], block: int) -> TensorRecord:
    where = f"tensors[{key!r}]"
    dtype = r.get(t, "dtype", str, where)
    datafile.torch_dtype(dtype, where=f"{r.source}, {where}")
    shape = datafile.check_shape(r.get(t, "shape", list, where), where=f"{r.source}, {where}")
    chunks = []
    covered = 0
    for i, c in enumerate(r.get(t, "chunks", list, where)):
        cw = f"{where}.chunks[{i}]"
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
        if len(hashes) != num_blocks(length, block) or not all(isinstance(h, str) and _HASH.match(h) for h in hashes):
            raise ManifestError(f"{r.source}, {cw}: expected {num_blocks(length, block)} block hashes of 16 hex digits")
        covered += math.prod(sizes)
        chunks.append(ChunkRecord(offsets, sizes, name, off, length, tuple(hashes)))
    if covered != math.prod(shape):
        raise ManifestError(f"{r.source}, {where}: chunks cover {covered} elements of {math.prod(shape)}")
    _check_disjoint(chunks, where=f"{r.source}, {where}")
    return TensorRecord(dtype, shape, tuple(chunks))


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


# Work bounds of first_overlap, per non-empty box plus a constant (see its docstring).
SMALL_LAYOUT = 32  # up to this many boxes the sweep is cheapest (numpy's fixed cost is ~0.1 ms)
GRID_CELLS_PER_BOX = 4
GRID_CELLS_SLACK = 1 << 16
SWEEP_WORK_PER_BOX = 8
SWEEP_WORK_SLACK = 1 << 17

Box = tuple[Sequence[int], Sequence[int]]


def first_overlap(boxes: Sequence[Box]) -> tuple[int, int] | None:
    """Indices ``(i, j)``, ``i < j``, of two overlapping (offsets, sizes) boxes, or None.

    Empty boxes overlap nothing; all boxes have the same number of dimensions d. Exact, in
    O(d * n log n) time and O(d * n) memory for n boxes, or ManifestError if neither method
    below fits its bound (a layout shardckpt never writes). Up to SMALL_LAYOUT boxes, the
    sweep of 2. alone (at most SMALL_LAYOUT**2 comparisons).

    1. Grid painting. The distinct box boundaries of each dimension cut space into a grid
       of ``cells`` = prod(intervals per dimension). Two boxes overlap iff they share a cell
       (every box end is a cut, so renumbering the cuts in order keeps every interval
       comparison). Boxes are painted into a bytearray in index order, row by row along the
       last dimension, stopping at the first cell painted twice: every row but the last
       paints fresh cells, so <= cells + n rows, each O(log cells) Python work plus a C
       find/fill. Used when cells <= GRID_CELLS_PER_BOX * n + GRID_CELLS_SLACK, which holds
       for every layout that splits each dimension independently (DTensor placements, so
       everything shardckpt saves: cells == n, one cell per box, decided by one sort).
    2. Otherwise (or with coordinates of 2**62 or more) a sweep along the dimension with the
       most distinct offsets, comparing each box with the boxes still open there; it stops
       with ManifestError once the comparisons exceed SWEEP_WORK_PER_BOX * n + SWEEP_WORK_SLACK.
    """
    live = [i for i, (_, sizes) in enumerate(boxes) if math.prod(sizes) > 0]
    if len(live) < 2:
        return None
    if not boxes[live[0]][0]:  # 0-d: every non-empty box is the one element
        return live[0], live[1]
    if len(live) <= SMALL_LAYOUT:
        return _sweep_overlap(boxes, live, len(live) ** 2)
    grid = _Grid.build(boxes, live, GRID_CELLS_PER_BOX * len(live) + GRID_CELLS_SLACK)
    if grid is not None:
        return grid.first_overlap()
    return _sweep_overlap(boxes, live, SWEEP_WORK_PER_BOX * len(live) + SWEEP_WORK_SLACK)


class _Grid:
    """The live boxes renumbered onto the grid of their boundaries (coordinate compression).

    ``lo``/``hi``: (n, d) int64 arrays of each box's first and past-last cell per dimension.
    """

    def __init__(self, live: list[int], lo: np.ndarray, hi: np.ndarray, extent: list[int]) -> None:
        self.live, self.lo, self.hi, self.extent = live, lo, hi, extent
        self.cells = math.prod(extent)
        self.stride = np.array([math.prod(extent[k + 1 :]) for k in range(len(extent))], dtype=np.int64)

    @classmethod
    def build(cls, boxes: Sequence[Box], live: list[int], max_cells: int) -> _Grid | None:
        """The grid, or None if it has more than ``max_cells`` cells or the numbers do not fit int64."""
        n, dims = len(live), len(boxes[live[0]][0])
        try:
            off = np.array([boxes[i][0] for i in live], dtype=np.int64).reshape(n, dims)
            size = np.array([boxes[i][1] for i in live], dtype=np.int64).reshape(n, dims)
        except (OverflowError, ValueError):  # huge or ragged: leave it to the sweep
            return None
        if off.min() <= -(2**62) or off.max() >= 2**62 or size.max() >= 2**62 or size.min() <= 0:
            return None  # off + size could wrap
        lo, hi, extent = np.empty_like(off), np.empty_like(off), []
        for k in range(dims):
            cuts = np.unique(np.concatenate((off[:, k], off[:, k] + size[:, k])))
            extent.append(len(cuts) - 1)
            if math.prod(extent) > max_cells:
                return None
            lo[:, k] = np.searchsorted(cuts, off[:, k])
            hi[:, k] = np.searchsorted(cuts, off[:, k] + size[:, k])
        return cls(live, lo, hi, extent)

    def first_overlap(self) -> tuple[int, int] | None:
        start = self.lo @ self.stride  # first cell of each box
        if bool((self.hi - self.lo == 1).all()):
            return self._first_duplicate(start)
        return self._paint(start.tolist())

    def _first_duplicate(self, cell: np.ndarray) -> tuple[int, int] | None:
        """One cell per box: the pair that painting in index order would find first."""
        order = np.argsort(cell, kind="stable")
        dup = np.flatnonzero(cell[order][1:] == cell[order][:-1])
        if not len(dup):
            return None
        at = int(dup[np.argmin(order[dup + 1])])
        return self.live[int(order[at])], self.live[int(order[at + 1])]

    def _paint(self, starts: list[int]) -> tuple[int, int] | None:
        painted = bytearray(self.cells)
        ones = memoryview(b"\x01" * self.extent[-1])
        spans = self.hi - self.lo
        widths, several = spans[:, -1].tolist(), (spans[:, :-1] > 1).any(axis=1).tolist()
        stride = self.stride.tolist()
        for n, (base, width) in enumerate(zip(starts, widths, strict=True)):
            for row in _rows(base, spans[n].tolist(), stride) if several[n] else (base,):
                hit = painted.find(1, row, row + width)
                if hit >= 0:
                    return self._owner(hit, n), self.live[n]
                painted[row : row + width] = ones[:width]
        return None

    def _owner(self, cell: int, until: int) -> int:
        """The first live box holding ``cell``, among the first ``until`` (one O(n d) pass)."""
        at = cell // self.stride % np.array(self.extent, dtype=np.int64)
        holds = ((self.lo[:until] <= at) & (at < self.hi[:until])).all(axis=1)
        assert holds.any(), "a painted cell belongs to an earlier box"
        return self.live[int(np.argmax(holds))]


def _rows(base: int, span: list[int], stride: list[int]) -> Iterator[int]:
    """First cell of each row (a run along the last dimension) of the box at ``base``.

    Dimensions the box spans one cell of are skipped, so each remaining one at least
    doubles the rows: summing the steps costs O(log rows) per row.
    """
    axes = [range(0, s * st, st) for s, st in zip(span[:-1], stride[:-1], strict=True) if s > 1]
    return (base + step for step in map(sum, itertools.product(*axes)))


def _sweep_overlap(boxes: Sequence[Box], live: list[int], budget: int) -> tuple[int, int] | None:
    """Sweep along the dimension with the most distinct offsets; ManifestError past ``budget``."""
    dims = len(boxes[live[0]][0])
    d = max(range(dims), key=lambda k: len({boxes[i][0][k] for i in live}))
    order = sorted(live, key=lambda i: boxes[i][0][d])
    active: list[int] = []
    work = 0
    for i in order:
        off, size = boxes[i]
        work += 2 * len(active)  # filtering the open boxes, then comparing with them
        if work > budget:
            raise ManifestError(
                f"the layout of {len(live)} non-empty chunks is too irregular to check for overlaps "
                f"within the work bound: its boundaries cut too many grid cells (more than {GRID_CELLS_PER_BOX} "
                f"per chunk) and a sweep needs more than {budget} box comparisons. shardckpt writes only layouts "
                "that split each dimension independently; re-save the tensor with such a sharding."
            )
        active = [a for a in active if boxes[a][0][d] + boxes[a][1][d] > off[d]]
        for a in active:
            ao, asz = boxes[a]
            if all(x < y + ys and y < x + xs for x, xs, y, ys in zip(ao, asz, off, size, strict=True)):
                return min(a, i), max(a, i)
        active.append(i)
    return None


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
        if not _HASH.match(v):
            raise ManifestError(f"{self.source}: field {where}.{name} must be 16 lowercase hex digits, found {v!r}")
        return str(v)

    def nonneg(self, obj: Any, name: str, where: str) -> int:
        v = self.get(obj, name, int, where)
        if v < 0 or v >= 2**62:
            raise ManifestError(f"{self.source}: field {where}.{name} = {v} out of range")
        return int(v)
