"""The planning of a load of many small tensors (issue #18): each item's chunk looked up
once, the data files' sizes still checked before any read (empty boxes' files included),
the spans of whole and partial chunks as the general sums give, and a DTensor's box as
``torch.chunk`` splits it."""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem
from torch.distributed.tensor import Partial, Replicate, Shard

import shardckpt
from shardckpt.engine.boxes import BoxReader
from shardckpt.engine.load_items import local_read_items
from shardckpt.engine.loading import read_manifest
from shardckpt.engine.local_items import shard_box
from shardckpt.engine.reader import ListedChunks, manifest_to_metadata, read_runs
from shardckpt.errors import IntegrityError
from shardckpt.format.manifest import ChunkRecord, Manifest
from shardckpt.storage import open_storage


@pytest.fixture
def small(tmp_path: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """Small tensors of several shapes and dtypes, back to back in one data file."""
    g = torch.Generator().manual_seed(3)
    state = {
        "a": torch.rand(5, 3, generator=g),
        "b": torch.rand(4, 6, generator=g).to(torch.bfloat16),
        "c": torch.rand(7, generator=g),
        "d": torch.arange(24, dtype=torch.int64).reshape(2, 3, 4),
        "s": torch.tensor(1.5),
    }
    path = str(tmp_path / "ck")
    shardckpt.save(state, path)
    return path, state


class CountingChunks(ListedChunks):
    """ListedChunks that counts its look-ups."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.lookups = 0

    def chunk(self, key: str, offsets: tuple[int, ...]) -> ChunkRecord:
        self.lookups += 1
        return super().chunk(key, offsets)


def _items(manifest: Manifest, state: dict[str, torch.Tensor]) -> list[ReadItem]:
    return local_read_items({k: torch.zeros_like(v) for k, v in state.items()}, manifest_to_metadata(manifest))


def _empty_box_item(key: str, chunk: ChunkRecord) -> ReadItem:
    """A read item of nothing (a zero length) from ``chunk``."""
    zeros = torch.Size([0] * len(chunk.sizes))
    return ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex(key, zeros),
        dest_offsets=zeros,
        storage_index=MetadataIndex(key, torch.Size(chunk.offsets)),
        storage_offsets=zeros,
        lengths=torch.Size([0, *chunk.sizes[1:]]),
    )


def test_each_items_chunk_is_looked_up_once_and_every_box_planned(small: Any) -> None:
    path, state = small
    manifest = read_manifest(path)
    chunks = CountingChunks(open_storage(path), manifest, verify=True, where=path)
    items = _items(manifest, state)
    boxes = chunks.prepare(items)
    runs = read_runs(items, chunks, boxes)
    assert chunks.lookups == len(items) == len(state)
    planned = [p for run in runs for p in run]
    assert sorted(p.item.storage_index.fqn for p in planned) == sorted(state)
    for p in planned:
        assert p.chunk is manifest.tensors[p.item.storage_index.fqn].chunks[0]
        assert p.box is not None and p.box.span.hi - p.box.span.lo <= p.chunk.byte_length
    where = [(p.chunk.file, p.chunk.byte_offset + p.box.span.lo) for p in planned if p.box is not None]
    assert where == sorted(where) and len(set(where)) == len(state)  # in file and offset order


@pytest.mark.parametrize("change", ["truncate", "delete"])
def test_read_runs_names_a_bad_data_file_before_any_read_even_for_an_empty_box(small: Any, change: str) -> None:
    path, state = small
    manifest = read_manifest(path)
    chunk = manifest.tensors["a"].chunks[0]
    empty = _empty_box_item("a", chunk)
    chunks = ListedChunks(open_storage(path), manifest, verify=True, where=f"{path} (rank 0)")
    assert read_runs([empty], chunks, chunks.prepare([empty])) == [[(empty, chunk, None, None)]]
    full = os.path.join(path, chunk.file)
    if change == "truncate":
        os.truncate(full, os.path.getsize(full) - 1)
    else:
        os.remove(full)
    for items in ([empty], _items(manifest, state)):
        chunks = ListedChunks(open_storage(path), manifest, verify=True, where=f"{path} (rank 0)")
        with pytest.raises(IntegrityError, match="the manifest says" if change == "truncate" else "is missing") as e:
            read_runs(items, chunks, chunks.prepare(items))
        assert chunk.file in str(e.value) and "(rank 0)" in str(e.value)


@pytest.mark.parametrize("verify", [True, False])
def test_spans_of_whole_and_partial_chunks_of_many_shapes(small: Any, verify: bool) -> None:
    path, _ = small
    manifest = read_manifest(path)
    boxes = BoxReader(open_storage(path), manifest, verify=verify, where=path)
    block = manifest.hash_block_bytes
    for _ in range(2):  # the second pass finds each shape's strides remembered
        for key, rec in manifest.tensors.items():
            chunk = rec.chunks[0]
            strides = tuple(math.prod(chunk.sizes[i + 1 :]) for i in range(len(chunk.sizes)))
            whole = boxes.span(key, chunk, torch.Size([0] * len(chunk.sizes)), torch.Size(chunk.sizes))
            numel, isz = math.prod(chunk.sizes), whole.dtype.itemsize
            assert (whole.first, whole.last, whole.strides) == (0, numel - 1, strides)
            assert type(whole.lengths) is tuple and whole.lengths == chunk.sizes
            assert (whole.lo, whole.hi) == (
                (0, min(chunk.byte_length, -(-numel * isz // block) * block)) if verify else (0, numel * isz)
            )
            if len(chunk.sizes) >= 2:  # the last row of the first two dimensions' box
                start = (chunk.sizes[0] - 1, *[0] * (len(chunk.sizes) - 1))
                part = boxes.span(key, chunk, start, (1, *chunk.sizes[1:]))
                assert (part.first, part.last) == (start[0] * strides[0], numel - 1)
                assert type(part.lengths) is tuple and part.strides == strides


def _chunked_box(
    shape: tuple[int, ...], mesh: tuple[int, ...], coordinate: tuple[int, ...], placements: tuple[Any, ...]
) -> tuple[list[int], list[int]]:
    """The box by ``torch.chunk`` of index ranges, mesh dimension by mesh dimension; an
    empty shard at the global size of its dimension (DCP's convention)."""
    ranges = [torch.arange(n) for n in shape]
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Shard):
            pieces = ranges[p.dim].chunk(mesh[mesh_dim])
            index = coordinate[mesh_dim]
            ranges[p.dim] = pieces[index] if index < len(pieces) else torch.arange(0)
    sizes = [len(r) for r in ranges]
    return sizes, [int(r[0]) if len(r) else n for r, n in zip(ranges, shape, strict=True)]


@pytest.mark.parametrize("mesh", [(1,), (3,), (4,), (2, 2), (3, 2)])
def test_shard_box_is_torch_chunks_box_for_every_coordinate(mesh: tuple[int, ...]) -> None:
    kinds = [Replicate(), Shard(0), Shard(1)]
    for placements in itertools.product(kinds, repeat=len(mesh)):
        for shape in [(0, 3), (1, 5), (5, 2), (7, 7), (9, 1), (16, 4)]:
            for coordinate in itertools.product(*(range(n) for n in mesh)):
                assert shard_box(shape, mesh, coordinate, placements) == _chunked_box(
                    shape, mesh, coordinate, placements
                ), (shape, mesh, coordinate, placements)
    assert shard_box((4, 4), mesh, (0,) * len(mesh), (Partial(),) * len(mesh)) is None
    assert shard_box((4, 4), mesh, (0,) * len(mesh), (Shard(2),) * len(mesh)) is None
