"""Issue #13: a save never deletes, clobbers or hangs on what it did not create.

Each test reproduces one way the earlier main lost data (items 1, 2, 3, 11, 14) and
asserts the user's files, the earlier checkpoint and the loaded values byte for byte.
``SHARDCKPT_STRESS=1`` runs the race with 500 trials instead of 50.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import distributed
import pytest
import torch
from distributed import run_ranks
from s3server import FaultProxy, S3Server

import shardckpt
from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.errors import (
    CheckpointExistsError,
    DestinationNotEmptyError,
    InconsistentRanksError,
    RankFailureError,
    StorageError,
)
from shardckpt.format import layout
from shardckpt.storage.local import LocalStorage, _LocalWriteStream

STRESS = os.environ.get("SHARDCKPT_STRESS") == "1"


def _snapshot(root: Path) -> dict[str, str]:
    """Every file below ``root`` (symlinks not followed) -> sha256 of its bytes."""
    out = {}
    for folder, _dirs, files in os.walk(root):
        for f in files:
            p = Path(folder) / f
            out[str(p.relative_to(root))] = "link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _state(value: float = 1.0) -> dict[str, Any]:
    return {"w": torch.arange(1000, dtype=torch.float32) * value, "step": int(value)}


def _loaded(path: str | Path) -> dict[str, Any]:
    target = {"w": torch.zeros(1000), "step": 0}
    shardckpt.load(target, str(path))
    return target


# ---------------------------------------------------------------- item 1: the user's folder


def test_save_into_a_users_folder_is_refused_and_deletes_nothing(tmp_path: Path) -> None:
    user = tmp_path / "project"
    (user / "data").mkdir(parents=True)
    (user / "data" / "notes.txt").write_text("my data")
    (user / "data" / "old.safetensors").write_bytes(b"not ours")
    (user / ".git" / "objects" / "pack").mkdir(parents=True)
    (user / ".git" / "objects" / "pack" / "tmp_pack_abc").write_bytes(b"git in progress")
    (user / ".cache" / "tmpfiles").mkdir(parents=True)
    (user / ".cache" / "tmpfiles" / "x").write_bytes(b"cache")
    before = _snapshot(user)
    with pytest.raises(DestinationNotEmptyError, match="not part of a shardckpt checkpoint"):
        shardckpt.save(_state(), str(user))
    assert _snapshot(user) == before
    assert not (user / layout.MANIFEST_NAME).exists() and not (user / layout.SAVE_MARKER_NAME).exists()


def test_a_data_symlink_is_not_followed_into_someone_elses_folder(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.bin").write_bytes(b"\x00" * 100)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "data").symlink_to(elsewhere, target_is_directory=True)
    before = _snapshot(elsewhere)
    with pytest.raises(DestinationNotEmptyError, match="'data'"):
        shardckpt.save(_state(), str(ckpt))
    assert _snapshot(elsewhere) == before


def test_empty_path_is_refused_and_the_working_directory_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".hidden_tmp").write_bytes(b"keep")
    with pytest.raises(ValueError, match="empty"):
        shardckpt.save(_state(), "")
    with pytest.raises(DestinationNotEmptyError):
        shardckpt.save(_state(), ".")
    assert (tmp_path / ".hidden_tmp").read_bytes() == b"keep"
    assert sorted(os.listdir(tmp_path)) == [".hidden_tmp"]


def test_pathlike_and_empty_existing_folder_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "new").mkdir()
    shardckpt.save(_state(3.0), tmp_path / "new")
    assert torch.equal(_loaded(tmp_path / "new")["w"], _state(3.0)["w"])


def test_overwrite_replaces_only_the_checkpoints_own_files(tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    shardckpt.save(_state(1.0), str(ckpt))
    old_files = set(os.listdir(ckpt / "data"))
    shardckpt.save(_state(2.0), str(ckpt), overwrite=True)
    new_files = set(os.listdir(ckpt / "data"))
    assert not (old_files & new_files) and len(new_files) == 1  # the replaced data file is gone
    assert torch.equal(_loaded(ckpt)["w"], _state(2.0)["w"])
    # a foreign file next to a checkpoint: refused even with overwrite, nothing deleted
    (ckpt / "README.txt").write_text("notes")
    before = _snapshot(ckpt)
    with pytest.raises(DestinationNotEmptyError, match=r"README\.txt"):
        shardckpt.save(_state(4.0), str(ckpt), overwrite=True)
    assert _snapshot(ckpt) == before
    assert torch.equal(_loaded(ckpt)["w"], _state(2.0)["w"])


def test_interrupted_save_is_refused_until_overwrite(tmp_path: Path) -> None:
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    (ckpt / layout.SAVE_MARKER_NAME).write_text('{"format": "shardckpt", "save_id": "0123456789ab"}')
    (ckpt / "data").mkdir()
    (ckpt / "data" / "0123456789ab-r00000-00.safetensors").write_bytes(b"half")
    with pytest.raises(CheckpointExistsError, match="interrupted"):
        shardckpt.save(_state(), str(ckpt))
    assert (ckpt / "data" / "0123456789ab-r00000-00.safetensors").read_bytes() == b"half"
    shardckpt.save(_state(5.0), str(ckpt), overwrite=True)
    assert os.listdir(ckpt / "data") != ["0123456789ab-r00000-00.safetensors"]
    assert torch.equal(_loaded(ckpt)["w"], _state(5.0)["w"])


def test_failed_save_into_a_new_folder_leaves_nothing(tmp_path: Path) -> None:
    class FailingCommit(LocalStorage):
        def create_exclusive(self, name: str, data: bytes) -> None:
            if name == layout.MANIFEST_NAME:
                raise OSError(5, "Input/output error")
            super().create_exclusive(name, data)

    engine = Checkpointer(
        storage_factory=lambda url, options=None: FailingCommit(url)
    )  # sync saves only: nothing to close
    with pytest.raises(StorageError):
        engine.save(_state(), str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- item 2: racing saves


def _racer(worker: int, paths: list[str], options: dict[str, Any] | None, barrier: Any, results: Any) -> None:
    import shardckpt as sc

    state = {"w": torch.full((4096,), float(worker)), "who": worker}
    for path in paths:
        barrier.wait()
        try:
            sc.save(state, path, num_io_threads=1, storage_options=options)
            results.put((path, worker, "ok"))
        except sc.CheckpointExistsError:
            results.put((path, worker, "exists"))
        except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the test
            results.put((path, worker, f"{type(e).__name__}: {e}"))


def test_two_processes_racing_for_one_path_commit_exactly_once(tmp_path: Path) -> None:
    _race([str(tmp_path / f"c{i}") for i in range(500 if STRESS else 50)], None)


def test_two_processes_racing_on_s3_commit_exactly_once(s3: S3Server) -> None:
    bucket = s3.create_bucket()
    _race([f"s3://{bucket}/c{i}" for i in range(200 if STRESS else 20)], s3.storage_options())


def _race(paths: list[str], options: dict[str, Any] | None) -> None:
    trials = len(paths)
    # forked from the fork server that run_ranks uses (torch and shardckpt imported once per
    # session), not spawned: two fresh interpreters importing torch cost seconds per test
    mp.set_forkserver_preload(list(distributed.PRELOAD))
    ctx = mp.get_context("forkserver")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(w, paths, options, barrier, results)) for w in (0, 1)]
    for p in procs:
        p.start()
    outcomes: dict[str, dict[int, str]] = {}
    deadline = time.monotonic() + 120 + trials  # a hang guard only
    try:
        while sum(len(v) for v in outcomes.values()) < 2 * trials:
            path, worker, outcome = results.get(timeout=max(1.0, deadline - time.monotonic()))
            outcomes.setdefault(path, {})[worker] = outcome
    finally:
        distributed.reap(procs, 30)  # a racer still alive then is killed, and the test fails
    for path in paths:
        got = outcomes[path]
        assert sorted(got.values()) == ["exists", "ok"], (path, got)
        winner = next(w for w, o in got.items() if o == "ok")
        target = {"w": torch.zeros(4096), "who": -1}
        shardckpt.load(target, path, storage_options=options)
        assert target["who"] == winner and torch.equal(target["w"], torch.full((4096,), float(winner)))


def test_s3_commit_whose_answer_was_lost_is_not_a_lost_race(s3: S3Server) -> None:
    """The conditional PUT of the manifest lands but its answer is lost: the retry gets
    412, finds its own bytes there, and the save succeeds (not CheckpointExistsError)."""
    bucket = s3.create_bucket()
    dropped: list[str] = []

    def fail(n: int, method: str, path: str) -> Any:
        if method == "PUT" and path.split("?")[0].endswith("/manifest.json") and not dropped:
            dropped.append(path)
            return "drop-after"
        return False

    proxy = FaultProxy(s3.port, fail=fail)
    try:
        url = f"s3://{bucket}/c"
        shardckpt.save(_state(7.0), url, storage_options=s3.storage_options(endpoint_url=proxy.endpoint_url))
    finally:
        proxy.stop()
    assert dropped, "the fault was injected"
    target = {"w": torch.zeros(1000), "step": 0}
    shardckpt.load(target, url, storage_options=s3.storage_options())
    assert torch.equal(target["w"], _state(7.0)["w"]) and target["step"] == 7


# ---------------------------------------------------------------- item 3: ranks disagree on the path


def _save_to_own_path(rank: int, world: int, base: str) -> None:
    with pytest.raises(InconsistentRanksError, match="different paths") as info:
        shardckpt.save({"w": torch.ones(4) * rank}, os.path.join(base, f"ckpt_{rank}"), timeout_s=30)
    assert "ckpt_0" in str(info.value) and "ckpt_1" in str(info.value)


def test_ranks_with_different_paths_commit_nothing(tmp_path: Path) -> None:
    run_ranks(_save_to_own_path, 2, str(tmp_path))
    for r in (0, 1):
        assert not (tmp_path / f"ckpt_{r}" / layout.MANIFEST_NAME).exists()


# ---------------------------------------------------------------- ranks disagree on the options


def _save_with_own_options(rank: int, world: int, path: str, option: str) -> None:
    """Rank 0 and rank 1 save one sharded state over the checkpoint at ``path`` (overwrite=True
    unless ``option`` is overwrite) with ``option`` set differently."""
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    state = {"d": distribute_tensor(torch.arange(world * 8192.0).reshape(world * 64, 128), mesh, [Shard(0)])}
    mine: dict[str, Any] = {
        "hash_block_bytes": {"hash_block_bytes": 4096 * (rank + 1)},
        "format_version": {"format_version": 3 if rank == 0 else 1},
        "incremental": {"incremental": rank == 0},
        "overwrite": {"overwrite": rank == 0},
    }[option]
    with pytest.raises(InconsistentRanksError, match=f"different save options: {option}") as info:
        shardckpt.save(state, path, timeout_s=60, **{"overwrite": True, **mine})
    assert "rank 0" in str(info.value) and "rank 1" in str(info.value), info.value
    assert "nothing was written" in str(info.value)


@pytest.mark.parametrize("option", ["hash_block_bytes", "format_version", "incremental", "overwrite"])
def test_ranks_with_different_save_options_write_nothing(tmp_path: Path, option: str) -> None:
    """Each rank hashes, lays out and claims with its own options, the coordinator builds the
    manifest with its own: ranks that disagree on hash_block_bytes committed a checkpoint that
    no reader accepts ("expected 8 block hashes"), with overwrite=True in place of a good
    one. Every rank is refused before the folder is claimed; an existing checkpoint stays."""
    path = tmp_path / "c"
    shardckpt.save(_state(1.0), str(path))  # what an overwrite would have replaced
    before = sorted(p.name for p in path.rglob("*"))
    run_ranks(_save_with_own_options, 2, str(path), option)
    assert sorted(p.name for p in path.rglob("*")) == before
    assert torch.equal(_loaded(path)["w"], _state(1.0)["w"])


def test_commit_checks_every_listed_file(tmp_path: Path) -> None:
    """A data file removed between the write and the commit (another job on the same
    path, a rank that wrote elsewhere) stops the commit instead of committing a hole."""

    class LosingStorage(LocalStorage):
        def sync_dir(self, name: str = "") -> None:
            super().sync_dir(name)
            for f in os.listdir(self._path("data")):
                os.unlink(self._path(f"data/{f}"))

    engine = Checkpointer(
        storage_factory=lambda url, options=None: LosingStorage(url)
    )  # sync saves only: nothing to close
    with pytest.raises(StorageError, match="is missing"):
        engine.save(_state(), str(tmp_path / "c"))
    assert not (tmp_path / "c" / layout.MANIFEST_NAME).exists()


# ---------------------------------------------------------------- item 11: errors after the commit


def test_cleanup_failure_after_commit_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "c"
    shardckpt.save(_state(1.0), str(ckpt))

    class NoDeletes(LocalStorage):
        def delete(self, names: list[str]) -> None:
            if any(n.startswith("data/") for n in names):
                raise PermissionError(13, "Permission denied", self._path(names[0]))
            super().delete(names)

    engine = Checkpointer(storage_factory=lambda url, options=None: NoDeletes(url))  # sync saves only: nothing to close
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        manifest = engine.save(_state(2.0), str(ckpt), overwrite=True)
    assert manifest is not None
    assert "could not remove" in caplog.text and str(ckpt) in caplog.text
    assert torch.equal(_loaded(ckpt)["w"], _state(2.0)["w"])


# ---------------------------------------------------------------- item 14: Ctrl-C


def test_ctrl_c_during_a_save_is_a_keyboard_interrupt_and_stops_the_writes(tmp_path: Path) -> None:
    writes: list[bool] = []  # one per write begun: had save() already raised? (it must not have)
    returned = threading.Event()

    class SlowStream(_LocalWriteStream):
        def write(self, data: memoryview | bytes) -> None:
            writes.append(returned.is_set())
            time.sleep(0.05)
            super().write(data)

    class SlowStorage(LocalStorage):
        def open_write(self, name: str) -> SlowStream:
            os.makedirs(os.path.dirname(self._path(name)), exist_ok=True)
            return SlowStream(self._path(name))

    done = threading.Event()
    signals_sent: list[float] = []

    def interrupt() -> None:
        # Like a user pressing Ctrl-C again: Python runs the SIGINT handler at the next
        # bytecode, which may be inside a weakref callback during garbage collection,
        # where the KeyboardInterrupt is "ignored" (seen once in a full suite run).
        while not done.is_set() and len(signals_sent) < 10:
            signals_sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)
            done.wait(0.5)

    engine = Checkpointer(
        storage_factory=lambda url, options=None: SlowStorage(url)
    )  # sync saves only: nothing to close
    state = {f"t{i}": torch.zeros(2**20) for i in range(8)}  # 32 MiB in 64 KiB blocks, ~0.05 s each
    timer = threading.Timer(0.3, interrupt)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        try:
            engine.save(state, str(tmp_path / "c"), num_io_threads=4, hash_block_bytes=2**16)
        finally:
            returned.set()
            done.set()
    timer.join()
    # Orders and counts, not durations (a loaded machine stretches those): the writer
    # threads were stopped before save() raised, and stopped early: a save that let them
    # run on would write all 512 blocks (plus headers), at 0.05 s each on 4 threads.
    assert not any(writes), f"{sum(writes)} writes began after save() raised KeyboardInterrupt"
    assert len(writes) < 512, f"{len(writes)} writes: the interrupt did not stop them"
    assert not (tmp_path / "c").exists()  # the interrupted save removed its own files


def _interrupt_rank_1(rank: int, world: int, path: str) -> None:
    import shardckpt.engine.planner

    if rank == 1:
        original = shardckpt.engine.planner.SavePlanner.create_local_plan

        def interrupted(self: Any) -> Any:
            raise KeyboardInterrupt

        shardckpt.engine.planner.SavePlanner.create_local_plan = interrupted  # type: ignore[method-assign]
    try:
        shardckpt.save({"w": torch.ones(4)}, path, timeout_s=30)
    except KeyboardInterrupt:
        assert rank == 1
    except RankFailureError as e:
        assert rank == 0 and "rank 1" in str(e) and "KeyboardInterrupt" in str(e), str(e)
    else:
        raise AssertionError("the save should have failed")
    finally:
        if rank == 1:
            shardckpt.engine.planner.SavePlanner.create_local_plan = original  # type: ignore[method-assign]


def test_ctrl_c_on_one_rank_is_named_on_the_others(tmp_path: Path) -> None:
    run_ranks(_interrupt_rank_1, 2, str(tmp_path / "c"))
    assert not (tmp_path / "c" / layout.MANIFEST_NAME).exists()
