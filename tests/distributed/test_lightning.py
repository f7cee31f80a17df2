"""The Lightning CheckpointIO plugin, with a real Trainer on CPU: fit, checkpoint, resume, retention."""

from __future__ import annotations

import copy
import enum
import os
import pathlib

import pytest
import torch

L = pytest.importorskip("lightning", reason="Lightning is not installed: pip install 'shardckpt[lightning]'")

from distributed import run_ranks  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from shardckpt.errors import ShardckptError, UnsupportedValueError  # noqa: E402
from shardckpt.integrations.lightning import ShardckptLoadMixin  # noqa: E402
from shardckpt.integrations.lightning.checkpoint_io import ShardckptCheckpointIO, decode_checkpoint, encode_checkpoint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning")


class TinyModel(ShardckptLoadMixin, L.LightningModule):
    def __init__(self, lr: float = 0.05, data_dir: pathlib.Path = pathlib.Path("/data/tiny"), seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("score", float(self.global_step))  # grows every step: top-k by "max" keeps the newest
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}


class WiderModel(TinyModel):
    """TinyModel with one more layer: a checkpoint of TinyModel lacks its keys."""

    def __init__(self, lr: float = 0.05, data_dir: pathlib.Path = pathlib.Path("/data/tiny"), seed: int = 0) -> None:
        super().__init__(lr, data_dir, seed)
        self.head = torch.nn.Linear(2, 1)


class BatchCounter(Callback):
    """A callback with its own state, which Lightning stores under checkpoint["callbacks"]."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.batches += 1

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state_dict: dict) -> None:
        self.batches = state_dict["batches"]


class Snapshot(Callback):
    """Records the state a resumed Trainer starts from, before it trains further."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())  # live tensors: training goes on
        self.scheduler = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())
        self.global_step = trainer.global_step


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(1))), batch_size=4)


def trainer(root: str, max_steps: int, *callbacks: Callback, async_save: bool = False) -> L.Trainer:
    checkpoints = ModelCheckpoint(
        dirpath=root, monitor="score", mode="max", save_top_k=2, every_n_train_steps=1, save_last=True
    )
    return L.Trainer(
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        plugins=[ShardckptCheckpointIO(async_save=async_save)],
        callbacks=[checkpoints, *callbacks],
    )


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_fit_checkpoint_resume_state_equal(tmp_path, async_save):
    root = str(tmp_path / "ckpts")
    counter, model = BatchCounter(), TinyModel()
    first = trainer(root, 6, counter, async_save=async_save)
    first.fit(model, loader())
    # Top-k retention ran through remove_checkpoint: only the 2 best and last are left.
    assert sorted(os.listdir(root)) == ["epoch=0-step=5.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    assert all(os.path.isfile(os.path.join(root, d, "manifest.json")) for d in os.listdir(root))
    # What a Lightning user types for inference, on the plugin's checkpoint folder.
    loaded = TinyModel.load_from_checkpoint(os.path.join(root, "last.ckpt"))
    assert loaded.hparams == {"lr": 0.05, "data_dir": pathlib.Path("/data/tiny"), "seed": 0}
    trained = model.state_dict()
    assert not torch.equal(TinyModel().layer.weight, trained["layer.weight"])  # training changed them
    assert sorted(loaded.state_dict()) == sorted(trained)
    assert all(torch.equal(loaded.state_dict()[k], trained[k]) for k in trained)

    snap, counter2 = Snapshot(), BatchCounter()
    second = trainer(root, 8, counter2, snap)
    second.fit(TinyModel(seed=123), loader(), ckpt_path="last")
    assert snap.global_step == 6
    want = model.state_dict()
    assert all(torch.equal(snap.weights[k], want[k]) for k in want)
    opt_want = first.optimizers[0].state_dict()
    assert sorted(snap.optimizer["state"]) == [0, 1]  # int param ids, as the optimizer saved them
    for pid, state in opt_want["state"].items():
        assert all(torch.equal(snap.optimizer["state"][pid][k], v) for k, v in state.items())
    assert snap.optimizer["param_groups"] == opt_want["param_groups"]
    assert snap.scheduler == first.lr_scheduler_configs[0].scheduler.state_dict()
    assert counter2.batches == 6 + 2  # restored to 6, then two more steps
    assert second.global_step == 8
    best = second.checkpoint_callback
    assert best.best_model_path.endswith("epoch=0-step=8.ckpt") and float(best.best_model_score) == 7.0


def test_checkpoint_dict_round_trips_through_the_plugin(tmp_path):
    ckpt = {
        "state_dict": {"w": torch.arange(6.0).reshape(2, 3)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}, 1: {}}, "param_groups": [{"params": [0, 1]}]}],
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 1}}}},
        "hyper_parameters": {"data_dir": pathlib.Path("/d"), "paths": [pathlib.Path("a"), "b"], "betas": (0.9, 0.99)},
        "lr_schedulers": [{}],
        "global_step": 3,
    }
    io = ShardckptCheckpointIO()
    io.save_checkpoint(ckpt, tmp_path / "c.ckpt")
    back = io.load_checkpoint(tmp_path / "c.ckpt")
    assert torch.equal(back["state_dict"]["w"], ckpt["state_dict"]["w"])
    assert back["optimizer_states"][0]["state"][1] == {} and torch.equal(
        back["optimizer_states"][0]["state"][0]["step"], torch.tensor(3.0)
    )
    back["optimizer_states"][0]["state"][0].pop("step")
    ckpt["optimizer_states"][0]["state"][0].pop("step")
    back["state_dict"] = ckpt["state_dict"]
    assert back == ckpt
    assert isinstance(back["hyper_parameters"]["data_dir"], pathlib.PurePath)


