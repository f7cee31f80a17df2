"""torchtitan's Trainer checkpointing through ShardckptCheckpointManager (issue #20).

The end-to-end test runs torchtitan 0.3.0's own ``torchtitan.train`` under torchrun on 2
gloo/CPU ranks (llama3's debug model, a tokenizer and data set made here), through
``tests/support/torchtitan_job.py`` (which says what it patches for CPU and why): one
uninterrupted run, one run SIGKILLed after step 3 (step 2 committed), and its resumption
(saving asynchronously).
The resumed losses and the final checkpoint must be bitwise the uninterrupted run's.

torchtitan is not a dependency: these tests run under ``.ci/torchtitan`` (its own venv)
and are skipped elsewhere, except the one that checks the error without torchtitan.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from distributed import free_port, run_command

from shardckpt.convert import read_state_dict
from shardckpt.errors import MissingDependencyError, ShardckptError

HAS_TORCHTITAN = importlib.util.find_spec("torchtitan") is not None
needs_torchtitan = pytest.mark.skipif(
    not HAS_TORCHTITAN, reason="torchtitan is not installed: bash .ci/torchtitan runs these (torchtitan==0.3.0)"
)
pytestmark = [
    pytest.mark.torchtitan,
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"),
]

JOB = Path(__file__).resolve().parents[1] / "support" / "torchtitan_job.py"
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(HAS_TORCHTITAN, reason="torchtitan is installed")
def test_without_torchtitan_the_import_says_what_to_install():
    with pytest.raises(MissingDependencyError, match=r"pip install torchtitan==0\.3\.0"):
        import shardckpt.integrations.torchtitan  # noqa: F401


@needs_torchtitan
@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"last_save_in_hf": True}, "last_save_in_hf"),
        ({"initial_load_in_hf": True, "initial_load_path": "/ckpt"}, "initial_load_in_hf"),
        ({"async_mode": "async_with_pinned_mem"}, "async_mode"),
    ],
)
def test_config_refuses_what_it_does_not_support(fields, named):
    from shardckpt.integrations.torchtitan import ShardckptCheckpointManager

    with pytest.raises(ValueError, match=named) as err:
        ShardckptCheckpointManager.Config(**fields)
    assert "ShardckptCheckpointManager" in str(err.value)


@needs_torchtitan
def test_a_disabled_manager_does_nothing():
    from shardckpt.integrations.torchtitan import ShardckptCheckpointManager

    mgr = ShardckptCheckpointManager.Config(enable=False).build(
        dataloader=None, model_parts=[], optimizers=None, lr_schedulers=None, states={}
    )
    assert mgr.load() is False
    assert mgr.save(10, last_step=True) is False
    mgr.close()


class Counter:
    """A stand-in for torchtitan's optimizer, scheduler and train-state Statefuls."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state_dict):
        self.value = state_dict["value"]


def build_manager(folder: Path, model: torch.nn.Module, counters: dict, loader=None, **fields):
    from shardckpt.integrations.torchtitan import ShardckptCheckpointManager

    config = ShardckptCheckpointManager.Config(enable=True, folder=str(folder), interval=2, **fields)
    return config.build(
        dataloader=loader,
        model_parts=[model],
        optimizers=counters["optimizer"],
        lr_schedulers=counters["lr_scheduler"],
        states={"train_state": counters["train_state"]},
    )


