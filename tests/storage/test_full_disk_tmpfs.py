"""A real full disk: a small tmpfs mount, filled by the kernel's own accounting.

tests/storage/test_full_disk.py injects ENOSPC through a storage subclass; here nothing is
injected. A CheckpointManager saves onto an 8 MiB tmpfs whose free space (or free
inodes) is first eaten by a filler file down to a chosen headroom, from nothing to a
little more than one checkpoint needs, so the OS refuses at whatever point it runs out:
creating the step folder, a data file, a write, the manifest's temp file, the rename,
the owner record. Each time the save either commits a checkpoint that loads bitwise
and verifies, or raises an OSError (a ShardckptError with errno ENOSPC) and commits
nothing; the previous step stays listed and whole, and once space is back the next
manager start removes the failed step's folder and the next save commits.

Needs root (mount); skipped with the reason where mounting is not permitted.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
import torch

import shardckpt
from shardckpt.convert.audit import verify_checkpoint

PAGE = 4096


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(256, 512, generator=g), "b": torch.randn(1000, generator=g), "step": step}  # ~0.5 MiB


def blank() -> dict:
    return {"w": torch.zeros(256, 512), "b": torch.zeros(1000), "step": -1}


@pytest.fixture
def small_disk(tmp_path):
    """Mount an 8 MiB tmpfs (options via the returned function); unmount afterwards."""
    mounted = []

    def mount(options: str) -> str:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True, timeout=60
        )
        if p.returncode != 0:
            pytest.skip(
                f"cannot mount a tmpfs here (needs root and mount permission): {p.stderr.strip() or p.returncode}"
            )
        mounted.append(str(where))
        return str(where)

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", where], check=False, timeout=60)


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def free_inodes(path: str) -> int:
    return os.statvfs(path).f_favail


def fill_to(disk: str, headroom_bytes: int) -> str:
    """Write a filler file so that about ``headroom_bytes`` stay free (in whole pages)."""
    filler = os.path.join(disk, "filler")
    size = max(0, free_bytes(disk) - headroom_bytes)
    with open(filler, "wb") as f:
        f.write(b"\0" * size)
    return filler


def eat_inodes(disk: str, keep: int) -> list[str]:
    made = []
    while free_inodes(disk) > keep:
        made.append(os.path.join(disk, f"inode{len(made)}"))
        open(made[-1], "wb").close()
    return made


def check_attempt(root: str, step: int, previous: int, attempt) -> str:
    """Run ``attempt`` (a save of ``step``); check what it left. Returns the outcome."""
    try:
        attempt()
        outcome = "committed"
    except OSError as e:  # StorageError is an OSError with errno kept
        assert isinstance(e, shardckpt.ShardckptError), f"untyped {type(e).__name__}: {e}"
        assert e.errno == errno.ENOSPC, (e.errno, str(e))
        msg = str(e)
        assert "No space left on device" in msg, msg
        where = (
            "owner record"
            if ".shardckpt-owner" in msg
            else "manifest"
            if "manifest.json" in msg
            else "data file"
            if "/data/" in msg
            else "step folder"
            if "step_" in msg
            else None
        )
        assert where is not None, f"the error does not say where: {msg}"
        outcome = f"{type(e).__name__} ENOSPC at the {where}"
    with shardckpt.CheckpointManager(root, read_only=True) as mgr:
        listed = mgr.steps()
        expect_newest = step if outcome == "committed" else previous
        assert listed[-1] == expect_newest, (outcome, listed)
        for s in listed:  # whatever is listed is whole
            got = blank()
            mgr.restore(got, step=s)
            want = state(s)
            assert torch.equal(got["w"], want["w"]) and torch.equal(got["b"], want["b"]) and got["step"] == s
            assert verify_checkpoint(mgr.path(s)).problems == []
    return outcome


@pytest.mark.parametrize("threads", [1, 3])
def test_running_out_of_space_at_every_point_commits_nothing_and_loses_nothing(small_disk, threads):
    disk = small_disk("size=8m")
    root = os.path.join(disk, "run")
    with shardckpt.CheckpointManager(root, keep_last=1, num_io_threads=threads) as mgr:
        mgr.save(1, state(1))
    step_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(mgr.path(1)) for f in fs)
    # From no room at all to a little more than a checkpoint needs (its files round up to pages).
    edge = range(step_bytes - 2 * PAGE, step_bytes + 12 * PAGE, PAGE)  # page by page across "just enough"
    headrooms = sorted({0, PAGE, 16 * PAGE, step_bytes // 2, *edge, step_bytes + 32 * PAGE})
    outcomes, previous = [], 1
    for i, headroom in enumerate(headrooms):
        step = i + 2
        filler = fill_to(disk, headroom)
        opened: list[shardckpt.CheckpointManager] = []

        # opening writes the owner record: it may be what fails
        def attempt(opened: list[shardckpt.CheckpointManager] = opened, step: int = step) -> None:
            opened.append(shardckpt.CheckpointManager(root, keep_last=1, num_io_threads=threads))
            opened[0].save(step, state(step))

        outcome = check_attempt(root, step, previous, attempt)
        for m in opened:
            m.close()
        os.unlink(filler)
        with shardckpt.CheckpointManager(root, keep_last=1) as fresh:  # space is back: a new start
            if outcome != "committed":
                assert fresh.cleaned_up in ([], [os.path.basename(fresh.path(step))]), fresh.cleaned_up
            assert not [
                n
                for n in os.listdir(root)
                if n.startswith("step_") and n != os.path.basename(fresh.path(fresh.latest_step()))
            ]
        outcomes.append((headroom, outcome))
        previous = step if outcome == "committed" else previous
    assert any("ENOSPC" in o for _, o in outcomes), outcomes
    assert outcomes[-1][1] == "committed", outcomes  # and with room to spare it works
    print(f"\nthreads={threads} checkpoint {step_bytes} B: " + ", ".join(f"{h} B free -> {o}" for h, o in outcomes))


def test_running_out_of_inodes_commits_nothing_and_loses_nothing(small_disk):
    disk = small_disk("size=8m,nr_inodes=64")
    root = os.path.join(disk, "run")
    with shardckpt.CheckpointManager(root, keep_last=1, num_io_threads=2) as mgr:
        mgr.save(1, state(1))
    outcomes, previous = [], 1
    # a save needs a folder, the save marker (+ its temp name: link(2) counts on tmpfs), a
    # data folder, data files, the manifest (+ its temp name)...
    for keep in range(0, 10):
        step = keep + 2
        fillers = eat_inodes(disk, keep)
        opened: list[shardckpt.CheckpointManager] = []

        def attempt(opened: list[shardckpt.CheckpointManager] = opened, step: int = step) -> None:
            opened.append(shardckpt.CheckpointManager(root, keep_last=1, num_io_threads=2))
            opened[0].save(step, state(step))

        outcome = check_attempt(root, step, previous, attempt)
        for m in opened:
            m.close()
        for f in fillers:
            os.unlink(f)
        with shardckpt.CheckpointManager(root, keep_last=1) as fresh:
            assert [n for n in os.listdir(root) if n.startswith("step_")] == [
                os.path.basename(fresh.path(fresh.latest_step()))
            ]
        outcomes.append((keep, outcome))
        previous = step if outcome == "committed" else previous
    assert any("ENOSPC" in o for _, o in outcomes), outcomes
    assert outcomes[-1][1] == "committed", outcomes
    print("\ninodes: " + ", ".join(f"{k} free -> {o}" for k, o in outcomes))
