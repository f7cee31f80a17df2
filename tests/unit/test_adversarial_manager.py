"""CheckpointManager under adversarial conditions (issue #13, items 4, 5, 6, 11, 12).

- ownership: a live owner stays fresh between saves (heartbeat thread); two managers
  claiming one root at the same instant never both win (fresh root and stale record);
  a manager that lost ownership deletes nothing and refuses to save;
- foreign folders: a ``step_<N>`` folder that shardckpt did not write (a DCP
  checkpoint, a user's notes) is never deleted, neither by the start-up clean-up nor by
  retention; user files inside a shardckpt step survive byte for byte;
- errors after a commit: an undeletable file in an old step never fails ``save`` and
  never stops a manager from opening;
- metrics: refused at ``save`` unless plain JSON; odd metrics in a committed manifest
  (another version, another tool) never crash listing, retention or ``shardckpt ls``;
- transient stat errors (EIO): propagate from start, ``steps()`` and ``restore``, never
  read as "missing".

Faults are injected with LocalStorage subclasses swapped in for ``open_storage`` in the
modules that call it (as tests/storage/test_full_disk.py does). ``SHARDCKPT_STRESS=1`` runs the
ownership races 500 times instead of 50.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed import reap

import shardckpt
import shardckpt.engine.loading
import shardckpt.engine.saving
import shardckpt.manager.checkpoint_manager
from shardckpt.errors import RootInUseError, StorageError, UnsupportedValueError
from shardckpt.format import layout
from shardckpt.storage.local import LocalStorage, _storage_error

TRIALS = 500 if os.environ.get("SHARDCKPT_STRESS") == "1" else 50
OWNER = ".shardckpt-owner.json"


@pytest.fixture(autouse=True)
def _no_job_id(monkeypatch):
    """Two managers of one test must look like two jobs (a job id would let them share)."""
    for var in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)


def state(v: float) -> dict[str, Any]:
    return {"model": {"w": torch.full((4, 3), float(v))}, "step": int(v)}


def blank() -> dict[str, Any]:
    return {"model": {"w": torch.zeros(4, 3)}, "step": -1}


def assert_step(root: Path, step: int) -> None:
    """``step`` under ``root`` loads (verified) and holds exactly what was saved."""
    got = blank()
    shardckpt.load(got, str(root / layout.step_dir_name(step)))
    assert got["step"] == step and torch.equal(got["model"]["w"], torch.full((4, 3), float(step)))


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to compare a folder before and after)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def owner_token(root: Path) -> str:
    return json.loads((root / OWNER).read_bytes())["token"]


def write_marker(step_dir: Path) -> None:
    """The save marker every save creates first (what an interrupted save leaves)."""
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / layout.SAVE_MARKER_NAME).write_text(json.dumps({"save_id": "0123456789ab"}))


def interrupted_step(root: Path, step: int) -> Path:
    """A step folder as an interrupted save leaves it: marker and a data file, no manifest."""
    d = root / layout.step_dir_name(step)
    write_marker(d)
    (d / "data").mkdir()
    (d / "data" / "0123456789ab-r00000-00.safetensors").write_bytes(b"partial data")
    return d


class AfterWrites(LocalStorage):
    """Calls ``committed(name)`` after every atomic or exclusive write (the commit among them)."""

    def write_atomic(self, name: str, data: bytes) -> None:
        super().write_atomic(name, data)
        self.committed(name)

    def create_exclusive(self, name: str, data: bytes) -> None:
        super().create_exclusive(name, data)
        self.committed(name)

    def committed(self, name: str) -> None:
        pass


def use_storage(monkeypatch, factory: Callable[[str], LocalStorage]) -> None:
    for mod in (shardckpt.engine.checkpointer,):  # the one lookup: managers open storage through their Checkpointer
        monkeypatch.setattr(mod, "open_storage", lambda url, options=None: factory(url))


# ---------------------------------------------------------------- 4: ownership


def test_live_owner_stays_fresh_between_saves_and_keeps_its_steps(tmp_path):
    """A job that saves less often than stale_owner_after_s is still alive: a second
    manager is refused, and the first job's committed and in-flight steps survive."""
    root = tmp_path / "run"
    # stale after 2 s, a heartbeat every 0.5 s: a loaded machine may delay the thread by a
    # second, not by the four beats it takes to look dead
    first = shardckpt.CheckpointManager(str(root), stale_owner_after_s=2.0)
    try:
        first.save(1, state(1))
        in_flight = interrupted_step(root, 2)  # the first job's save in progress
        before = tree(root / layout.step_dir_name(1)), tree(in_flight)
        time.sleep(5.0)  # no save for 2.5x stale_owner_after_s: only the heartbeat speaks
        with pytest.raises(RootInUseError, match="in use by another CheckpointManager"):
            shardckpt.CheckpointManager(str(root), stale_owner_after_s=2.0)
        assert (tree(root / layout.step_dir_name(1)), tree(in_flight)) == before
        assert first.save(3, state(3))  # still the owner
    finally:
        first.close()
    assert_step(root, 1)
    assert_step(root, 3)


