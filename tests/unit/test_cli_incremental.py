"""Incremental checkpoints (issue #17) through the readers and the command line: inspect,
verify, ls, export and materialize follow a format-2 checkpoint's references into its
bases, say which bytes live where, and materialize makes a copy that needs none."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.cli.app import main

BLOCK = 4096


def _state(seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {
        "frozen": torch.randn(64, 100, generator=g),  # 25,600 bytes: unchanged, shared with the base
        "emb": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "adapter": torch.randn(4, 100, generator=g),  # changed by every step
        "step": 0,
    }


def _step(sd: dict[str, object], step: int) -> None:
    sd["adapter"] = sd["adapter"] + 1  # type: ignore[operator]
    sd["step"] = step


def _zeros_like(sd: dict[str, object]) -> dict[str, object]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1 for k, v in sd.items()}


def _assert_same(got: dict[str, object], want: dict[str, object]) -> None:
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k  # type: ignore[union-attr,arg-type]
        else:
            assert got[k] == v, k


def _save_pair(root: Path, num_io_threads: int = 1) -> tuple[Path, Path, dict[str, object]]:
    """s0 (full, with digests) and s1 (incremental on s0: only the adapter written)."""
    sd = _state()
    s0, s1 = root / "s0", root / "s1"
    shardckpt.save(sd, s0, incremental=True, hash_block_bytes=BLOCK, num_io_threads=num_io_threads)
    _step(sd, 1)
    shardckpt.save(sd, s1, base=s0, hash_block_bytes=BLOCK, num_io_threads=num_io_threads)
    return s0, s1, sd


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- inspect


def test_inspect_shows_bases_and_the_bytes_in_each_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, s1, _ = _save_pair(tmp_path)
    m1 = _manifest(s1)
    code, out, _ = run(capsys, "inspect", str(s1), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["format_version"] == 2 and doc["bases"] == ["s0"]
    own, base = doc["folders"]
    assert (own["folder"], own["own"], base["folder"], base["own"]) == ("s1", True, "s0", False)
    shared = {n for n, f in m1["files"].items() if f.get("checkpoint") == "s0"}
    assert base["files"] == len(shared) and own["files"] == len(m1["files"]) - len(shared)
    assert own["file_bytes"] == sum(f["size"] for n, f in m1["files"].items() if n not in shared)
    assert own["tensor_bytes"] == 4 * 100 * 4  # the adapter, the only tensor written anew
    assert base["tensor_bytes"] == 64 * 100 * 4 + 16 * 8 * 2
    assert {n for n, f in doc["files"].items() if f.get("checkpoint") == "s0"} == shared

    code, out, _ = run(capsys, "inspect", str(s1))
    assert code == 0
    assert "bases       s0 (incremental" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("s0 (base)"))
    assert row[-2:] == ["25.2", "KiB"]  # tensor bytes read from s0: 25,856


def test_inspect_of_a_full_checkpoint_has_no_bases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shardckpt.save(_state(), tmp_path / "full")
    code, out, _ = run(capsys, "inspect", str(tmp_path / "full"), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["bases"] == [] and [f["folder"] for f in doc["folders"]] == ["full"]
    assert doc["folders"][0]["tensor_bytes"] == doc["tensor_bytes"]
    code, out, _ = run(capsys, "inspect", str(tmp_path / "full"))
    assert "bases" not in out and "DATA IN FOLDER" not in out


# ---------------------------------------------------------------- verify


def test_verify_reports_which_bytes_live_in_which_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, s1, _ = _save_pair(tmp_path)
    code, out, _ = run(capsys, "verify", str(s1), "--json", "--no-progress")
    doc = json.loads(out)
    assert code == 0 and doc["ok"]
    assert [(f["folder"], f["own"]) for f in doc["folders"]] == [("s1", True), ("s0", False)]
    assert doc["bytes_hashed"] == sum(f["file_bytes"] for f in doc["folders"])
    code, out, _ = run(capsys, "verify", str(s1), "--no-progress")
    assert code == 0 and out.startswith("OK ") and "s0 (base)" in out and "s1 (this checkpoint)" in out


def test_verify_names_the_base_a_missing_file_belongs_to(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s0, s1, _ = _save_pair(tmp_path)
    shared = sorted(n for n, f in _manifest(s1)["files"].items() if f.get("checkpoint") == "s0")
    os.remove(s0 / shared[0])
    code, out, _ = run(capsys, "verify", str(s1), "--no-progress")
    assert code == 1
    (problem,) = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert shared[0] in problem and "missing from base checkpoint 's0'" in problem
    assert "was 's0' deleted or moved by hand" in problem  # DataFiles.missing_hint
    assert "'frozen'" in problem
