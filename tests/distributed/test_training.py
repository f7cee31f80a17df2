"""TrainState and ResumableDistributedSampler: round trips, per-rank RNG rules, resharded resume.

The distributed part saves FSDP2 (1-D and 2x2 HSDP) and DDP training states on 4 and 2
gloo ranks once per module, then restores them on 4, 3, 2 and 1 (no process group) and
compares full parameters and optimizer state bitwise with what was saved.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import shardckpt
from shardckpt.training.rng import RngStreamsRederivedWarning, apply_rng, capture_rng, reseed_rng
from shardckpt.training.sampler import ResumableDistributedSampler
from shardckpt.training.train_state import TrainState

# ---------------------------------------------------------------- RNG streams (one process)


def draws() -> tuple:
    return (torch.rand(3).tolist(), random.random(), float(np.random.rand()))


def test_rng_streams_round_trip_through_uint8_tensors():
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state: it must survive too
    random.gauss(0, 1)
    streams = capture_rng()
    assert all(t.dtype == torch.uint8 and t.dim() == 1 for t in streams.values())
    assert {"torch", "python", "numpy"} <= set(streams)
    expected = (draws(), np.random.randn(), random.gauss(0, 1))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    apply_rng(streams)
    assert (draws(), np.random.randn(), random.gauss(0, 1)) == expected


def test_reseed_depends_on_seed_step_and_rank_only():
    reseed_rng(5, 10, 2)
    a = draws()
    draws()
    reseed_rng(5, 10, 2)
    assert draws() == a
    reseed_rng(5, 10, 3)
    assert draws() != a
    reseed_rng(5, 11, 2)
    assert draws() != a


# ---------------------------------------------------------------- TrainState (one process)


class Counter:
    """A Stateful extra holding a tensor and a JSON value."""

    def __init__(self) -> None:
        self.hits = torch.zeros(3)
        self.name = "fresh"

    def state_dict(self) -> dict:
        return {"hits": self.hits, "name": self.name}

    def load_state_dict(self, sd: dict) -> None:
        self.hits.copy_(sd["hits"])
        self.name = sd["name"]


def plain_state(*, with_scheduler: bool = True) -> TrainState:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    model[0].bias.requires_grad_(False)  # frozen: in the checkpoint, not in the optimizer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5) if with_scheduler else None
    return TrainState(
        model=model,
        optimizer=opt,
        lr_scheduler=sched,
        grad_scaler=torch.amp.GradScaler("cpu", init_scale=1024.0),
        data=ResumableDistributedSampler(40, seed=3),
        extras={"best": 1.5, "tags": {"run": "a"}, "counter": Counter()},
        seed=7,
    )


def train_steps(state: TrainState, n: int) -> None:
    opt = state.optimizers[0]
    for i in range(n):
        batch = state.data.next_batch(4)
        x = torch.randn(len(batch.local_ids), 5)
        loss = nn.functional.dropout(state.model(x), 0.5).pow(2).mean()
        state.grad_scaler.scale(loss).backward()
        state.grad_scaler.step(opt)
        state.grad_scaler.update(2048.0 if i == 0 else None)
        opt.zero_grad()
        if state.lr_scheduler is not None:
            state.lr_scheduler.step(10.0 + i)  # never improves: the plateau scheduler halves the LR
        state.step += 1


def test_train_state_round_trip_restores_everything(tmp_path):
    state = plain_state()
    train_steps(state, 4)
    state.epoch = 2
    state.extras["tags"]["more"] = [1, 2]  # JSON extras may change shape: the saved one comes back
    state.extras["counter"].hits += 4
    state.extras["counter"].name = "trained"
    with shardckpt.CheckpointManager(str(tmp_path)) as manager:
        assert state.save(manager, metrics={"loss": 1.0})
    expected_draws = draws()
    saved_sched = state.lr_scheduler.state_dict()
    assert saved_sched["num_bad_epochs"] == 1 and state.optimizers[0].param_groups[0]["lr"] == 0.005

    fresh = plain_state()
    with shardckpt.CheckpointManager(str(tmp_path)) as manager, warnings.catch_warnings():
        warnings.simplefilter("error")  # same world size: nothing to warn about
        assert fresh.restore(manager) == 4
    assert fresh.rng_restored == "exact" and fresh.restored_world_size == 1
    assert draws() == expected_draws
    assert (fresh.step, fresh.epoch, fresh.seed) == (4, 2, 7)
    for (k, a), b in zip(state.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    a_opt, b_opt = state.optimizers[0].state_dict(), fresh.optimizers[0].state_dict()
    assert a_opt["param_groups"] == b_opt["param_groups"]
    for pid, s in a_opt["state"].items():
        for name, t in s.items():
            assert torch.equal(t, b_opt["state"][pid][name]), (pid, name)
    assert fresh.lr_scheduler.state_dict() == saved_sched
    assert fresh.grad_scaler.state_dict() == state.grad_scaler.state_dict()
    assert fresh.grad_scaler.get_scale() == 2048.0
    assert fresh.data.state_dict() == state.data.state_dict()
    assert {k: v for k, v in fresh.data.state_dict().items() if k != "order_digest"} == {
        "epoch": 0,
        "consumed": 16,
        "seed": 3,
        "dataset_len": 40,
        "shuffle": True,
    }
    assert fresh.extras["best"] == 1.5 and fresh.extras["tags"] == {"run": "a", "more": [1, 2]}
    assert (
        torch.equal(fresh.extras["counter"].hits, torch.full((3,), 4.0)) and fresh.extras["counter"].name == "trained"
    )


def test_fresh_root_restores_nothing_and_leaves_rng_alone(tmp_path):
    state = plain_state()
    torch.manual_seed(11)
    expected = torch.rand(2)
    torch.manual_seed(11)
    with shardckpt.CheckpointManager(str(tmp_path)) as manager:
        assert state.restore(manager) is None
    assert torch.equal(torch.rand(2), expected) and state.rng_restored is None


def test_missing_part_is_refused_unless_not_strict(tmp_path):
    state = plain_state()
    train_steps(state, 1)
    with shardckpt.CheckpointManager(str(tmp_path)) as manager:
        state.save(manager)
        without = plain_state(with_scheduler=False)
        with pytest.raises(shardckpt.StateDictMismatchError, match="lr_scheduler"):
            without.restore(manager)
        with pytest.warns(UserWarning, match="skipped"):
            assert without.restore(manager, strict=False) == 1
    assert without.step == 1 and torch.equal(without.model[2].weight, state.model[2].weight)


def test_damaged_latest_step_falls_back_to_the_one_before(tmp_path):
    state = plain_state()
    with shardckpt.CheckpointManager(str(tmp_path)) as manager:
        train_steps(state, 1)
        state.save(manager)
        train_steps(state, 1)
        state.save(manager)
        data_dir = Path(manager.path(2)) / "data"
    for f in data_dir.iterdir():  # flip the last byte of every data file
        raw = bytearray(f.read_bytes())
        raw[-1] ^= 0xFF
        f.write_bytes(bytes(raw))
    fresh = plain_state()
    with shardckpt.CheckpointManager(str(tmp_path)) as manager:
        assert fresh.restore(manager) == 1 and fresh.step == 1
        with pytest.raises(shardckpt.IntegrityError):
            fresh.restore(manager, step=2)
        with pytest.raises(shardckpt.CheckpointNotFoundError, match="committed steps are"):
            fresh.restore(manager, step=7)


def test_plain_checkpoint_is_not_mistaken_for_a_train_state(tmp_path):
    with shardckpt.CheckpointManager(str(tmp_path)) as manager:
        manager.save(5, {"model": {"w": torch.ones(2)}})
        with pytest.raises(shardckpt.StateDictMismatchError, match="no TrainState"):
            plain_state().restore(manager)


def test_data_scope_defaults_and_validation():
    assert TrainState(model=nn.Linear(1, 1), data=ResumableDistributedSampler(4)).data_scope == "global"
    assert TrainState(model=nn.Linear(1, 1), data=Counter()).data_scope == "per_rank"
    with pytest.raises(ValueError, match="data_scope"):
        TrainState(model=nn.Linear(1, 1), data=Counter(), data_scope="sometimes")
    with pytest.raises(TypeError, match="lr_scheduler"):
        TrainState(model=nn.Linear(1, 1), lr_scheduler=object())


# ---------------------------------------------------------------- sampler (pure)


def samplers(world: int, n: int = 50, **kw) -> list[ResumableDistributedSampler]:
    return [ResumableDistributedSampler(n, num_replicas=world, rank=r, seed=4, **kw) for r in range(world)]


def take(group: list[ResumableDistributedSampler], global_batch: int, steps: int) -> list[tuple[int, list[int]]]:
    """Run ``steps`` steps on every rank; check the ranks agree; return (epoch, global ids) per step."""
    out = []
    for _ in range(steps):
        batches = [s.next_batch(global_batch) for s in group]
        assert all(b.global_ids == batches[0].global_ids and b.epoch == batches[0].epoch for b in batches)
        assert sorted(i for b in batches for i in b.local_ids) == sorted(batches[0].global_ids)
        assert len({len(b.local_ids) for b in batches}) == 1
        out.append((batches[0].epoch, batches[0].global_ids))
    assert all(s.state_dict() == group[0].state_dict() for s in group)
    return out


@pytest.mark.parametrize("before,after", [(4, 2), (4, 3), (2, 4), (3, 1), (1, 4)])
def test_sampler_resume_on_another_world_size_neither_repeats_nor_skips(before, after):
    gb = 12
    reference = take(samplers(1), gb, 9)  # 50 samples: 4 steps per epoch (2 dropped), into epoch 2
    first = samplers(before)
    seen = take(first, gb, 5)
    resumed = samplers(after)
    for s in resumed:
        s.load_state_dict(dict(first[0].state_dict()))
    seen += take(resumed, gb, 4)
    assert seen == reference
    for epoch in (0, 1):
        ids = [i for e, batch in seen if e == epoch for i in batch]
        assert len(ids) == len(set(ids)) == 48  # every sample at most once; only the 2-sample tail dropped
        assert ids == ResumableDistributedSampler(50, seed=4).global_order(epoch)[:48]


def test_sampler_as_dataloader_sampler_resumes_mid_epoch_on_another_world_size():
    def run(group, local_batch, n_batches):
        iters = [iter(torch.utils.data.DataLoader(range(50), batch_size=local_batch, sampler=s)) for s in group]
        ids = []
        for _ in range(n_batches):
            ids += sorted(i for it in iters for i in next(it).tolist())
            for s in group:
                s.advance(local_batch * len(group))
        return ids

    before = samplers(4)
    ids = run(before, 2, 3)  # 24 samples
    after = samplers(2)
    for s in after:
        s.load_state_dict(before[0].state_dict())
    assert len(after[0]) == 13 and len(after[1]) == 13
    ids += run(after, 3, 4)  # 24 more
    order = ResumableDistributedSampler(50, seed=4).global_order(0)
    assert sorted(ids) == sorted(order[:48]) and len(set(ids)) == 48


def test_sampler_epochs_drop_last_and_state_checks():
    s = ResumableDistributedSampler(10, num_replicas=2, rank=1, seed=1, drop_last=False)
    assert len(s.next_batch(8).global_ids) == 8
    short = s.next_batch(8)  # drop_last=False: the 2 remaining samples, one per rank
    assert (short.epoch, len(short.global_ids), len(short.local_ids)) == (0, 2, 1)
    assert s.next_batch(8).epoch == 1
    assert s.global_order(0) != s.global_order(1) and sorted(s.global_order(1)) == list(range(10))
    s.set_epoch(1)  # the current epoch keeps its position
    assert s.consumed == 8
    with pytest.raises(ValueError, match="multiple of num_replicas"):
        s.next_batch(3)
    with pytest.raises(ValueError, match="same dataset"):
        ResumableDistributedSampler(11).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="computes differently"):
        ResumableDistributedSampler(10).load_state_dict({**s.state_dict(), "order_digest": "0" * 16})
    assert list(ResumableDistributedSampler(5, shuffle=False, num_replicas=2, rank=0)) == [0, 2]


# ---------------------------------------------------------------- FSDP2 / DDP across world sizes


class Net(nn.Module):
    """Uneven sizes on purpose (shards of 11, 13 and 5 rows over 2, 3, 4 ranks) and a frozen param."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 13)
        self.out = nn.Linear(13, 5)
        self.frozen = nn.Parameter(torch.arange(7.0), requires_grad=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(self.emb(idx)))) + self.frozen[:5]