def _race(root: Path, make: Callable[[], Any], workers: str) -> list[str]:
    """Start two managers on ``root`` at the same instant; 'won' or 'refused' for each."""
    if workers == "threads":
        barrier = threading.Barrier(2)
        results: list[str] = []
        managers: list[Any] = []

        def claim() -> None:
            barrier.wait()
            try:
                managers.append(make())
                results.append("won")
            except RootInUseError:
                results.append("refused")

        threads = [threading.Thread(target=claim) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for m in managers:
            beat = m._ownership._heartbeat  # not close(): a double winner would release the other's record
            if beat is not None:
                beat.close()
        return results
    ctx = multiprocessing.get_context("fork")
    start, done = ctx.Event(), ctx.Event()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(make, start, done, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        start.set()
        got = [queue.get(timeout=60) for _ in procs]
    finally:
        done.set()
        reap(procs, 60)  # a racer still alive then is killed, and the test fails
    return got


def _claim_in_process(make: Callable[[], Any], start: Any, done: Any, queue: Any) -> None:
    start.wait()
    try:
        make()
        queue.put("won")
    except RootInUseError:
        queue.put("refused")
    done.wait(60)  # stay alive until both answered: a dead winner may rightly be taken over
    os._exit(0)  # keep the record: the parent checks who holds it


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_two_managers_claiming_a_fresh_root_never_both_win(tmp_path, workers):
    trials = TRIALS  # two threads or two processes, as the issue asks: >= 50 (stress: 500)
    doubles = 0
    for i in range(trials):
        root = tmp_path / f"t{i}"
        results = _race(root, lambda r=root: shardckpt.CheckpointManager(str(r)), workers)
        assert sorted(results) in (["refused", "won"], ["won", "won"]), results
        doubles += results.count("won") == 2
    assert doubles == 0, f"{doubles} of {trials} races had two owners"


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_two_takers_of_a_stale_record_never_both_win(tmp_path, workers):
    stale = {
        "token": "f" * 32,
        "host": "elsewhere",
        "pid": 1,
        "job_id": None,
        "started_at": time.time() - 7200,
        "heartbeat_at": time.time() - 3600,
    }
    trials = TRIALS  # two threads or two processes, as the issue asks: >= 50 (stress: 500)
    doubles = 0
    for i in range(trials):
        root = tmp_path / f"t{i}"
        root.mkdir()
        (root / OWNER).write_text(json.dumps(stale))
        results = _race(root, lambda r=root: shardckpt.CheckpointManager(str(r), stale_owner_after_s=60), workers)
        assert sorted(results) in (["refused", "won"], ["won", "won"]), results
        doubles += results.count("won") == 2
        assert owner_token(root) != stale["token"]
        assert not [n for n in os.listdir(root) if "takeover" in n], os.listdir(root)  # the gate is cleared
    assert doubles == 0, f"{doubles} of {trials} races had two owners"


def test_a_takeover_gate_left_by_a_dead_taker_and_an_unreadable_record_do_not_lock_the_root(tmp_path):
    import hashlib

    root = tmp_path / "run"
    root.mkdir()
    raw = json.dumps(
        {
            "token": "f" * 32,
            "host": "elsewhere",
            "pid": 1,
            "job_id": None,
            "started_at": time.time() - 7200,
            "heartbeat_at": time.time() - 3600,
        }
    ).encode()
    (root / OWNER).write_bytes(raw)
    gate = root / f"{OWNER}.takeover-{hashlib.sha256(raw).hexdigest()[:32]}"
    gate.write_text(
        json.dumps(
            {
                "token": "a" * 32,
                "host": "elsewhere",
                "pid": 1,
                "job_id": None,
                "started_at": time.time() - 120,
                "heartbeat_at": time.time() - 120,
            }
        )
    )
    with shardckpt.CheckpointManager(str(root), stale_owner_after_s=60) as mgr:
        assert owner_token(root) == mgr._owner.token
        assert not gate.exists()
    (root / OWNER).write_text("{not json")  # a hand edit
    with shardckpt.CheckpointManager(str(root)) as mgr:
        assert owner_token(root) == mgr._owner.token
    assert sorted(os.listdir(root)) == []


def test_owner_that_lost_the_root_deletes_nothing_and_refuses_to_save(tmp_path):
    root = tmp_path / "run"
    first = shardckpt.CheckpointManager(str(root), keep_last=1)
    first.save(1, state(1))
    second = shardckpt.CheckpointManager(str(root), takeover=True)  # e.g. an operator's decision
    second.save(10, state(10))
    kept = tree(root)
    with pytest.raises(RootInUseError, match="no longer owns"):
        first.save(2, state(2))
    assert tree(root) == kept  # nothing written, nothing deleted
    first.close()  # must not remove the new owner's record
    assert owner_token(root) == second._owner.token
    assert second.steps() == [1, 10]
    second.close()
    assert_step(root, 1)
    assert_step(root, 10)


def test_heartbeat_never_overwrites_the_record_of_a_manager_that_took_over(tmp_path):
    root = tmp_path / "run"
    first = shardckpt.CheckpointManager(str(root), stale_owner_after_s=0.4)
    second = shardckpt.CheckpointManager(str(root), takeover=True)
    time.sleep(0.6)  # several heartbeats of the first manager
    assert owner_token(root) == second._owner.token
    with pytest.raises(RootInUseError):
        first.save(1, state(1))
    first.close()
    second.close()
    assert not (root / OWNER).exists()


def test_retention_rechecks_ownership_right_before_deleting(tmp_path, monkeypatch, caplog):
    """Ownership lost while a save is in flight (the record changes between the save's
    start and its retention): the step commits, retention deletes nothing."""
    root = tmp_path / "run"
    thief = {"armed": False}

    class Stealing(AfterWrites):
        def committed(self, name: str) -> None:
            if thief["armed"] and name == layout.MANIFEST_NAME:
                other = {
                    "token": "e" * 32,
                    "host": "other",
                    "pid": 1,
                    "job_id": "x",
                    "started_at": time.time(),
                    "heartbeat_at": time.time(),
                }
                (root / OWNER).write_text(json.dumps(other))

        def child(self, name: str) -> LocalStorage:
            return Stealing(self._path(name))

    use_storage(monkeypatch, Stealing)
    mgr = shardckpt.CheckpointManager(str(root), keep_last=1)
    mgr.save(1, state(1))
    thief["armed"] = True
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        assert mgr.save(2, state(2))
    assert "no longer owns" in caplog.text
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [
        "step_0000000001",
        "step_0000000002",
    ]
    assert_step(root, 1)
    assert_step(root, 2)
    with pytest.raises(RootInUseError):
        mgr.save(3, state(3))
    mgr.close()
    assert owner_token(root) == "e" * 32


def test_heartbeat_thread_belongs_to_the_manager(tmp_path):
    before = {t.ident for t in threading.enumerate()}
    mgr = shardckpt.CheckpointManager(str(tmp_path), stale_owner_after_s=0.2)
    started = [t for t in threading.enumerate() if t.ident not in before]
    assert [t.name for t in started] == ["shardckpt-heartbeat"]
    reader = shardckpt.CheckpointManager(str(tmp_path), read_only=True)
    assert [t for t in threading.enumerate() if t.ident not in before] == started  # readers have none
    stamp = json.loads((tmp_path / OWNER).read_bytes())["heartbeat_at"]
    # The next beat comes every 0.05 s; wait for it rather than a fixed 0.3 s, which a
    # loaded machine may not give the thread. The deadline only ends a heartbeat that stopped.
    deadline = time.monotonic() + 60
    while json.loads((tmp_path / OWNER).read_bytes())["heartbeat_at"] == stamp and time.monotonic() < deadline:
        time.sleep(0.02)
    assert json.loads((tmp_path / OWNER).read_bytes())["heartbeat_at"] > stamp
    mgr.close()
    reader.close()
    assert not started[0].is_alive()
    assert not (tmp_path / OWNER).exists()


def test_failed_open_releases_the_root(tmp_path, monkeypatch):
    """A manager whose start-up fails after the claim (here: EIO listing the root) must
    not keep the root locked by a record nobody refreshes or releases."""

    class Failing(LocalStorage):
        def list_names(self, prefix: str = "") -> list[str]:
            raise _storage_error(OSError(errno.EIO, os.strerror(errno.EIO)), self._path(prefix), "list")

    use_storage(monkeypatch, Failing)
    with pytest.raises(StorageError, match="Input/output error"):
        shardckpt.CheckpointManager(str(tmp_path))
    assert not (tmp_path / OWNER).exists()
    assert not [t for t in threading.enumerate() if t.name == "shardckpt-heartbeat"]


# ---------------------------------------------------------------- 6: folders shardckpt did not write


def dcp_like(folder: Path) -> None:
    """What torch.distributed.checkpoint writes: .metadata and __<rank>_<k>.distcp."""
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"\x80\x04DCP metadata")
    (folder / "__0_0.distcp").write_bytes(os.urandom(1000))


def test_start_never_deletes_a_step_folder_shardckpt_did_not_write(tmp_path, caplog):
    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root)) as mgr:
        mgr.save(1, state(1))
    dcp_like(root / "step_0000000005")
    (root / "step_0000000006" / "data").mkdir(parents=True)
    (root / "step_0000000006" / "data" / "user.bin").write_bytes(b"mine")
    interrupted = interrupted_step(root, 7)
    (interrupted / "notes.txt").write_text("do not delete")
    before = tree(root / "step_0000000005"), tree(root / "step_0000000006")
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        mgr = shardckpt.CheckpointManager(str(root), keep_last=1)
    assert (tree(root / "step_0000000005"), tree(root / "step_0000000006")) == before
    assert tree(interrupted) == {"notes.txt": b"do not delete"}  # ours removed, the user's kept
    assert mgr.cleaned_up == ["step_0000000007"]
    assert str(root / "step_0000000005") in caplog.text
    # and retention (keep_last=1) after new saves deletes only committed shardckpt steps
    mgr.save(8, state(8))
    mgr.save(9, state(9))
    mgr.close()
    assert (tree(root / "step_0000000005"), tree(root / "step_0000000006")) == before
    assert sorted(p.name for p in root.iterdir()) == [
        "step_0000000005",
        "step_0000000006",
        "step_0000000007",
        "step_0000000009",
    ]
    assert_step(root, 9)


