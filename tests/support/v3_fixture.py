"""Write a format-3 checkpoint folder from a description, without the engine's writer.

The loader of format 3 is tested against this until the writer (issue #16, section 12.7 of
docs/format.md) produces the same shape. Only the format module's serializers and the
commit rule are used, exactly as the spec orders the writes:

1. each simulated rank writes its data files ``data/<save_id>-r<rank>-<k>.safetensors``
   (a safetensors header, then its chunks back to back, as ``engine/datawrite.py`` lays them
   out), then its index record ``data/<save_id>-r<rank>.index.json``
   (``rank_index.rank_index_to_json``: each file's size and xxh3-64, each chunk's block hashes);
2. the coordinator writes the pages of the rank table (``file_table.page_to_json``);
3. then ``manifest.json`` (``manifest_v3_to_json``), created exclusively: the commit.

A tensor is described by :class:`Split` (``torch.chunk``-like pieces per dimension, so the
writer's ``rules.compress`` turns them into a rule; cell ``c`` in row-major order is held by
rank ``c % ranks``) or :class:`Boxes` (an irregular tiling listed chunk by chunk, box ``i`` held
by rank ``i % ranks``). A rank holding nothing writes no data file (its index lists none).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from shardckpt import read_manifest, read_state_dict
from shardckpt.format import datafile, integrity, layout, rules
from shardckpt.format.file_table import FileGroup, FileTable, Page, RankEntry, page_to_json
from shardckpt.format.manifest_v3 import Chunk, ManifestV3, Tensor, manifest_v3_to_json
from shardckpt.format.rank_index import FileIndex, IndexEntry, rank_index_to_json
from shardckpt.format.values import encode_value

SAVE_ID = "0123456789ab"


@dataclass(frozen=True)
class Split:
    """``parts[d]`` pieces along dimension ``d`` (``torch.chunk``'s sizes: block ceil(n / parts))."""

    parts: tuple[int, ...]


@dataclass(frozen=True)
class Boxes:
    """An irregular tiling: ``(offsets, sizes)`` per box."""

    boxes: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]


@dataclass
class _Stored:
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    data: bytes
    dtype: str
    file: int = 0  # the rank's file number
    byte_offset: int = 0


@dataclass
class Written:
    """What :func:`write_v3` wrote, for tests to tamper with and to count reads against."""

    path: str
    manifest: ManifestV3
    files_of_rank: dict[int, list[str]] = field(default_factory=dict)
    index_names: dict[int, str] = field(default_factory=dict)
    page_names: list[str] = field(default_factory=list)


def write_v3(
    path: str | os.PathLike[str],
    tensors: dict[str, tuple[torch.Tensor, Split | Boxes]],
    *,
    ranks: int,
    values: dict[str, Any] | None = None,
    hash_block_bytes: int = 4096,
    files_per_rank: int = 1,
    ranks_per_page: int = 1024,
    paths: dict[str, list[str | int]] | None = None,
    metadata: dict[str, Any] | None = None,
    save_id: str = SAVE_ID,
    base: Written | None = None,
    from_base: tuple[str, ...] = (),
    digests: bool = False,
) -> Written:
    """Write a committed format-3 checkpoint of ``tensors`` (flat keys; the path of a key is
    ``paths[key]``, by default its ``.``-separated parts) saved by ``ranks`` simulated ranks
    into the new folder ``path``.

    Incremental (section 11 and 12.3): the keys ``from_base`` are not written but point at the
    chunks of ``base`` (a checkpoint written here, in a folder beside ``path``, with a
    different ``save_id``), whose group follows this save's in the file table. ``digests``:
    the index records carry each chunk's xxh3-128 digest (an incremental base, 12.4)."""
    root = os.fspath(path)
    os.makedirs(os.path.join(root, layout.DATA_DIR))
    values = values or {}
    held: list[list[_Stored]] = [[] for _ in range(ranks)]
    for key, (t, how) in sorted(tensors.items()):
        for i, (offsets, sizes) in enumerate(_boxes(tuple(t.shape), how)):
            if math.prod(sizes) == 0:
                continue
            piece = t[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))].contiguous()
            data = piece.reshape(-1).view(torch.uint8).numpy().tobytes()
            dtype = datafile.dtype_name(t.dtype, key=key)
            held[i % ranks].append(_Stored(key, offsets, sizes, data, dtype))
    written = Written(root, None)  # type: ignore[arg-type]  # set below
    counts, entries = [], []
    for rank, stored in enumerate(held):
        shapes = {k: tuple(t.shape) for k, (t, _) in tensors.items()}
        files = _write_rank(root, rank, stored, files_per_rank, hash_block_bytes, written, shapes, save_id, digests)
        counts.append(len(files))
        raw = rank_index_to_json(save_id, rank, hash_block_bytes, files)
        name = layout.rank_index_name(save_id, rank)
        _write(root, name, raw)
        written.index_names[rank] = name
        entries.append(RankEntry(len(raw), integrity.hash_hex(raw), "node0", rank))
    pages = []
    for p, first in enumerate(range(0, ranks, ranks_per_page)):
        raw = page_to_json(save_id, first, entries[first : first + ranks_per_page])
        name = layout.rank_page_name(save_id, p)
        _write(root, name, raw)
        written.page_names.append(name)
        pages.append(Page(len(raw), integrity.hash_hex(raw)))
    runs = [(len(list(g)), n) for n, g in itertools.groupby(counts)]
    group = FileGroup(save_id, None, ranks, tuple(runs), ranks_per_page, tuple(pages))
    bases: tuple[str, ...] = ()
    table = FileTable((group,))
    records: dict[str, Tensor] = {}
    if base is not None:
        (base_group,) = base.manifest.file_table.groups  # a full save: its own group only
        bases = (os.path.basename(base.path),)
        table = FileTable((group, dataclasses.replace(base_group, checkpoint=bases[0])))
        records = {k: _shifted(base.manifest.tensors[k], group.total_files) for k in from_base}
    for key, (t, _) in sorted(tensors.items()):
        dtype = datafile.dtype_name(t.dtype, key=key)
        mine = [(s, table.position(0, r, s.file)) for r, stored in enumerate(held) for s in stored if s.key == key]
        rule, rest = rules.compress(
            tuple(t.shape), [rules.Chunk(s.offsets, s.sizes, pos, s.byte_offset) for s, pos in mine]
        )
        size = datafile.itemsize(dtype)
        listed = tuple(Chunk(c.offsets, c.sizes, c.file, c.byte_offset, math.prod(c.sizes) * size) for c in rest)
        records[key] = Tensor(dtype, tuple(t.shape), rule, listed)
    manifest = ManifestV3(
        world_size=ranks,
        hash_block_bytes=hash_block_bytes,
        bases=bases,
        file_table=table,
        tensors=records,
        values={k: encode_value(v, key=k) for k, v in values.items()},
        paths=paths if paths is not None else {k: list(k.split(".")) for k in [*tensors, *from_base, *values]},
        created_at="2026-11-30T20:00:00+00:00",
        shardckpt_version="0.4.0",
        torch_version=torch.__version__.split("+")[0],
        metadata=dict(metadata or {}),
    )
    _write(root, layout.MANIFEST_NAME, manifest_v3_to_json(manifest))  # the commit, last
    written.manifest = manifest
    return written


