"""The read items computed in engine/load_items.py equal DCP's (issue #18)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_local_load_plan
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.tensor import Replicate, Shard

from shardckpt.engine.local_items import shard_box
from shardckpt.engine.planner import LoadPlanner
from shardckpt.engine.state import flatten
from tests.support.distributed import run_ranks

# How a tensor was saved: (mesh shape, placements); every rank's box, duplicates once.
SAVED = {
    "whole": ((1,), [Replicate()]),
    "rows4": ((4,), [Shard(0)]),
    "cols3": ((3,), [Shard(1)]),
    "grid": ((2, 2), [Shard(0), Shard(1)]),
    "rows2x2": ((2, 2), [Shard(0), Shard(0)]),
}


def _saved_chunks(shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: list[Any]) -> list[Any]:
    boxes: dict[tuple[Any, ...], ChunkStorageMetadata] = {}
    for coordinate in itertools.product(*(range(n) for n in mesh_shape)):
        sizes, offsets = shard_box(shape, mesh_shape, coordinate, placements)  # type: ignore[misc]
        boxes.setdefault(
            (tuple(offsets), tuple(sizes)),
            ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
        )
    return list(boxes.values())


def _state_and_metadata(world: int) -> tuple[dict[str, Any], Metadata]:
    """Targets of many layouts, each against checkpoints of several layouts."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    meshes = {
        "1d": init_device_mesh("cpu", (world,)),
        "2d": init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b")),
        "three": DeviceMesh("cpu", [0, 1, 2]),  # resharding 4 -> 3; rank 3 is not on it
    }
    meshes["sub"] = meshes["2d"]["b"]
    layouts = {1: [[Shard(0)], [Shard(1)], [Replicate()]], 2: [[Shard(0), Shard(1)], [Shard(1), Shard(0)]]}
    layouts[2] += [[Replicate(), Shard(0)], [Shard(0), Shard(0)]]
    flat: dict[str, Any] = {}
    sd: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    for shape in [(10, 3), (2, 5), (0, 4), (13, 7), (8, 8)]:
        for (name, mesh), (saved, (s_mesh, s_placements)) in itertools.product(meshes.items(), SAVED.items()):
            for i, placements in enumerate(layouts[mesh.ndim]):
                key = f"{name}.{i}.{shape}.{saved}"
                flat[key] = distribute_tensor(torch.rand(shape, generator=g), mesh, placements)
                chunks = _saved_chunks(shape, s_mesh, s_placements)
                sd[key] = TensorStorageMetadata(TensorProperties(torch.float32), torch.Size(shape), chunks)
        flat[f"plain.{shape}"] = torch.rand(shape, generator=g)
        sd[f"plain.{shape}"] = TensorStorageMetadata(
            TensorProperties(torch.float32), torch.Size(shape), _saved_chunks(shape, (4,), [Shard(0)])
        )
    # A bf16 target of an fp32 checkpoint (allow_dtype_cast), a Parameter, a 0-d tensor,
    # a DTensor Parameter, a value (DCP plans it), a key the checkpoint lacks.
    flat["bf16"] = distribute_tensor(torch.ones(6, 2, dtype=torch.bfloat16), meshes["1d"], [Shard(0)])
    sd["bf16"] = TensorStorageMetadata(
        TensorProperties(torch.float32), torch.Size((6, 2)), _saved_chunks((6, 2), (2,), [Shard(0)])
    )
    flat["param"] = torch.nn.Parameter(torch.ones(3, 2))
    sd["param"] = TensorStorageMetadata(
        TensorProperties(torch.float32), torch.Size((3, 2)), _saved_chunks((3, 2), (1,), [Replicate()])
    )
    flat["scalar"] = torch.tensor(3.0)
    sd["scalar"] = TensorStorageMetadata(
        TensorProperties(torch.float32), torch.Size(()), _saved_chunks((), (1,), [Replicate()])
    )
    flat["dparam"] = torch.nn.Parameter(distribute_tensor(torch.ones(6, 3), meshes["2d"], [Shard(0), Shard(1)]))
    sd["dparam"] = TensorStorageMetadata(
        TensorProperties(torch.float32), torch.Size((6, 3)), _saved_chunks((6, 3), (4,), [Shard(0)])
    )
    flat["step"] = 7
    sd["step"] = BytesStorageMetadata()
    flat["new"] = torch.zeros(2)
    return flat, Metadata(state_dict_metadata=sd)


