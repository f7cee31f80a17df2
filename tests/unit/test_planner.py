"""Planner and writer weights: an item weighs its chunk's bytes, not the whole tensor's."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from shardckpt.engine.datawrite import split_by_bytes as _split_by_bytes
from shardckpt.engine.placement import balance_replicated
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
    from shardckpt.engine import placement

    plans = _fsdp_with_steps(3, 4)
    for plan in plans:
        plan.items.append(_item("r", rows=64))  # 64 KiB exactly: still small
        plan.items.append(_item("s", rows=65))  # just over: balanced
    plans[0].items.append(_item("own0", rows=1000))  # rank 0 the most loaded: balance avoids it
    holders = _holders(balance_replicated(plans, small_to=0))
    assert holders["r"] == [0] and holders["s"] != [0]
    monkeypatch.setattr(placement, "SMALL_REPLICATED_BUDGET_BYTES", 3 * 4)  # room for three steps
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

    from shardckpt.engine.plan_checks import _check_tiling
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


def _reference_balance(all_plans: list[SavePlan]) -> list[list[str]]:
    """The LPT rule of balance_replicated, written the plain way: each item's holders,
    replicated items largest first to the least-loaded holder (ties: lowest rank)."""
    holders: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    sizes: dict[tuple[str, tuple[int, ...]], int] = {}
    for rank, plan in enumerate(all_plans):
        for it in plan.items:
            key = (it.index.fqn, tuple(it.index.offset or ()))
            holders.setdefault(key, []).append(rank)
            sizes[key] = item_bytes(it) or 1
    load = [0] * len(all_plans)
    owner = {}
    for key, ranks in holders.items():
        if len(ranks) == 1:
            owner[key] = ranks[0]
            load[ranks[0]] += sizes[key]
    for key in sorted((k for k in holders if len(holders[k]) > 1), key=lambda k: (-sizes[k], k)):
        owner[key] = min(holders[key], key=lambda r: (load[r], r))
        load[owner[key]] += sizes[key]
    return [
        [it.index.fqn for it in plan.items if owner[(it.index.fqn, tuple(it.index.offset or ()))] == rank]
        for rank, plan in enumerate(all_plans)
    ]


def test_balance_replicated_matches_the_plain_lpt_rule():
    """Random plans: own shards of various sizes, items replicated on every rank (the heap)
    and on some ranks (the plain minimum), ties included."""
    import random

    for seed in range(30):
        rng = random.Random(seed)
        world = rng.randint(1, 9)
        plans = []
        for rank in range(world):
            own = [_item(f"own{rank}.{k}", rows=rng.choice([1, 2, 50])) for k in range(rng.randint(0, 3))]
            everywhere = [_item(f"all{k}", rows=rng.choice([1, 3, 3, 40])) for k in range(4)]
            some = [_item(f"some{k}", rows=k + 1) for k in range(6) if (rank + k + seed) % 3]
            items = own + everywhere + some
            rng.shuffle(items)
            plans.append(SavePlan(items))
        for k in range(4):  # every rank holds all{k} with the same size
            size = rng.choice([1, 3, 40])
            for plan in plans:
                plan.items[:] = [_item(f"all{k}", rows=size) if it.index.fqn == f"all{k}" else it for it in plan.items]
        kept = balance_replicated(plans)
        assert [[it.index.fqn for it in p.items] for p in kept] == _reference_balance(plans), seed
        assert sorted(it.index.fqn for p in kept for it in p.items) == sorted(
            {it.index.fqn for p in plans for it in p.items}
        )  # every item exactly once


def test_tensors_that_disagree_across_ranks_are_refused_naming_the_ranks():
    from torch.distributed.checkpoint.planner import TensorWriteData

    from shardckpt.engine.plan_checks import _check_tensors_agree
    from shardckpt.errors import UnsupportedValueError

    def plain(fqn: str, shape: list[int], dtype: torch.dtype = torch.float32) -> WriteItem:
        size = torch.Size(shape)
        return WriteItem(
            index=MetadataIndex(fqn, torch.Size([0] * len(shape))),
            type=WriteItemType.TENSOR,
            tensor_data=TensorWriteData(
                ChunkStorageMetadata(torch.Size([0] * len(shape)), size), TensorProperties(dtype=dtype), size
            ),
        )

    same = [SavePlan([plain("a", [2]), plain("b", [3])]) for _ in range(3)]
    _check_tensors_agree(same)
    shapes = [SavePlan([plain("a", [2])]), SavePlan([plain("a", [2])]), SavePlan([plain("a", [3])])]
    with pytest.raises(
        UnsupportedValueError,
        match=r"key 'a'.*ranks \[0, 1\] hold shape \[2\] float32; ranks \[2\] hold shape \[3\] float32",
    ):
        _check_tensors_agree(shapes)
    dtypes = [SavePlan([plain("b", [2])]), SavePlan([plain("b", [2], torch.bfloat16)])]
    with pytest.raises(UnsupportedValueError, match=r"key 'b'.*ranks \[1\] hold shape \[2\] bfloat16"):
        _check_tensors_agree(dtypes)
    # A shape given as a list on one rank and a torch.Size on another is the same shape.
    item = plain("a", [2])
    assert item.tensor_data is not None
    listed = dataclasses.replace(item, tensor_data=dataclasses.replace(item.tensor_data, size=[2]))
    _check_tensors_agree([SavePlan([plain("a", [2])]), SavePlan([listed])])


def _tiling_metadata(shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> Any:
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    chunks = [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes]
    return Metadata({"t": TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(shape), chunks)})


def test_regular_grids_are_proven_at_once_and_the_rest_checked_box_by_box():
    from shardckpt.engine.plan_checks import _check_tiling, _regular_tilings
    from shardckpt.errors import UnsupportedValueError

    def proven(shape: tuple[int, ...], boxes: list[Any]) -> bool:
        md = _tiling_metadata(shape, boxes).state_dict_metadata["t"]
        return _regular_tilings([md]) == [True]

    rows = [((r * 3, 0), (min(3, 10 - r * 3), 4)) for r in range(4)]  # torch.chunk of 10 rows over 4 ranks
    assert proven((10, 4), rows)
    assert proven((10, 4), [*rows, ((10, 0), (0, 4))])  # an empty shard at the end
    grid2d = [((i * 2, j * 3), (2, min(3, 5 - j * 3))) for i in range(2) for j in range(2)]
    assert proven((4, 5), grid2d)
    irregular = [((0, 0), (3, 4)), ((3, 0), (7, 4))]  # a valid tiling, not one block grid
    assert not proven((10, 4), irregular)
    _check_tiling(_tiling_metadata((10, 4), irregular))  # the box-by-box check lets it pass
    for bad, message in (
        ([*rows, rows[1]], "overlap"),  # a cell twice
        (rows[:3], "hold 36 elements, the tensor 40"),  # a cell missing
        ([*rows, ((11, 0), (0, 4))], "outside the tensor's global shape"),  # an empty shard beyond the end
        ([((0, 0), (3, 4)), ((3, 0), (3,))], "outside the tensor's global shape"),  # a box of other dimensions
    ):
        assert not proven((10, 4), bad)
        with pytest.raises(UnsupportedValueError, match=message):
            _check_tiling(_tiling_metadata((10, 4), bad))


def test_the_tiling_check_decides_as_the_box_by_box_check_on_random_layouts():
    import random

    from shardckpt.engine.plan_checks import _check_tensor_tiling, _check_tiling, _regular_tilings
    from shardckpt.errors import UnsupportedValueError

    def outcome(check: Any, md: Any) -> str | None:
        try:
            check(md)
        except UnsupportedValueError as e:
            return str(e)
        return None

    for seed in range(200):
        rng = random.Random(seed)
        shape = tuple(rng.randint(1, 7) for _ in range(rng.randint(1, 3)))
        block = tuple(rng.randint(1, n) for n in shape)
        boxes = []
        for cell in itertools.product(*(range(0, n, b) for n, b in zip(shape, block, strict=True))):
            boxes.append((cell, tuple(min(b, n - o) for o, b, n in zip(cell, block, shape, strict=True))))
        for _ in range(rng.randint(0, 2)):  # break it, sometimes
            k = rng.randrange(len(boxes))
            o, s = boxes[k]
            change = rng.choice(["drop", "twice", "grow", "shift", "empty"])
            if change == "drop" and len(boxes) > 1:
                boxes.pop(k)
            elif change == "twice":
                boxes.append(boxes[k])
            elif change == "grow":
                boxes[k] = (o, (s[0] + 1, *s[1:]))
            elif change == "shift":
                boxes[k] = ((o[0] + 1, *o[1:]), s)
            else:
                boxes.append(((rng.randint(0, shape[0] + 1), *o[1:]), (0, *s[1:])))
        rng.shuffle(boxes)
        metadata = _tiling_metadata(shape, boxes)
        md = metadata.state_dict_metadata["t"]
        expected = outcome(lambda m: _check_tensor_tiling("t", m), md)
        assert outcome(_check_tiling, metadata) == expected, (seed, shape, boxes)
        if _regular_tilings([md]) == [True]:
            assert expected is None, (seed, shape, boxes)


def test_the_header_entry_shortcut_bounds_the_longest_entry() -> None:
    """The check skips building a header when the bound for the key's length and the rank
    fits the limit; the bound must be at least the real entry of the worst such key:
    astral characters (12 bytes escaped), offsets and sizes of 19 digits, and the data
    offsets' end, which grows with the product of the sizes."""
    from shardckpt.engine import plan_checks
    from shardckpt.format import datafile

    checked = 0
    for char in ("k", '"', "\U0001f600"):
        for n in (1, 2, 10, 100, 1000):
            for ndim in range(1, datafile.MAX_NDIM + 1):
                big = 2**62 - 1
                offsets = ",".join([str(big)] * ndim)
                entry = datafile.HeaderEntry(f"{char * n}@{offsets}", "float64", (big,) * ndim, 0, big**ndim * 8)
                length = len(datafile.build_header([entry], {})) - datafile.HEADER_LEN_BYTES
                assert length <= plan_checks._HEADER_ENTRY_BOUND * (n + 1 + ndim), (char, n, ndim, length)
                checked += 1
    assert checked == 3 * 5 * datafile.MAX_NDIM
