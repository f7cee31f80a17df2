"""Modules and optimizers as objects on gloo ranks: DDP and FSDP2 (fully_shard on CPU).

Every case trains 3 steps, saves ``{"model": model, "optim": optim, "step": 3}``, and
takes one more step: the uninterrupted run. Fresh objects (a new process's model and an
optimizer that never stepped) then load the checkpoint and take that same step; their
parameters must equal the uninterrupted run's. On the saving world size (2 -> 2) that
holds bit for bit; on another (2 -> 3) the loaded state is still bitwise the saved one,
but the step after it is compared with a tight tolerance (see ``_resume_on_3``).
Also: TrainState's deliberate partial loads log no warning.
"""

from __future__ import annotations

import logging

import torch
from distributed import run_ranks
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import shardckpt

FULL = StateDictOptions(full_state_dict=True, cpu_offload=False)
GLOBAL_BATCH = 6  # splits evenly over 2 and 3 ranks, so every rank's mean weighs the same


class Net(nn.Module):
    """Uneven sizes on purpose: 10 and 3 rows shard unevenly over 2 and 3 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def build(kind: str, world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model: nn.Module = Net()
    if kind == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.fc1, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def train_step(model: nn.Module, optim: torch.optim.Optimizer, step: int, rank: int, world: int) -> None:
    batch = torch.randn(GLOBAL_BATCH, 6, generator=torch.Generator().manual_seed(step))
    model(batch.chunk(world)[rank]).pow(2).mean().backward()
    optim.step()
    optim.zero_grad()


def copied(tree: object) -> object:
    """A deep copy of the tensors in ``tree`` (DCP returns the live tensors where it can)."""
    if isinstance(tree, dict):
        return {k: copied(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [copied(v) for v in tree]
    return tree.clone() if isinstance(tree, torch.Tensor) else tree


def full(model: nn.Module, optim: torch.optim.Optimizer | None = None) -> dict:
    """Collective: a copy of the full (unsharded) parameters, and of the optimizer's state if given."""
    out = {"params": get_model_state_dict(model, options=FULL)}
    if optim is not None:
        out["optim"] = get_optimizer_state_dict(model, optim, options=FULL)
    return copied(out)


def assert_equal(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k, v in want.items():
        if isinstance(v, dict):
            assert_equal(got[k], v, f"{what}.{k}")
        elif isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), f"{what}.{k}"
        else:
            assert got[k] == v, f"{what}.{k}"


def _resume_on_2(rank: int, world: int, root: str, out: str) -> None:
    record = {}
    for kind in ("ddp", "fsdp"):
        model, optim = build(kind, world)
        for step in range(3):
            train_step(model, optim, step, rank, world)
        optim.param_groups[0]["lr"] = 0.005  # a scheduler's work: the fresh optimizer must get it
        shardckpt.save({"model": model, "optim": optim, "step": 3}, f"{root}/{kind}")
        saved = full(model, optim)
        train_step(model, optim, 3, rank, world)
        want = full(model)

        fresh_model, fresh_optim = build(kind, world)
        assert not fresh_optim.state
        state = {"model": fresh_model, "optim": fresh_optim, "step": 0}
        assert shardckpt.load(state, f"{root}/{kind}") == ([], [])
        assert state["step"] == 3 and fresh_optim.param_groups[0]["lr"] == 0.005
        assert_equal(full(fresh_model, fresh_optim), saved, f"{kind} loaded")
        train_step(fresh_model, fresh_optim, 3, rank, world)
        assert_equal(full(fresh_model), want, f"{kind} after one more step")
        record[kind] = {"saved": saved, "next": want}
    if rank == 0:
        torch.save(record, out)
    _train_state_restores_quietly(rank, world, root)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _train_state_restores_quietly(rank: int, world: int, root: str) -> None:
    """TrainState loads with strict=False on purpose (other ranks' RNG streams are in the
    checkpoint, not in this rank's target) and checks the keys itself: no warning."""
    model, optim = build("ddp", world)
    train_step(model, optim, 0, rank, world)
    with shardckpt.CheckpointManager(f"{root}/train") as manager:
        shardckpt.TrainState(model=model, optimizer=optim, step=1).save(manager, force=True)
        handler = Records()
        logging.getLogger("shardckpt").addHandler(handler)
        try:
            fresh_model, fresh_optim = build("ddp", world)
            fresh = shardckpt.TrainState(model=fresh_model, optimizer=fresh_optim)
            assert fresh.restore(manager) == 1
        finally:
            logging.getLogger("shardckpt").removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]


def _resume_on_3(rank: int, world: int, root: str, record: dict) -> None:
    for source in ("fsdp", "ddp"):  # a DDP checkpoint has the same names: it loads into FSDP2 too
        model, optim = build("fsdp", world)
        state = {"model": model, "optim": optim, "step": 0}
        assert shardckpt.load(state, f"{root}/{source}") == ([], [])
        assert state["step"] == 3 and optim.param_groups[0]["lr"] == 0.005
        assert_equal(full(model, optim), record[source]["saved"], f"{source} loaded on 3 ranks")  # copies: exact
        train_step(model, optim, 3, rank, world)
        # Not bitwise: 3 ranks each average 2 rows and the gradients are summed in another
        # order (and partial matmuls differ) than on 2 ranks, so float32 rounding differs in
        # the last bits; one AdamW step moves parameters by ~lr, so 1e-6 is far below any real error.
        got = full(model)["params"]
        assert got.keys() == record[source]["next"]["params"].keys()
        for k, v in record[source]["next"]["params"].items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=f"{source} {k}")


def test_ddp_and_fsdp2_resume_from_fresh_objects_bit_for_bit_and_fsdp2_on_3_ranks(tmp_path):
    root = str(tmp_path)
    run_ranks(_resume_on_2, 2, root, f"{root}/record.pt")
    record = torch.load(f"{root}/record.pt", weights_only=False)
    run_ranks(_resume_on_3, 3, root, record)
