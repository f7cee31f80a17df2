"""The global plan from rules (engine/rule_plan.py), over simulated ranks in one process:
every rank's final plan and the commit's metadata equal the full path's for the same local
plans (so the same rank writes the same bytes, and the manifest is the same), and every
layout rules cannot prove falls back (None) instead of planning wrong."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import Replicate, Shard

from shardckpt.engine import placement, rule_plan
from shardckpt.engine.local_items import shard_box
from shardckpt.engine.planner import SavePlanner, _LocalPlannerData
from shardckpt.engine.write_v3 import tensors_of

Spec = tuple[int | None, ...]
Tensor = tuple[str, tuple[int, ...], torch.dtype, Spec | None]  # spec None: a plain tensor


def _item(fqn: str, shape: tuple[int, ...], dtype: torch.dtype, offsets: Any, sizes: Any, kind: Any) -> WriteItem:
    props = TensorProperties(dtype=dtype)
    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
    return WriteItem(
        index=MetadataIndex(fqn, torch.Size(offsets)),
        type=kind,
        tensor_data=TensorWriteData(chunk=chunk, properties=props, size=torch.Size(shape)),
    )


def simulate(
    mesh_shape: tuple[int, ...], tensors: list[Tensor], order: list[int] | None = None
) -> tuple[list[SavePlan], list[dict[str, rule_plan.TensorLayout | None]]]:
    """Every rank's local plan and layouts: rank r at mesh coordinate ``order[r]``
    (row-major; default r), its DTensor items as DCP computes them (``shard_box``), plain
    tensors whole, and one value."""
    world = 1
    for n in mesh_shape:
        world *= n
    coords = list(itertools.product(*(range(n) for n in mesh_shape)))
    plans, layouts = [], []
    for rank in range(world):
        coordinate = coords[order[rank] if order else rank]
        items, lay = [], {}
        for fqn, shape, dtype, spec in tensors:
            if spec is None:
                items.append(_item(fqn, shape, dtype, (0,) * len(shape), shape, WriteItemType.TENSOR))
                lay[fqn] = None
                continue
            placements = [Replicate() if d is None else Shard(d) for d in spec]
            box = shard_box(shape, mesh_shape, coordinate, placements)
            assert box is not None
            items.append(_item(fqn, shape, dtype, box[1], box[0], WriteItemType.SHARD))
            lay[fqn] = rule_plan.TensorLayout("mesh", mesh_shape, spec, coordinate)
        items.append(WriteItem(index=MetadataIndex("epoch"), type=WriteItemType.BYTE_IO))
        mappings = {fqn: (fqn,) for fqn, *_ in tensors} | {"epoch": ("epoch",)}
        plans.append(SavePlan(items, planner_data=_LocalPlannerData(mappings, {"epoch": "d"}, {"epoch": 4})))
        layouts.append(lay)
    return plans, layouts


def full_path(plans: list[SavePlan], small_to: int | None) -> tuple[list[SavePlan], Any]:
    planner = SavePlanner(small_replicated_to=small_to)
    planner.set_up_planner({}, None, True)
    return planner.create_global_plan(plans)


def rules_path(
    plans: list[SavePlan], layouts: list[dict[str, Any]], small_to: int | None
) -> tuple[list[SavePlan], Any] | None:
    summaries, tables = zip(*(rule_plan.summarize(p, lay) for p, lay in zip(plans, layouts, strict=True)), strict=True)
    ruled = rule_plan.plan_from_rules(list(summaries), tables[0], small_to=small_to)
    if ruled is None:
        return None
    answer = rule_plan.decode_winners(rule_plan.encode_winners(ruled.winners))  # as the ranks get it
    assert answer == ruled.winners
    finals = [rule_plan.derive_plan(p, answer, r, {}) for r, p in enumerate(plans)]
    return finals, ruled.metadata


def assert_same_as_full_path(mesh_shape: tuple[int, ...], tensors: list[Tensor], **kwargs: Any) -> None:
    assert_same_plans(*simulate(mesh_shape, tensors, **kwargs))


def assert_same_plans(plans: list[SavePlan], layouts: list[dict[str, Any]]) -> None:
    for small_to in (0, None):
        full, full_md = full_path(plans, small_to)
        ruled = rules_path(plans, layouts, small_to)
        assert ruled is not None, "a regular layout fell back"
        finals, md = ruled
        for rank, (a, b) in enumerate(zip(full, finals, strict=True)):
            assert a.items == b.items, f"rank {rank} keeps other items"
        assert tensors_of(md) == tensors_of(full_md)
        assert md.planner_data == full_md.planner_data  # the manifest writes the paths sorted
        assert set(md.state_dict_metadata) == set(full_md.state_dict_metadata)


F32, BF16 = torch.float32, torch.bfloat16
MODEL: list[Tensor] = [
    ("w", (8, 4), F32, (0,)),
    ("uneven", (5, 3), F32, (0,)),  # torch.chunk: 2, 2, 1, 0 rows over 4
    ("empty", (2, 3), BF16, (0,)),  # two ranks hold an empty box each
    ("cols", (3, 6), F32, (1,)),
    ("step", (), F32, None),  # replicated small tensors
    ("bias", (4,), F32, None),
    ("big", (200, 200), F32, None),  # a replicated tensor over SMALL_REPLICATED_BYTES
    ("zero_rows", (0, 4), F32, (0,)),
]


@pytest.mark.parametrize(
    "mesh_shape, specs",
    [
        ((4,), [(0,), (0,), (0,), (1,), None, None, None, (0,)]),  # FSDP Shard(0) (and Shard(1))
        ((2, 2), [(None, 0), (None, 0), (None, 0), (None, 1), None, None, None, (None, 0)]),  # HSDP
        ((2, 2), [(0, 1), (1, 0), (0, None), (None, 1), None, None, None, (1, 0)]),  # TP + FSDP
        ((2, 2), [(0, 0), (1, 0), (0, None), (1, 0), None, None, None, (1, 0)]),  # w: a dimension sharded twice
        ((2, 2), [(None, None), (0, None), (None, 0), (1, None), None, None, None, (0, 1)]),
        ((3,), [(0,), (0,), (0,), (1,), None, None, None, (0,)]),
        ((1,), [(0,), (0,), (0,), (1,), None, None, None, (0,)]),
        ((2, 3), [(1, 0), (None, 0), (0, None), (None, 1), None, None, None, (0, 0)]),
    ],
)
def test_the_plan_from_rules_is_the_full_paths(mesh_shape, specs):
    tensors = [(fqn, shape, dtype, spec) for (fqn, shape, dtype, _), spec in zip(MODEL, specs, strict=True)]
    assert_same_as_full_path(mesh_shape, tensors)


def test_the_same_plan_whatever_the_ranks_order_on_the_mesh():
    tensors = [("a", (7, 5), F32, (None, 0)), ("b", (3,), F32, (0, None)), ("s", (), F32, None)]
    assert_same_as_full_path((2, 3), tensors, order=[5, 0, 3, 1, 4, 2])


def test_many_replicated_tensors_are_placed_as_the_full_path_places_them():
    """The LPT over replicated tensors of many sizes, with the small ones on the coordinator."""
    tensors: list[Tensor] = [(f"r{i}", (i * 37 % 91 + 1, 300), F32, None) for i in range(40)]
    tensors += [(f"s{i}", (i,), F32, None) for i in range(20)]
    tensors += [(f"h{i}", (9 + i, 2), F32, (None, 0)) for i in range(10)]
    assert_same_as_full_path((3, 2), tensors)


def irregular(plans: list[SavePlan], layouts: list[dict[str, Any]]) -> None:
    assert rules_path(plans, layouts, 0) is None


def _with_item(plan: SavePlan, index: int, item: WriteItem) -> SavePlan:
    items = list(plan.items)
    items[index] = item
    return dataclasses.replace(plan, items=items)


def test_a_box_that_is_not_its_cell_falls_back():
    plans, layouts = simulate((2,), [("w", (6, 2), F32, (0,))])
    plans[1] = _with_item(plans[1], 0, _item("w", (6, 2), F32, (2, 0), (4, 2), WriteItemType.SHARD))
    summary, _ = rule_plan.summarize(plans[1], layouts[1])
    assert isinstance(summary, rule_plan.Irregular) and "'w'" in summary.reason
    irregular(plans, layouts)


def test_a_dimension_sharded_twice_unevenly_falls_back():
    """Shard(0) on both mesh dimensions: chunks of chunks, which are a torch.chunk grid only
    when the first split is even (6 rows over 2 x 2: 2, 1 | 2, 1, not 2, 2, 2, 0)."""
    plans, layouts = simulate((2, 2), [("w", (6, 2), F32, (0, 0))])
    assert isinstance(rule_plan.summarize(plans[1], layouts[1])[0], rule_plan.Irregular)
    irregular(plans, layouts)


def test_a_plain_tensor_held_in_part_falls_back():
    plans, layouts = simulate((2,), [("w", (6, 2), F32, None)])
    plans[0] = _with_item(plans[0], 0, _item("w", (6, 2), F32, (0, 0), (3, 2), WriteItemType.SHARD))
    irregular(plans, layouts)


def test_a_position_held_twice_or_missing_falls_back():
    plans, layouts = simulate((4,), [("w", (8, 2), F32, (0,))])
    # rank 3 claims rank 2's coordinate (and its box): cell 3 is missing, cell 2 held twice
    plans[3] = plans[2]
    layouts[3] = layouts[2]
    irregular(plans, layouts)


def test_a_mesh_smaller_than_the_world_falls_back():
    plans, layouts = simulate((2,), [("w", (8, 2), F32, (0,))])
    irregular(plans + plans, layouts + layouts)  # 4 ranks, a 2-rank mesh


def test_disagreeing_dtype_or_shape_falls_back():
    base = [("w", (8, 2), F32, (0,)), ("s", (), F32, None)]
    for other in (
        [("w", (8, 2), BF16, (0,)), ("s", (), F32, None)],
        [("w", (8, 2), F32, (0,)), ("s", (1,), F32, None)],
        [("w", (8, 2), F32, (0,)), ("s", (), BF16, None)],
        [("w", (8, 3), F32, (0,)), ("s", (), F32, None)],
        [("s", (), F32, None)],  # a DTensor missing on a rank
    ):
        plans, layouts = simulate((2,), base)
        plans2, layouts2 = simulate((2,), other)
        irregular([plans[0], plans2[1]], [layouts[0], layouts2[1]])


def test_plain_tensors_on_some_ranks_only_are_placed_as_the_full_path_places_them():
    base = [("w", (8, 2), F32, (0,)), ("s", (), F32, None)]
    for other in ([("w", (8, 2), F32, (0,)), ("t", (), F32, None)], [("w", (8, 2), F32, (0,))]):
        plans, layouts = simulate((2,), base)
        plans2, layouts2 = simulate((2,), other)
        assert_same_plans([plans[0], plans2[1]], [layouts[0], layouts2[1]])


def test_a_key_without_a_layout_is_irregular():
    """A staged shard or a placement other than Shard/Replicate (layouts_of leaves it out)."""
    plans, layouts = simulate((2,), [("w", (8, 2), F32, (0,))])
    summary, _ = rule_plan.summarize(plans[0], {})
    assert isinstance(summary, rule_plan.Irregular)
    irregular(plans, [{}, layouts[1]])


def test_the_summary_grows_with_groups_not_tensors():
    tensors: list[Tensor] = [(f"w{i}", (64, 8), F32, (0,)) for i in range(500)]
    tensors += [(f"s{i}", (), F32, None) for i in range(500)]
    plans, layouts = simulate((4,), tensors)
    summary, _ = rule_plan.summarize(plans[2], layouts[2])
    assert isinstance(summary, rule_plan.RuleSummary)
    assert summary.coordinates == ((2,),) and summary.single_bytes == 500 * 16 * 8 * 4


def test_assign_replicated_is_balance_replicateds_placement():
    """The full path's dedup goes through assign_replicated: the winners it returns are the
    ranks that keep each shared item."""
    plans, _ = simulate((3,), [("a", (5,), F32, None), ("b", (40,), F32, None), ("c", (7, 2), F32, (0,))])
    kept = placement.balance_replicated(plans)
    owners = {(it.index.fqn, tuple(it.index.offset or ())): r for r, p in enumerate(kept) for it in p.items}
    # c's rows are 3, 3, 1 (24, 24, 8 bytes): b (160 bytes) to the least loaded, rank 2, then a to rank 0
    assert owners[("b", (0,))] == 2 and owners[("a", (0,))] == 0
    assert sum(len(p.items) for p in kept) == 2 + 3 + 1  # a, b once; c's three cells; the value once


def _with_own_keys(plans: list[SavePlan], layouts: list[dict[str, Any]], ranks: list[int]) -> None:
    """Give each rank in ``ranks`` its own plain tensor and value (TrainState's per_rank.rank{r})."""
    for r in ranks:
        rng = _item(f"per_rank.rank{r}.rng", (r + 3,), torch.uint8, (0,), (r + 3,), WriteItemType.TENSOR)
        pos = WriteItem(index=MetadataIndex(f"per_rank.rank{r}.pos"), type=WriteItemType.BYTE_IO)
        data = plans[r].planner_data
        mappings = dict(data.mappings) | {f"per_rank.rank{r}.rng": ("per_rank", f"rank{r}", "rng")}
        mappings[f"per_rank.rank{r}.pos"] = ("per_rank", f"rank{r}", "pos")
        digests = dict(data.value_digests) | {f"per_rank.rank{r}.pos": str(r)}
        sizes = dict(data.value_bytes) | {f"per_rank.rank{r}.pos": 1}
        plans[r] = SavePlan([*plans[r].items, rng, pos], planner_data=_LocalPlannerData(mappings, digests, sizes))
        layouts[r][f"per_rank.rank{r}.rng"] = None


def test_per_rank_keys_are_placed_from_every_ranks_rows():
    """Ranks holding different plain tensors and values (per-rank keys): still a plan from
    rules, the same as the full path's, the other ranks' keys in the metadata."""
    plans, layouts = simulate((2, 2), [("w", (5, 4), F32, (None, 0)), ("s", (), F32, None), ("b", (3,), F32, None)])
    _with_own_keys(plans, layouts, [0, 1, 2, 3])
    assert_same_plans(plans, layouts)
    plans, layouts = simulate((3,), [("w", (5, 4), F32, (0,)), ("s", (), F32, None)])
    _with_own_keys(plans, layouts, [2])  # only the last rank has keys of its own
    assert_same_plans(plans, layouts)
    ruled = rules_path(plans, layouts, 0)
    assert ruled is not None and ruled[1].planner_data["per_rank.rank2.rng"] == ("per_rank", "rank2", "rng")


def test_a_per_rank_key_whose_shape_differs_across_ranks_falls_back():
    plans, layouts = simulate((2,), [("w", (4, 4), F32, (0,))])
    _with_own_keys(plans, layouts, [0, 1])
    items = list(plans[1].items)
    items[-2] = _item("per_rank.rank0.rng", (9,), torch.uint8, (0,), (9,), WriteItemType.TENSOR)  # rank 0's key
    plans[1] = dataclasses.replace(plans[1], items=items)
    layouts[1]["per_rank.rank0.rng"] = None
    irregular(plans, layouts)
