"""The launch scripts' output folder (launch/fresh_out.sh): a run empties only a folder a
launch script made, so `bash launch/main_job.sh ~/data` by mistake deletes nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARKER = ".shardckpt-launch-output"


def fresh_out(path: Path) -> subprocess.CompletedProcess[str]:
    script = f'source launch/fresh_out.sh && fresh_out "{path}"'
    return subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)


def test_a_new_path_is_created_with_the_marker(tmp_path: Path) -> None:
    out = tmp_path / "a" / "run"
    assert fresh_out(out).returncode == 0
    assert os.listdir(out) == [MARKER]


def test_a_folder_a_launch_script_made_is_emptied(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert fresh_out(out).returncode == 0
    (out / "ckpt").mkdir()
    (out / "ckpt" / "old.json").write_text("{}")
    assert fresh_out(out).returncode == 0
    assert os.listdir(out) == [MARKER]


def test_an_empty_folder_is_used(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert fresh_out(out).returncode == 0
    assert os.listdir(out) == [MARKER]


def test_a_users_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    done = fresh_out(out)
    assert done.returncode == 2
    assert "refusing to empty" in done.stderr and "pass a new or empty folder" in done.stderr
    assert (out / "thesis.tex").read_text() == "years of work"
    assert os.listdir(out) == ["thesis.tex"]


def test_a_file_or_a_link_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / MARKER).write_text("")
    (target / "keep").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target)
    f = tmp_path / "file"
    f.write_text("x")
    for path in (link, f):
        done = fresh_out(path)
        assert done.returncode == 2, path
        assert "is not a folder" in done.stderr
    assert sorted(os.listdir(target)) == [MARKER, "keep"]
    assert f.read_text() == "x"