@needs_torchtitan
def test_one_process_interval_model_only_last_save_and_load_step(tmp_path):
    """The manager driven as the Trainer drives it, without the trainer: saves on the
    interval and the last step, a model-only last step in export_dtype, a load of the
    latest (model only, as recorded) and of an older full step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    counters = {k: Counter() for k in ("optimizer", "lr_scheduler", "train_state")}
    mgr = build_manager(tmp_path / "ckpt", model, counters, export_dtype="bfloat16", keep_latest_k=0)
    saved = {}
    for step in (1, 2, 3):
        for c in counters.values():
            c.value = step
        with torch.no_grad():
            model.weight.add_(1.0)
        saved[step] = model.weight.detach().clone()
        assert mgr.save(step, last_step=step == 3) is (step != 1)
    mgr.close()
    assert committed(tmp_path / "ckpt") == ["step_0000000002", "step_0000000003"]
    last = read_state_dict(str(tmp_path / "ckpt" / "step_0000000003"))
    assert sorted(last) == ["bias", "weight"] and last["weight"].dtype == torch.bfloat16

    fresh = {k: Counter() for k in counters}
    model2 = torch.nn.Linear(4, 3)
    mgr2 = build_manager(tmp_path / "ckpt", model2, fresh)
    assert mgr2.load() is True  # the latest, step 3: the model only, as its metrics say
    assert torch.equal(model2.weight, saved[3].to(torch.bfloat16).float())
    assert [c.value for c in fresh.values()] == [0, 0, 0]
    assert mgr2.load(step=2) is True
    assert torch.equal(model2.weight, saved[2])
    assert [c.value for c in fresh.values()] == [2, 2, 2]
    mgr2.close()


@needs_torchtitan
def test_exclude_from_loading_names_only_known_states(tmp_path):
    counters = {k: Counter() for k in ("optimizer", "lr_scheduler", "train_state")}
    with pytest.raises(ValueError, match=r"'dataloader'.*'lr_scheduler', 'optimizer', 'train_state'"):
        build_manager(tmp_path / "ckpt", torch.nn.Linear(2, 2), counters, exclude_from_loading=["dataloader"])


@needs_torchtitan
def test_dataloader_position_round_trips_as_json_and_refuses_another_dp_degree():
    from torchtitan.components.dataloader import ParallelAwareDataloader

    from shardckpt.integrations.torchtitan import _DataLoaderState

    def loader(world: int):
        return ParallelAwareDataloader(list(range(20)), dp_rank=0, dp_world_size=world, batch_size=2)

    first = loader(2)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = _DataLoaderState(first).state_dict()
    assert isinstance(state["dp_rank_0"], str) and state["world_size"] == 2  # JSON text, not pickle bytes
    again = loader(2)
    _DataLoaderState(again).load_state_dict(state)
    assert next(iter(again)).tolist() == next(it).tolist() == [6, 7]
    with pytest.raises(ShardckptError, match="saved with 2 data-parallel ranks, this job has 4"):
        _DataLoaderState(loader(4)).load_state_dict(state)


def make_assets(root: Path) -> tuple[Path, Path]:
    """A word-level tokenizer of 203 ids (the debug model has 2048) and a small JSON data set."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(200)]
    tok_dir, data_dir = root / "tokenizer", root / "data"
    tok_dir.mkdir(parents=True)
    data_dir.mkdir()
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    rng = random.Random(0)
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(100))}) for _ in range(64)]
    (data_dir / "train.jsonl").write_text("\n".join(lines) + "\n")
    return tok_dir, data_dir


def train(dump: Path, assets: tuple[Path, Path], losses: Path, *overrides: str, kill_at_step: int = 0):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(JOB.parent), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TT_LOSSES=str(losses), TT_KILL_AT_STEP=str(kill_at_step))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += [str(JOB), "--module", "torchtitan_job", "--config", "debugmodel_cpu", "--dump_folder", str(dump)]
    cmd += ["--hf_assets_path", str(assets[0]), "--dataloader.dataset_path", str(assets[1]), *overrides]
    return run_command(cmd, env=env, cwd=dump.parent)


def read_losses(path: Path) -> dict[tuple[int, int], str]:
    """(rank, step) -> the loss's exact repr, as the job recorded it."""
    out = {}
    for line in path.read_text().splitlines():
        rank, step, loss = line.split()
        out[int(rank), int(step)] = loss
    return out


def committed(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob("step_*/manifest.json"))


@needs_torchtitan
def test_trainer_killed_and_resumed_matches_an_uninterrupted_run(tmp_path):
    assets = make_assets(tmp_path / "assets")
    ref, run = tmp_path / "ref", tmp_path / "run"

    done = train(ref, assets, tmp_path / "ref.losses")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    expected = read_losses(tmp_path / "ref.losses")
    assert sorted(expected) == [(r, s) for r in (0, 1) for s in (1, 2, 3, 4)]
    # keep_latest_k=2, interval=2, 4 steps: steps 2 and 4 committed, nothing else kept
    assert committed(ref / "checkpoint") == ["step_0000000002", "step_0000000004"]

    killed = train(run, assets, tmp_path / "killed.losses", kill_at_step=3)
    assert killed.returncode != 0, "the ranks were to SIGKILL themselves after step 3"
    assert "SIGKILL" in killed.stdout + killed.stderr
    assert read_losses(tmp_path / "killed.losses") == {k: v for k, v in expected.items() if k[1] <= 3}
    assert committed(run / "checkpoint") == ["step_0000000002"]

    # async this time (a command-line override of the Config's own field): step 4 is
    # committed by close() at the end of training
    resumed = train(run, assets, tmp_path / "resumed.losses", "--checkpoint.async_mode", "async")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert "resumed from step 2" in resumed.stdout + resumed.stderr
    # steps 3 and 4 again, from step 2's checkpoint: the same losses to the last bit
    assert read_losses(tmp_path / "resumed.losses") == {k: v for k, v in expected.items() if k[1] >= 3}

    want = read_state_dict(str(ref / "checkpoint" / "step_0000000004"))
    got = read_state_dict(str(run / "checkpoint" / "step_0000000004"))
    assert sorted(got) == sorted(want)
    assert {"optimizer", "lr_scheduler", "dataloader", "train_state", "tok_embeddings.weight"} <= set(want)
    assert got["train_state"] == {"step": 4, "ntokens_seen": want["train_state"]["ntokens_seen"]}
    mismatched = [key for key in want if not _bitwise_equal(want[key], got[key])]
    assert mismatched == [], f"differ from the uninterrupted run: {mismatched}"


def _bitwise_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_bitwise_equal, a, b))
    return type(a) is type(b) and a == b
