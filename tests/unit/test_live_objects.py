"""Modules and optimizers given to save/load as objects (one process; DDP and FSDP2 ranks
are in tests/distributed/test_live_objects_ranks.py).

The resume a new user writes first: a fresh model and a fresh optimizer, which has no
state before its first step, loaded from a checkpoint; the next step must be the step
the uninterrupted run takes, bit for bit. Also: the format is DCP's get_*_state_dict
(so objects and plain state dicts load into each other), optimizers are paired with
their modules, strict=False reports what it skipped, and mismatch messages stay short.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

import shardckpt
from shardckpt import LoadResult, Manifest, StateDictMismatchError, UnsupportedValueError
from shardckpt.storage import open_storage

OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
    "adam": lambda params: torch.optim.Adam(params, lr=0.02, betas=(0.8, 0.99)),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
}


def make(kind: str = "adamw") -> tuple[nn.Module, torch.optim.Optimizer]:
    """The same initial model every call (what a new process builds before loading)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2))
    return model, OPTIMIZERS[kind](model.parameters())


def train_step(model: nn.Module, optim: torch.optim.Optimizer, step: int) -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))  # the batch depends on the step only
    model(x).pow(2).mean().backward()
    optim.step()
    optim.zero_grad()


def trained(kind: str, steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, optim = make(kind)
    for step in range(steps):
        train_step(model, optim, step)
    optim.param_groups[0]["lr"] *= 0.5  # a scheduler's work: the loaded optimizer must get it too
    return model, optim


def manifest(path: Path) -> Manifest:
    return shardckpt.read_manifest(open_storage(str(path)))


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for pid, s in sa["state"].items():
        assert s.keys() == sb["state"][pid].keys()
        for name, t in s.items():
            assert torch.equal(t, sb["state"][pid][name]), (pid, name)


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_fresh_model_and_optimizer_resume_bit_for_bit(tmp_path, kind):
    model, optim = trained(kind, 3)
    shardckpt.save({"model": model, "optim": optim, "step": 3}, str(tmp_path / "c"))
    train_step(model, optim, 3)  # the uninterrupted run's next step: the reference

    fresh_model, fresh_optim = make(kind)
    assert not fresh_optim.state  # never stepped
    state = {"model": fresh_model, "optim": fresh_optim, "step": 0}
    result = shardckpt.load(state, str(tmp_path / "c"))
    assert result == LoadResult([], [])
    assert state["model"] is fresh_model and state["optim"] is fresh_optim and state["step"] == 3
    assert fresh_optim.param_groups[0]["lr"] == OPTIMIZERS[kind]([torch.zeros(1)]).defaults["lr"] * 0.5
    train_step(fresh_model, fresh_optim, 3)
    assert_same_params(fresh_model, model)
    assert_same_optimizer(fresh_optim, optim)


def test_async_save_of_objects_loads_the_same(tmp_path):
    model, optim = trained("adamw", 2)
    shardckpt.async_save({"model": model, "optim": optim}, str(tmp_path / "c")).wait()
    fresh_model, fresh_optim = make()
    shardckpt.load({"model": fresh_model, "optim": fresh_optim}, str(tmp_path / "c"))
    assert_same_params(fresh_model, model)
    assert_same_optimizer(fresh_optim, optim)


def test_objects_and_dcp_state_dicts_are_one_format(tmp_path):
    """Saved with objects -> loads into get_*_state_dict dicts, and the other way round."""
    model, optim = trained("adamw", 2)
    shardckpt.save({"model": model, "optim": optim}, str(tmp_path / "objects"))
    as_dicts = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    shardckpt.save(as_dicts, str(tmp_path / "dicts"))
    a, b = manifest(tmp_path / "objects"), manifest(tmp_path / "dicts")
    assert a.tensors.keys() == b.tensors.keys() and a.values == b.values
    assert "optim.state.0.weight.exp_avg" in a.tensors and "model.3.bias" in a.tensors  # names, not param ids

    fresh_model, fresh_optim = make()
    target = {"model": get_model_state_dict(fresh_model), "optim": get_optimizer_state_dict(fresh_model, fresh_optim)}
    shardckpt.load(target, str(tmp_path / "objects"))
    for k, v in get_model_state_dict(model).items():
        assert torch.equal(target["model"][k], v), k
    assert target["optim"]["param_groups"] == as_dicts["optim"]["param_groups"]
    assert torch.equal(target["optim"]["state"]["3.weight"]["exp_avg"], optim.state[model[3].weight]["exp_avg"])

    fresh_model, fresh_optim = make()
    shardckpt.load({"model": fresh_model, "optim": fresh_optim}, str(tmp_path / "dicts"))
    assert_same_params(fresh_model, model)
    assert_same_optimizer(fresh_optim, optim)


def test_lists_nested_dicts_and_one_optimizer_over_two_modules(tmp_path):
    def build() -> dict:
        torch.manual_seed(1)
        gen, disc, head = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(2, 2)
        return {
            "nets": [gen, disc],
            "optim": torch.optim.Adam([*gen.parameters(), *disc.parameters()], lr=0.01),
            "extra": {
                "head": head,
                "head_optim": torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.5),
                "tag": "new",
            },
        }

    def step(state: dict, i: int) -> None:
        gen, disc = state["nets"]
        head = state["extra"]["head"]
        g = torch.Generator().manual_seed(i)
        (disc(gen(torch.randn(2, 3, generator=g))).sum() + head(torch.randn(2, 2, generator=g)).sum()).backward()
        for o in (state["optim"], state["extra"]["head_optim"]):
            o.step()
            o.zero_grad()

    state = build()
    for i in range(2):
        step(state, i)
    state["extra"]["tag"] = "trained"
    shardckpt.save(state, str(tmp_path / "c"))
    keys = manifest(tmp_path / "c").tensors
    # one optimizer over two modules: its state is named by each module's key path
    assert {"optim.state.nets.0.weight.exp_avg", "optim.state.nets.1.bias.exp_avg_sq"} <= set(keys)
    assert {"nets.0.weight", "extra.head.bias", "extra.head_optim.state.weight.momentum_buffer"} <= set(keys)
    step(state, 2)

    fresh = build()
    nested = fresh["extra"]
    shardckpt.load(fresh, str(tmp_path / "c"))
    assert fresh["extra"] is nested and nested["tag"] == "trained"  # values land in the caller's own dicts
    step(fresh, 2)
    for a, b in zip([*state["nets"], state["extra"]["head"]], [*fresh["nets"], fresh["extra"]["head"]], strict=True):
        assert_same_params(a, b)
    assert_same_optimizer(fresh["optim"], state["optim"])
    assert_same_optimizer(fresh["extra"]["head_optim"], state["extra"]["head_optim"])


