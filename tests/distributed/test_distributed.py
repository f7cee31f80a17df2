"""Save and load across gloo ranks: plain, DTensor 1-D/2-D, resharding N -> M, dedup balance."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
from distributed import mark, run_ranks, wait_for
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import shardckpt


def global_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The global tensors every test saves (uneven sizes on purpose)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(13, 7, generator=g),
        "b": torch.randn(10, generator=g).to(torch.bfloat16),
        "e": torch.randint(0, 100, (9, 3, 2), generator=g),
        "m": torch.rand(6, 4, generator=g) > 0.5,
    }


def sharded_state(mesh, placements) -> dict:
    sd = {k: distribute_tensor(v, mesh, placements) for k, v in global_state().items()}
    return {"model": sd, "step": 42, "opt": {"lr": 1e-3, "betas": (0.9, 0.95)}}


def empty_target(mesh, placements) -> dict:
    sd = {}
    for k, v in global_state().items():
        p = [Shard(0)] if v.dim() == 1 and placements == [Shard(1)] else placements
        sd[k] = distribute_tensor(torch.zeros_like(v), mesh, p)
    return {"model": sd, "step": 0, "opt": {"lr": 0.0, "betas": None}}


def check_loaded(target: dict) -> None:
    ref = global_state()
    for k, v in target["model"].items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        assert torch.equal(full, ref[k]), k
    assert target["step"] == 42
    assert target["opt"] == {"lr": 1e-3, "betas": (0.9, 0.95)}


def _save_sharded(rank: int, world: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    shardckpt.save(sharded_state(mesh, [Shard(0)]), path)


def _load_sharded(rank: int, world: int, path: str, placement: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    p = [Shard(0)] if placement == "shard0" else [Shard(1)] if placement == "shard1" else [Replicate()]
    target = empty_target(mesh, p)
    shardckpt.load(target, path)
    check_loaded(target)


@pytest.mark.compat
def test_save_on_4_load_on_4_3_2_1(tmp_path):
    path = str(tmp_path / "ckpt")
    run_ranks(_save_sharded, 4, path)
    manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
    assert manifest["world_size"] == 4
    assert len(manifest["tensors"]["model.w"]["chunks"]) == 4  # 4,4,4,1 rows
    assert sorted({f["rank"] for f in manifest["files"].values()}) == [0, 1, 2, 3]
    run_ranks(_load_sharded, 3, path, "shard0")
    run_ranks(_load_sharded, 2, path, "shard1")
    # one process, no process group at all
    target = {
        "model": {k: torch.zeros_like(v) for k, v in global_state().items()},
        "step": 0,
        "opt": {"lr": 0.0, "betas": None},
    }
    shardckpt.load(target, path)
    check_loaded(target)


def test_save_on_2_load_on_4_replicated(tmp_path):
    path = str(tmp_path / "ckpt")
    run_ranks(_save_sharded, 2, path)
    run_ranks(_load_sharded, 4, path, "replicate")


def _save_2d(rank: int, world: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    shardckpt.save(sharded_state(mesh, [Replicate(), Shard(0)]), path)


def test_2d_mesh_sharded_and_replicated_loads_on_3(tmp_path):
    path = str(tmp_path / "ckpt")
    run_ranks(_save_2d, 4, path)
    manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
    # replicated over dp: each tp shard is stored exactly once
    assert len(manifest["tensors"]["model.w"]["chunks"]) == 2
    run_ranks(_load_sharded, 3, path, "shard0")


def _save_tp_fsdp_v3(rank: int, world: int, path: str) -> None:
    # TP over "tp" (columns) inside FSDP over "dp" (rows); 1-D tensors FSDP only
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    sd = {}
    for k, v in global_state().items():
        placements = [Shard(0), Shard(1)] if v.dim() >= 2 else [Shard(0), Replicate()]
        sd[k] = distribute_tensor(v, mesh, placements)
    shardckpt.save({"model": sd, "step": 42, "opt": {"lr": 1e-3, "betas": (0.9, 0.95)}}, path, format_version=3)


def test_format3_tp_fsdp_2x2_loads_on_3_and_on_one_process(tmp_path):
    path = str(tmp_path / "ckpt")
    run_ranks(_save_tp_fsdp_v3, 4, path)
    manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
    assert manifest["format_version"] == 3
    # a 2x2 grid of (row, column) blocks is one rule, no listed chunk
    assert manifest["tensors"]["model.w"]["rule"]["grid"] == [2, 2]
    assert manifest["tensors"]["model.w"]["chunks"] == []
    run_ranks(_load_sharded, 3, path, "shard1")
    target = {
        "model": {k: torch.zeros_like(v) for k, v in global_state().items()},
        "step": 0,
        "opt": {"lr": 0.0, "betas": None},
    }
    shardckpt.load(target, path)
    check_loaded(target)


def _save_replicated(rank: int, world: int, path: str) -> None:
    # 32 equal plain tensors present on every rank: each must be written once, evenly spread
    sd = {f"layer{i}": torch.full((256, 64), float(i)) for i in range(32)}
    sd["big"] = torch.ones(1000, 64)
    shardckpt.save(sd, path)


def test_replicated_tensors_written_once_and_balanced(tmp_path):
    path = str(tmp_path / "ckpt")
    run_ranks(_save_replicated, 4, path)
    manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
    per_rank = [0, 0, 0, 0]
    for name, t in manifest["tensors"].items():
        assert len(t["chunks"]) == 1, name
        c = t["chunks"][0]
        per_rank[manifest["files"][c["file"]]["rank"]] += c["byte_length"]
    total = (32 * 256 + 1000) * 64 * 4
    assert sum(per_rank) == total
    assert max(per_rank) <= 1.25 * (total / 4), per_rank
    target = {f"layer{i}": torch.zeros(256, 64) for i in range(32)}
    target["big"] = torch.zeros(1000, 64)
    shardckpt.load(target, path)
    assert all(torch.equal(target[f"layer{i}"], torch.full((256, 64), float(i))) for i in range(32))


def _save_divergent_value(rank: int, world: int, path: str) -> None:
    with pytest.raises(shardckpt.UnsupportedValueError, match="differs across ranks"):
        shardckpt.save({"rng_seed": rank, "w": torch.ones(2)}, path)


def test_per_rank_values_that_differ_are_refused_on_every_rank(tmp_path):
    path = str(tmp_path / "ckpt")
    run_ranks(_save_divergent_value, 2, path)
    assert not os.path.exists(os.path.join(path, "manifest.json"))


class _FailingStateful:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def state_dict(self) -> dict:
        return {"x": torch.ones(3)}

    def load_state_dict(self, sd: dict) -> None:
        pass


def _one_rank_bad_target(rank: int, world: int, path: str) -> None:
    only_rank_0 = dist.new_group([0])  # new_group is collective: every rank creates it
    if rank == 0:
        shardckpt.save({"w": torch.arange(4.0)}, path, process_group=only_rank_0)
    dist.barrier()
    target = {"w": torch.zeros(4) if rank != 1 else torch.zeros(5)}
    with pytest.raises(shardckpt.StateDictMismatchError) as info:
        shardckpt.load(target, path)
    assert "rank 1" in str(info.value)
    assert "saved shape [4]" in str(info.value)


def test_shape_mismatch_on_one_rank_raises_on_all(tmp_path):
    run_ranks(_one_rank_bad_target, 2, str(tmp_path / "ckpt"))


def _write_fails_on_rank_1(rank: int, world: int, path: str) -> None:
    class Exploding(torch.Tensor):
        pass

    sd = {"w": torch.arange(8.0).reshape(4, 2)}
    if rank == 1:
        # an unsupported dtype on one rank only: planning fails there, every rank must raise
        sd = {"w": torch.zeros(4, 2, dtype=torch.complex64)}
    with pytest.raises(shardckpt.ShardckptError) as info:
        shardckpt.save(sd, path)
    assert "rank 1" in str(info.value)


def test_failure_on_one_rank_raises_on_every_rank_and_commits_nothing(tmp_path):
    path = str(tmp_path / "ckpt")
    run_ranks(_write_fails_on_rank_1, 2, path)
    assert not os.path.exists(os.path.join(path, "manifest.json"))


# The hang tests below assert an order, not a duration (a loaded machine stretches
# durations): the absent rank stays away until the others have raised (wait_for/mark),
# so they cannot have waited for it. Waiting for it would deadlock the two; wait_for's
# deadline then fails the test.


def _rank_1_never_saves(rank: int, world: int, path: str) -> None:
    shardckpt.save({"w": torch.ones(2)}, path + "-first", timeout_s=3)  # both ranks: creates the group
    if rank == 1:
        wait_for(path + ".rank0-raised")  # "forgot" to call save; alive until rank 0 gave up
        return
    with pytest.raises(shardckpt.RankTimeoutError) as info:
        shardckpt.save({"w": torch.ones(2)}, path, timeout_s=3)
    mark(path + ".rank0-raised")
    assert "not every rank arrived within 3 s" in str(info.value)
    assert "(rank 1 did not)" in str(info.value)  # the coordinator names rank 1


def test_a_rank_that_never_calls_save_is_named_not_a_hang(tmp_path):
    run_ranks(_rank_1_never_saves, 2, str(tmp_path / "ckpt"))
    assert not os.path.exists(tmp_path / "ckpt" / "manifest.json")


def _rank_1_stuck_writing(rank: int, world: int, path: str) -> None:
    from shardckpt.storage import local

    if rank == 1:
        original = local._LocalWriteStream.write

        def slow_write(self, data):  # a rank whose storage hangs mid-write, until rank 0 gave up
            wait_for(path + ".rank0-raised")
            return original(self, data)

        local._LocalWriteStream.write = slow_write
    with pytest.raises(shardckpt.ShardckptError) as info:
        shardckpt.save({"w": torch.full((4,), float(rank)), f"r{rank}": torch.ones(3)}, path, timeout_s=3)
    if rank == 0:
        mark(path + ".rank0-raised")  # raised while rank 1 was still stuck: it did not wait for it
        assert isinstance(info.value, shardckpt.RankTimeoutError)
        assert "finish writing: not every rank arrived within 3 s (rank 1 did not)" in str(info.value), str(info.value)


def test_a_rank_stuck_writing_is_named_and_nothing_commits(tmp_path):
    run_ranks(_rank_1_stuck_writing, 2, str(tmp_path / "ckpt"))
    assert not os.path.exists(tmp_path / "ckpt" / "manifest.json")


def _mismatched_tensor(rank: int, world: int, path: str, case: str) -> None:
    if case == "shape":
        sd = {"w": torch.ones(4 + rank), "b": torch.zeros(2)}
    else:
        sd = {"w": torch.ones(4, dtype=torch.float32 if rank == 0 else torch.float64), "b": torch.zeros(2)}
    # Refused by the ranks' agreement, not by a timeout: that would be a RankTimeoutError.
    with pytest.raises(shardckpt.UnsupportedValueError) as info:
        shardckpt.save(sd, path, timeout_s=60)
    msg = str(info.value)
    assert "key 'w'" in msg and "ranks [0] hold shape [4] float32" in msg, msg
    assert ("ranks [1] hold shape [5] float32" if case == "shape" else "ranks [1] hold shape [4] float64") in msg, msg


@pytest.mark.parametrize("case", ["shape", "dtype"])
def test_a_key_whose_shape_or_dtype_differs_across_ranks_is_refused_on_every_rank(tmp_path, case):
    """Before: rank 0's copy was saved and rank 1's dropped without a word (DCP dedups by key)."""
    path = str(tmp_path / "ckpt")
    run_ranks(_mismatched_tensor, 2, path, case)
    assert not os.path.exists(os.path.join(path, "manifest.json"))


def _key_on_one_rank_only(rank: int, world: int, path: str) -> None:
    sd = {"w": torch.arange(4.0)}
    if rank == 1:
        sd["stage1.w"] = torch.full((3,), 7.0)  # e.g. a pipeline stage only rank 1 holds
    shardckpt.save(sd, path, timeout_s=5)
    target = {"w": torch.zeros(4)} | ({"stage1.w": torch.zeros(3)} if rank == 1 else {})
    with pytest.raises(shardckpt.StateDictMismatchError) as info:
        shardckpt.load(target, path, timeout_s=5)  # strict: rank 0's target lacks stage1.w
    assert "rank 0" in str(info.value) and "'stage1.w'" in str(info.value), str(info.value)
    shardckpt.load(target, path, strict=False, timeout_s=5)
    assert torch.equal(target["w"], torch.arange(4.0))
    if rank == 1:
        assert torch.equal(target["stage1.w"], torch.full((3,), 7.0))


def test_keys_held_by_one_rank_only_are_saved_and_a_strict_load_names_the_rank(tmp_path):
    path = str(tmp_path / "ckpt")
    run_ranks(_key_on_one_rank_only, 2, path)
    manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
    assert sorted(manifest["tensors"]) == ["stage1.w", "w"]
    file_of = manifest["tensors"]["stage1.w"]["chunks"][0]["file"]
    assert manifest["files"][file_of]["rank"] == 1


def _coordinator_stuck_at_commit(rank: int, world: int, path: str) -> None:
    import shardckpt.engine.checkpointer
    from shardckpt.storage.local import LocalStorage

    class StuckCommit(LocalStorage):  # rank 0's storage hangs on the manifest write, until rank 1 gave up
        def write_atomic(self, name: str, data: bytes) -> None:
            if name.endswith("manifest.json"):
                wait_for(path + ".rank1-raised")
            super().write_atomic(name, data)

        def create_exclusive(self, name: str, data: bytes) -> None:
            if name.endswith("manifest.json"):
                wait_for(path + ".rank1-raised")
            super().create_exclusive(name, data)

    if rank == 0:
        shardckpt.engine.checkpointer.open_storage = lambda url, options=None: StuckCommit(url)
    try:
        shardckpt.save({"w": torch.full((4,), float(rank)), f"r{rank}": torch.ones(3)}, path, timeout_s=3)
        outcome = None
    except shardckpt.ShardckptError as e:
        outcome = e
    if rank == 1:
        mark(path + ".rank1-raised")  # raised while rank 0 was still stuck: it did not wait for it
        assert isinstance(outcome, shardckpt.RankTimeoutError), repr(outcome)
        assert "not committed" not in str(outcome), "the commit may still land; the message must not deny it"
        wait_for(path + ".rank0-done")  # let rank 0 finish its stuck write before the harness barrier
    else:
        mark(path + ".rank0-done")


def test_a_coordinator_stuck_at_the_commit_makes_the_others_raise_not_hang(tmp_path):
    run_ranks(_coordinator_stuck_at_commit, 2, str(tmp_path / "ckpt"))


def _rank_1_never_opens_the_manager(rank: int, world: int, root: str) -> None:
    if rank == 1:
        wait_for(root + ".rank0-raised")  # never constructs the manager; alive until rank 0 gave up
        return
    with pytest.raises(shardckpt.RankTimeoutError) as info:
        shardckpt.CheckpointManager(root, keep_last=2, timeout_s=3)
    # Before: the manager's agreements ran on the training group, bounded only by its
    # timeout (30 min by default); now they run on a gloo group bounded by timeout_s.
    mark(root + ".rank0-raised")  # raised while rank 1 was still away: it did not wait for it
    assert "within 3 s" in str(info.value), str(info.value)


def test_a_rank_that_never_opens_the_manager_is_a_timeout_not_a_hang(tmp_path):
    run_ranks(_rank_1_never_opens_the_manager, 2, str(tmp_path / "root"))


# Defaults, not timeout_s: a rank that never makes the call is reported after the short
# arrival bound (600 s), while a rank that is only slow at its I/O gets the long one (1800 s).
# The tests shrink both module defaults in the ranks; a save or load passes no timeout_s.


def _shrink_default_timeouts(arrive_s: float, io_s: float) -> None:
    import shardckpt.engine.options as options

    options.DEFAULT_ARRIVE_TIMEOUT_S, options.DEFAULT_IO_TIMEOUT_S = arrive_s, io_s


def _slow_but_healthy_io(rank: int, world: int, path: str) -> None:
    from shardckpt.storage import local

    _shrink_default_timeouts(arrive_s=2.0, io_s=120.0)  # 2 s, as the tests below: arrivals on a loaded machine
    if rank == 1:  # the first write and the first read take twice the arrival bound
        write, read_into = local._LocalWriteStream.write, local.LocalStorage.read_into
        slowed: set[str] = set()

        def slow(kind, fn):
            def call(*args, **kwargs):
                if kind not in slowed:
                    slowed.add(kind)
                    time.sleep(4.0)
                return fn(*args, **kwargs)

            return call

        local._LocalWriteStream.write = slow("write", write)
        local.LocalStorage.read_into = slow("read", read_into)
    sd = {"w": torch.full((4,), float(rank)), f"r{rank}": torch.ones(3)}
    dist.barrier()  # arrive together: only the I/O is slow
    start = time.monotonic()
    shardckpt.save(sd, path)
    assert rank == 1 or time.monotonic() - start > 3.5  # rank 0 did wait for rank 1's writes
    target = {"w": torch.zeros(4), f"r{rank}": torch.zeros(3)}
    dist.barrier()
    start = time.monotonic()
    shardckpt.load(target, path, strict=False)
    assert rank == 1 or time.monotonic() - start > 3.5  # and for rank 1's reads
    assert torch.equal(target[f"r{rank}"], torch.ones(3))


def test_a_rank_slow_at_its_io_is_waited_for_past_the_arrival_bound(tmp_path):
    """Before: one timeout_s bounded both waits, so a short default would fail healthy saves."""
    path = str(tmp_path / "ckpt")
    run_ranks(_slow_but_healthy_io, 2, path)
    assert os.path.exists(os.path.join(path, "manifest.json"))


def _rank_1_never_calls_async_save(rank: int, world: int, path: str) -> None:
    _shrink_default_timeouts(arrive_s=2.0, io_s=120.0)
    shardckpt.async_save({"w": torch.ones(2)}, path + "-first").wait()  # both ranks: creates the group
    if rank == 1:
        wait_for(path + ".rank0-raised")  # "forgot" to call async_save; alive until rank 0 gave up
        return
    with pytest.raises(shardckpt.RankTimeoutError) as info:
        shardckpt.async_save({"w": torch.ones(2)}, path)
    mark(path + ".rank0-raised")
    assert "waiting for every rank to call async_save: not every rank arrived within 2 s" in str(info.value)


def test_a_rank_that_never_calls_async_save_is_reported_after_the_arrival_bound(tmp_path):
    """Before: async_save's first wait ran on the training group, bounded by its timeout only."""
    run_ranks(_rank_1_never_calls_async_save, 2, str(tmp_path / "ckpt"))


