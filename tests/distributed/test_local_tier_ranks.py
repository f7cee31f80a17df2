"""The fast recovery tier on 4 gloo ranks as 2 simulated nodes (``SHARDCKPT_NODE_ID``), each
node with its own ``local_dir``: a lost node's shards come back from the partner copies,
bitwise; with a shard lost on every node, or another world size, the durable tier is used and
a log line says why.

One save run (module fixture: local steps 4 and 6, durable step 5) leaves its ranks without
``close()``, as a crashed job does, so the local steps stay; each case copies its ``local_dir``s
and restores with the run's own durable root (local steps are bound to it: a copy of the root
elsewhere would be another root)."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import shardckpt
from shardckpt.engine.collective import RankGroup
from shardckpt.errors import StorageError
from shardckpt.format import local_step
from shardckpt.manager.local_store import LocalStore
from shardckpt.manager.local_tier import LocalTier, LocalTierOptions


def full(step: int) -> torch.Tensor:
    return torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3) + step


def state(step: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    return {
        "model": {"w": distribute_tensor(full(step), mesh, [Shard(0)]), "b": torch.full((3,), float(step))},
        "extra": {"step": step},
    }


def blank(world: int) -> dict:
    s = state(0, world)
    s["model"]["w"].to_local().fill_(-1)
    s["model"]["b"].fill_(-1)
    s["extra"]["step"] = -1
    return s


def manager(base: str, rank: int, world: int, durable: str | None = None, **kw) -> shardckpt.CheckpointManager:
    node = rank * 2 // world  # two nodes: the lower half of the ranks, the upper half
    os.environ["SHARDCKPT_NODE_ID"] = f"node{node}"
    return shardckpt.CheckpointManager(
        durable or f"{base}/durable",
        local_dir=f"{base}/local{node}",
        local_interval_steps=2,
        save_interval_steps=5,
        replicas=1,
        **kw,
    )


def save_run(rank: int, world: int, base: str) -> None:
    mgr = manager(base, rank, world)
    for step in range(1, 7):
        mgr.save(step, state(step, world))
    mgr.wait()  # no close(): the job "crashes" with its local steps in place


def restore_run(rank: int, world: int, base: str, want_step: int, want_log: str, durable: str) -> None:
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("shardckpt").addHandler(handler)
    logging.getLogger("shardckpt").setLevel(logging.INFO)
    mgr = manager(base, rank, world, durable, takeover=True)
    target = blank(world)
    assert mgr.restore(target) == want_step, lines
    expected = state(want_step, world)
    assert torch.equal(target["model"]["w"].to_local(), expected["model"]["w"].to_local())
    assert torch.equal(target["model"]["b"], expected["model"]["b"])
    assert target["extra"]["step"] == want_step
    assert any(want_log in line for line in lines), lines
    mgr.close()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    base = str(tmp_path_factory.mktemp("local_tier"))
    run_ranks(save_run, 4, base)
    return base


def copy_of(saved: str, tmp_path) -> str:
    base = str(tmp_path / "run")
    for node in (0, 1):
        shutil.copytree(f"{saved}/local{node}", f"{base}/local{node}")
    return base


def steps_in(local: str) -> str:
    """The folder of the run's durable root in ``local``."""
    (root,) = [n for n in os.listdir(local) if local_step.parse_root_dir_name(n)]
    return f"{local}/{root}"


def test_replicas_live_on_the_other_node(saved):
    step6 = [sorted(os.listdir(f"{steps_in(f'{saved}/local{n}')}/step_0000000006")) for n in (0, 1)]
    pairs = ((0, 0), (1, 1), (2, 0), (3, 1))  # (whose shard, holder): own shards and node 1's replicas
    assert step6[0] == sorted([local_step.data_name(*p) for p in pairs] + [local_step.index_name(*p) for p in pairs])
    assert local_step.data_name(0, 2) in step6[1] and local_step.data_name(1, 3) in step6[1]
    assert sorted(os.listdir(steps_in(f"{saved}/local0"))) == ["step_0000000004", "step_0000000006"]  # keep_last=2
    indices = [
        f"{steps_in(f'{saved}/local{n}')}/step_0000000006/{local_step.index_name(r, r)}" for n, r in ((0, 0), (1, 3))
    ]
    save_ids = {local_step.parse_index(open(p, "rb").read(), where=p).save_id for p in indices}
    assert len(save_ids) == 1  # one save id, agreed by every rank


def test_node_loss_restores_from_partner_copies_bitwise(saved, tmp_path):
    base = copy_of(saved, tmp_path)
    shutil.rmtree(f"{base}/local0")  # node 0 died with its RAM disk
    run_ranks(restore_run, 4, base, 6, "restored step 6 from the local tier", f"{saved}/durable")


def test_both_copies_lost_falls_back_to_durable(saved, tmp_path):
    base = copy_of(saved, tmp_path)
    shutil.rmtree(f"{base}/local0")
    node1 = steps_in(f"{base}/local1")
    for step in ("step_0000000004", "step_0000000006"):  # node 1's replicas of rank 0
        for name in os.listdir(f"{node1}/{step}"):
            if name.startswith("shard_r00000_"):
                os.unlink(f"{node1}/{step}/{name}")
    run_ranks(restore_run, 4, base, 5, "no live copy of the shard of rank(s) [0]", f"{saved}/durable")