def test_optimizer_whose_model_is_not_in_the_state_is_refused_clearly(tmp_path):
    model, optim = trained("adamw", 1)
    other = nn.Linear(1, 1)
    for state in ({"optim": optim}, {"other": other, "optim": optim}):
        with pytest.raises(UnsupportedValueError) as info:
            shardckpt.save(state, str(tmp_path / "c"))
        text = str(info.value)
        assert "state_dict['optim']" in text and "6 of 6" in text
        assert "pass the model in the same state_dict" in text
    assert not (tmp_path / "c").exists()
    shardckpt.save({"model": model, "optim": optim}, str(tmp_path / "c"))
    with pytest.raises(UnsupportedValueError, match="pass the model in the same state_dict"):
        shardckpt.load({"optim": make()[1]}, str(tmp_path / "c"))


def test_module_inside_a_tuple_is_refused(tmp_path):
    model, _ = make()
    with pytest.raises(UnsupportedValueError, match=r"state_dict\['pair'\] is a tuple.*list or a dict"):
        shardckpt.save({"pair": (model, 1)}, str(tmp_path / "c"))


def test_strict_false_returns_and_logs_the_skipped_keys_once(tmp_path, caplog):
    model, optim = trained("adamw", 1)
    shardckpt.save({"model": model, "optim": optim, "step": 1}, str(tmp_path / "c"))
    fresh_model, _ = make()
    state = {"model": fresh_model, "ema": torch.full((2,), 5.0), "step": 0}
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        result = shardckpt.load(state, str(tmp_path / "c"), strict=False)
    missing, unexpected = result
    assert missing == ["ema"] and result.missing_keys is missing
    saved = manifest(tmp_path / "c")
    assert unexpected == sorted(k for k in [*saved.tensors, *saved.values] if k.startswith("optim."))
    assert len(unexpected) > 10
    assert_same_params(fresh_model, model)
    assert state["step"] == 1 and torch.equal(state["ema"], torch.full((2,), 5.0))
    records = [r for r in caplog.records if r.name == "shardckpt"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    text = records[0].getMessage()
    assert "1 key of the state_dict not in the checkpoint" in text and "'ema'" in text
    assert f"{len(unexpected)} keys of the checkpoint not in the state_dict" in text
    assert f"... and {len(unexpected) - 10} more" in text and len(text) < 2000

    caplog.clear()
    fresh_model, fresh_optim = make()
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        result = shardckpt.load({"model": fresh_model, "optim": fresh_optim}, str(tmp_path / "c"), strict=False)
        assert result == ([], ["step"])
        assert shardckpt.load({"model": make()[0], "step": 0}, str(tmp_path / "c"), strict=False).unexpected_keys
    assert len([r for r in caplog.records if r.name == "shardckpt"]) == 2  # one per load


def test_a_fresh_optimizers_plain_state_dict_gets_a_fix_in_the_error(tmp_path):
    model, optim = trained("adamw", 1)
    shardckpt.save({"model": model.state_dict(), "optim": optim.state_dict()}, str(tmp_path / "c"))
    fresh_model, fresh_optim = make()
    with pytest.raises(StateDictMismatchError) as info:
        shardckpt.load({"model": fresh_model.state_dict(), "optim": fresh_optim.state_dict()}, str(tmp_path / "c"))
    text = str(info.value)
    assert "18 keys in the checkpoint but not in the state_dict: 'optim.state.0.exp_avg'" in text
    assert "put the optimizer itself in the state_dict" in text and text.endswith("the saved one was built.")


def test_mismatch_message_stays_short_with_hundreds_of_keys(tmp_path):
    shardckpt.save({f"layer{i:03d}.weight": torch.zeros(2) for i in range(300)}, str(tmp_path / "c"))
    target = {f"layer{i:03d}.weight": torch.zeros(2, dtype=torch.float64) for i in range(300)}
    target["only_here"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as info:
        shardckpt.load(target, str(tmp_path / "c"))
    text = str(info.value)
    assert len(text) < 2000, len(text)
    assert "300 keys where the state_dict cannot hold what was saved" in text and "... and 290 more" in text
    assert "'layer000.weight': saved shape [2] dtype float32, the state_dict holds" in text
    assert "1 key missing from the checkpoint: 'only_here'" in text
    assert text.endswith("`shardckpt inspect` lists what was saved.")


def test_train_state_still_round_trips_through_the_shared_code(tmp_path: Path):
    model, optim = trained("adamw", 2)
    with shardckpt.CheckpointManager(str(tmp_path)) as manager:
        assert shardckpt.TrainState(model=model, optimizer=optim, step=2).save(manager, force=True)
        fresh_model, fresh_optim = make()
        restored = shardckpt.TrainState(model=fresh_model, optimizer=fresh_optim)
        assert restored.restore(manager) == 2
    assert_same_params(fresh_model, model)
    assert_same_optimizer(fresh_optim, optim)