class Mode(enum.Enum):
    FAST = "fast"


def test_values_that_are_not_json_fail_with_their_path():
    with pytest.raises(UnsupportedValueError, match=r"\['hyper_parameters'\]\['mode'\].*Mode.*\.value"):
        encode_checkpoint({"hyper_parameters": {"mode": Mode.FAST}})
    with pytest.raises(UnsupportedValueError, match="dict key"):
        encode_checkpoint({"x": {(1, 2): 3}})


def test_encode_notes_nested_int_keys_inner_first():
    t = torch.ones(1)
    tree, notes = encode_checkpoint({"a": {1: {2: t}}})
    assert tree == {"a": {"1": {"2": t}}} and notes["int_keys"] == [["a", "1"], ["a"]]
    assert decode_checkpoint(tree, notes) == {"a": {1: {2: t}}}


def test_async_save_keeps_the_values_of_the_moment(tmp_path):
    w = torch.zeros(1000)
    io = ShardckptCheckpointIO(async_save=True)
    io.save_checkpoint({"state_dict": {"w": w}}, str(tmp_path / "a.ckpt"))
    w.add_(1)  # training goes on while the save is written
    io.teardown()
    assert torch.equal(io.load_checkpoint(str(tmp_path / "a.ckpt"))["state_dict"]["w"], torch.zeros(1000))


def test_remove_checkpoint_refuses_folders_that_are_not_checkpoints(tmp_path):
    io = ShardckptCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, str(tmp_path / "c.ckpt"))
    (tmp_path / "c.ckpt" / "notes.txt").write_text("mine")
    with pytest.raises(ShardckptError, match="refusing to delete"):
        io.remove_checkpoint(str(tmp_path / "c.ckpt"))
    assert (tmp_path / "c.ckpt" / "manifest.json").exists()
    (tmp_path / "c.ckpt" / "notes.txt").unlink()
    io.remove_checkpoint(str(tmp_path / "c.ckpt"))
    assert not (tmp_path / "c.ckpt").exists()
    io.remove_checkpoint(str(tmp_path / "c.ckpt"))  # already gone: fine, as with files


