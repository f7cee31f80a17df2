"""The first hour of a new user (issue #15): what a fresh clone's README leads to.

One step-naming scheme (the manager's ``step_0000000100``; a plain ``step_100`` is a
checkpoint, not a step, and says so), ``pathlib.Path`` everywhere a path is taken, a
non-zero exit for every CLI command given a missing path, a short Manifest repr, one
traceback per save error, and the timeout defaults.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

import shardckpt
from shardckpt.cli.app import main
from shardckpt.format import layout


def state(v: float) -> dict:
    return {"model": {"w": torch.full((4, 3), float(v))}, "step": int(v)}


def blank() -> dict:
    return {"model": {"w": torch.zeros(4, 3)}, "step": -1}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- 1: one step-naming scheme


def test_only_the_managers_own_spelling_is_a_step():
    assert layout.step_dir_name(100) == "step_0000000100"
    assert layout.parse_step_dir("step_0000000100") == 100
    assert layout.parse_step_dir("runs/exp1/step_0000000100/") == 100
    assert layout.parse_step_dir("step_12345678901") == 12345678901  # more than 10 digits, no padding
    # Other spellings of 100 would give step 100 a second folder: not steps.
    for name in ("step_100", "step_00000000100", "step_0100", "step_", "step_-000000001", "Step_0000000100"):
        assert layout.parse_step_dir(name) is None, name
    assert layout.looks_like_step_dir("step_100") and not layout.looks_like_step_dir("final")


def test_readme_paths_work_together(tmp_path, capsys, caplog):
    """README: save to runs/exp1/step_100, a manager on runs/exp1, then the shell section."""
    root = tmp_path / "runs" / "exp1"
    shardckpt.save(state(1), str(root / "step_100"))
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        with shardckpt.CheckpointManager(str(root)) as mgr:
            assert mgr.restore(blank()) is None  # step_100 is not one of its steps: a fresh start
            mgr.save(100, state(2))
            assert mgr.steps() == [100] and mgr.path(100) == f"{root}/step_0000000100"
    warned = [r.getMessage() for r in caplog.records if "step_100" in r.getMessage()]
    assert len(warned) == 1 and "not a step of this manager" in warned[0] and "step_0000000100" in warned[0]

    code, out, err = run(capsys, "inspect", str(root / "step_100"))
    assert code == 0 and "world_size  1" in out and err == ""
    code, out, _ = run(capsys, "verify", "--no-progress", str(root / "step_100"))
    assert code == 0 and out.startswith("OK")
    code, out, _ = run(capsys, "inspect", str(root / "step_0000000100"))
    assert code == 0

    code, out, _ = run(capsys, "ls", str(root))
    lines = out.splitlines()
    assert code == 0
    assert lines[1].split()[:2] == ["100", "committed"] and lines[1].endswith("latest")
    (other,) = [ln for ln in lines if ln.startswith("step_100 ")]
    assert "checkpoint (not a manager step)" in other
    assert f"shardckpt inspect {root}/step_100" in out and "step_0000000100" in out

    code, out, _ = run(capsys, "ls", "--json", str(root))
    doc = json.loads(out)
    assert [(s["step"], s["folder"]) for s in doc["steps"]] == [(100, "step_0000000100")]
    assert [o["folder"] for o in doc["other_checkpoints"]] == ["step_100"]
    assert doc["other_checkpoints"][0]["world_size"] == 1 and doc["latest"] == 100


def test_the_manager_never_touches_a_plain_checkpoint_in_its_root(tmp_path):
    root = tmp_path / "run"
    shardckpt.save(state(7), str(root / "step_100"))
    shardckpt.save(state(8), str(root / "final"))
    with shardckpt.CheckpointManager(str(root), keep_last=1) as mgr:
        for step in (100, 200, 300):
            mgr.save(step, state(step))
        assert mgr.steps() == [300]
    assert sorted(os.listdir(root)) == ["final", "step_0000000300", "step_100"]
    got = blank()
    shardckpt.load(got, str(root / "step_100"))
    assert got["step"] == 7
    names = [o.name for o in shardckpt.manager.list_other_checkpoints(root)]
    assert names == ["final", "step_100"]


def test_ls_of_a_folder_with_only_plain_checkpoints_says_there_are_no_steps(tmp_path, capsys):
    shardckpt.save(state(1), str(tmp_path / "step_100"))
    code, out, _ = run(capsys, "ls", str(tmp_path))
    assert code == 0
    assert out.splitlines()[0] == f"{tmp_path}: no manager step folders (a CheckpointManager names step 100 step_0000000100)"
    assert "step_100  checkpoint (not a manager step)" in out


def test_ls_of_an_empty_folder_exits_0_and_says_so(tmp_path, capsys):
    code, out, _ = run(capsys, "ls", str(tmp_path))
    assert code == 0 and out.startswith(f"{tmp_path}: no checkpoints")


def test_ls_of_a_checkpoint_points_to_inspect(tmp_path, capsys):
    shardckpt.save(state(1), str(tmp_path / "step_100"))
    code, out, err = run(capsys, "ls", str(tmp_path / "step_100"))
    assert code == 2 and out == ""
    assert err.startswith(f"shardckpt ls: error: {tmp_path}/step_100 is a checkpoint, not a CheckpointManager root")
    assert f"shardckpt inspect {tmp_path}/step_100" in err and f"shardckpt ls {tmp_path}`" in err


def test_inspect_of_a_manager_root_points_to_ls(tmp_path, capsys):
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, state(1))
    code, out, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and out == ""
    assert "not a checkpoint but a folder of them" in err and f"`shardckpt ls {tmp_path}`" in err
    assert "interrupted" not in err  # it is not an interrupted save


def test_inspect_of_a_users_folder_says_shardckpt_did_not_write_it(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and "was not written by shardckpt (it holds 'notes.txt')" in err