def test_start_removes_a_save_killed_while_creating_its_marker(tmp_path, caplog):
    """SIGKILL between the save marker's durable temp file and its link(2) (found by
    tests/slow/test_crash_incremental.py) leaves a step folder holding only that temp file.
    Its name is shardckpt's own, as specific as the marker's: the next start removes the
    folder, instead of keeping it for ever as another tool's."""
    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root)) as mgr:
        mgr.save(1, state(1))
    killed = root / "step_0000000002"
    killed.mkdir()
    (killed / f".{layout.SAVE_MARKER_NAME}.tmp-0123456789ab").write_bytes(b'{"format": "shardckpt", "save_id": "a')
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        with shardckpt.CheckpointManager(str(root)) as mgr:
            assert mgr.cleaned_up == ["step_0000000002"]
            assert mgr.steps() == [1]
    assert not killed.exists()
    assert "shardckpt did not write it" not in caplog.text


def test_ls_tells_foreign_folders_from_interrupted_saves(tmp_path, capsys):
    from shardckpt.cli.app import main

    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root)) as mgr:
        mgr.save(1, state(1))
    dcp_like(root / "step_0000000005")
    interrupted_step(root, 7)
    assert main(["ls", str(root)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:4]}
    assert rows == {"1": "committed", "5": "FOREIGN", "7": "UNCOMMITTED"}
    assert "FOREIGN folders were not written by shardckpt" in out
    assert main(["ls", str(root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(s["step"], s["committed"], s["foreign"]) for s in doc["steps"]] == [
        (1, True, False),
        (5, False, True),
        (7, False, False),
    ]


def test_retention_leaves_user_files_in_a_deleted_step(tmp_path, caplog):
    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root), keep_last=1) as mgr:
        mgr.save(1, state(1))
        (root / "step_0000000001" / "eval.json").write_text('{"acc": 0.9}')
        with caplog.at_level(logging.WARNING, logger="shardckpt"):
            assert mgr.save(2, state(2))
        assert mgr.steps() == [2]
    assert tree(root / "step_0000000001") == {"eval.json": b'{"acc": 0.9}'}
    assert "eval.json" in caplog.text
    assert_step(root, 2)


