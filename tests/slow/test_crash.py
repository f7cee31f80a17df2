"""SIGKILL at every storage step of a manager's save loop -> the last committed step always restores.

A child process runs a CheckpointManager over a LocalStorage subclass that kills the
process (SIGKILL, no cleanup of any kind) at its K-th storage event: opening a data
file, each write, fsync, directory fsync, before/while/after the manifest's atomic
write, retention deletes. The parent then restores with verification and checks the
step it gets. ``SHARDCKPT_STRESS=1`` runs every event index instead of a spread sample.
"""

from __future__ import annotations

import os
import shutil
import textwrap

import pytest
import torch
from trial_server import TrialServer

import shardckpt

CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    import shardckpt
    from shardckpt.storage.local import LocalStorage, _LocalWriteStream
    import shardckpt.engine.saving, shardckpt.manager.checkpoint_manager, shardckpt.engine.loading

    KILL_AT = int(sys.argv[2])
    ASYNC = sys.argv[3] == "async"
    events = [0]

    def say(line):
        os.write(1, (line + "\\n").encode())  # one write per line: threads do not interleave

    def event(name):
        events[0] += 1
        if KILL_AT == 0:
            say(f"EVENT {events[0]} {name}")
        if events[0] == KILL_AT:
            say(f"KILL {name}")
            os.kill(os.getpid(), signal.SIGKILL)

    class Stream(_LocalWriteStream):
        def write(self, data):
            event("write")
            super().write(data)
        def finish(self):
            event("fsync")
            super().finish()

    class KillingStorage(LocalStorage):
        def open_write(self, name):
            event("open")
            os.makedirs(os.path.dirname(self._path(name)), exist_ok=True)
            return Stream(self._path(name))
        def write_atomic(self, name, data):
            event("commit:before")
            if name.endswith("manifest.json"):
                tmp = os.path.join(os.path.dirname(self._path(name)), ".manifest.json.tmp-0123456789ab")
                with open(tmp, "wb") as f:
                    f.write(data[: len(data) // 2])
                event("commit:half-written-tmp")
                os.unlink(tmp)
            super().write_atomic(name, data)
            event("commit:after")
        def sync_dir(self, name=""):
            event("sync_dir")
            super().sync_dir(name)
        def delete(self, names):
            event("delete")
            super().delete(names)
        def create_exclusive(self, name, data):
            self.write_atomic(name, data)  # same kill points as the commit by rename
        def remove_empty_dir(self, name=""):
            event("rmdir")
            return super().remove_empty_dir(name)
        def child(self, name):
            return KillingStorage(self._path(name))

    def open_killing(url, options=None):
        return KillingStorage(url)

    for mod in (shardckpt.engine.checkpointer,):  # the one lookup: managers open storage through their Checkpointer
        mod.open_storage = open_killing

    mgr = shardckpt.CheckpointManager(sys.argv[1], keep_last=2, async_save=ASYNC)
    start = mgr.restore({"w": torch.zeros(64, 33), "b": torch.zeros(7), "step": 0}) or 0
    for step in range(start + 1, start + 5):
        sd = {"w": torch.full((64, 33), float(step)), "b": torch.arange(7.0) + step, "step": step}
        mgr.save(step, sd)
        sd["w"].add_(1000.0)  # training mutates right away; an async save must not see it
        say(f"SAVED {step}")
    mgr.close()
    say(f"EVENTS {events[0]}")
    """
)


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    server = TrialServer(str(tmp_path_factory.mktemp("crash-children")), CHILD)
    yield server
    server.stop()


def expected(step: int) -> dict:
    return {"w": torch.full((64, 33), float(step)), "b": torch.arange(7.0) + step, "step": step}


def check_root(root: str, last_reported: int, mode: str) -> int:
    with shardckpt.CheckpointManager(root) as mgr:
        steps = mgr.steps()
        got = {"w": torch.zeros(64, 33), "b": torch.zeros(7), "step": 0}
        restored = mgr.restore(got)
        # every listed step is committed and verifies, never a half-written one
        for s in steps:
            sd = {"w": torch.zeros(64, 33), "b": torch.zeros(7), "step": 0}
            shardckpt.load(sd, mgr.path(s), verify=True)
            assert torch.equal(sd["w"], expected(s)["w"]) and sd["step"] == s
    restored = restored or 0
    # sync: the save that returned is committed; async: the one before it (save(n) confirms n-1).
    # At most the save in flight may also be committed, never anything newer.
    lowest = last_reported - (1 if mode == "async" else 0)
    assert lowest <= restored <= last_reported + 1, (mode, last_reported, restored)
    if restored:
        assert torch.equal(got["w"], expected(restored)["w"]) and got["step"] == restored
    assert all(n.startswith(("step_", ".shardckpt-owner")) for n in os.listdir(root))
    return restored


def choose_points(trace: dict[int, str], n: int) -> list[int]:
    """Every kind of event at least twice (first and last occurrence), then a spread."""
    points: set[int] = set()
    for kind in set(trace.values()):
        where = [i for i, k in trace.items() if k == kind]
        points |= {where[0], where[-1]}
    total = max(trace)
    points |= {1 + (i * (total - 1)) // (n - 1) for i in range(n)}
    return sorted(points)


@pytest.mark.parametrize("mode,spread", [("sync", 16), ("async", 16)])
def test_sigkill_at_every_storage_event_never_loses_the_last_commit(tmp_path, children, mode, spread):
    good = str(tmp_path / "good")
    rc, out = children.run(good, 0, mode)  # steps 1..4 committed; the killed runs continue from it
    assert rc == 0, out
    trace = {int(ln.split()[1]): ln.split()[2] for ln in out.splitlines() if ln.startswith("EVENT ")}
    assert len(trace) >= 40, out  # 4 saves x (open, writes, fsync, dir sync, commit, retention)
    stress = os.environ.get("SHARDCKPT_STRESS") == "1"
    shutil.copytree(good, str(tmp_path / "probe"))
    rc, out = children.run(str(tmp_path / "probe"), 0, mode)  # the trace of a run that continues
    trace = {int(ln.split()[1]): ln.split()[2] for ln in out.splitlines() if ln.startswith("EVENT ")}
    points = list(range(1, max(trace) + 1)) if stress else choose_points(trace, spread)
    kinds = set()
    for n, k in enumerate(points):
        root = str(tmp_path / f"k{k}")
        shutil.copytree(good, root)
        rc, out = children.run(root, k, mode)
        assert rc == -9, f"child was not killed at event {k}: rc={rc}\n{out}"
        kinds.add(out.split("KILL ")[1].split()[0])
        saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("SAVED")]
        restored = check_root(root, saved[-1] if saved else 4, mode)
        if n % 8 == 0:  # and the job resumes: a good run continues after the restored step
            rc, out = children.run(root, 0, mode)
            assert rc == 0 and f"SAVED {restored + 4}" in out, out
    assert len(points) >= 20
    assert {"open", "write", "fsync", "commit:before", "commit:half-written-tmp", "commit:after", "delete"} <= kinds, (
        kinds
    )


def test_a_trial_that_raises_exits_1_with_its_traceback(tmp_path, children):
    # the trial server ends its children itself (os._exit after the interpreter's exit
    # steps): an exception must still be a failed trial, as it is for `python -c`
    rc, out = children.run(str(tmp_path / "never"), "not-a-number", "sync")
    assert rc == 1, out
    assert "Traceback" in out and "ValueError" in out and "not-a-number" in out, out
    assert not os.path.exists(tmp_path / "never")
