"""async_save: the stall is a copy, mutations after return do not leak, errors reach every rank."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import shardckpt
from shardckpt.engine import default as saving


def test_mutation_after_return_does_not_change_what_is_saved(tmp_path):
    w = torch.arange(12.0).reshape(3, 4)
    view = torch.arange(40.0).reshape(8, 5).t()  # non-contiguous CPU tensor
    sd = {"w": w, "v": view, "cfg": {"lrs": [0.1, 0.2]}, "step": 5}
    handle = shardckpt.async_save(sd, str(tmp_path / "a"))
    w.add_(100.0)
    view.mul_(-1)
    sd["cfg"]["lrs"].append(9.9)
    sd["step"] = 6
    manifest = handle.wait()
    assert handle.done() and manifest is not None
    got = {"w": torch.zeros(3, 4), "v": torch.zeros(5, 8), "cfg": {"lrs": None}, "step": 0}
    shardckpt.load(got, str(tmp_path / "a"))
    assert torch.equal(got["w"], torch.arange(12.0).reshape(3, 4))
    assert torch.equal(got["v"], torch.arange(40.0).reshape(8, 5).t())
    assert got["cfg"] == {"lrs": [0.1, 0.2]} and got["step"] == 5


def test_buffers_are_reused_across_saves(tmp_path):
    sd = {"a": torch.ones(256, 256), "b": torch.zeros(1000)}
    before = saving.staging_stats()["allocations"]
    for i in range(4):
        sd["a"].fill_(float(i))
        shardckpt.async_save(sd, str(tmp_path / f"s{i}"))
    saving.wait_pending()
    stats = saving.staging_stats()
    assert stats["allocations"] - before <= 2  # a and b once (or zero if an earlier test staged them)
    assert stats["staged_bytes"] == (256 * 256 + 1000) * 4
    got = {"a": torch.zeros(256, 256), "b": torch.ones(1000)}
    shardckpt.load(got, str(tmp_path / "s2"))
    assert torch.equal(got["a"], torch.full((256, 256), 2.0))


def test_one_save_in_flight_and_a_new_save_waits(tmp_path):
    h1 = shardckpt.async_save({"x": torch.ones(10)}, str(tmp_path / "1"))
    h2 = shardckpt.async_save({"x": torch.full((10,), 2.0)}, str(tmp_path / "2"))
    assert h1.done()  # the second call finished the first before staging over its buffers
    h2.wait()
    for name, v in (("1", 1.0), ("2", 2.0)):
        got = {"x": torch.zeros(10)}
        shardckpt.load(got, str(tmp_path / name))
        assert torch.equal(got["x"], torch.full((10,), v))


def test_background_failure_raises_at_wait_and_commits_nothing(tmp_path):
    target = tmp_path / "taken"
    shardckpt.save({"x": torch.ones(2)}, str(target))
    handle = shardckpt.async_save({"x": torch.zeros(2)}, str(target))  # exists: fails in background
    with pytest.raises(shardckpt.CheckpointExistsError):
        handle.wait()
    got = {"x": torch.zeros(2)}
    shardckpt.load(got, str(target))
    assert torch.equal(got["x"], torch.ones(2))  # the earlier checkpoint is intact
    shardckpt.async_save({"x": torch.zeros(2)}, str(tmp_path / "next")).wait()  # error not raised twice


def test_unseen_background_failure_raises_at_next_save(tmp_path):
    shardckpt.save({"x": torch.ones(2)}, str(tmp_path / "taken"))
    shardckpt.async_save({"x": torch.zeros(2)}, str(tmp_path / "taken"))
    with pytest.raises(shardckpt.CheckpointExistsError):
        shardckpt.save({"x": torch.ones(2)}, str(tmp_path / "other"))
    assert not os.path.exists(tmp_path / "other")
    shardckpt.save({"x": torch.ones(2)}, str(tmp_path / "other"))  # raised exactly once


def test_bad_value_fails_before_returning(tmp_path):
    with pytest.raises(shardckpt.UnsupportedValueError, match="'bad'"):
        shardckpt.async_save({"bad": {1, 2}}, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x" / "manifest.json")


def _async_ranks(rank: int, world: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(13 * 5, dtype=torch.float32).reshape(13, 5)
    sd = {"w": distribute_tensor(full.clone(), mesh, [Shard(0)]), "bias": torch.ones(3), "step": 9}
    handle = shardckpt.async_save(sd, path)
    # training goes on: the local shard is mutated and training collectives run meanwhile
    sd["w"].to_local().mul_(-1)
    for _ in range(20):
        t = torch.ones(4)
        dist.all_reduce(t)
        assert t[0].item() == world
    handle.wait()
    target = {"w": distribute_tensor(torch.zeros(13, 5), mesh, [Shard(0)]), "bias": torch.zeros(3), "step": 0}
    shardckpt.load(target, path)
    assert torch.equal(target["w"].full_tensor(), full) and target["step"] == 9
    # the same key in another layout: cached write items must not be reused
    sd["w"] = distribute_tensor(full.clone() + 1, mesh, [Shard(1)])
    shardckpt.async_save(sd, path + "-shard1").wait()
    target = {"w": distribute_tensor(torch.zeros(13, 5), mesh, [Shard(0)]), "bias": torch.zeros(3), "step": 0}
    shardckpt.load(target, path + "-shard1")
    assert torch.equal(target["w"].full_tensor(), full + 1)


def test_async_on_ranks_with_training_collectives_running(tmp_path):
    run_ranks(_async_ranks, 2, str(tmp_path / "ckpt"))


# ------------------------------------------------------------ bounded staging (max_staging_bytes)

MIB = 2**20


def _mib_tensors(n: int) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((MIB // 4,), float(i)) for i in range(n)}


def _load_equals(path: str, expected: dict[str, torch.Tensor]) -> bool:
    got = {k: torch.zeros_like(v) for k, v in expected.items()}
    shardckpt.load(got, path)
    return all(torch.equal(got[k], v) for k, v in expected.items())


def test_bounded_staging_stages_only_the_tail_and_saves_the_state_of_the_call(tmp_path):
    sd = _mib_tensors(16)
    expected = {k: v.clone() for k, v in sd.items()}
    budget = 3 * MIB
    handle = shardckpt.async_save(sd, str(tmp_path / "b"), max_staging_bytes=budget, num_io_threads=3)
    stats = saving.staging_stats()
    for t in sd.values():
        t.add_(1000.0)  # training resumes at once
    handle.wait()
    assert _load_equals(str(tmp_path / "b"), expected)
    assert stats["bounded_staged_bytes"] <= budget
    assert stats["bounded_live_bytes"] + stats["bounded_staged_bytes"] == 16 * MIB
    assert stats["bounded_live_bytes"] >= 16 * MIB - budget
    assert stats["staged_bytes"] <= budget + 64 * 16  # the arena (64-byte aligned slices); no per-key copies


def test_bounded_staging_reuses_its_arena_across_saves(tmp_path):
    sd = _mib_tensors(8)
    for i in range(3):
        shardckpt.async_save(sd, str(tmp_path / f"s{i}"), max_staging_bytes=2 * MIB, num_io_threads=1).wait()
        if i == 0:
            allocations = saving.staging_stats()["allocations"]
    assert saving.staging_stats()["allocations"] == allocations


def test_zero_budget_writes_everything_before_returning(tmp_path):
    sd = _mib_tensors(4)
    expected = {k: v.clone() for k, v in sd.items()}
    handle = shardckpt.async_save(sd, str(tmp_path / "z"), max_staging_bytes=0)
    assert saving.staging_stats()["bounded_staged_bytes"] == 0
    for t in sd.values():
        t.zero_()
    handle.wait()
    assert _load_equals(str(tmp_path / "z"), expected)


def test_odd_sizes_and_dtypes_in_the_staged_tail_keep_their_bytes(tmp_path):
    big = torch.arange(MIB, dtype=torch.float32)
    tail = {
        "i8": torch.arange(3, dtype=torch.int8),
        "bf16": torch.arange(5, dtype=torch.bfloat16),
        "f64": torch.arange(7, dtype=torch.float64),
        "strided": torch.arange(30.0).reshape(5, 6).t(),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False, True]),
    }
    sd = {"big": big, **tail}
    expected = {k: v.clone() for k, v in sd.items()}
    handle = shardckpt.async_save(sd, str(tmp_path / "o"), max_staging_bytes=4096, num_io_threads=1)
    assert saving.staging_stats()["bounded_staged_bytes"] > 0  # the small tensors went through the arena
    for t in sd.values():
        if t.numel():
            t.copy_(torch.ones_like(t) if t.dtype == torch.bool else t * 0 - 7)
    handle.wait()
    assert _load_equals(str(tmp_path / "o"), expected)


def test_a_budget_at_least_the_shard_is_a_plain_async_save(tmp_path):
    sd = _mib_tensors(2)
    shardckpt.async_save(sd, str(tmp_path / "p"), max_staging_bytes=2 * MIB).wait()
    stats = saving.staging_stats()
    assert "bounded_live_bytes" not in stats and stats["staged_bytes"] == 2 * MIB


def test_bounded_failure_releases_the_caller_and_raises_at_wait(tmp_path):
    target = str(tmp_path / "taken")
    shardckpt.save({"t0": torch.ones(4)}, target)
    handle = shardckpt.async_save(_mib_tensors(4), target, max_staging_bytes=MIB)  # must return, not hang
    with pytest.raises(shardckpt.CheckpointExistsError):
        handle.wait()
    got = {"t0": torch.zeros(4)}
    shardckpt.load(got, target)
    assert torch.equal(got["t0"], torch.ones(4))


def test_negative_budget_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_staging_bytes must be >= 0"):
        shardckpt.async_save({"x": torch.ones(2)}, str(tmp_path / "n"), max_staging_bytes=-1)


def _bounded_ranks(rank: int, world: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(64 * 1024, dtype=torch.float32).reshape(64, 1024)
    bias = torch.arange(50_000, dtype=torch.float32)  # replicated: written by one rank
    sd = {"w": distribute_tensor(full.clone(), mesh, [Shard(0)]), "bias": bias.clone(), "step": 4}
    handle = shardckpt.async_save(sd, path, max_staging_bytes=64 * 1024)
    sd["w"].to_local().mul_(-1)
    sd["bias"].zero_()
    t = torch.ones(4)
    dist.all_reduce(t)  # a training collective while the save runs on
    handle.wait()
    target = {"w": distribute_tensor(torch.zeros(64, 1024), mesh, [Shard(0)]), "bias": torch.ones(50_000), "step": 0}
    shardckpt.load(target, path)
    assert torch.equal(target["w"].full_tensor(), full) and torch.equal(target["bias"], bias)
    assert target["step"] == 4
    # A shard's bytes are its chunk's, not the whole tensor's: the 128 KiB local shard of
    # a 256 KiB tensor fits the tail of a 200 KiB budget next to a 300 KiB replicated tensor.
    sd = {"w": distribute_tensor(full.clone(), mesh, [Shard(0)]), "x": torch.arange(75_000.0)}
    handle = shardckpt.async_save(sd, path + "-tail", max_staging_bytes=200 * 1024, num_io_threads=1)
    assert saving.staging_stats()["bounded_staged_bytes"] == 128 * 1024  # the shard, on both ranks
    sd["w"].to_local().zero_()
    sd["x"].zero_()
    handle.wait()
    target = {"w": distribute_tensor(torch.zeros(64, 1024), mesh, [Shard(0)]), "x": torch.zeros(75_000)}
    shardckpt.load(target, path + "-tail")
    assert torch.equal(target["w"].full_tensor(), full) and torch.equal(target["x"], torch.arange(75_000.0))


@pytest.mark.compat
def test_bounded_async_on_ranks_with_dtensors(tmp_path):
    run_ranks(_bounded_ranks, 2, str(tmp_path / "ckpt"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("budget", [None, MIB])
def test_cuda_tensors_mutated_after_return_do_not_change_the_save(tmp_path, budget):
    sd = {k: v.cuda() for k, v in _mib_tensors(6).items()}
    expected = {k: v.cpu() for k, v in sd.items()}
    handle = shardckpt.async_save(sd, str(tmp_path / "g"), max_staging_bytes=budget)
    for t in sd.values():
        t.mul_(-3.0)
    handle.wait()
    assert _load_equals(str(tmp_path / "g"), expected)