# ---------------------------------------------------------------- 11: errors after the commit


class Undeletable(LocalStorage):
    """Deleting a name matching ``stuck`` fails with EACCES (an NFS .nfsXXXX file held
    open elsewhere, a file of another user)."""

    stuck: tuple[str, ...] = ()

    def delete(self, names: list[str]) -> None:
        for name in names:
            path = self._path(name)
            if any(s in path for s in self.stuck):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            super().delete([name])

    def child(self, name: str) -> LocalStorage:
        return Undeletable(self._path(name))


def test_undeletable_file_in_an_old_step_never_fails_save_or_open(tmp_path, monkeypatch, caplog):
    root = tmp_path / "run"
    use_storage(monkeypatch, Undeletable)
    monkeypatch.setattr(Undeletable, "stuck", ("step_0000000001/data/",))
    mgr = shardckpt.CheckpointManager(str(root), keep_last=1)
    mgr.save(1, state(1))
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        assert mgr.save(2, state(2))  # committed; retention fails on step 1's data file
        assert mgr.save(3, state(3))  # not CheckpointExistsError, not a retention error
    assert str(root / "step_0000000001" / "data") in caplog.text  # the full path
    assert mgr.steps() == [3]  # retention advanced past the stuck step
    mgr.close()
    assert not (root / "step_0000000001" / "manifest.json").exists()  # uncommitted first
    # a half-deleted step does not stop the next manager from opening
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        mgr = shardckpt.CheckpointManager(str(root), keep_last=1)
    assert mgr.steps() == [3]
    got = blank()
    assert mgr.restore(got) == 3 and got["step"] == 3
    mgr.close()
    assert_step(root, 3)


