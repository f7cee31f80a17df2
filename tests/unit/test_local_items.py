"""The DTensor write items computed in engine/local_items.py equal DCP's (issue #18)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from shardckpt.engine.local_items import shard_box
from tests.support.distributed import run_ranks


def _chunked_box(
    shape: tuple[int, ...], mesh_shape: tuple[int, ...], coordinate: tuple[int, ...], placements: list[Any]
) -> tuple[list[int], list[int]]:
    """The oracle: split the global indices of each dimension with torch.chunk, mesh
    dimension by mesh dimension; a rank past the last chunk holds nothing, and DCP puts an
    empty box at the end of its dimension."""
    indices = [torch.arange(n) for n in shape]
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Shard):
            pieces = torch.chunk(indices[p.dim], mesh_shape[mesh_dim]) if len(indices[p.dim]) else ()
            c = coordinate[mesh_dim]
            indices[p.dim] = pieces[c] if c < len(pieces) else indices[p.dim][:0]
    sizes = [len(ix) for ix in indices]
    offsets = [int(ix[0]) if len(ix) else n for ix, n in zip(indices, shape, strict=True)]
    return sizes, offsets


LAYOUTS_1D = [[Shard(0)], [Shard(1)], [Replicate()]]
LAYOUTS_2D = [
    [Shard(0), Shard(1)],
    [Shard(1), Shard(0)],
    [Shard(0), Shard(0)],
    [Shard(1), Shard(1)],
    [Replicate(), Shard(0)],
    [Shard(1), Replicate()],
    [Replicate(), Replicate()],
]


@pytest.mark.parametrize("mesh_shape", [(1,), (2,), (3,), (4,), (5,), (2, 2), (3, 2), (2, 3), (4, 3)])
def test_shard_box_splits_like_torch_chunk_with_uneven_and_empty_shards(mesh_shape: tuple[int, ...]) -> None:
    layouts = LAYOUTS_1D if len(mesh_shape) == 1 else LAYOUTS_2D
    shapes = [(n, m) for n in (0, 1, 2, 3, 5, 7, 8, 13) for m in (1, 3, 6)]
    checked = empty = 0
    for placements, shape in itertools.product(layouts, shapes):
        for coordinate in itertools.product(*(range(n) for n in mesh_shape)):
            got = shard_box(shape, mesh_shape, coordinate, placements)
            assert got == _chunked_box(shape, mesh_shape, coordinate, placements), (shape, placements, coordinate)
            checked += 1
            empty += 0 in got[0]  # type: ignore[index]
    assert checked >= len(layouts) * len(shapes) and empty > 0  # the layouts include empty shards


def test_shard_box_leaves_other_placements_to_dcp() -> None:
    assert shard_box((4, 4), (2,), (0,), [Partial()]) is None
    assert shard_box((4, 4), (2,), (0,), [Shard(2)]) is None  # DCP raises its own error for it


def _compare_with_dcp(rank: int, world: int) -> None:
    from torch.distributed.checkpoint.default_planner import create_default_local_save_plan
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, distribute_tensor

    from shardckpt.engine.local_items import local_shards, local_write_items

    flat: dict[str, Any] = {}
    meshes = {"1d": init_device_mesh("cpu", (world,)), "2d": init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))}
    sub = meshes["2d"]["b"]  # a 1-D submesh: each rank is on one of two of them
    g = torch.Generator().manual_seed(0)
    shapes = [(10, 3), (2, 5), (1, 7), (0, 4), (13,), (8, 8)]
    for name, mesh in [*meshes.items(), ("sub", sub)]:
        layouts = LAYOUTS_2D if mesh.ndim == 2 else LAYOUTS_1D
        for i, (placements, shape) in enumerate(itertools.product(layouts, shapes)):
            if any(isinstance(p, Shard) and p.dim >= len(shape) for p in placements):
                continue
            full = torch.rand(shape, generator=g)
            flat[f"{name}.{i}"] = distribute_tensor(full, mesh, placements)
    flat["bf16"] = distribute_tensor(torch.ones(6, 2, dtype=torch.bfloat16), meshes["1d"], [Shard(0)])
    flat["grad"] = distribute_tensor(torch.ones(5, 2, requires_grad=True), meshes["1d"], [Shard(0)])
    pair = DeviceMesh("cpu", [0, 1])  # ranks 2 and 3 are not on it: DCP plans no item there
    flat["off"] = distribute_tensor(torch.ones(4, 2), pair, [Shard(0)])
    flat["param"] = torch.nn.Parameter(distribute_tensor(torch.ones(6, 3), meshes["2d"], [Shard(0), Shard(1)]))
    flat["plain"] = torch.arange(3)
    flat["value"] = {"a": 1}
    flat["step"] = 7
    calls = []
    original = DTensor.__create_write_items__

    def counting(self: Any, fqn: str, obj: Any) -> Any:
        calls.append(fqn)
        return original(self, fqn, obj)

    DTensor.__create_write_items__ = counting  # type: ignore[method-assign]
    try:
        for coordinator, grad in itertools.product((True, False), (True, False)):
            with torch.set_grad_enabled(grad):  # DCP records requires_grad as to_local() gives it
                ours = local_write_items(flat, local_shards(flat), coordinator)
                assert not calls, f"DCP planned {calls[:3]}: the fast path was not taken"
                theirs = create_default_local_save_plan(flat, coordinator).items
            assert len(theirs) >= len(flat) - 3 and ours == theirs
            assert any(it.index.fqn == "off" for it in ours) == (rank < 2)
            requires = {it.index.fqn: it.tensor_data.properties.requires_grad for it in ours if it.tensor_data}
            assert (requires["grad"] or not grad) and not requires["bf16"]
            calls.clear()
        _check_resolved(flat)
        partial = {"p": DTensor.from_local(torch.ones(2), meshes["1d"], [Partial()])}
        with pytest.raises(Exception) as ours_error:
            local_write_items(partial, local_shards(partial), True)
        assert calls == ["p"]  # handed to DCP, which refuses it as it would anyway
        with pytest.raises(type(ours_error.value)):
            create_default_local_save_plan(partial, True)
    finally:
        DTensor.__create_write_items__ = original  # type: ignore[method-assign]


def _check_resolved(flat: dict[str, Any]) -> None:
    """Our planner hands the writer each DTensor's local tensor, as DCP's would, without
    asking the DTensor again."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.tensor import DTensor

    from shardckpt.engine.planner import SavePlanner

    ours, theirs = SavePlanner(), DefaultSavePlanner()
    for planner in (ours, theirs):
        planner.set_up_planner(flat, None, True)
    items = [it for it in ours.create_local_plan().items if it.tensor_data is not None]
    asked, original = [], DTensor.__get_tensor_shard__
    DTensor.__get_tensor_shard__ = lambda self, index: asked.append(index) or original(self, index)  # type: ignore[method-assign]
    try:
        resolved = [ours.resolve_data(it) for it in items]
        assert not asked, f"asked DTensors for {asked[:3]}"
        expected = [theirs.resolve_data(it) for it in items]
    finally:
        DTensor.__get_tensor_shard__ = original  # type: ignore[method-assign]
    assert len(asked) >= len(items) - 1  # every DTensor (all but "plain") was asked by DCP's
    for it, got, want in zip(items, resolved, expected, strict=True):
        assert got.shape == want.shape and torch.equal(got, want), it.index