def _rank_1_skips_the_first_save(rank: int, world: int, path: str) -> None:
    _shrink_default_timeouts(arrive_s=2.0, io_s=120.0)
    if rank == 1:
        wait_for(path + ".rank0-raised")
        return
    with pytest.raises(shardckpt.RankTimeoutError) as info:
        shardckpt.save({"w": torch.ones(2)}, path)  # the very first save: its group is created now
    mark(path + ".rank0-raised")
    assert "not every rank arrived within 2 s" in str(info.value), str(info.value)


def test_a_rank_that_skips_the_first_save_is_reported_after_the_arrival_bound(tmp_path):
    run_ranks(_rank_1_skips_the_first_save, 2, str(tmp_path / "ckpt"))


def _foreign_folder_on_two_ranks(rank: int, world: int, path: str) -> None:
    import traceback

    with pytest.raises(shardckpt.errors.DestinationNotEmptyError) as info:
        shardckpt.save({"w": torch.ones(4)}, path)
    text = "".join(traceback.format_exception(info.value))
    assert text.count("Traceback (most recent call last)") == 1, text
    assert "During handling" not in text and "torch/distributed/checkpoint" not in text, text
    assert str(info.value).startswith(f"save to {path} failed on rank 0: DestinationNotEmptyError: save to {path}: ")


def test_a_save_error_gathered_from_ranks_prints_one_traceback_on_each(tmp_path):
    """Rank 0 refuses the folder; rank 0 (its own error) and rank 1 (a stand-in for it)
    both raise it with one traceback, no chain through DCP's internals."""
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    run_ranks(_foreign_folder_on_two_ranks, 2, str(path))
    assert sorted(os.listdir(path)) == ["notes.txt"]
