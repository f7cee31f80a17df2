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


def _step(fqn: str) -> WriteItem:
    """A replicated 0-d tensor of 4 bytes, like AdamW's ``step``."""
    return WriteItem(
        index=MetadataIndex(fqn, torch.Size([])),
        type=WriteItemType.TENSOR,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size([]), sizes=torch.Size([])),
            properties=TensorProperties(dtype=torch.float32),
            size=torch.Size([]),
        ),
    )


def _fsdp_with_steps(world: int, params: int) -> list[SavePlan]:
    """Every rank: its Shard(0) rows of ``params`` weights and every parameter's step."""
    return [
        SavePlan(
            [_item(f"w{p}", rows=8, start=8 * r, total_rows=8 * world) for p in range(params)]
            + [_step(f"step{p}") for p in range(params)]
        )
        for r in range(world)
    ]


def _holders(kept: list[SavePlan]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r, plan in enumerate(kept):
        for it in plan.items:
            out.setdefault(it.index.fqn, []).append(r)
    return out


def test_without_small_to_replicated_steps_are_spread_over_the_ranks():
    holders = _holders(balance_replicated(_fsdp_with_steps(4, 8)))
    assert {holders[f"step{p}"][0] for p in range(8)} == {0, 1, 2, 3}  # formats 1 and 2: unchanged
    assert all(len(holders[f"step{p}"]) == 1 for p in range(8))


def test_small_replicated_items_go_to_the_given_rank_and_the_rest_is_balanced():
    plans = _fsdp_with_steps(4, 8)
    for plan in plans:  # plus two large replicated tensors (over SMALL_REPLICATED_BYTES)
        plan.items.extend([_item("big_a", rows=100), _item("big_b", rows=100)])
    for coordinator in (0, 2):
        holders = _holders(balance_replicated(plans, small_to=coordinator))
        assert {holders[f"step{p}"][0] for p in range(8)} == {coordinator}
        assert all(holders[f"w{p}"] == [0, 1, 2, 3] for p in range(8))  # shards stay with their ranks
        big = holders["big_a"] + holders["big_b"]
        assert len(big) == 2 and coordinator not in big  # LPT counted the steps the coordinator took
        assert sum(len(v) for v in holders.values()) == 8 * 4 + 8 + 2  # each item kept exactly once


def test_small_replicated_placement_has_a_size_limit_and_a_budget(monkeypatch):
    from shardckpt.engine import planner

    plans = _fsdp_with_steps(3, 4)
    for plan in plans:
        plan.items.append(_item("r", rows=64))  # 64 KiB exactly: still small
        plan.items.append(_item("s", rows=65))  # just over: balanced
    plans[0].items.append(_item("own0", rows=1000))  # rank 0 the most loaded: balance avoids it
    holders = _holders(balance_replicated(plans, small_to=0))
    assert holders["r"] == [0] and holders["s"] != [0]
    monkeypatch.setattr(planner, "SMALL_REPLICATED_BUDGET_BYTES", 3 * 4)  # room for three steps
    holders = _holders(balance_replicated(plans, small_to=0))
    on_zero = [p for p in range(4) if holders[f"step{p}"] == [0]]
    assert len(on_zero) == 3  # the fourth step and r do not fit: placed by balance
    assert holders["r"] != [0]


def test_small_replicated_items_the_given_rank_does_not_hold_are_balanced():
    plans = [SavePlan([_item("w", rows=10)]), SavePlan([_step("s")]), SavePlan([_step("s")])]
    holders = _holders(balance_replicated(plans, small_to=0))
    assert holders == {"w": [0], "s": [1]}


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


def test_the_layout_fingerprint_tells_the_replicated_placement_apart():
    from shardckpt.engine.planner import layout_fingerprint

    (plan,) = _fsdp_with_steps(1, 2)
    spread = layout_fingerprint(plan)
    assert layout_fingerprint(plan) == spread  # deterministic: a repeated save reuses its plan
    assert layout_fingerprint(plan, small_replicated_to=0) not in (
        spread,
        layout_fingerprint(plan, small_replicated_to=1),
    )
