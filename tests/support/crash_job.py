"""One rank of the multi-process job that tests/slow/test_crash_ranks.py kills.

``python tests/support/crash_job.py ROOT RANK WORLD PORT MODE KILL SCOPE TIMEOUT_S STEPS``, or
``python tests/support/crash_job.py --serve``: a fork server that has imported torch once and
starts the ranks of a job by fork (a trial then costs no interpreter start-up); see
:func:`serve`.

Every rank runs a CheckpointManager (keep_last=2, sync or async saves) over a
LocalStorage subclass that counts this rank's storage events (open, write, fsync,
folder fsync, atomic write, delete, rmdir; :func:`killing_storage_class`, which
tests/support/incremental_crash_job.py reuses). KILL says when this rank dies by
SIGKILL: ``none``; ``event:K`` (at its K-th storage event); ``nth:J:NAME`` (at its
J-th event named NAME); ``timer:S`` (S seconds
after the process group is up). SCOPE ``self`` kills this rank only, ``all`` kills
the whole job at that instant (the parent starts the ranks in one process group).

Each rank saves a 1-D sharded DTensor (its own rows), a replicated tensor and a step
value for STEPS steps after the restored one, printing ``SAVED n`` when
``mgr.save(n)`` returned, then ``DONE``. A rank whose call raises prints
``ERROR <type> <seconds since its last line>`` and exits with code 3.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import shardckpt
import shardckpt.engine.loading
import shardckpt.engine.saving
import shardckpt.manager.checkpoint_manager
from shardckpt.format import layout
from shardckpt.storage.local import LocalStorage, _LocalWriteStream

ROWS_PER_RANK = 16
COLS = 33


def expected(step: int, world: int) -> dict:
    """The global state saved at ``step`` (the same on every rank of any world size)."""
    w = torch.arange(world * ROWS_PER_RANK * COLS, dtype=torch.float32).reshape(-1, COLS) + 1000.0 * step
    return {"w": w, "b": torch.arange(7.0) + step, "step": step}


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write per line: threads do not interleave


class Killer:
    """Counts events and kills at the one KILL names: ``event:K`` (the K-th event of any
    kind), ``nth:J:NAME`` (the J-th event named NAME: the same point of the run however
    writer threads interleave), ``timer:S``, or ``none`` (then each event is printed,
    ``EVENT n name``, to trace a run)."""

    def __init__(self, kill: str, scope: str) -> None:
        self.at_event = int(kill.split(":")[1]) if kill.startswith("event:") else 0
        self.after_s = float(kill.split(":")[1]) if kill.startswith("timer:") else None
        self.at_kind: tuple[str, int] | None = None
        if kill.startswith("nth:"):
            _, nth, name = kill.split(":", 2)
            self.at_kind = (name, int(nth))
        self.scope = scope
        self.events = 0
        self.by_kind: dict[str, int] = {}
        self.lock = threading.Lock()

    def event(self, name: str) -> None:
        with self.lock:
            self.events += 1
            n = self.events
            self.by_kind[name] = nth = self.by_kind.get(name, 0) + 1
        if self.at_event == 0 and self.after_s is None and self.at_kind is None:
            say(f"EVENT {n} {name}")
        if n == self.at_event or (name, nth) == self.at_kind:
            self.kill(name)

    def kill(self, where: str) -> None:
        say(f"KILL {where}")
        if self.scope == "all":
            os.killpg(0, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    def start_timer(self) -> None:
        if self.after_s is not None:
            t = threading.Timer(self.after_s, self.kill, args=("timer",))
            t.daemon = True
            t.start()


def _what(name: str) -> str:
    """What a storage call touches, in an event's name: ``data`` or the file's own name."""
    return "data" if layout.is_data_file_name(name) else name.rsplit("/", 1)[-1]


def _atomic(name: str) -> str:
    return "commit" if name.endswith(layout.MANIFEST_NAME) else f"atomic:{_what(name)}"


def killing_storage_class(killer: Killer) -> type[LocalStorage]:
    """A LocalStorage that tells ``killer`` of each event: ``open``, ``write``, ``fsync``
    (of a data file), ``sync_dir``, ``commit`` / ``commit:after`` (the manifest),
    ``atomic:<name>`` / ``atomic:<name>:after`` (the save marker, the referenced marker,
    the owner record), ``delete:<what>`` (``manifest.json``, ``data``, a marker), ``rmdir``."""

    class Stream(_LocalWriteStream):
        def write(self, data):  # type: ignore[no-untyped-def]
            killer.event("write")
            super().write(data)

        def finish(self) -> None:
            killer.event("fsync")
            super().finish()

    class KillingStorage(LocalStorage):
        def open_write(self, name: str) -> Stream:
            killer.event("open")
            os.makedirs(os.path.dirname(self._path(name)), exist_ok=True)
            return Stream(self._path(name))

        def write_atomic(self, name: str, data: bytes) -> None:
            killer.event(_atomic(name))
            super().write_atomic(name, data)
            killer.event(f"{_atomic(name)}:after")

        def sync_dir(self, name: str = "") -> None:
            killer.event("sync_dir")
            super().sync_dir(name)

        def delete(self, names: list[str]) -> None:
            killer.event(f"delete:{_what(names[0])}" if names else "delete")
            super().delete(names)

        def create_exclusive(self, name: str, data: bytes) -> None:
            killer.event(_atomic(name))
            super().create_exclusive(name, data)
            killer.event(f"{_atomic(name)}:after")

        def remove_empty_dir(self, name: str = "") -> bool:
            killer.event("rmdir")
            return super().remove_empty_dir(name)

        # Same class (a subclass's too) for sub-folders and siblings: an incremental save
        # writes its base's referenced marker through sibling().
        def child(self, name: str) -> KillingStorage:
            return type(self)(self._path(name))

        def sibling(self, name: str) -> KillingStorage:
            return type(self)(super().sibling(name).root)

    return KillingStorage


def main(argv: list[str]) -> None:
    root, rank, world, port, mode, kill, scope, timeout_s, steps = argv
    rank, world, timeout, n_steps = int(rank), int(world), float(timeout_s), int(steps)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    killer = Killer(kill, scope)
    storage_cls = killing_storage_class(killer)
    for mod in (shardckpt.engine.checkpointer,):  # the one lookup: managers open storage through their Checkpointer
        mod.open_storage = lambda url, options=None, _cls=storage_cls: _cls(url)  # type: ignore[attr-defined]
    # The default group's own timeout is long on purpose: only shardckpt's timeout_s may end a wait.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (world,))
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)

    def state(step: int) -> dict:
        full = expected(step, world)
        w = DTensor.from_local(full["w"][rows].clone(), mesh, [Shard(0)], run_check=False)
        return {"w": w, "b": full["b"], "step": step}

    killer.start_timer()
    t_start = t_last = time.monotonic()
    try:
        mgr = shardckpt.CheckpointManager(root, keep_last=2, async_save=mode == "async", timeout_s=timeout)
        target = state(0)
        start = mgr.restore(target) or 0
        if start:
            want = state(start)
            assert torch.equal(target["w"].to_local(), want["w"].to_local()) and target["step"] == start
        say(f"RESTORED {start}")
        t_last = time.monotonic()
        for step in range(start + 1, start + n_steps + 1):
            sd = state(step)
            mgr.save(step, sd)
            sd["w"].to_local().add_(1e6)  # training mutates at once; an async save must not see it
            say(f"SAVED {step}")
            t_last = time.monotonic()
        mgr.close()
        say(f"DONE events={killer.events} total_s={time.monotonic() - t_start:.2f}")
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which judges it
        first = str(e).splitlines()[0] if str(e) else ""
        say(f"ERROR {type(e).__name__} {time.monotonic() - t_last:.2f} {first[:300]}")
        os._exit(3)
    # Leave without gloo's C++ teardown (it can abort once a peer is gone).
    os._exit(0)


def serve() -> None:
    """Fork server. Reads one job per stdin line: ``out_path|argv`` per rank, joined by
    tabs. Forks every rank (one new process group, rank 0's pid), answers ``PIDS p0 p1
    ...``, then ``RC <pid> <returncode> <monotonic time>`` as each one exits, then ``END``.
    Only imports ran here, no torch op, so no thread exists to be lost in fork."""
    for line in sys.stdin:
        jobs = [part.split("|", 1) for part in line.rstrip("\n").split("\t")]
        pids: list[int] = []
        for out_path, argv in jobs:
            pgid = pids[0] if pids else 0
            pid = os.fork()
            if pid == 0:
                try:
                    os.setpgid(0, pgid)
                    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(fd, 1)
                    os.dup2(fd, 2)
                    main(argv.split(" "))
                finally:
                    os._exit(4)
            try:
                os.setpgid(pid, pgid or pid)
            except OSError:
                pass  # the child did it first
            pids.append(pid)
        print("PIDS " + " ".join(map(str, pids)), flush=True)
        for _ in pids:
            pid, status = os.wait()
            print(f"RC {pid} {os.waitstatus_to_exitcode(status)} {time.monotonic()}", flush=True)
        print("END", flush=True)


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["--serve"] else main(sys.argv[1:])