@contextlib.contextmanager
def dcp_boxes_asked() -> Iterator[list[Any]]:
    """A list that gets every DTensor DCP is asked to list the boxes of
    (``__create_chunk_list__``) inside the block: our planner's fast path asks for none."""
    from torch.distributed.tensor import DTensor

    asked: list[Any] = []
    original = DTensor.__create_chunk_list__

    def counting(self: Any) -> Any:
        asked.append(self)
        return original(self)

    DTensor.__create_chunk_list__ = counting  # type: ignore[method-assign]
    try:
        yield asked
    finally:
        DTensor.__create_chunk_list__ = original  # type: ignore[method-assign]


def _compare_with_dcp(rank: int, world: int) -> None:

    from shardckpt.engine.load_items import local_read_items

    flat, metadata = _state_and_metadata(world)
    with dcp_boxes_asked() as asked:
        targets: dict[str, torch.Tensor] = {}
        ours = local_read_items(flat, metadata, targets)
        assert not asked, f"DCP was asked for {len(asked)} boxes: the fast path was not taken"
        theirs = create_default_local_load_plan(flat, metadata, False).items
    assert len(asked) > 100 and len(theirs) > 300  # DCP's own path asked every DTensor
    assert ours == theirs
    hints = [(i.dest_index.index, i.storage_index.index) for i in ours]
    assert hints == [(i.dest_index.index, i.storage_index.index) for i in theirs]
    # Resharded reads (a box over several saved chunks) and same-layout ones both occur.
    assert any(i.lengths != targets[i.dest_index.fqn].shape for i in ours if i.dest_index.fqn in targets)
    assert sum(i.lengths == targets[i.dest_index.fqn].shape for i in ours if i.dest_index.fqn in targets) > 50
    assert any(k.startswith("three.") for k in targets) == (rank < 3)  # off the 3-rank mesh: nothing to read
    _check_resolved(flat, metadata, ours)


def _check_resolved(flat: dict[str, Any], metadata: Metadata, items: list[Any]) -> None:
    """Our planner resolves each item to the same part of the same tensor as DCP's."""
    mine, default = LoadPlanner(allow_partial_load=True), DefaultLoadPlanner(allow_partial_load=True)
    for planner in (mine, default):
        planner.set_up_planner(dict(flat), metadata, False)
    assert mine.create_local_plan().items == items
    for item in items:
        if item.type.name != "TENSOR":
            continue
        got, want = mine.resolve_tensor(item), default.resolve_tensor(item)
        strides = [(a, b) for a, b, n in zip(got.stride(), want.stride(), got.shape, strict=True) if n > 1]
        assert got.shape == want.shape and all(a == b for a, b in strides), item  # a size-1 dim's stride is moot
        assert got.data_ptr() == want.data_ptr(), item


def test_read_items_equal_dcps_over_layouts_reshardings_and_meshes() -> None:
    run_ranks(_compare_with_dcp, 4)


def test_the_planner_reuses_the_callers_flattening_only_where_dcp_would_change_nothing_else(monkeypatch: Any) -> None:
    state = {
        "model": {"w": torch.ones(2), "layers": [torch.zeros(3), {"b": torch.ones(1)}]},
        "optim": {"state": {0: {"step": 3, "exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "empty": {},
        "epoch": 4,
    }
    default = DefaultLoadPlanner(allow_partial_load=True)
    default.set_up_planner(state)
    given = flatten(state)
    mine = LoadPlanner(allow_partial_load=True, flattened=given)
    mine.set_up_planner(state)
    assert mine.state_dict is given[0] and mine.state_dict == default.state_dict
    assert mine.mappings == default.mappings and mine.original_state_dict is state
    # A meta tensor (DCP's set-up materializes it) or a tensor subclass: DCP sets up.
    calls: list[Any] = []
    monkeypatch.setattr(DefaultLoadPlanner, "set_up_planner", lambda self, sd, *args: calls.append(sd))
    LoadPlanner(allow_partial_load=True, flattened=given).set_up_planner(state)
    assert calls == []
    for odd in ({"m": {"x": torch.empty(2, device="meta")}}, {"s": torch.ones(1).as_subclass(_Sub)}):
        LoadPlanner(allow_partial_load=True, flattened=flatten(odd)).set_up_planner(odd)
        assert calls[-1] is odd


class _Sub(torch.Tensor):
    pass
