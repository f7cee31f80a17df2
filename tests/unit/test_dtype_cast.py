"""load(..., allow_dtype_cast=True): floating tensors saved in another floating dtype.

Off by default (a dtype mismatch is refused, the message naming the option); with it the
result is what ``target.copy_(saved)`` gives, bit for bit, resharded loads included.
Integer, bool and shape mismatches are refused either way.
"""

from __future__ import annotations

import json

import pytest
import torch
from damage import flip_byte
from distributed import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import shardckpt
from shardckpt.errors import IntegrityError, StateDictMismatchError
from shardckpt.training.train_state import TrainState


def _values(n: int, seed: int) -> torch.Tensor:
    # Values with mantissa bits bf16 cannot hold, so rounding is observable (and ties occur
    # only by chance: randn, scaled over several binades).
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.logspace(-3, 3, n)


def test_fp32_checkpoint_loads_into_bf16_target_as_torch_rounds(tmp_path):
    saved = _values(4096, 0).reshape(64, 64)
    shardckpt.save({"w": saved}, tmp_path / "c")
    target = {"w": torch.zeros(64, 64, dtype=torch.bfloat16)}
    result = shardckpt.load(target, tmp_path / "c", allow_dtype_cast=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert target["w"].dtype == torch.bfloat16
    expected = saved.to(torch.bfloat16)
    assert torch.equal(target["w"].view(torch.int16), expected.view(torch.int16))
    # Not the same as truncating the low 16 bits: the test would notice a wrong rounding.
    truncated = (saved.view(torch.int32) >> 16).to(torch.int16)
    assert not torch.equal(target["w"].view(torch.int16), truncated)


def test_bf16_checkpoint_loads_into_fp32_and_fp16_targets(tmp_path):
    saved = _values(512, 1).to(torch.bfloat16)
    shardckpt.save({"w": saved, "step": 3}, tmp_path / "c")
    wide = {"w": torch.zeros(512), "step": 0}
    shardckpt.load(wide, tmp_path / "c", allow_dtype_cast=True)
    assert torch.equal(wide["w"], saved.float()) and wide["step"] == 3
    half = {"w": torch.zeros(512, dtype=torch.float16), "step": 0}
    shardckpt.load(half, tmp_path / "c", allow_dtype_cast=True)
    expected = torch.zeros(512, dtype=torch.float16).copy_(saved)
    assert torch.equal(half["w"].view(torch.int16), expected.view(torch.int16))


def test_cast_reads_verified_bytes_in_blocks_into_a_strided_view(tmp_path):
    # Several checksum blocks, and a target that is a column slice of a larger bf16 tensor:
    # the cast goes through the staging path box by box and writes through the view.
    saved = _values(64 * 48, 2).reshape(64, 48)
    shardckpt.save({"w": saved}, tmp_path / "c", hash_block_bytes=4096)
    backing = torch.full((64, 96), 7.0, dtype=torch.bfloat16)
    shardckpt.load({"w": backing[:, ::2]}, tmp_path / "c", allow_dtype_cast=True)
    assert torch.equal(backing[:, ::2], saved.to(torch.bfloat16))
    assert bool((backing[:, 1::2] == 7.0).all())


def test_checksums_are_checked_on_the_saved_bytes_before_the_cast(tmp_path):
    # Flip the lowest mantissa bit of one fp32 element: bf16 drops that bit, so only a check
    # of the saved bytes (not of the converted ones) can see the damage.
    saved = torch.arange(100.0) + 0.5
    shardckpt.save({"w": saved}, tmp_path / "c")
    chunk = json.loads((tmp_path / "c" / "manifest.json").read_text())["tensors"]["w"]["chunks"][0]
    flip_byte(str(tmp_path / "c" / chunk["file"]), chunk["byte_offset"] + 37 * 4)
    damaged = saved.clone()
    damaged.view(torch.int32)[37] ^= 1
    assert torch.equal(damaged.to(torch.bfloat16), saved.to(torch.bfloat16))
    with pytest.raises(IntegrityError, match="'w'"):
        shardckpt.load({"w": torch.zeros(100, dtype=torch.bfloat16)}, tmp_path / "c", allow_dtype_cast=True)
    target = {"w": torch.zeros(100, dtype=torch.bfloat16)}
    shardckpt.load(target, tmp_path / "c", allow_dtype_cast=True, verify=False)
    assert torch.equal(target["w"], saved.to(torch.bfloat16))


def test_default_refuses_a_dtype_mismatch_and_names_the_option(tmp_path):
    shardckpt.save({"enc": {"w": torch.ones(4)}}, tmp_path / "c")
    target = {"enc": {"w": torch.zeros(4, dtype=torch.bfloat16)}}
    with pytest.raises(StateDictMismatchError) as info:
        shardckpt.load(target, tmp_path / "c")
    text = str(info.value)
    assert "'enc.w'" in text and "float32" in text and "bfloat16" in text
    assert "allow_dtype_cast=True" in text
    assert torch.equal(target["enc"]["w"], torch.zeros(4, dtype=torch.bfloat16))


def test_shape_mismatch_is_refused_even_with_the_option(tmp_path):
    shardckpt.save({"w": torch.ones(2, 3)}, tmp_path / "c")
    with pytest.raises(StateDictMismatchError) as info:
        shardckpt.load({"w": torch.zeros(3, 2, dtype=torch.bfloat16)}, tmp_path / "c", allow_dtype_cast=True)
    text = str(info.value)
    assert "[2, 3]" in text and "[3, 2]" in text
    assert "converts only between floating dtypes, and never changes a shape" in text


@pytest.mark.parametrize(
    ("saved", "target"),
    [
        (torch.tensor([0.7, 1.5]), torch.zeros(2, dtype=torch.int64)),
        (torch.tensor([1, 2]), torch.zeros(2)),
        (torch.tensor([True, False]), torch.zeros(2)),
        (torch.tensor([1, 2], dtype=torch.int32), torch.zeros(2, dtype=torch.int64)),
    ],
    ids=["float-to-int", "int-to-float", "bool-to-float", "int32-to-int64"],
)
def test_non_floating_casts_are_refused_even_with_the_option(tmp_path, saved, target):
    shardckpt.save({"t": saved}, tmp_path / "c")
    with pytest.raises(StateDictMismatchError, match="converts only between floating dtypes"):
        shardckpt.load({"t": target}, tmp_path / "c", allow_dtype_cast=True)


def test_checkpointer_and_manager_restore_pass_the_option(tmp_path):
    saved = _values(256, 4)
    with shardckpt.CheckpointManager(tmp_path / "run") as manager:
        manager.save(5, {"w": saved}, force=True)
        manager.wait()
        with pytest.raises(StateDictMismatchError, match="allow_dtype_cast=True"):
            manager.restore({"w": torch.zeros(256, dtype=torch.bfloat16)})
        target = {"w": torch.zeros(256, dtype=torch.bfloat16)}
        assert manager.restore(target, allow_dtype_cast=True) == 5
    assert torch.equal(target["w"], saved.to(torch.bfloat16))


def _save_sharded_then_cast_resharded(rank: int, world_size: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    full = _values(48 * 32, 5).reshape(48, 32)
    shardckpt.save({"w": distribute_tensor(full, mesh, [Shard(0)])}, path)
    # Read back on the same ranks into bf16 shards along the other dimension.
    target = {"w": distribute_tensor(torch.zeros(48, 32, dtype=torch.bfloat16), mesh, [Shard(1)])}
    shardckpt.load(target, path, allow_dtype_cast=True)
    assert torch.equal(target["w"].to_local(), full.to(torch.bfloat16).chunk(world_size, dim=1)[rank])


def test_sharded_fp32_checkpoint_loads_resharded_into_bf16(tmp_path):
    path = str(tmp_path / "c")
    run_ranks(_save_sharded_then_cast_resharded, 2, path)
    # 2 -> 1: this process, with no process group, loads the two shards into one bf16 tensor.
    target = {"w": torch.zeros(48, 32, dtype=torch.bfloat16)}
    shardckpt.load(target, path, allow_dtype_cast=True)
    assert torch.equal(target["w"], _values(48 * 32, 5).reshape(48, 32).to(torch.bfloat16))


def test_train_state_restores_an_fp32_run_into_a_bf16_model(tmp_path):
    torch.manual_seed(0)
    fp32 = torch.nn.Linear(16, 8)
    optim = torch.optim.Adam(fp32.parameters())
    fp32(torch.ones(2, 16)).sum().backward()
    optim.step()
    with shardckpt.CheckpointManager(tmp_path / "run") as manager:
        assert TrainState(model=fp32, optimizer=optim).save(manager, force=True)
    model = torch.nn.Linear(16, 8).to(torch.bfloat16)
    bf16 = TrainState(model=model, optimizer=torch.optim.Adam(model.parameters()))
    with shardckpt.CheckpointManager(tmp_path / "run") as manager:
        with pytest.raises(StateDictMismatchError, match="allow_dtype_cast=True"):
            bf16.restore(manager)
        assert bf16.restore(manager, allow_dtype_cast=True) == 0
    assert bf16.model.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.model.weight, fp32.weight.detach().to(torch.bfloat16))
    assert torch.equal(bf16.model.bias, fp32.bias.detach().to(torch.bfloat16))
    exp_avg = bf16.optimizers[0].state[model.weight]["exp_avg"]
    assert torch.equal(exp_avg, optim.state[fp32.weight]["exp_avg"].to(torch.bfloat16))


@pytest.mark.parametrize(
    ("saved_dtype", "target_dtype"),
    [
        (torch.float64, torch.float32),
        (torch.float32, torch.float16),
        (torch.float32, torch.float8_e4m3fn),
        (torch.float8_e5m2, torch.bfloat16),
    ],
    ids=lambda d: str(d).removeprefix("torch."),
)
def test_every_floating_pair_converts_as_copy_does(tmp_path, saved_dtype, target_dtype):
    saved = _values(300, 6).clamp(-400, 400).to(saved_dtype)
    shardckpt.save({"w": saved}, tmp_path / "c")
    target = {"w": torch.zeros(300, dtype=target_dtype)}
    shardckpt.load(target, tmp_path / "c", allow_dtype_cast=True)
    expected = torch.zeros(300, dtype=target_dtype).copy_(saved)
    assert torch.equal(target["w"].view(torch.uint8), expected.view(torch.uint8))


def test_a_bf16_model_and_its_fresh_optimizer_load_an_fp32_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optim = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optim.step()
    shardckpt.save({"model": model, "optim": optim}, tmp_path / "c")
    bf16 = torch.nn.Linear(4, 3).to(torch.bfloat16)
    fresh = torch.optim.Adam(bf16.parameters())
    shardckpt.load({"model": bf16, "optim": fresh}, tmp_path / "c", allow_dtype_cast=True)
    assert torch.equal(bf16.weight, model.weight.detach().to(torch.bfloat16))
    state = fresh.state[bf16.weight]
    assert state["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(state["exp_avg"], optim.state[model.weight]["exp_avg"].to(torch.bfloat16))
    assert torch.equal(state["exp_avg_sq"], optim.state[model.weight]["exp_avg_sq"].to(torch.bfloat16))
