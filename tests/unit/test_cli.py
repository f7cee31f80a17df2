"""The ``shardckpt`` command line: inspect and verify, their exit status, output and help."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from damage import chunk_of, flip_byte

import shardckpt
from shardckpt.cli import app as cli
from shardckpt.cli.app import main

BLOCK = 4096


def make_checkpoint(path: str, num_io_threads: int = 1) -> dict:
    """Save a small known state to ``path``; return its manifest as plain JSON."""
    state = {
        "model": {
            "w": torch.arange(3000, dtype=torch.float32).reshape(60, 50),  # 12000 bytes: 3 blocks
            "b": torch.ones(7, dtype=torch.bfloat16),
        },
        "step": 7,
        "opt": {"lr": 0.001, "betas": (0.9, 0.95)},
    }
    shardckpt.save(state, path, hash_block_bytes=BLOCK, num_io_threads=num_io_threads, metadata={"run": "t1"})
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


@pytest.fixture
def ckpt(tmp_path) -> tuple[str, dict]:
    path = str(tmp_path / "ckpt")
    return path, make_checkpoint(path)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def row(out: str, key: str) -> list[str]:
    (line,) = [ln for ln in out.splitlines() if ln.split(" ", 1)[0] == key]
    return line.split()


# ---------------------------------------------------------------- inspect


def test_inspect_prints_header_and_one_row_per_key(ckpt, capsys):
    path, m = ckpt
    code, out, err = run(capsys, "inspect", path)
    assert code == 0 and err == ""
    assert f"checkpoint  {path}" in out
    assert "world_size  1" in out
    assert "shardckpt format 1" in out and f"torch {torch.__version__}" in out
    assert f"created_at  {m['created_at']}" in out
    assert "keys        5 (2 tensors, 3 values)" in out
    assert 'metadata    {"run": "t1"}' in out
    assert row(out, "model.w") == ["model.w", "F32", "[60,", "50]", "1", "11.7", "KiB"]
    assert row(out, "model.b") == ["model.b", "BF16", "[7]", "1", "14", "B"]
    assert row(out, "step") == ["step", "int", "7"]
    assert row(out, "opt.betas") == ["opt.betas", "tuple", '{"$tuple":', "[0.9,", "0.95]}"]


def test_inspect_json_is_parseable_and_complete(ckpt, capsys):
    path, m = ckpt
    code, out, _ = run(capsys, "inspect", "--json", path)
    assert code == 0
    doc = json.loads(out)
    assert doc["world_size"] == 1 and doc["format_version"] == 1
    assert doc["keys"]["model.w"] == {"kind": "tensor", "dtype": "F32", "shape": [60, 50], "chunks": 1, "bytes": 12000}
    assert doc["keys"]["opt.lr"] == {"kind": "value", "type": "float", "value": 0.001}
    assert doc["metadata"] == {"run": "t1"}
    assert doc["total_bytes"] == sum(f["size"] for f in m["files"].values())


def test_inspect_keys_pattern_filters_rows_and_json(ckpt, capsys):
    path, _ = ckpt
    code, out, _ = run(capsys, "inspect", path, "--keys", "model.*")
    assert code == 0
    assert row(out, "model.w")[0] == "model.w" and row(out, "model.b")[0] == "model.b"
    assert not any(ln.startswith(("step", "opt.")) for ln in out.splitlines())
    code, out, _ = run(capsys, "inspect", path, "--json", "--keys", "opt.*")
    assert sorted(json.loads(out)["keys"]) == ["opt.betas", "opt.lr"]
    code, out, _ = run(capsys, "inspect", path, "--keys", "nothing*")
    assert code == 0 and "no key matches 'nothing*'" in out


def test_inspect_cuts_long_values_in_the_table_only(tmp_path, capsys):
    path = str(tmp_path / "ckpt")
    shardckpt.save({"note": "x" * 500}, path)
    _, out, _ = run(capsys, "inspect", path)
    (line,) = [ln for ln in out.splitlines() if ln.startswith("note")]
    assert line.endswith("...") and len(line) < 200
    _, out, _ = run(capsys, "inspect", "--json", path)
    assert json.loads(out)["keys"]["note"]["value"] == "x" * 500


# ---------------------------------------------------------------- verify


def test_verify_clean_checkpoint_exits_0(ckpt, capsys):
    path, _ = ckpt
    code, out, _ = run(capsys, "verify", path, "--no-progress")
    assert code == 0
    assert out.startswith(f"OK  {path}: 1 data files, 2 chunks")


def test_verify_flipped_byte_exits_1_naming_file_and_key(ckpt, capsys):
    path, m = ckpt
    c = chunk_of(m, "model.w")
    flip_byte(os.path.join(path, c["file"]), c["byte_offset"] + 100)
    code, out, _ = run(capsys, "verify", path, "--no-progress")
    assert code == 1
    keyed = [ln for ln in out.splitlines() if "key" in ln and ln.startswith("PROBLEM")]
    assert len(keyed) == 1
    assert c["file"] in keyed[0] and "'model.w'" in keyed[0] and "block 0" in keyed[0]
    assert out.splitlines()[-1].startswith(f"FAILED  {path}: 2 problem(s) in 1 file(s)")


def test_verify_json_lists_problems(ckpt, capsys):
    path, m = ckpt
    c = chunk_of(m, "model.b")
    flip_byte(os.path.join(path, c["file"]), c["byte_offset"])
    code, out, _ = run(capsys, "verify", "--json", path)
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False and doc["chunks_checked"] == 2
    assert [(p["file"], p["key"]) for p in doc["problems"]] == [(c["file"], "model.b"), (c["file"], None)]


def test_verify_truncated_file(ckpt, capsys):
    path, m = ckpt
    (name,) = m["files"]
    os.truncate(os.path.join(path, name), m["files"][name]["size"] - 1)
    code, out, _ = run(capsys, "verify", path)
    assert code == 1
    assert "truncated" in out and "'model.b'" in out and "run past the end" in out


def test_verify_deleted_file(tmp_path, capsys):
    path = str(tmp_path / "ckpt")
    m = make_checkpoint(path, num_io_threads=2)
    gone = chunk_of(m, "model.b")["file"]
    os.remove(os.path.join(path, gone))
    code, out, _ = run(capsys, "verify", path)
    assert code == 1
    (problem,) = [ln for ln in out.splitlines() if ln.startswith("PROBLEM")]
    assert gone in problem and "missing" in problem and "'model.b'" in problem


def test_verify_corrupt_header(ckpt, capsys):
    path, m = ckpt
    (name,) = m["files"]
    with open(os.path.join(path, name), "r+b") as f:
        f.seek(9)
        f.write(b"\xff\xfe")
    code, out, _ = run(capsys, "verify", path)
    assert code == 1
    assert any(name in ln and "header" in ln for ln in out.splitlines() if ln.startswith("PROBLEM"))


def test_verify_corrupt_manifest_is_damage_but_inspect_cannot_read_it(ckpt, capsys):
    path, _ = ckpt
    with open(os.path.join(path, "manifest.json"), "w") as f:
        f.write("{")
    code, out, _ = run(capsys, "verify", path)
    assert code == 1 and "PROBLEM  manifest.json" in out and "checksum" in out
    code, out, err = run(capsys, "inspect", path)
    assert code == 2 and out == "" and "checksum" in err


def test_folder_without_manifest_exits_2_without_traceback(tmp_path, capsys):
    (tmp_path / "half" / "data").mkdir(parents=True)
    for command in ("verify", "inspect"):
        code, out, err = run(capsys, command, str(tmp_path / "half"))
        assert code == 2 and out == ""
        assert err.startswith(f"shardckpt {command}: error: ")
        assert "has no manifest.json" in err and "not finished" in err
        assert "Traceback" not in err


def test_missing_path_exits_2(tmp_path, capsys):
    code, _, err = run(capsys, "verify", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in err


# ---------------------------------------------------------------- help and registry


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["verify", "--help"]])
def test_help_has_a_description_and_examples(argv, capsys):
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert "examples:\n  shardckpt " in out
    if argv[0] == "--help":
        assert "inspect" in out and "verify" in out and "exit status:" in out
    else:
        assert cli.COMMANDS[argv[0]].description.split()[0] in out
        assert f"usage: shardckpt {argv[0]}" in out


def test_bad_command_lines_exit_2(capsys):
    assert run(capsys)[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    code, _, err = run(capsys, "verify")
    assert code == 2 and "PATH" in err


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"shardckpt {shardckpt.__version__}"


def test_registered_command_appears_in_help_and_runs(monkeypatch, capsys):
    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument("word")

    def echo(args: argparse.Namespace) -> int:
        print(args.word.upper())
        return 0

    cmd = cli.Command("echo", "print a word loudly", "Print WORD in capitals.", ("shardckpt echo hi",), configure, echo)
    monkeypatch.setitem(cli.COMMANDS, "echo", cmd)
    assert run(capsys, "echo", "hi")[:2] == (0, "HI\n")
    assert "print a word loudly" in run(capsys, "--help")[1]
    with pytest.raises(ValueError, match="registered twice"):
        cli.register(cmd)


# ---------------------------------------------------------------- as a program


def test_python_dash_m_and_console_script(ckpt):
    path, m = ckpt
    c = chunk_of(m, "model.w")
    flip_byte(os.path.join(path, c["file"]), c["byte_offset"] + c["byte_length"] - 1)
    proc = subprocess.run(
        [sys.executable, "-m", "shardckpt", "verify", path, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert c["file"] in proc.stdout and "'model.w'" in proc.stdout
    script = shutil.which("shardckpt")
    if script is None:
        pytest.skip("the shardckpt console script is not installed (pip install -e .)")
    proc = subprocess.run([script, "inspect", "--json", path], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["keys"]["model.w"]["shape"] == [60, 50]
