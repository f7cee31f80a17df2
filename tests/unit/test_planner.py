"""Planner and writer weights: an item weighs its chunk's bytes, not the whole tensor's."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from shardckpt.engine.datawrite import split_by_bytes as _split_by_bytes
from shardckpt.engine.planner import balance_replicated
from shardckpt.engine.staging import item_bytes

pytestmark = pytest.mark.compat  # the subset .ci/torch_compat runs on other torch releases


def _item(fqn: str, rows: int, start: int = 0, total_rows: int | None = None, cols: int = 256) -> WriteItem:
    total = total_rows if total_rows is not None else rows
    return WriteItem(
        index=MetadataIndex(fqn, torch.Size([start, 0])),
        type=WriteItemType.SHARD if total != rows else WriteItemType.TENSOR,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size([start, 0]), sizes=torch.Size([rows, cols])),
            properties=TensorProperties(dtype=torch.float32),
            size=torch.Size([total, cols]),
        ),
    )


def test_item_bytes_is_the_chunks():
    shard = _item("w", rows=10, start=90, total_rows=100)
    assert item_bytes(shard) == 10 * 256 * 4
    assert shard.tensor_storage_size() == 100 * 256 * 4  # DCP's: the whole tensor, which we must not use


def test_replicated_items_go_to_the_rank_whose_own_shard_is_smaller():
    # rank 0 holds 999 rows of w, rank 1 one row; both hold the replicated r.
    plans = [
        SavePlan([_item("w", rows=999, start=0, total_rows=1000), _item("r", rows=300)]),
        SavePlan([_item("w", rows=1, start=999, total_rows=1000), _item("r", rows=300)]),
    ]
    kept = balance_replicated(plans)
    assert [it.index.fqn for it in kept[1].items] == ["w", "r"]
    assert [it.index.fqn for it in kept[0].items] == ["w"]


def test_io_threads_get_balanced_bytes():
    items = [
        _item("a", rows=900, total_rows=1000),
        _item("b", rows=100, start=900, total_rows=1000),
        _item("c", rows=500),
    ]
    buckets = _split_by_bytes(items, 2)
    loads = sorted(sum(item_bytes(it) for it in b) for b in buckets)
    assert loads == [600 * 256 * 4, 900 * 256 * 4]  # {a} and {c, b}; whole-tensor weights would give {a, c} and {b}


def _column_shards(n: int, rows: int = 100_000) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    return [((0, k * 4), (rows, 4)) for k in range(n)]  # split along dim 1, the smaller one


def test_overlap_check_is_linear_for_shards_along_a_smaller_dimension():
    import time

    from shardckpt.format.overlap import first_overlap

    boxes = _column_shards(20_000)
    t0 = time.process_time()  # CPU time: other processes on a loaded machine do not count
    assert first_overlap(boxes) is None
    # every pair compared would be 2e8 comparisons (minutes); a sweep along dim 1 is ~1e5 (0.03 s)
    assert time.process_time() - t0 < 5.0
    boxes[7_000] = ((0, 7_000 * 4 - 2), (100_000, 4))  # now overlaps its left neighbour
    assert first_overlap(boxes) == (6_999, 7_000)


def test_global_plan_refuses_shards_that_do_not_tile_the_tensor():
    import pytest
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    from shardckpt.engine.planner import _check_tiling
    from shardckpt.errors import UnsupportedValueError

    def md(chunks: list[tuple[int, int]]) -> Metadata:
        return Metadata(
            {
                "w": TensorStorageMetadata(
                    TensorProperties(dtype=torch.float32),
                    torch.Size([10, 4]),
                    [ChunkStorageMetadata(torch.Size([o, 0]), torch.Size([n, 4])) for o, n in chunks],
                )
            }
        )

    _check_tiling(md([(0, 5), (5, 5)]))
    with pytest.raises(UnsupportedValueError, match="overlap"):
        _check_tiling(md([(0, 6), (5, 5)]))
    with pytest.raises(UnsupportedValueError, match="hold 36 elements, the tensor 40"):
        _check_tiling(md([(0, 4), (5, 5)]))
    with pytest.raises(UnsupportedValueError, match="outside the tensor's global shape"):
        _check_tiling(md([(0, 5), (5, 6)]))


def test_the_header_entry_shortcut_bounds_the_longest_entry() -> None:
    """The check skips building a header when the bound for the key's length and the rank
    fits the limit; the bound must be at least the real entry of the worst such key:
    astral characters (12 bytes escaped), offsets and sizes of 19 digits, and the data
    offsets' end, which grows with the product of the sizes."""
    from shardckpt.engine import planner
    from shardckpt.format import datafile

    checked = 0
    for char in ("k", '"', "\U0001f600"):
        for n in (1, 2, 10, 100, 1000):
            for ndim in range(1, datafile.MAX_NDIM + 1):
                big = 2**62 - 1
                offsets = ",".join([str(big)] * ndim)
                entry = datafile.HeaderEntry(f"{char * n}@{offsets}", "float64", (big,) * ndim, 0, big**ndim * 8)
                length = len(datafile.build_header([entry], {})) - datafile.HEADER_LEN_BYTES
                assert length <= planner._HEADER_ENTRY_BOUND * (n + 1 + ndim), (char, n, ndim, length)
                checked += 1
    assert checked == 3 * 5 * datafile.MAX_NDIM
