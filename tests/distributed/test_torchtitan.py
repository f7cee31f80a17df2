"""torchtitan's Trainer checkpointing through ShardckptCheckpointManager (issue #20).

The end-to-end test runs torchtitan 0.3.0's own ``torchtitan.train`` under torchrun on 2
gloo/CPU ranks (llama3's debug model, a tokenizer and data set made here), through
``tests/support/torchtitan_job.py`` (which says what it patches for CPU and why): one
uninterrupted run, one run SIGKILLed after step 3 (step 2 committed), and its resumption.
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
    with pytest.raises(ImportError, match=r"pip install torchtitan==0\.3\.0"):
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


def train(dump: Path, assets: tuple[Path, Path], losses: Path, kill_at_step: int = 0):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(JOB.parent), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TT_LOSSES=str(losses), TT_KILL_AT_STEP=str(kill_at_step))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += [str(JOB), "--module", "torchtitan_job", "--config", "debugmodel_cpu", "--dump_folder", str(dump)]
    cmd += ["--hf_assets_path", str(assets[0]), "--dataloader.dataset_path", str(assets[1])]
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

    resumed = train(run, assets, tmp_path / "resumed.losses")
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
