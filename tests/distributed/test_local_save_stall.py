"""What a local save costs in the foreground, on 2 gloo ranks: one collective (the previous
save's outcome and this save's staging agreed on together), and still a failure of the
previous save raised on every rank, and one save id per save that every rank agrees on.

benchmarks/step_slowdown.py measured the stall of a local save every step at about twice
the staging copy on 4 ranks, the collectives about half of it: each collective waits for
every rank, and a save made three (the previous outcome, the save id, the staging)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from distributed import run_ranks

from shardckpt.engine.collective import RankGroup
from shardckpt.errors import StorageError
from shardckpt.format import local_step
from shardckpt.manager.local_store import LocalStore
from shardckpt.manager.local_tier import LocalTier, LocalTierOptions

TIER = "ab" * 8
COLLECTIVES = ("all_gather_object", "broadcast_object_list", "all_gather", "broadcast", "all_reduce", "barrier")


class FailingStore(LocalStore):
    """Fails to commit step ``fail_step`` (a full RAM disk, say)."""

    fail_step = 1

    def commit(self, index: local_step.ShardIndex, image: memoryview) -> str:
        if index.step == self.fail_step:
            raise StorageError(f"rank {self.holder}: no room in {self.local_dir} (injected)")
        return super().commit(index, image)


def count_foreground_collectives(calls: list[str]) -> None:
    """Record every collective the main thread starts (the save thread's are its own business)."""
    main = threading.main_thread()

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is main:
                calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    for name in COLLECTIVES:
        setattr(dist, name, counted(name, getattr(dist, name)))


def _one_collective_per_save(rank: int, world: int, local_dir: str) -> None:
    tier = LocalTier(LocalTierOptions(local_dir, replicas=0, keep_last=2), RankGroup.current(), TIER)
    state = {"w": torch.arange(1000, dtype=torch.float32) + rank, "step": 0}
    calls: list[str] = []
    count_foreground_collectives(calls)
    per_save = []
    for step in (1, 2, 3):
        calls.clear()
        tier.save(step, state)
        per_save.append(list(calls))
    # the first save has no previous one; the later ones also agree on the previous outcome
    assert per_save == [["all_gather_object"]] * 3, per_save
    tier.wait()
    ids = {}
    for step in (2, 3):  # keep_last=2: steps 2 and 3 stay
        folder = LocalStore(local_dir, rank, TIER).step_dir(step)
        indices = [n for n in os.listdir(folder) if local_step.parse_index_name(n) is not None]
        assert len(indices) == world  # both ranks' shards, one folder (one node)
        with_ids = {
            local_step.parse_index(open(os.path.join(folder, n), "rb").read(), where=n).save_id for n in indices
        }
        assert len(with_ids) == 1, with_ids  # one id per save, on every rank
        ids[step] = with_ids.pop()
    assert ids[2] != ids[3]
    dist.barrier()
    tier.close()


def test_a_local_save_makes_one_collective(tmp_path: Any) -> None:
    run_ranks(_one_collective_per_save, 2, str(tmp_path / "local"))


def _previous_failure_raised(rank: int, world: int, local_dir: str) -> None:
    store = (FailingStore if rank == 1 else LocalStore)(local_dir, rank, TIER)
    tier = LocalTier(LocalTierOptions(local_dir, replicas=0), RankGroup.current(), TIER, store=store)
    state = {"w": torch.ones(100)}
    tier.save(1, state)  # fails in rank 1's background
    try:
        tier.save(2, state)
    except StorageError as e:
        assert "local save of step 1" in str(e) and "no room" in str(e) and "rank 1" in str(e), str(e)
    else:
        raise AssertionError(f"rank {rank}: the failure of local step 1 was not raised by the next save")
    tier.save(3, state)  # the tier goes on after a failure was raised once
    tier.wait()
    held = sorted(s.index.step for s in LocalStore(local_dir, rank, TIER).scan() if s.index.holder == rank)
    assert held == ([1, 3] if rank == 0 else [3]), held  # step 2 was never staged: its save raised first
    tier.close()


def test_the_previous_save_failure_is_raised_on_every_rank_by_the_next_save(tmp_path: Any) -> None:
    run_ranks(_previous_failure_raised, 2, str(tmp_path / "local"))
