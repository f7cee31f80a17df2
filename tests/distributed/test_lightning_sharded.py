"""The sharded Lightning strategies, with real Trainers on gloo/CPU ranks: fit, checkpoint,
resume on a different number of processes, retention.

FSDP1 refuses CPU when Lightning wraps the model (Lightning passes ``device_id=None`` and
FSDP1 then wants an accelerator), so the FSDP module wraps itself in ``configure_model``
with ``device_id=cpu``, which Lightning's FSDPStrategy accepts as user wrapping. Everything
else (the strategy's setup, Lightning's checkpoint dict, ModelCheckpoint, ckpt_path resume,
our save/load/remove) is the real code path.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

L = pytest.importorskip("lightning", reason="Lightning is not installed: pip install 'shardckpt[lightning]'")

from distributed import run_ranks  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from test_lightning import BatchCounter  # noqa: E402  (the same callback: state under checkpoint["callbacks"])
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from shardckpt.errors import CheckpointNotFoundError, ShardckptError  # noqa: E402
from shardckpt.integrations.lightning import ShardckptLoadMixin  # noqa: E402
from shardckpt.integrations.lightning.strategy import ShardckptFSDPStrategy, ShardckptModelParallelStrategy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")
STEPS = 4


class ShardedNet(ShardckptLoadMixin, L.LightningModule):
    """Uneven shapes, so shards differ in size and resharding 2 -> 3 ranks moves rows."""

    def __init__(
        self, kind: str, seed: int = 0, lr: float = 0.05, data_dir: pathlib.Path = pathlib.Path("/data")
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))

    def configure_model(self) -> None:
        if not torch.distributed.is_initialized():
            return  # load_from_checkpoint for inference, in one process: a plain module
        if self.hparams.kind == "fsdp":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            if not isinstance(self.net, FSDP):
                self.net = FSDP(self.net, device_id=torch.device("cpu"), use_orig_params=True)
        else:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            fully_shard(self.net[0], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        self.log("score", float(self.global_step))  # grows every step: top-k by "max" keeps the newest
        return self.net(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}


def run_forked(fn, world_size: int, *args) -> None:
    """run_ranks (tests/support/distributed.py), but each rank is forked from a fork server that
    imported Lightning and this module once: a spawned rank spends ~10 s of CPU importing
    Lightning again. The server is a fresh process (no threads, no torch op run), which a
    plain fork of the test process, after other tests ran in it, would not be."""
    run_ranks(fn, world_size, *args, start_method="forkserver", preload=["lightning.pytorch", "distributed", __name__])


def full_state(trainer: L.Trainer) -> tuple[dict[str, torch.Tensor], list]:
    """Whole (unsharded) model and optimizer tensors, and the param groups. Collective."""
    model, opt = trainer.strategy.model, trainer.optimizers[0]
    full = StateDictOptions(full_state_dict=True)
    tensors = {f"model/{k}": v.clone() for k, v in get_model_state_dict(model, options=full).items()}
    osd = get_optimizer_state_dict(model, opt, options=full)
    for name, state in osd["state"].items():
        tensors.update({f"optim/{name}/{k}": v.clone() for k, v in state.items()})
    groups = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
    return tensors, json.loads(json.dumps(groups))


class Snapshot(Callback):
    """What a resumed Trainer starts from (before it trains on) and the dict it was given."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.loaded = checkpoint

    def on_train_start(self, trainer, pl_module) -> None:
        self.tensors, self.groups = full_state(trainer)
        self.global_step = trainer.global_step
        self.scheduler = trainer.lr_scheduler_configs[0].scheduler.state_dict()


def make_trainer(
    kind: str, world: int, root: str, max_steps: int, *callbacks: Callback, async_save: bool = False
) -> L.Trainer:
    if kind == "fsdp":
        strategy: L.pytorch.strategies.Strategy = ShardckptFSDPStrategy(async_save=async_save, num_io_threads=2)
    else:
        strategy = ShardckptModelParallelStrategy(
            data_parallel_size=world, tensor_parallel_size=1, async_save=async_save, num_io_threads=2
        )
    checkpoints = ModelCheckpoint(
        dirpath=root, monitor="score", mode="max", save_top_k=2, every_n_train_steps=1, save_last=True
    )
    return L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoints, *callbacks],
    )


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(96, 5, generator=torch.Generator().manual_seed(1))), batch_size=4)