def make_state(kind: str, world: int) -> TrainState:
    torch.manual_seed(0)
    model = Net()
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    elif kind in ("fsdp", "hsdp"):
        mesh = (
            init_device_mesh("cpu", (world,))
            if kind == "fsdp"
            else init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        )
        for sub in (model.emb, model.fc):
            fully_shard(sub, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return TrainState(
        model=model, optimizer=opt, lr_scheduler=sched, data=ResumableDistributedSampler(64, seed=1), seed=5
    )


def full_state(state: TrainState) -> dict:
    """Collective: full model and optimizer state, identical whatever the parallelism."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)
    model = {k: v.clone() for k, v in get_model_state_dict(state.model, options=opts).items()}
    optim = get_optimizer_state_dict(state.model, state.optimizers, options=opts)
    return {
        "model": model,
        "optim": optim,
        "sched": state.lr_scheduler.state_dict(),
        "data": state.data.state_dict(),
        "step": state.step,
    }


def assert_same_state(got: dict, want: dict) -> None:
    assert got["model"].keys() == want["model"].keys() and "frozen" in got["model"]
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert got["optim"]["param_groups"] == want["optim"]["param_groups"]
    assert got["optim"]["state"].keys() == want["optim"]["state"].keys()
    for fqn, s in want["optim"]["state"].items():
        for name, t in s.items():
            assert torch.equal(got["optim"]["state"][fqn][name], t), (fqn, name)
    assert (got["sched"], got["data"], got["step"]) == (want["sched"], want["data"], want["step"])


def _train_and_save(rank: int, world: int, root: str, kinds: list[str], out: str) -> None:
    record = {}
    for kind in kinds:
        state = make_state(kind, world)
        state.reseed_rng(step=0)
        opt = state.optimizers[0]
        for step in range(1, 4):
            batch = state.data.next_batch(8)
            x = torch.tensor(batch.local_ids).remainder(11)
            loss = nn.functional.dropout(state.model(x), 0.2).pow(2).mean()
            loss.backward()
            opt.step()
            state.lr_scheduler.step()
            opt.zero_grad()
            state.step = step
        with shardckpt.CheckpointManager(f"{root}/{kind}{world}") as manager:
            state.save(manager, force=True)
        after = draws()
        everyone = [None] * world
        dist.all_gather_object(everyone, after)
        record[f"{kind}{world}"] = {"state": full_state(state), "draws": everyone}
        if kind != "ddp":  # the same state in format 3 (sharding rules, per-rank index records)
            with shardckpt.CheckpointManager(f"{root}/v3{kind}{world}", format_version=3) as manager:
                state.save(manager, force=True)
            record[f"v3{kind}{world}"] = record[f"{kind}{world}"]
    if rank == 0:
        torch.save(record, out)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Roots fsdp4, hsdp4, ddp4 (saved on 4 ranks) and fsdp2 (2 ranks), the FSDP and HSDP
    states again in format 3 (v3fsdp4, v3hsdp4, v3fsdp2), plus what was saved."""
    root = str(tmp_path_factory.mktemp("train_states"))
    run_ranks(_train_and_save, 4, root, ["fsdp", "hsdp", "ddp"], f"{root}/ref4.pt")
    run_ranks(_train_and_save, 2, root, ["fsdp"], f"{root}/ref2.pt")
    ref = {**torch.load(f"{root}/ref4.pt", weights_only=False), **torch.load(f"{root}/ref2.pt", weights_only=False)}
    return root, ref


def _restore_and_check(rank: int, world: int, root: str, cases: list[tuple[str, str]], ref: dict) -> None:
    for source, kind in cases:
        state = make_state(kind, world)
        saved_world = int(source[-1])
        with (
            shardckpt.CheckpointManager(f"{root}/{source}", read_only=True) as manager,
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            assert state.restore(manager) == 3
        rederived = [w for w in caught if issubclass(w.category, RngStreamsRederivedWarning)]
        got_draws = draws()
        assert_same_state(full_state(state), ref[source]["state"])
        if saved_world == world:
            assert state.rng_restored == "exact" and not rederived
            assert got_draws == ref[source]["draws"][rank]
        else:
            assert state.rng_restored == "rederived" and len(rederived) == 1
            assert f"saved on {saved_world} ranks and is resumed on {world}" in str(rederived[0].message)
            reseed_rng(5, 3, rank)
            assert got_draws == draws()


def test_resume_on_the_same_world_size_restores_rng_exactly_and_2_to_4_reshards(saved):
    root, ref = saved
    run_ranks(_restore_and_check, 4, root, [("fsdp4", "fsdp"), ("hsdp4", "hsdp"), ("fsdp2", "fsdp")], ref)


@pytest.mark.compat
def test_reshard_4_to_3_uneven_from_fsdp_hsdp_and_ddp(saved):
    root, ref = saved
    for name in ("v3fsdp4", "v3hsdp4"):  # really format 3, FSDP's Shard(0) stored as rules
        manifest = json.loads(next(Path(root, name).glob("*/manifest.json")).read_text())
        assert manifest["format_version"] == 3 and "files" not in manifest, name
        assert any("rule" in t for t in manifest["tensors"].values()), name
    run_ranks(
        _restore_and_check,
        3,
        root,
        [("fsdp4", "fsdp"), ("hsdp4", "fsdp"), ("ddp4", "fsdp"), ("v3fsdp4", "fsdp"), ("v3hsdp4", "fsdp")],
        ref,
    )


def test_reshard_4_to_2_into_fsdp_and_ddp(saved):
    root, ref = saved
    run_ranks(_restore_and_check, 2, root, [("fsdp4", "fsdp"), ("fsdp4", "ddp"), ("fsdp2", "ddp")], ref)


@pytest.mark.compat
def test_load_on_one_process_without_process_group(saved):
    root, ref = saved
    assert not dist.is_initialized()
    _restore_and_check(
        0, 1, root, [("fsdp4", "plain"), ("hsdp4", "plain"), ("ddp4", "plain"), ("v3hsdp4", "plain")], ref
    )
