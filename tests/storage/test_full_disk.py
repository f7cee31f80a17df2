"""Saving onto storage that fills up: a clear error, nothing committed, nothing earlier lost.

The disk is a LocalStorage subclass with a byte budget shared by every storage it
opens: a data-file write that would pass the budget writes what fits (as a real full
disk does) and then raises ``OSError(ENOSPC)`` naming the file; the manifest's atomic
write raises the same when it does not fit. ``open_storage`` is replaced in the modules
that call it, the way tests/slow/test_crash.py does in its child process.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
import shardckpt.engine.loading
import shardckpt.engine.saving
import shardckpt.manager.checkpoint_manager
from shardckpt.convert.audit import verify_checkpoint
from shardckpt.errors import CheckpointNotFoundError, ShardckptError
from shardckpt.storage.local import LocalStorage, _LocalWriteStream


class Disk:
    """Bytes left on the fake device (None: unlimited) and the files a write failed on."""

    def __init__(self) -> None:
        self.free: int | None = None
        self.failed: list[str] = []
        self._lock = threading.Lock()  # writer threads share the disk

    def take(self, path: str, n: int) -> int:
        """Reserve up to ``n`` bytes; returns how many fit."""
        with self._lock:
            if self.free is None:
                return n
            fit = min(n, self.free)
            self.free -= fit
            if fit < n:
                self.failed.append(path)
            return fit


def enospc(path: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


class FillingStream(_LocalWriteStream):
    def __init__(self, path: str, disk: Disk) -> None:
        super().__init__(path)
        self.disk = disk

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        fit = self.disk.take(self._path, len(view))
        super().write(view[:fit])
        if fit < len(view):
            raise enospc(self._path)


class FillingStorage(LocalStorage):
    def __init__(self, root: str, disk: Disk) -> None:
        super().__init__(root)
        self.disk = disk

    def open_write(self, name: str) -> FillingStream:
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return FillingStream(path, self.disk)

    def write_atomic(self, name: str, data: bytes) -> None:
        if self.disk.take(self._path(name), len(data)) < len(data):
            raise enospc(self._path(name))
        super().write_atomic(name, data)

    def create_exclusive(self, name: str, data: bytes) -> None:
        if self.disk.take(self._path(name), len(data)) < len(data):
            raise enospc(self._path(name))
        super().create_exclusive(name, data)

    def child(self, name: str) -> FillingStorage:
        return FillingStorage(self._path(name), self.disk)


@pytest.fixture
def disk(monkeypatch) -> Disk:
    d = Disk()

    def open_filling(url: str, options: Any = None) -> FillingStorage:
        return FillingStorage(url, d)

    for mod in (shardckpt.engine.checkpointer,):  # the one lookup: managers open storage through their Checkpointer
        monkeypatch.setattr(mod, "open_storage", open_filling)
    return d


def state(step: int) -> dict[str, Any]:
    return {"w": torch.full((64, 100), float(step)), "b": torch.arange(300.0) + step, "step": step}


def blank() -> dict[str, Any]:
    return {"w": torch.zeros(64, 100), "b": torch.zeros(300), "step": -1}


def assert_is(loaded: dict[str, Any], step: int) -> None:
    want = state(step)
    assert torch.equal(loaded["w"], want["w"]) and torch.equal(loaded["b"], want["b"]) and loaded["step"] == step


def total_bytes(folder: Path) -> tuple[int, int]:
    """(data bytes, manifest bytes) of a committed checkpoint."""
    data = sum(p.stat().st_size for p in (folder / "data").iterdir())
    return data, (folder / "manifest.json").stat().st_size


def measure(folder: Path, threads: int) -> tuple[int, int]:
    """(data bytes, manifest bytes) the same save takes on an unlimited disk."""
    shardckpt.save(state(9), str(folder), hash_block_bytes=4096, num_io_threads=threads)
    return total_bytes(folder)


def full_disk_error(exc: BaseException) -> None:
    """What a user sees: an OSError (ENOSPC) or a ShardckptError that says the disk is full."""
    assert isinstance(exc, (ShardckptError, OSError)), repr(exc)
    assert "No space left on device" in str(exc), str(exc)


@pytest.mark.parametrize("where", ["first_byte", "header", "mid_data", "last_data_byte", "manifest"])
@pytest.mark.parametrize("threads", [1, 3])
def test_save_on_full_disk_commits_nothing_and_keeps_earlier(tmp_path, disk, where, threads):
    data_bytes, manifest_bytes = measure(tmp_path / "reference", threads)
    earlier = tmp_path / "earlier"
    shardckpt.save(state(1), str(earlier), hash_block_bytes=4096, num_io_threads=threads)

    free = {
        "first_byte": 0,
        "header": 10,
        "mid_data": data_bytes // 2,
        "last_data_byte": data_bytes - 1,
        "manifest": data_bytes + manifest_bytes // 2,
    }[where]
    disk.free = free
    target = tmp_path / "new"
    with pytest.raises((ShardckptError, OSError)) as ei:
        shardckpt.save(state(2), str(target), hash_block_bytes=4096, num_io_threads=threads)
    full_disk_error(ei.value)
    assert disk.failed, "the budget was hit"
    assert any(f in str(ei.value) for f in disk.failed), str(ei.value)  # names the file (of one failing thread)

    # nothing committed, the file whose write failed was removed (abort), and the
    # failed save removed its own files (a new folder: nothing is left)
    assert not (target / "manifest.json").exists()
    with pytest.raises(CheckpointNotFoundError):
        shardckpt.load(blank(), str(target))
    if where != "manifest":
        for failed in disk.failed:
            assert not os.path.exists(failed), f"partial data file {failed} left behind"
    leftovers = sorted(p.name for p in target.rglob("*") if p.is_file())
    assert not any(".tmp" in n for n in leftovers), leftovers

    # the earlier checkpoint is intact
    disk.free = None
    got = blank()
    shardckpt.load(got, str(earlier))
    assert_is(got, 1)
    assert verify_checkpoint(str(earlier)).ok


def test_manager_full_disk_step_not_listed_and_cleaned_on_restart(tmp_path, disk):
    data_bytes, _ = measure(tmp_path / "reference", 1)
    root = tmp_path / "root"
    with shardckpt.CheckpointManager(str(root), keep_last=3) as mgr:
        assert mgr.save(1, state(1))
        disk.free = data_bytes // 2
        with pytest.raises((ShardckptError, OSError)) as ei:
            mgr.save(2, state(2))
        full_disk_error(ei.value)
        assert mgr.steps() == [1]
        assert not (root / "step_0000000002").exists(), "the failed save removed its own files and folder"
        disk.free = None

    with shardckpt.CheckpointManager(str(root), keep_last=3) as mgr:
        assert mgr.cleaned_up == []
        assert mgr.steps() == [1]
        got = blank()
        assert mgr.restore(got) == 1
        assert_is(got, 1)
        # with space again, the same step saves and commits
        assert mgr.save(2, state(2))
        assert mgr.steps() == [1, 2]
    got = blank()
    shardckpt.load(got, str(root / "step_0000000002"))
    assert_is(got, 2)


def test_what_the_user_sees(tmp_path, disk):
    """Pins the error a user gets today, so a change to it is a visible decision."""
    disk.free = 100
    with pytest.raises(BaseException) as ei:
        shardckpt.save(state(3), str(tmp_path / "c"), hash_block_bytes=4096, num_io_threads=1)
    err = ei.value
    print(f"\nfull disk during save -> {type(err).__module__}.{type(err).__name__}: {err}")
    full_disk_error(err)
    # A StorageError (a ShardckptError and an OSError, errno kept) whose message names the
    # file; the ENOSPC OSError is its __cause__ and its failures[0].
    assert isinstance(err, shardckpt.StorageError) and isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert disk.failed == [disk.failed[0]] and disk.failed[0] in str(err)
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC
    assert isinstance(err.failures[0], OSError) and err.failures[0].errno == errno.ENOSPC