def rewrite_as_v3(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, ranks: int, **kw: Any) -> Written:
    """The format-1 or -2 checkpoint ``src`` written again as format 3 into ``dst``: the same
    tensors, boxes, values, paths and metadata (so a TrainState or manager step can be
    restored from format 3 before the writer writes it)."""
    m = read_manifest(src)
    flat = read_state_dict(src, flat=True)
    tensors = {k: (flat[k], Boxes(tuple((c.offsets, c.sizes) for c in rec.chunks))) for k, rec in m.tensors.items()}
    values = {k: flat[k] for k in m.values}
    return write_v3(dst, tensors, ranks=ranks, values=values, paths=m.paths, metadata=m.metadata, **kw)


def _shifted(t: Tensor, by: int) -> Tensor:
    """``t`` of a base's manifest with its file positions moved past this save's ``by`` files."""
    rule = None
    if t.rule is not None:
        runs = tuple(dataclasses.replace(r, file=r.file + by) for r in t.rule.runs)
        rule = rules.Rule(t.rule.shape, t.rule.block, runs)
    return Tensor(t.dtype, t.shape, rule, tuple(dataclasses.replace(c, file=c.file + by) for c in t.chunks))


def _boxes(shape: tuple[int, ...], how: Split | Boxes) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    if isinstance(how, Boxes):
        return list(how.boxes)
    if 0 in shape:
        return []  # an empty tensor: no chunk, no rule (docs/format.md 12.5 item 3)
    per_dim = []
    for n, parts in zip(shape, how.parts, strict=True):
        block = -(-n // parts)
        per_dim.append([(o, min(block, n - o)) for o in range(0, n, block)])
    return [(tuple(o for o, _ in cell), tuple(s for _, s in cell)) for cell in itertools.product(*per_dim)]


def _write_rank(
    root: str,
    rank: int,
    stored: list[_Stored],
    files_per_rank: int,
    block: int,
    written: Written,
    tensor_shapes: dict[str, tuple[int, ...]],
    save_id: str,
    digests: bool = False,
) -> list[FileIndex]:
    """One rank's data files: its chunks dealt over ``files_per_rank`` files (fewer when it
    holds fewer chunks), each a safetensors header then the chunks back to back."""
    buckets = [stored[k::files_per_rank] for k in range(min(files_per_rank, len(stored)))]
    out = []
    for k, bucket in enumerate(buckets):
        header_entries, begin = [], 0
        for s in bucket:
            whole = s.sizes == tuple(tensor_shapes[s.key]) and "@" not in s.key and s.key != "__metadata__"
            name = s.key if whole else f"{s.key}@{','.join(map(str, s.offsets))}"
            header_entries.append(datafile.HeaderEntry(name, s.dtype, s.sizes, begin, begin + len(s.data)))
            begin += len(s.data)
        meta = {"format": "shardckpt", "format_version": "3", "save_id": save_id, "rank": str(rank)}
        header = datafile.build_header(header_entries, meta)
        body = header + b"".join(s.data for s in bucket)
        index = []
        for s, e in zip(bucket, header_entries, strict=True):
            s.file, s.byte_offset = k, len(header) + e.begin
            hashes = "".join(integrity.block_hashes(memoryview(s.data), block))
            digest = integrity.digest_hex(memoryview(s.data)) if digests else None
            index.append(IndexEntry(s.byte_offset, len(s.data), hashes, digest))
        name = layout.data_file_name(save_id, rank, k)
        _write(root, name, body)
        written.files_of_rank.setdefault(rank, []).append(name)
        out.append(FileIndex(len(body), integrity.hash_hex(body), tuple(index)))
    return out


def _write(root: str, name: str, data: bytes) -> None:
    with open(os.path.join(root, name), "xb") as f:  # exclusive: never over an existing name
        f.write(data)