def test_half_deleted_step_with_a_stuck_file_never_blocks_opening(tmp_path, monkeypatch, caplog):
    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root)) as mgr:
        mgr.save(1, state(1))
    half = interrupted_step(root, 2)  # no manifest, marker and data left
    use_storage(monkeypatch, Undeletable)
    monkeypatch.setattr(Undeletable, "stuck", ("step_0000000002/data/",))
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        mgr = shardckpt.CheckpointManager(str(root))
    assert str(half / "data") in caplog.text
    assert mgr.steps() == [1]
    assert mgr.save(3, state(3))
    mgr.close()
    assert_step(root, 1)
    assert_step(root, 3)


def test_retention_listing_error_after_the_commit_is_a_warning(tmp_path, monkeypatch, caplog):
    root = tmp_path / "run"
    broken = {"on": False, "armed": False}

    class FlakyList(AfterWrites):
        def committed(self, name: str) -> None:
            if name == layout.MANIFEST_NAME and broken["armed"]:
                broken["on"] = True  # the commit landed; the listing that follows fails

        def list_names(self, prefix: str = "") -> list[str]:
            if broken["on"] and not prefix and Path(self.root) == root:
                broken["on"] = False
                raise _storage_error(OSError(errno.ESTALE, os.strerror(errno.ESTALE)), self.root, "list")
            return super().list_names(prefix)

        def child(self, name: str) -> LocalStorage:
            return FlakyList(self._path(name))

    use_storage(monkeypatch, FlakyList)
    with shardckpt.CheckpointManager(str(root), keep_last=1) as mgr:
        mgr.save(1, state(1))
        broken["armed"] = True
        with caplog.at_level(logging.WARNING, logger="shardckpt"):
            assert mgr.save(2, state(2))
        broken["armed"] = False
        assert "Stale file handle" in caplog.text and str(root) in caplog.text
        assert mgr.steps() == [1, 2]  # retention skipped this time ...
        mgr.save(3, state(3))
        assert mgr.steps() == [3]  # ... and catches up at the next commit
    assert_step(root, 3)


