"""``shardckpt.dcp`` on gloo ranks: DCP's scenarios through the drop-in and through shardckpt.

One 4-rank launch saves the same state (1-D and 2-D meshes, uneven and empty shards,
a replicated tensor, values, a Stateful) five ways: ``dcp.save`` through
``StorageWriter`` with DCP's DefaultSavePlanner and with ours, ``dcp.async_save``,
``shardckpt.save``, and an overwrite of each kind; it also checks that one rank's
unstorable value fails every rank and leaves nothing. One 3-rank launch then loads
every checkpoint three ways (``dcp.load`` through ``StorageReader`` with
DefaultLoadPlanner and with ours, ``shardckpt.load``) into other layouts, bitwise, and
loads a subset of the keys.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from distributed import run_ranks
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import shardckpt
from shardckpt.dcp import StorageReader, StorageWriter
from shardckpt.engine.planner import LoadPlanner, SavePlanner

# Ranks fork from a server that imported torch's DCP and shardckpt once.
FAST_START: dict = {
    "start_method": "forkserver",
    "preload": ["torch.distributed.checkpoint", "shardckpt.dcp", __name__],
}
SAVES = ("dcp_default", "dcp_ours", "dcp_async", "native", "over_dcp", "over_native")


def reference() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(13, 7, generator=g),  # 4 ranks: rows 4, 4, 4, 1
        "tiny": torch.randn(3, 5, generator=g).to(torch.bfloat16),  # 4 ranks: one empty shard
        "grid": torch.randint(0, 1000, (8, 6), generator=g),  # on a 2x2 mesh
        "rep": torch.randn(5, generator=g),  # a plain tensor on every rank
        "repd": torch.randn(7, 2, generator=g),  # a Replicate() DTensor, loaded as Shard(0)
        "counter": torch.arange(4),
    }


class Counter:
    """A Stateful, as DCP's tests use them: state_dict() out, load_state_dict() in."""

    def __init__(self, n: torch.Tensor, label: str) -> None:
        self.n, self.label = n, label

    def state_dict(self) -> dict:
        return {"n": self.n, "label": self.label}

    def load_state_dict(self, sd: dict) -> None:
        self.n.copy_(sd["n"])
        self.label = sd["label"]


def saved_state(world: int, step: int = 42) -> dict:
    ref = reference()
    mesh1 = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (2, world // 2))
    return {
        "model": {
            "w": distribute_tensor(ref["w"], mesh1, [Shard(0)]),
            "tiny": distribute_tensor(ref["tiny"], mesh1, [Shard(0)]),
            "grid": distribute_tensor(ref["grid"], mesh2, [Shard(0), Shard(1)]),
            "rep": ref["rep"].clone(),
            "repd": distribute_tensor(ref["repd"], mesh1, [Replicate()]),
        },
        "counter": Counter(ref["counter"].clone(), "seen"),
        "step": step,
        "cfg": {"name": "run-a", "dims": [1, (2, 3)], "lr": 3e-4, "none": None},
    }


class DiskGoneOnRank1(DefaultSavePlanner):
    """A fault injected on one rank: its tensors cannot be read for writing."""

    def resolve_data(self, write_item):
        if write_item.tensor_data is not None:
            raise OSError("disk gone")
        return super().resolve_data(write_item)


def _save_all(rank: int, world: int, root: str) -> None:
    p = {name: os.path.join(root, name) for name in SAVES}
    dcp.save(saved_state(world), storage_writer=StorageWriter(p["dcp_default"]), planner=DefaultSavePlanner())
    dcp.save(saved_state(world), storage_writer=StorageWriter(p["dcp_ours"]), planner=SavePlanner())
    dcp.async_save(saved_state(world), storage_writer=StorageWriter(p["dcp_async"])).result(timeout=240)
    shardckpt.save(saved_state(world), p["native"])
    # Overwrite: refused on every rank without the option, then replaced with it.
    dcp.save(saved_state(world, step=41), checkpoint_id=p["over_dcp"], storage_writer=StorageWriter())
    with pytest.raises(CheckpointException, match="committed checkpoint is already there"):
        dcp.save(saved_state(world), storage_writer=StorageWriter(p["over_dcp"]))
    dcp.save(saved_state(world), storage_writer=StorageWriter(p["over_dcp"], overwrite=True))
    # Options that shape the checkpoint must agree: one rank's overwrite=True is refused on every rank.
    with pytest.raises(CheckpointException, match="different save options: overwrite"):
        dcp.save(saved_state(world, step=40), storage_writer=StorageWriter(p["over_dcp"], overwrite=rank == 0))
    shardckpt.save(saved_state(world, step=41), p["over_native"])
    with pytest.raises(shardckpt.CheckpointExistsError):
        shardckpt.save(saved_state(world), p["over_native"])
    shardckpt.save(saved_state(world), p["over_native"], overwrite=True)
    # One rank's value JSON cannot hold: every rank fails, before any tensor byte.
    bad = saved_state(world) | ({"extra": {"obj": object()}} if rank == 2 else {})
    with pytest.raises(CheckpointException) as info:
        dcp.save(bad, storage_writer=StorageWriter(os.path.join(root, "bad")))
    assert "'extra.obj'" in str(info.value) and "rank 2" in str(info.value), str(info.value)
    dist.barrier()
    if rank == 0:
        left = os.path.join(root, "bad")
        assert not os.path.exists(left) or os.listdir(left) in ([], ["data"]), os.listdir(left)
        assert not os.path.exists(os.path.join(left, "data")) or os.listdir(os.path.join(left, "data")) == []
    # One rank's writes fail after the others wrote their files: all fail, nothing is left.
    broken = os.path.join(root, "broken")
    planner = DiskGoneOnRank1() if rank == 1 else DefaultSavePlanner()
    with pytest.raises(CheckpointException, match="disk gone"):
        dcp.save(saved_state(world), storage_writer=StorageWriter(broken), planner=planner)
    dist.barrier()
    if rank == 0:
        assert not os.path.exists(broken) or os.listdir(broken) in ([], ["data"]), os.listdir(broken)
        assert not os.path.exists(os.path.join(broken, "data")) or os.listdir(os.path.join(broken, "data")) == []
    # A save on a subgroup: the writer must be told the group, else refused before writing.
    pair = dist.new_group([0, 1], backend="gloo")
    if rank < 2:
        sub = os.path.join(root, "pair")
        with pytest.raises(CheckpointException, match="StorageWriter's process_group has 4"):
            dcp.save({f"r{rank}": torch.ones(2)}, storage_writer=StorageWriter(sub), process_group=pair)
        dcp.save({f"r{rank}": torch.ones(2)}, storage_writer=StorageWriter(sub, process_group=pair), process_group=pair)
        assert rank != 0 or set(shardckpt.read_manifest(sub).tensors) == {"r0", "r1"}


def target_state(world: int) -> dict:
    mesh1 = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (1, world))
    ref = reference()
    return {
        "model": {
            "w": distribute_tensor(torch.zeros_like(ref["w"]), mesh2, [Replicate(), Shard(0)]),  # 1-D -> 2-D
            "tiny": distribute_tensor(torch.zeros_like(ref["tiny"]), mesh1, [Shard(1)]),
            "grid": distribute_tensor(torch.zeros_like(ref["grid"]), mesh1, [Shard(1)]),  # 2-D -> 1-D
            "rep": torch.zeros(5),
            "repd": distribute_tensor(torch.zeros(7, 2), mesh1, [Shard(0)]),
        },
        "counter": Counter(torch.zeros(4, dtype=torch.long), ""),
        "step": 0,
        "cfg": {"name": "", "dims": [], "lr": 0.0, "none": 1},
    }


