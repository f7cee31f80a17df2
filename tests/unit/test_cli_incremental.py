"""Incremental checkpoints (issue #17) through the readers and the command line: inspect,
verify, ls, export and materialize follow a format-2 checkpoint's references into its
bases, say which bytes live where, and materialize makes a copy that needs none."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from distributed import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

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
    assert f"{shared[0]}: in base checkpoint 's0' ({s0}): the data file is missing" in problem
    assert "was 's0' deleted or moved by hand" in problem  # DataFiles.missing_hint
    assert "'frozen'" in problem


def test_verify_says_a_damaged_file_is_in_a_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s0, s1, _ = _save_pair(tmp_path)
    m1 = _manifest(s1)
    (shared,) = [n for n, f in m1["files"].items() if f.get("checkpoint") == "s0"]
    (emb,) = [c for c in m1["tensors"]["emb"]["chunks"] if c["file"] == shared]  # a chunk s1 reads from s0
    data = bytearray((s0 / shared).read_bytes())
    data[emb["byte_offset"] + emb["byte_length"] - 1] ^= 0xFF
    (s0 / shared).write_bytes(bytes(data))
    code, out, _ = run(capsys, "verify", str(s1), "--json", "--no-progress")
    problems = json.loads(out)["problems"]
    assert code == 1 and {(p["file"], p["key"]) for p in problems} == {(shared, "emb"), (shared, None)}
    assert all(p["message"].startswith(f"in base checkpoint 's0' ({s0}): ") for p in problems)


# ---------------------------------------------------------------- materialize


def test_materialized_copy_loads_bitwise_after_the_base_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s0, s1, sd = _save_pair(tmp_path, num_io_threads=2)
    out = tmp_path / "elsewhere" / "copy"
    code, stdout, err = run(capsys, "materialize", str(s1), str(out), "--json", "--no-progress")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["format_version"] == 2 and report["path"] == str(out)
    assert [(f["folder"], f["own"]) for f in report["folders"]] == [("s1", True), ("s0", False)]
    m = _manifest(out)
    assert m["format_version"] == 2 and m["bases"] == []
    assert all("checkpoint" not in f for f in m["files"].values())
    assert all("digest" in c for t in m["tensors"].values() for c in t["chunks"])
    # Only the chunks s1 uses were copied: s0's stale adapter is not in the copy.
    assert report["tensor_bytes"] == sum(f["tensor_bytes"] for f in report["folders"]) == 25_600 + 256 + 1_600
    code, stdout, _ = run(capsys, "diff", str(s1), str(out), "--exit-code", "--no-progress")
    assert code == 0 and "0 changed; 3 of 3 common tensors unchanged" in stdout  # diff reads s1 through s0
    shutil.rmtree(s0)
    shutil.rmtree(s1)
    got = _zeros_like(sd)
    shardckpt.load(got, out)
    _assert_same(got, sd)
    code, stdout, _ = run(capsys, "verify", str(out), "--no-progress")
    assert code == 0 and stdout.startswith("OK "), stdout  # no stray header entries, every hash matches


def test_materialize_format_1_drops_digests_and_is_a_base_no_more(tmp_path: Path) -> None:
    from shardckpt.convert import materialize_checkpoint

    _, s1, sd = _save_pair(tmp_path)
    report = materialize_checkpoint(s1, tmp_path / "v1", format_version=1)
    m = _manifest(tmp_path / "v1")
    assert report.format_version == 1 and m["format_version"] == 1 and "bases" not in m
    assert all("digest" not in c for t in m["tensors"].values() for c in t["chunks"])
    got = _zeros_like(sd)
    shardckpt.load(got, tmp_path / "v1")
    _assert_same(got, sd)
    with pytest.raises(ValueError, match="no chunk digests"):
        materialize_checkpoint(tmp_path / "v1", tmp_path / "v2", format_version=2)
    assert not (tmp_path / "v2").exists()


def test_materialize_of_values_only_and_of_a_full_checkpoint(tmp_path: Path) -> None:
    from shardckpt.convert import materialize_checkpoint

    shardckpt.save({"step": 3, "lr": 0.5}, tmp_path / "values")
    report = materialize_checkpoint(tmp_path / "values", tmp_path / "values-copy")
    assert (report.files, report.format_version) == (0, 1)
    got: dict[str, object] = {"step": 0, "lr": 0.0}
    shardckpt.load(got, tmp_path / "values-copy")
    assert got == {"step": 3, "lr": 0.5}
    sd = _state()
    shardckpt.save(sd, tmp_path / "full", num_io_threads=2)
    report = materialize_checkpoint(tmp_path / "full", tmp_path / "full-copy")
    assert report.format_version == 1 and report.files == 2 and "digest" not in str(_manifest(tmp_path / "full-copy"))
    loaded = _zeros_like(sd)
    shardckpt.load(loaded, tmp_path / "full-copy")
    _assert_same(loaded, sd)
    with pytest.raises(ValueError, match="inside the checkpoint folder"):
        materialize_checkpoint(tmp_path / "full", tmp_path / "full" / "copy")
    assert not (tmp_path / "full" / "copy").exists()


def test_materialize_refuses_an_existing_destination(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s0, s1, _ = _save_pair(tmp_path)
    code, _, err = run(capsys, "materialize", str(s1), str(s0))
    assert code == 2 and "already holds a shardckpt checkpoint" in err
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "materialize", str(s1), str(user))
    assert code == 2 and "is not empty ('notes.txt')" in err
    assert (user / "notes.txt").read_text() == "keep me" and sorted(os.listdir(user)) == ["notes.txt"]
    assert (s0 / "manifest.json").exists()


def test_materialize_of_a_damaged_base_commits_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s0, s1, _ = _save_pair(tmp_path)
    m1 = _manifest(s1)
    shared = sorted(n for n, f in m1["files"].items() if f.get("checkpoint") == "s0")
    target = s0 / shared[0]
    used = next(c for t in m1["tensors"].values() for c in t["chunks"] if c["file"] == shared[0])  # s1 reads it
    data = bytearray(target.read_bytes())
    data[used["byte_offset"] + used["byte_length"] - 1] ^= 0xFF
    target.write_bytes(bytes(data))
    out = tmp_path / "copy"
    code, _, err = run(capsys, "materialize", str(s1), str(out), "--no-progress")
    assert code == 1 and "checksum mismatch" in err and "of base checkpoint 's0'" in err
    assert not out.exists()  # the marker and the partial files were removed with the folder


def test_materialize_checks_whole_file_hashes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, s1, _ = _save_pair(tmp_path)
    (own,) = [n for n, f in _manifest(s1)["files"].items() if "checkpoint" not in f]
    target = s1 / own
    data = target.read_bytes()
    save_id = own.split("/")[1].split("-")[0]
    at = data.index(save_id.encode())  # in the header's metadata: no chunk byte, no block hash covers it
    changed = data[:at] + (b"0" if data[at : at + 1] != b"0" else b"1") + data[at + 1 :]
    target.write_bytes(changed)
    code, _, err = run(capsys, "materialize", str(s1), str(tmp_path / "copy"), "--no-progress")
    assert code == 1 and "whole-file xxh3" in err and own in err
    assert not (tmp_path / "copy").exists()


def _save_sharded_pair(rank: int, world: int, root: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    sd = {k: distribute_tensor(v, mesh, [Shard(0)]) if isinstance(v, torch.Tensor) else v for k, v in _state().items()}
    shardckpt.save(sd, f"{root}/s0", incremental=True, hash_block_bytes=BLOCK)
    sd["adapter"] = distribute_tensor(_state()["adapter"] + 1, mesh, [Shard(0)])  # type: ignore[operator]
    sd["step"] = 1
    shardckpt.save(sd, f"{root}/s1", base=f"{root}/s0", hash_block_bytes=BLOCK)


def test_materialize_a_two_rank_checkpoint_and_load_it_on_one(tmp_path: Path) -> None:
    from shardckpt.convert import materialize_checkpoint

    run_ranks(_save_sharded_pair, 2, str(tmp_path))
    report = materialize_checkpoint(tmp_path / "s1", tmp_path / "copy")
    m = _manifest(tmp_path / "copy")
    source_files = _manifest(tmp_path / "s1")["files"].values()  # one copy of each, of the same rank
    assert sorted(f["rank"] for f in m["files"].values()) == sorted(f["rank"] for f in source_files)
    assert m["world_size"] == 2 and {f["rank"] for f in source_files} == {0, 1}
    assert report.files == len(source_files) and [f.folder for f in report.folders] == ["s1", "s0"]
    assert all(len(t["chunks"]) == 2 for t in m["tensors"].values())  # every tensor as the 2 ranks saved it
    shutil.rmtree(tmp_path / "s0")
    want = _state()
    _step(want, 1)
    got = _zeros_like(want)
    shardckpt.load(got, tmp_path / "copy")  # 2 -> 1: whole tensors assembled from both ranks' chunks
    _assert_same(got, want)


def test_materialize_through_fsspec() -> None:
    from shardckpt.convert import materialize_checkpoint, read_state_dict

    sd = _state()
    root = "memory://materialize-test"
    shardckpt.save(sd, f"{root}/s0", incremental=True, hash_block_bytes=BLOCK)
    _step(sd, 1)
    shardckpt.save(sd, f"{root}/s1", base=f"{root}/s0", hash_block_bytes=BLOCK)
    report = materialize_checkpoint(f"{root}/s1", f"{root}/copy", read_piece_bytes=1)  # one block per piece
    assert report.format_version == 2 and [f.folder for f in report.folders] == ["s1", "s0"]
    got = read_state_dict(f"{root}/copy")
    _assert_same(got, sd)


# ---------------------------------------------------------------- export and the readers


def test_export_and_read_state_dict_follow_references(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    from shardckpt.convert import CheckpointSource, read_state_dict

    s0, s1, sd = _save_pair(tmp_path, num_io_threads=2)
    source = CheckpointSource(s1)
    assert torch.equal(source.read_box("frozen", (3, 10), (5, 20)), sd["frozen"][3:8, 10:30])  # type: ignore[index]
    _assert_same(read_state_dict(s1), sd)
    code, _, err = run(capsys, "export", str(s1), str(tmp_path / "hf"), "--format", "hf", "--no-progress")
    assert code == 0, err
    (shard,) = (tmp_path / "hf").glob("model-*.safetensors")
    exported = load_file(str(shard))
    assert sorted(exported) == ["adapter", "emb", "frozen"]
    _assert_same(exported, {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
    shutil.rmtree(s0)
    code, _, err = run(capsys, "export", str(s1), str(tmp_path / "x.safetensors"), "--format", "safetensors")
    assert code == 1 and "of base checkpoint 's0'" in err and "was 's0' deleted or moved by hand" in err


# ---------------------------------------------------------------- ls


def test_ls_marks_incremental_steps_and_retired_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "run"
    sd = _state()
    with shardckpt.CheckpointManager(root, incremental=True, keep_last=2) as mgr:
        for step in (100, 200, 300):
            _step(sd, step)
            mgr.save(step, sd, force=True)
    # keep_last=2 deleted step 100, but 200 and 300 still read its frozen tensors.
    code, out, _ = run(capsys, "ls", str(root), "--json")
    assert code == 0
    rows = {r["step"]: r for r in json.loads(out)["steps"]}
    assert (rows[100]["committed"], rows[100]["retired"]) == (False, True)
    assert rows[200]["bases"] == rows[300]["bases"] == ["step_0000000100"]
    assert 0 < rows[300]["base_bytes"] < rows[300]["size_bytes"]
    code, out, _ = run(capsys, "ls", str(root))
    assert code == 0
    table = {line.split()[0]: line for line in out.splitlines() if line[:1].isdigit()}
    assert table["100"].split()[1] == "RETIRED" and "INCREMENTAL" in out.splitlines()[0]
    assert "on step 100 (" in table["300"] and "latest" in table["300"]
    assert "RETIRED folders are deleted steps" in out and "UNCOMMITTED folders" not in out