def test_remove_checkpoint_deletes_only_what_it_can_prove_is_a_checkpoint(tmp_path):
    io = ShardckptCheckpointIO()
    ckpt = tmp_path / "c.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, str(ckpt))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    native = tmp_path / "native.ckpt"
    native.write_bytes(b"a torch.save file, or anything else")
    refused = {
        native: "not a shardckpt checkpoint folder",
        tmp_path / "to-mine.ckpt": "symlink",
        tmp_path / "to-file.ckpt": "symlink",
        tmp_path / "dangling.ckpt": "symlink",
    }
    (tmp_path / "to-mine.ckpt").symlink_to(mine, target_is_directory=True)
    (tmp_path / "to-file.ckpt").symlink_to(native)
    (tmp_path / "dangling.ckpt").symlink_to(tmp_path / "gone")
    for path, why in refused.items():
        with pytest.raises(ShardckptError, match=f"refusing to delete.*{why}.*by hand"):
            io.remove_checkpoint(str(path))
        assert os.path.lexists(path)
    assert (mine / "thesis.tex").read_text() == "years of work" and native.exists()
    # save_last="link" with a last-{step} name: Lightning removes the previous link through
    # remove_checkpoint. The link goes, the checkpoint it points to stays.
    link = tmp_path / "last-v1.ckpt"
    link.symlink_to(ckpt, target_is_directory=True)
    io.remove_checkpoint(str(link))
    assert not os.path.lexists(link) and (ckpt / "manifest.json").is_file()


def test_remove_checkpoint_refuses_a_file_in_an_object_store_too():
    import fsspec

    url = "memory://lightning-remove/native.ckpt"
    with fsspec.open(url, "wb") as f:
        f.write(b"a torch.save file")
    with pytest.raises(ShardckptError, match=r"refusing to delete.*it is a file"):
        ShardckptCheckpointIO().remove_checkpoint(url)
    assert fsspec.filesystem("memory").exists(url)
    fsspec.filesystem("memory").rm(url)


def _rank_zero_saves_alone(rank: int, world: int, path: str) -> None:
    import torch.distributed as dist

    io = ShardckptCheckpointIO()
    if rank == 0:  # what Lightning's strategies do: only global rank 0 calls save_checkpoint
        io.save_checkpoint({"state_dict": {"w": torch.arange(4.0)}, "global_step": 5}, path)
    dist.barrier()
    back = io.load_checkpoint(path)  # every rank reads, nothing collective
    assert torch.equal(back["state_dict"]["w"], torch.arange(4.0)) and back["global_step"] == 5


def test_rank_zero_alone_can_save_inside_a_process_group(tmp_path):
    run_ranks(_rank_zero_saves_alone, 2, str(tmp_path / "c.ckpt"))


# ---------------------------------------------------------------- load_from_checkpoint (ShardckptLoadMixin)


def _save_like_lightning(path: str, model: L.LightningModule, **extra: object) -> None:
    """What Trainer.save_checkpoint hands the plugin, less the loops: weights, hparams, version."""
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": L.__version__,
        **extra,
    }
    ShardckptCheckpointIO().save_checkpoint(checkpoint, path)


def test_load_from_checkpoint_overrides_hparams_and_honours_map_location(tmp_path):
    path = str(tmp_path / "c.ckpt")
    saved = TinyModel(lr=0.5, seed=3)
    _save_like_lightning(path, saved)
    loaded = TinyModel.load_from_checkpoint(path, map_location="cpu", data_dir=pathlib.Path("/elsewhere"))
    assert loaded.hparams == {
        "lr": 0.5,
        "data_dir": pathlib.Path("/elsewhere"),
        "seed": 3,
    }  # kwargs win, as in Lightning
    assert torch.equal(loaded.layer.weight, saved.layer.weight) and loaded.layer.weight.device.type == "cpu"
    assert TinyModel.load_from_checkpoint(path, map_location={"cpu": "cpu"}).hparams["lr"] == 0.5
    with pytest.raises(TypeError, match=r"callable map_location.*device"):
        TinyModel.load_from_checkpoint(path, map_location=lambda storage, location: storage)
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        saved.load_from_checkpoint(path)  # Lightning's guard against a discarded result, kept