def check(target: dict) -> None:
    ref = reference()
    for k, v in target["model"].items():
        got = v.full_tensor() if hasattr(v, "full_tensor") else v
        assert got.dtype == ref[k].dtype and torch.equal(got, ref[k]), k  # bitwise
    assert torch.equal(target["counter"].n, ref["counter"]) and target["counter"].label == "seen"
    assert target["step"] == 42
    assert target["cfg"] == {"name": "run-a", "dims": [1, (2, 3)], "lr": 3e-4, "none": None}


LOADERS = {
    "dcp_default": lambda t, p: dcp.load(t, storage_reader=StorageReader(p), planner=DefaultLoadPlanner()),
    "dcp_ours": lambda t, p: dcp.load(
        t, storage_reader=StorageReader(p), planner=LoadPlanner(allow_partial_load=False)
    ),
    "native": lambda t, p: shardckpt.load(t, p),
}


def _load_all(rank: int, world: int, root: str) -> None:
    for name in SAVES:
        for how, load in LOADERS.items():
            target = target_state(world)
            load(target, os.path.join(root, name))
            try:
                check(target)
            except AssertionError as e:
                raise AssertionError(f"saved {name}, loaded {how}: {e}") from e
    # Partial loads: a subset of the keys.
    w = target_state(world)["model"]["w"]
    subset = {"model": {"w": w}, "step": 0}
    dcp.load(subset, checkpoint_id=os.path.join(root, "dcp_default"), storage_reader=StorageReader())
    assert torch.equal(subset["model"]["w"].full_tensor(), reference()["w"]) and subset["step"] == 42
    subset = {"model": {"grid": target_state(world)["model"]["grid"]}}
    result = shardckpt.load(subset, os.path.join(root, "dcp_ours"), strict=False)
    assert torch.equal(subset["model"]["grid"].full_tensor(), reference()["grid"])
    assert "step" in result.unexpected_keys


def test_dcp_scenarios_saved_on_4_loaded_on_3(tmp_path):
    root = str(tmp_path)
    run_ranks(_save_all, 4, root, **FAST_START)
    for name in SAVES:
        m = shardckpt.read_manifest(os.path.join(root, name))
        assert m.world_size == 4 and m.values["step"] == 42, name
        assert set(m.tensors) == {"model.w", "model.tiny", "model.grid", "model.rep", "model.repd", "counter.n"}, name
    run_ranks(_load_all, 3, root, **FAST_START)
