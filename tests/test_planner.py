"""Planner and writer weights: an item weighs its chunk's bytes, not the whole tensor's."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from shardckpt.planner import balance_replicated
from shardckpt.staging import item_bytes
from shardckpt.writer import _split_by_bytes


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
    items = [_item("a", rows=900, total_rows=1000), _item("b", rows=100, start=900, total_rows=1000), _item("c", rows=500)]
    buckets = _split_by_bytes(items, 2)
    loads = sorted(sum(item_bytes(it) for it in b) for b in buckets)
    assert loads == [600 * 256 * 4, 900 * 256 * 4]  # {a} and {c, b}; whole-tensor weights would give {a, c} and {b}