def test_hparams_file_and_classes_without_the_mixin(tmp_path):
    from shardckpt.integrations.lightning import load_module

    class Plain(L.LightningModule):  # a class the user cannot edit
        def __init__(self, lr: float = 0.05, seed: int = 0) -> None:
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(seed)
            self.layer = torch.nn.Linear(4, 2)

    path = str(tmp_path / "c.ckpt")
    saved = Plain(lr=0.3, seed=6)
    _save_like_lightning(path, saved)
    (tmp_path / "hparams.yaml").write_text("lr: 0.7\nseed: 8\n")
    loaded = load_module(Plain, path, hparams_file=tmp_path / "hparams.yaml")
    assert dict(loaded.hparams) == {"lr": 0.7, "seed": 8}  # the file replaces the saved hparams, as in Lightning
    assert torch.equal(loaded.layer.weight, saved.layer.weight)
    with pytest.raises(ValueError, match=r"hparams_file=.*\.csv, \.yml or \.yaml"):
        load_module(Plain, path, hparams_file=tmp_path / "hparams.json")


def test_the_mixin_must_come_before_lightning_module():
    with pytest.raises(TypeError, match=r"put it first: class Late\(ShardckptLoadMixin, LightningModule\)"):

        class Late(L.LightningModule, ShardckptLoadMixin):
            pass


def test_load_from_checkpoint_strict_and_unexpected_keys_as_in_lightning(tmp_path):
    narrow, wide = str(tmp_path / "narrow.ckpt"), str(tmp_path / "wide.ckpt")
    _save_like_lightning(narrow, TinyModel(seed=1))
    _save_like_lightning(wide, WiderModel(seed=2))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"head\.weight\""):
        WiderModel.load_from_checkpoint(narrow)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"head\.bias\", \"head\.weight\"\. "):
        TinyModel.load_from_checkpoint(wide)
    with pytest.warns(
        UserWarning, match=r"not in the model state dict but in the checkpoint: \['head\.bias', 'head\.weight'\]"
    ):
        loose = TinyModel.load_from_checkpoint(wide, strict=False)
    assert torch.equal(loose.layer.weight, WiderModel(seed=2).layer.weight)
    with pytest.warns(
        UserWarning, match=r"in the model state dict but not in the checkpoint: \['head\.weight', 'head\.bias'\]"
    ):
        WiderModel.load_from_checkpoint(narrow, strict=False)


def test_load_from_checkpoint_still_reads_lightning_files(tmp_path):
    # A torch.save file the test wrote itself: the mixin hands it to Lightning's own loader.
    path = tmp_path / "native.ckpt"
    saved = TinyModel(lr=0.2, seed=4)
    checkpoint = {"state_dict": saved.state_dict(), "hyper_parameters": dict(saved.hparams)}
    torch.save({**checkpoint, "pytorch-lightning_version": L.__version__}, path)
    loaded = TinyModel.load_from_checkpoint(path, weights_only=False)
    assert loaded.hparams["lr"] == 0.2 and torch.equal(loaded.layer.weight, saved.layer.weight)


def test_load_from_checkpoint_explains_folders_that_are_not_committed_checkpoints(tmp_path):
    from shardckpt.errors import CheckpointNotFoundError

    native = tmp_path / "dcp.ckpt"  # what Lightning's own sharded strategies write
    native.mkdir()
    (native / "meta.pt").write_bytes(b"never read")
    with pytest.raises(CheckpointNotFoundError, match="never unpickles"):
        TinyModel.load_from_checkpoint(native)
    with pytest.raises(CheckpointNotFoundError, match=r"missing\.ckpt"):
        TinyModel.load_from_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_from_checkpoint_map_location_cuda(tmp_path):
    path = str(tmp_path / "c.ckpt")
    saved = TinyModel(seed=5)
    _save_like_lightning(path, saved)
    loaded = TinyModel.load_from_checkpoint(path, map_location="cuda:0")
    assert loaded.layer.weight.device == torch.device("cuda:0")
    assert torch.equal(loaded.layer.weight.cpu(), saved.layer.weight)
