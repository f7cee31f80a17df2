"""CheckpointManager: commit discovery, retention, restore, ownership, intervals, preemption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from distributed import run_ranks

import shardckpt
from shardckpt.manager.retention import RetentionPolicy


def state(v: float) -> dict:
    return {"model": {"w": torch.full((4, 3), float(v))}, "step": int(v)}


def blank() -> dict:
    return {"model": {"w": torch.zeros(4, 3)}, "step": -1}


# ---------------------------------------------------------------- retention policy (pure)


def test_keep_last_never_drops_newest():
    p = RetentionPolicy(keep_last=2)
    assert p.to_delete([10, 20, 30, 40], {}) == [10, 20]
    assert p.to_delete([40], {}) == []
    assert RetentionPolicy().to_delete([1, 2, 3], {}) == []


def test_keep_every_n_and_best_combine_with_last():
    p = RetentionPolicy(keep_last=1, keep_every_n_steps=100, keep_best=2, monitor="loss", mode="min")
    metrics = {
        50: {"loss": 0.1},
        100: {"loss": 9.0},
        150: {"loss": 0.3},
        170: {"loss": 5.0},
        180: {"loss": 0.2},
        190: {},
    }
    # kept: 190 (last), 100 (every 100), 50 and 180 (best two losses)
    assert p.to_delete([50, 100, 150, 170, 180, 190], metrics) == [150, 170]


def test_best_mode_max_and_missing_metric():
    p = RetentionPolicy(keep_last=1, keep_best=1, monitor="acc", mode="max")
    assert p.best([1, 2, 3], {1: {"acc": 0.5}, 2: {"acc": 0.9}, 3: {"other": 1}}) == [2, 1]
    assert p.to_delete([1, 2, 3], {1: {"acc": 0.5}, 2: {"acc": 0.9}, 3: {}}) == [1]


@pytest.mark.parametrize(
    "kwargs,match",
    [({"keep_last": 0}, "keep_last"), ({"mode": "avg"}, "mode"), ({"keep_best": 2}, "monitor")],
)
def test_bad_policy_is_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetentionPolicy(**kwargs)


# ---------------------------------------------------------------- manager, one process


def test_fresh_root_restores_none_then_latest(tmp_path):
    root = str(tmp_path / "run")
    with shardckpt.CheckpointManager(root, keep_last=2) as mgr:
        sd = blank()
        assert mgr.restore(sd) is None and sd["step"] == -1
        for step in (1, 2, 3):
            assert mgr.save(step, state(step))
        assert mgr.steps() == [2, 3]
        assert sorted(os.listdir(root)) == [".shardckpt-owner.json", "step_0000000002", "step_0000000003"]
    with shardckpt.CheckpointManager(root) as mgr:
        sd = blank()
        assert mgr.restore(sd) == 3
        assert sd["step"] == 3 and torch.equal(sd["model"]["w"], torch.full((4, 3), 3.0))
        assert mgr.restore(sd, step=2) == 2 and sd["step"] == 2
        with pytest.raises(shardckpt.CheckpointNotFoundError, match=r"step 1; committed steps are \[2, 3\]"):
            mgr.restore(sd, step=1)
    assert not os.path.exists(os.path.join(root, ".shardckpt-owner.json"))


def test_save_interval_steps_and_force(tmp_path):
    with shardckpt.CheckpointManager(str(tmp_path), save_interval_steps=5) as mgr:
        saved = [s for s in range(1, 13) if mgr.save(s, state(s))]
        assert saved == [5, 10]
        assert mgr.save(12, state(12), force=True)
        assert mgr.steps() == [5, 10, 12]


def test_save_interval_seconds(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("shardckpt.manager.checkpoint_manager.time.monotonic", lambda: clock[0])
    with shardckpt.CheckpointManager(str(tmp_path), save_interval_steps=10**9, save_interval_s=60) as mgr:
        assert not mgr.save(1, state(1))
        clock[0] += 61
        assert mgr.save(2, state(2))
        clock[0] += 30
        assert not mgr.save(3, state(3))
        assert mgr.steps() == [2]


def test_best_step_and_keep_best_survive_retention(tmp_path):
    with shardckpt.CheckpointManager(str(tmp_path), keep_last=1, keep_best=1, monitor="val_loss") as mgr:
        for step, loss in [(1, 3.0), (2, 0.5), (3, 2.0), (4, 1.0)]:
            mgr.save(step, state(step), metrics={"val_loss": loss})
        assert mgr.steps() == [2, 4]
        assert mgr.best_step() == 2
        assert mgr.metrics(2) == {"val_loss": 0.5}


def test_uncommitted_leftovers_are_ignored_then_cleaned(tmp_path):
    root = str(tmp_path)
    with shardckpt.CheckpointManager(root) as mgr:
        mgr.save(1, state(1))
    # an interrupted save: the save marker (written first by every save) and data, no manifest
    os.makedirs(os.path.join(root, "step_0000000002", "data"))
    with open(os.path.join(root, "step_0000000002", ".shardckpt-save.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(root, "step_0000000002", "data", "0123456789ab-r00000-00.safetensors"), "wb") as f:
        f.write(b"partial")
    infos = shardckpt.list_root(root)
    assert [(i.step, i.committed) for i in infos] == [(1, True), (2, False)]
    reader = shardckpt.CheckpointManager(root, read_only=True)
    assert reader.steps() == [1]
    with shardckpt.CheckpointManager(root) as mgr:
        assert mgr.cleaned_up == ["step_0000000002"]
        assert mgr.steps() == [1]
    assert not os.path.exists(os.path.join(root, "step_0000000002"))


def test_second_writer_is_refused_until_first_closes(tmp_path):
    first = shardckpt.CheckpointManager(str(tmp_path))
    with pytest.raises(shardckpt.RootInUseError, match="in use by another CheckpointManager"):
        shardckpt.CheckpointManager(str(tmp_path))
    shardckpt.CheckpointManager(str(tmp_path), read_only=True).close()  # readers are welcome
    first.close()
    shardckpt.CheckpointManager(str(tmp_path)).close()


def test_owner_record_of_a_dead_process_is_taken_over(tmp_path):
    script = f"import shardckpt; m = shardckpt.CheckpointManager({str(tmp_path)!r}); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert os.path.exists(os.path.join(tmp_path, ".shardckpt-owner.json"))
    shardckpt.CheckpointManager(str(tmp_path)).close()


def test_damaged_latest_falls_back_to_previous(tmp_path):
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
        data = os.path.join(mgr.path(2).removeprefix(""), "data")
    victim = os.path.join(data, os.listdir(data)[0])
    with open(victim, "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        sd = blank()
        assert mgr.restore(sd) == 1 and sd["step"] == 1
        with pytest.raises(shardckpt.IntegrityError):
            mgr.restore(sd, step=2)


def test_preemption_saves_then_exits(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, torch, shardckpt
        mgr = shardckpt.CheckpointManager({str(tmp_path)!r}, save_interval_steps=1000, save_on_preemption=True,
                                          preemption_exit_code=17)
        for step in range(1, 100):
            if step == 7:
                os.kill(os.getpid(), signal.SIGTERM)
            mgr.save(step, {{"w": torch.full((2,), float(step)), "step": step}})
        print("not reached")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    assert "not reached" not in proc.stdout
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        assert mgr.steps() == [7]


# ---------------------------------------------------------------- manager, several ranks


def _manager_ranks(rank: int, world: int, root: str) -> None:
    with shardckpt.CheckpointManager(root, keep_last=2, save_interval_s=3600) as mgr:
        sd = {"w": torch.full((8,), float(rank)), "step": 0}
        assert mgr.restore(sd) is None
        for step in range(1, 5):
            sd["step"] = step
            sd[f"r{rank}"] = torch.full((2,), float(step))  # per-rank keys
            assert mgr.save(step, sd)
        assert mgr.steps() == [3, 4]
    with shardckpt.CheckpointManager(root) as mgr:
        target = {"w": torch.zeros(8), "step": 0, f"r{rank}": torch.zeros(2)}
        assert mgr.restore(target, strict=False) == 4
        assert target["step"] == 4 and torch.equal(target[f"r{rank}"], torch.full((2,), 4.0))


def test_manager_on_two_ranks(tmp_path):
    run_ranks(_manager_ranks, 2, str(tmp_path / "run"))


def test_async_manager_commits_in_background_and_applies_retention(tmp_path):
    with shardckpt.CheckpointManager(str(tmp_path), keep_last=2, async_save=True) as mgr:
        sd = state(0)
        for step in range(1, 5):
            sd["model"]["w"].fill_(float(step))
            sd["step"] = step
            assert mgr.save(step, sd)
            sd["model"]["w"].fill_(-1.0)  # mutate at once: must not reach the checkpoint
        mgr.wait()
        assert mgr.steps() == [3, 4]
        got = blank()
        assert mgr.restore(got) == 4
        assert torch.equal(got["model"]["w"], torch.full((4, 3), 4.0)) and got["step"] == 4


def test_cli_ls_shows_committed_uncommitted_latest_and_best(tmp_path, capsys):
    from shardckpt.cli.app import main

    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
            mgr.save(step, state(step), metrics={"loss": loss})
    os.makedirs(tmp_path / "step_0000000004" / "data")
    assert main(["ls", str(tmp_path), "--monitor", "loss"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["STEP", "STATE", "SIZE"]
    assert lines[2].split()[0] == "2" and lines[2].rstrip().endswith("best")
    assert lines[3].split()[0] == "3" and lines[3].rstrip().endswith("latest")
    assert lines[4].split()[:2] == ["4", "UNCOMMITTED"]
    assert main(["ls", str(tmp_path), "--json", "--monitor", "loss", "--mode", "max"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["latest"] == 3 and doc["best"] == 1
    assert [(s["step"], s["committed"]) for s in doc["steps"]] == [(1, True), (2, True), (3, True), (4, False)]


@pytest.mark.parametrize("use_async", [False, True])
def test_failed_save_never_triggers_retention(tmp_path, use_async):
    """keep_last=1: a save that fails (here in planning: complex dtype; for async, in the
    background) must not delete the only committed step."""
    with shardckpt.CheckpointManager(str(tmp_path), keep_last=1, async_save=use_async) as mgr:
        mgr.save(1, state(1))
        mgr.wait()
        bad = state(2)
        bad["model"]["z"] = torch.zeros(2, dtype=torch.complex64)
        with pytest.raises(shardckpt.UnsupportedValueError):
            mgr.save(2, bad)
            mgr.wait()  # async: the background failure surfaces here
        assert mgr.steps() == [1]
        got = blank()
        assert mgr.restore(got) == 1 and got["step"] == 1
        mgr.save(3, state(3))
        mgr.wait()
        assert mgr.steps() == [3]  # retention resumes with the next committed step