# ---------------------------------------------------------------- 12: metrics


@pytest.mark.parametrize(
    "metrics,match",
    [
        ("0.5", "metrics must be a dict"),
        ([("loss", 0.5)], "metrics must be a dict"),
        ({1: 0.5}, "keys must be str"),
        ({"loss": torch.tensor(0.5)}, r"\['loss'\].*Tensor.*\.item\(\)"),
        ({"loss": float("nan")}, r"\['loss'\].*nan"),
        ({"loss": {"a": object()}}, r"\['loss'\]\['a'\].*object"),
    ],
)
def test_metrics_must_be_plain_json_and_nothing_is_written_otherwise(tmp_path, metrics, match, capsys):
    from shardckpt.cli.app import main

    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root), keep_best=1, monitor="loss", keep_last=1) as mgr:
        mgr.save(1, state(1), metrics={"loss": 1.0})
        with pytest.raises(UnsupportedValueError, match=match):
            mgr.save(2, state(2), metrics=metrics)
        assert not (root / "step_0000000002").exists()
        assert mgr.save(3, state(3), metrics={"loss": 2.0})
        assert mgr.steps() == [1, 3] and mgr.best_step() == 1
    assert main(["ls", str(root), "--monitor", "loss"]) == 0
    assert "best" in capsys.readouterr().out