def test_local_write_items_equal_dcps_on_1d_2d_and_sub_meshes() -> None:
    run_ranks(_compare_with_dcp, 4)


def _cache_follows_layout(rank: int, world: int, path: str) -> None:
    from torch.distributed.checkpoint.default_planner import create_default_local_save_plan
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    import shardckpt
    from shardckpt.engine.local_items import ItemCache, local_shards, local_write_items

    mesh = init_device_mesh("cpu", (world,))

    def state(n: int, placement: Any, dtype: torch.dtype) -> dict[str, Any]:
        return {
            "a": distribute_tensor(torch.arange(n * 3, dtype=dtype).reshape(n, 3), mesh, [placement]),
            "b": distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]),
        }

    cache = ItemCache()
    first = state(5, Shard(0), torch.float32)
    items = local_write_items(first, local_shards(first), True, cache)
    again = local_write_items(first, local_shards(first), True, cache)
    assert all(x is y for x, y in zip(items, again, strict=True)) and len(cache) == 2  # reused
    for changed in (
        state(7, Shard(0), torch.float32),
        state(5, Replicate(), torch.float32),
        state(5, Shard(0), torch.int64),
    ):
        ours = local_write_items(changed, local_shards(changed), True, cache)
        assert ours == create_default_local_save_plan(changed, True).items  # recomputed where it changed
        assert ours[0] is not items[0] and ours[1] is items[1]

    # Through one Checkpointer: a save after the layout changed writes the new layout.
    with shardckpt.Checkpointer() as ckpt:
        ckpt.save(state(5, Shard(0), torch.float32), f"{path}/one")
        saved = state(7, Replicate(), torch.int64)
        ckpt.save(saved, f"{path}/two")
        assert len(ckpt._items) == 2
    assert len(ckpt._items) == 0  # close() empties it
    target = state(7, Replicate(), torch.int64)
    for t in target.values():
        t.to_local().zero_()
    shardckpt.load(target, f"{path}/two")
    assert all(torch.equal(target[k].full_tensor(), saved[k].full_tensor()) for k in saved)


def test_the_item_cache_reuses_unchanged_items_and_recomputes_changed_ones(tmp_path: Any) -> None:
    run_ranks(_cache_follows_layout, 2, str(tmp_path))