def test_other_world_size_falls_back_to_durable_with_a_log_line(saved, tmp_path):
    base = copy_of(saved, tmp_path)
    run_ranks(restore_run, 2, base, 5, "local steps were saved by [4] ranks; this job has 2", f"{saved}/durable")


TIER = "0123456789abcdef"  # a durable root's tier id, for tiers made without a manager


class ReplicaLostMidway(LocalStore):
    """Rank 1 receives rank 0's step 2, writes part of it and fails before the index;
    rank 0's own copy of step 3 fails on a full disk."""

    def commit(self, index: local_step.ShardIndex, image: memoryview) -> str:
        if index.step == 3 and index.holder == index.rank == 0:
            raise StorageError("rank 0: no space left on device")
        if index.step == 2 and index.holder != index.rank:
            path = os.path.join(self.step_dir(2), local_step.data_name(index.rank, index.holder))
            os.makedirs(self.step_dir(2), exist_ok=True)
            with open(path, "wb") as f:
                f.write(image[: len(image) // 2])
            raise StorageError(f"rank {self.holder}: lost power while keeping rank {index.rank}'s replica")
        return super().commit(index, image)


def replication_crash(rank: int, world: int, base: str) -> None:
    os.environ["SHARDCKPT_NODE_ID"] = f"node{rank}"
    group = RankGroup.current(dist.new_group(backend="gloo"))
    local = f"{base}/local{rank}"
    options = LocalTierOptions(local)
    tier = LocalTier(options, group, TIER, store=ReplicaLostMidway(local, rank, TIER))
    flat = {"w": torch.full((4,), float(rank))}
    tier.save(1, {"w": flat["w"] + 1})
    tier.save(2, {"w": flat["w"] + 2})
    with pytest.raises(StorageError, match="lost power"):
        tier.wait()  # raised on both ranks: the step's replication failed
    dist.barrier()
    if rank == 0:
        shutil.rmtree(local)  # node 0 is lost: only the half-written replica of its step 2 is left
    dist.barrier()
    target = {"w": torch.zeros(4)}
    tier = LocalTier(options, group, TIER, store=ReplicaLostMidway(local, rank, TIER))
    assert tier.restore(target) == 1
    assert torch.equal(target["w"], torch.full((4,), rank + 1.0))
    # One rank's own write fails: its partner still got and kept the replica, the error
    # reaches both ranks (no rank is left waiting), and the replica makes step 3 restorable.
    tier.save(3, {"w": flat["w"] + 3})
    with pytest.raises(StorageError, match="no space left"):
        tier.wait()
    assert tier.restore(target) == 3
    assert torch.equal(target["w"], torch.full((4,), rank + 3.0))


def test_a_replica_cut_off_midway_is_never_restored_and_a_failed_own_copy_keeps_the_replica(tmp_path):
    run_ranks(replication_crash, 2, str(tmp_path))


def one_node(rank: int, world: int, base: str) -> None:
    os.environ["SHARDCKPT_NODE_ID"] = "the-only-node"
    with pytest.raises(ValueError, match="replicas=1 needs at least 2 nodes"):
        shardckpt.CheckpointManager(f"{base}/durable", local_dir=f"{base}/local", replicas=1)
    # the failed open released the root: a manager without replicas opens it at once
    with shardckpt.CheckpointManager(f"{base}/durable", local_dir=f"{base}/local", replicas=0) as mgr:
        mgr.save(1, {"w": torch.ones(2)})


def test_replicas_on_a_single_node_are_refused_on_every_rank(tmp_path):
    run_ranks(one_node, 2, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "local")) == []  # the clean close removed the local step


def mixed_saves(rank: int, world: int, base: str) -> None:
    os.environ["SHARDCKPT_NODE_ID"] = f"node{rank}"
    group = RankGroup.current(dist.new_group(backend="gloo"))
    local = f"{base}/local{rank}"
    tier = LocalTier(LocalTierOptions(local), group, TIER)
    step2 = f"{local}/{local_step.root_dir_name(TIER)}/step_0000000002"
    tier.save(2, {"w": torch.full((4,), 10.0 + rank)})  # an attempt that is later redone
    tier.wait()
    if rank == 1:
        shutil.copytree(local, f"{base}/attempt1")
    dist.barrier()
    tier.save(2, {"w": torch.full((4,), 20.0 + rank)})  # step 2 again, after a restart from step 1
    tier.wait()
    if rank == 1:  # node 1 comes back with its copies of the first attempt
        shutil.rmtree(local)
        shutil.copytree(f"{base}/attempt1", local)
    for name in os.listdir(step2):  # and each node lost its replica of the other's shard
        if not name.startswith(f"shard_r{rank:05d}_"):
            os.unlink(f"{step2}/{name}")
    dist.barrier()
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("shardckpt").addHandler(handler)
    logging.getLogger("shardckpt").setLevel(logging.INFO)
    target = {"w": torch.zeros(4)}
    assert tier.restore(target) is None, target  # rank 0's shard of one save, rank 1's of another
    assert torch.equal(target["w"], torch.zeros(4))
    assert any("its shards come from 2 different saves, none complete" in line for line in lines), lines


def test_shards_of_two_saves_of_one_step_are_never_restored_together(tmp_path):
    run_ranks(mixed_saves, 2, str(tmp_path))