def _fit(rank: int, world: int, kind: str, root: str, ref: str, async_save: bool) -> None:
    trainer = make_trainer(kind, world, root, STEPS, BatchCounter(), async_save=async_save)
    trainer.fit(ShardedNet(kind), loader())
    tensors, groups = full_state(trainer)
    # Retention ran through the strategy's remove_checkpoint: the 2 best and last, each committed.
    names = sorted(os.listdir(root))
    assert names == [f"epoch=0-step={STEPS - 1}.ckpt", f"epoch=0-step={STEPS}.ckpt", "last.ckpt"], names
    assert all(os.path.isfile(os.path.join(root, n, "manifest.json")) for n in names)
    with open(os.path.join(root, "last.ckpt", "manifest.json")) as f:
        manifest = json.load(f)
    # Each rank wrote its own rows of each weight (FSDP shards dim 0): sharded, in parallel.
    chunks = manifest["tensors"]["state_dict.net.0.weight"]["chunks"]
    assert manifest["world_size"] == world and len({c["file"].split("-r")[1][:5] for c in chunks}) == world
    if rank == 0:
        save_file(tensors, ref + ".safetensors")
        with open(ref + ".json", "w") as f:
            json.dump({"groups": groups, "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict()}, f)
    _refuses_foreign_folders(rank, trainer.strategy, root)


def _refuses_foreign_folders(rank: int, strategy, root: str) -> None:
    import torch.distributed as dist

    victim = os.path.join(root, f"epoch=0-step={STEPS - 1}.ckpt")
    dist.barrier()
    if rank == 0:
        with open(os.path.join(victim, "notes.txt"), "w") as f:
            f.write("mine")
    dist.barrier()
    with pytest.raises(ShardckptError, match="refusing to delete"):  # raised on every rank, not only rank 0
        strategy.remove_checkpoint(victim)
    assert os.path.isfile(os.path.join(victim, "manifest.json"))
    dist.barrier()
    if rank == 0:
        os.unlink(os.path.join(victim, "notes.txt"))
    dist.barrier()
    strategy.remove_checkpoint(victim)
    assert not os.path.exists(victim)


def _resume(rank: int, world: int, kind: str, root: str, ref: str) -> None:
    snap, counter = Snapshot(), BatchCounter()
    trainer = make_trainer(kind, world, root, STEPS + 1, counter, snap)
    trainer.fit(ShardedNet(kind, seed=123), loader(), ckpt_path="last")
    want = load_file(ref + ".safetensors")
    assert sorted(snap.tensors) == sorted(want)
    unequal = [k for k in want if not torch.equal(snap.tensors[k], want[k])]
    assert not unequal, unequal
    with open(ref + ".json") as f:
        saved = json.load(f)
    assert snap.groups == saved["groups"]
    assert json.loads(json.dumps(snap.scheduler)) == saved["scheduler"]
    assert snap.global_step == STEPS and trainer.global_step == STEPS + 1
    assert counter.batches == STEPS + 1  # restored to STEPS by the callback state, then one more
    assert "state_dict" not in snap.loaded and "optimizer_states" not in snap.loaded  # loaded in place instead
    assert snap.loaded["hyper_parameters"]["data_dir"] == pathlib.Path("/data")
    best = trainer.checkpoint_callback
    assert best.best_model_path.endswith(f"epoch=0-step={STEPS + 1}.ckpt") and float(best.best_model_score) == STEPS
    # Not fitting: only the model is loaded (no optimizers exist), from a top-k checkpoint.
    trainer.validate(ShardedNet(kind, seed=7), loader(), ckpt_path=os.path.join(root, f"epoch=0-step={STEPS}.ckpt"))
    weights = get_model_state_dict(trainer.strategy.model, options=StateDictOptions(full_state_dict=True))
    assert all(torch.equal(v, want[f"model/{k}"]) for k, v in weights.items()) and len(weights) == 4


@pytest.mark.parametrize(
    ("kind", "fit_world", "resume_world", "async_save"),
    [("fsdp", 2, 3, False), ("model_parallel", 2, 1, True)],
    ids=["fsdp-2to3-sync", "model_parallel-2to1-async"],
)
def test_fit_checkpoint_resume_on_another_world_size(tmp_path, kind, fit_world, resume_world, async_save):
    root, ref = str(tmp_path / "ckpts"), str(tmp_path / "reference")
    run_forked(_fit, fit_world, kind, root, ref, async_save)
    _load_for_inference_in_this_process(kind, root, ref)
    run_forked(_resume, resume_world, kind, root, ref)


def _load_for_inference_in_this_process(kind: str, root: str, ref: str) -> None:
    """What a user types after sharded training: one process, no process group, CPU."""
    assert not torch.distributed.is_initialized()
    model = ShardedNet.load_from_checkpoint(os.path.join(root, "last.ckpt"), map_location="cpu")
    assert dict(model.hparams) == {"kind": kind, "seed": 0, "lr": 0.05, "data_dir": pathlib.Path("/data")}
    trained = {
        k.removeprefix("model/"): v for k, v in load_file(ref + ".safetensors").items() if k.startswith("model/")
    }
    weights = model.state_dict()
    assert sorted(weights) == sorted(trained) and len(trained) == 4
    assert not torch.equal(ShardedNet(kind).net[0].weight, trained["net.0.weight"])  # training changed them
    unequal = [k for k in trained if not torch.equal(weights[k], trained[k])]
    assert not unequal, unequal


def test_only_sharded_saving_is_offered():
    with pytest.raises(ValueError, match="always sharded"):
        ShardckptFSDPStrategy(state_dict_type="full")
    with pytest.raises(ValueError, match="always sharded"):
        ShardckptModelParallelStrategy(save_distributed_checkpoint=False)
    with pytest.raises(ValueError, match="num_io_threads"):
        ShardckptFSDPStrategy(num_io_threads=0)


def test_lightning_native_checkpoints_are_refused_without_unpickling(tmp_path):
    from shardckpt.integrations.lightning.strategy import ShardckptOptions, _open

    native = tmp_path / "epoch=0-step=1.ckpt"
    native.mkdir()
    (native / "meta.pt").write_bytes(b"not read")
    with pytest.raises(CheckpointNotFoundError, match="never unpickles"):
        _open(str(native), ShardckptOptions())


def test_a_checkpoint_that_does_not_cover_the_model_or_optimizers_is_refused_before_reading(tmp_path):
    import shardckpt
    from shardckpt.errors import StateDictMismatchError
    from shardckpt.integrations.lightning.strategy import ShardckptOptions, _check_covered, _open

    path = str(tmp_path / "c.ckpt")
    w = torch.ones(2)
    shardckpt.save({"state_dict": {"a": w}, "optimizer_states": [{"state": {"a": {"exp_avg": w}}}]}, path)
    source = _open(path, ShardckptOptions())
    _check_covered(
        source, {"state_dict": {"a": w}, "optimizer_states": [{"state": {"a": {"exp_avg": w}}}]}, strict_model=True
    )
    with pytest.raises(StateDictMismatchError, match=r"lacks 'state_dict\.b'.*strict_loading"):
        _check_covered(source, {"state_dict": {"a": w, "b": w}}, strict_model=True)
    _check_covered(source, {"state_dict": {"a": w, "b": w}}, strict_model=False)  # strict_loading = False
    with pytest.raises(StateDictMismatchError, match=r"state of 1 optimizer\(s\), but 2 are configured"):
        _check_covered(source, {"state_dict": {"a": w}, "optimizer_states": [{}, {}]}, strict_model=True)