@pytest.mark.parametrize("odd", ["0.5", [1, 2], 7, None, {"loss": "low"}, {"loss": [1]}])
def test_odd_metrics_in_a_committed_manifest_never_crash(tmp_path, odd, capsys):
    """A manifest from another version or tool whose metadata has odd metrics: treated
    as no metrics by listing, best_step, retention and ``shardckpt ls``."""
    from shardckpt.cli.app import main

    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root)) as mgr:
        mgr.save(1, state(1), metrics={"loss": 3.0})
    shardckpt.save(state(2), str(root / "step_0000000002"), metadata={"step": 2, "metrics": odd})
    assert main(["ls", str(root), "--monitor", "loss"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].split()[0] == "2" and out[2].rstrip().endswith("latest")
    assert main(["ls", str(root), "--json", "--monitor", "loss"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["best"] == 1 and doc["latest"] == 2
    with shardckpt.CheckpointManager(str(root), keep_last=1, keep_best=1, monitor="loss") as mgr:
        assert mgr.metrics(2) == (odd if isinstance(odd, dict) else {})
        assert mgr.best_step() == 1
        assert mgr.save(3, state(3), metrics={"loss": 5.0})
        assert mgr.steps() == [1, 3]
    assert shardckpt.list_root(str(root))[0].metrics == {"loss": 3.0}
    assert_step(root, 1)


# ---------------------------------------------------------------- 5: EIO is not "missing"


class FlakyStat(LocalStorage):
    """stat() (or, with ``failing_read``, reading) a path containing ``failing`` fails
    with EIO (a storage hiccup)."""

    failing: str | None = None
    failing_read: str | None = None

    def read_bytes(self, name: str) -> bytes:
        path = self._path(name)
        if self.failing_read is not None and self.failing_read in path:
            raise _storage_error(OSError(errno.EIO, os.strerror(errno.EIO)), path, "read")
        return super().read_bytes(name)

    def _stat(self, name: str) -> os.stat_result | None:
        path = self._path(name)
        if self.failing is not None and self.failing in path:
            raise _storage_error(OSError(errno.EIO, os.strerror(errno.EIO)), path, "look up")
        return super()._stat(name)

    def child(self, name: str) -> LocalStorage:
        return FlakyStat(self._path(name))


def test_eio_on_a_manifest_propagates_and_deletes_nothing(tmp_path, monkeypatch):
    root = tmp_path / "run"
    with shardckpt.CheckpointManager(str(root)) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))
    before = tree(root / "step_0000000002")
    use_storage(monkeypatch, FlakyStat)
    monkeypatch.setattr(FlakyStat, "failing", "step_0000000002/manifest.json")
    # start: not an "interrupted save" to clean up
    with pytest.raises(StorageError, match=r"step_0000000002/manifest\.json.*Input/output error"):
        shardckpt.CheckpointManager(str(root))
    assert tree(root / "step_0000000002") == before
    assert not (root / OWNER).exists()
    # listing and restore: not "step 2 is missing, restore step 1"
    reader = shardckpt.CheckpointManager(str(root), read_only=True)
    with pytest.raises(StorageError, match="Input/output error"):
        reader.steps()
    got = blank()
    with pytest.raises(StorageError, match="Input/output error"):
        reader.restore(got)
    assert got["step"] == -1
    monkeypatch.setattr(FlakyStat, "failing", None)
    assert reader.restore(got) == 2 and got["step"] == 2
    assert tree(root / "step_0000000002") == before


def test_eio_during_retention_deletes_nothing_and_save_still_succeeds(tmp_path, monkeypatch, caplog):
    root = tmp_path / "run"
    use_storage(monkeypatch, FlakyStat)
    with shardckpt.CheckpointManager(str(root), keep_last=1, keep_best=1, monitor="loss") as mgr:
        mgr.save(1, state(1), metrics={"loss": 0.1})  # the best: kept by keep_best
        mgr.save(2, state(2), metrics={"loss": 0.5})
        mgr._metrics.clear()  # a fresh manager would read metrics from the manifests
        monkeypatch.setattr(FlakyStat, "failing_read", "step_0000000001/manifest.json")
        with caplog.at_level(logging.WARNING, logger="shardckpt"):
            assert mgr.save(3, state(3), metrics={"loss": 0.9})
        monkeypatch.setattr(FlakyStat, "failing_read", None)
        assert "Input/output error" in caplog.text
        assert 1 in mgr.steps()  # the best step was not deleted for want of its metrics
        mgr.save(4, state(4), metrics={"loss": 0.9})
        assert mgr.steps() == [1, 4]
    assert_step(root, 1)
