"""Every process a test starts, started one way: under a deadline, in a process group of
its own, killed with that whole group when the deadline passes, the failure carrying its
output. A hung rank or launcher then fails its test, named, instead of the suite.

- ``run_ranks(fn, world_size, *args)`` calls ``fn(rank, world_size, *args)`` in every
  rank (torch.multiprocessing, gloo on CPU, the environment torchrun sets) with the
  default process group initialized. Ranks are forked from a server that imported
  torch and shardckpt once per session (``PRELOAD``), not spawned afresh. A rank that raises fails the test with its
  traceback; past ``timeout_s`` every rank prints its Python stacks (faulthandler) and
  is killed with its process group. Each rank's output is echoed to the test's stdout.
- ``run_command(cmd, timeout_s=...)``: a command line run to its end (torchrun, a
  script), output captured; ``start_command``/``finish`` for one a test signals while it
  runs. Past the deadline the command's whole session is killed.
- ``reap(procs, timeout_s)``: ends the helper processes of a race (two writers, not
  ranks): waits for them, kills what is left and fails.
- ``mark(path)`` / ``wait_for(path)``: one rank tells another it got this far, so a test
  asserts an order ("rank 0 gave up before rank 1 came back") instead of a duration that
  a loaded machine stretches.

``SHARDCKPT_TEST_TIMEOUT_S`` changes the default deadline of ranks and commands (300 s).
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

# Only catches hangs: the slowest run_ranks call (4 FSDP ranks training) takes well under
# a minute alone and a few on a loaded 2-core machine.
TIMEOUT_S = float(os.environ.get("SHARDCKPT_TEST_TIMEOUT_S", "300"))
_TAIL = 6000  # characters of each rank's output in a failure message
# What the fork server of run_ranks imports once for every rank it forks.
PRELOAD = ("torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.tensor", "shardckpt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_group(pgid: int) -> None:
    """SIGKILL a process group (a rank or command and whatever it started); gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _tail(text: str, limit: int = _TAIL) -> str:
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


# ---------------------------------------------------------------- ranks


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    args: tuple[Any, ...],
    log_dir: str,
    environ: dict[str, str],
) -> None:
    # The caller's environment as it is now (a forkserver child inherits the server's, from
    # when it started), so a test's monkeypatch.setenv reaches its ranks as under spawn.
    os.environ.clear()
    os.environ.update(environ)
    os.setsid()  # its own process group: the parent can kill the rank and all it started
    log = os.open(os.path.join(log_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # stacks, asked for at the deadline
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, world_size, *args)
        # Everyone leaves together: rank 0 hosts the store, and a rank that tears down
        # its group after rank 0 exited can abort in gloo's C++ threads.
        dist.barrier()
    except BaseException as e:
        raise RuntimeError(f"rank {rank} failed:\n{traceback.format_exc()}") from e
    dist.destroy_process_group()
    # The test body passed on every rank (the barrier above). Leave without running C++
    # destructors at interpreter exit: gloo's teardown can rarely abort ("terminate called
    # without an active exception") on a loaded machine, failing a test that passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _outputs(log_dir: str, world_size: int) -> dict[int, str]:
    out = {}
    for rank in range(world_size):
        try:
            with open(os.path.join(log_dir, f"rank{rank}.log"), errors="replace") as f:
                out[rank] = f.read()
        except FileNotFoundError:
            out[rank] = "(no output: the rank never started)"
    return out


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = TIMEOUT_S,
    start_method: str = "forkserver",
    preload: Sequence[str] = (),
) -> None:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; see the module docstring.

    By default every rank is forked from multiprocessing's fork server, which imported torch,
    its distributed packages and shardckpt once (``PRELOAD``, plus ``preload``: more module
    names) for the whole test session, instead of each spawned rank importing them again
    (seconds per rank, and the suite starts a few hundred ranks). The fork server does no
    torch op and starts no thread, so a fork loses nothing; each rank then imports ``fn``'s
    module, gets the caller's current environment and sys.path, and runs as under spawn.
    The modules a rank imports first are the server's: ``start_method="spawn"`` for a test
    that must see a process import them fresh. Only the first call's preload list counts:
    the server starts once."""
    if start_method == "forkserver":
        mp.set_forkserver_preload([*PRELOAD, *preload])
    log_dir = tempfile.mkdtemp(prefix="shardckpt-ranks-")
    ctx = mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), args, log_dir, dict(os.environ)),
        nprocs=world_size,
        join=False,
        start_method=start_method,
    )
    deadline = time.monotonic() + timeout_s
    failure: str | None = None
    try:
        try:
            while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    stuck = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                    for p in ctx.processes:  # print your stacks (rank output, below)
                        with contextlib.suppress(ProcessLookupError):
                            if p.is_alive():
                                os.kill(p.pid, signal.SIGUSR1)
                    time.sleep(2)
                    failure = f"ranks {stuck} of {world_size} still running after {timeout_s:g} s: killed (a hang?)"
                    break
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:  # torch ended the other ranks
            failure = str(e).strip()
    finally:
        for p in ctx.processes:
            kill_group(p.pid)  # the rank's group (it called setsid), and anything it started
            if p.is_alive():  # killed before its setsid
                p.kill()
            p.join()
        outputs = _outputs(log_dir, world_size)
        shutil.rmtree(log_dir, ignore_errors=True)
        for rank, text in outputs.items():  # shown by pytest with the test's captured output
            if text:
                print(f"----- rank {rank} output -----\n{text}", end="" if text.endswith("\n") else "\n")
    if failure is not None:
        raise AssertionError(
            failure + "".join(f"\n----- rank {r} output (tail) -----\n{_tail(t)}" for r, t in outputs.items() if t)
        )


# ---------------------------------------------------------------- commands


def start_command(cmd: Sequence[str], **popen_kw: Any) -> subprocess.Popen[str]:
    """``cmd`` started in a session (and process group) of its own; text I/O."""
    return subprocess.Popen(list(cmd), text=True, start_new_session=True, **popen_kw)


def finish(proc: subprocess.Popen[str], timeout_s: float = TIMEOUT_S) -> tuple[str, str]:
    """(stdout, stderr) of a started command once it ended; past ``timeout_s`` its whole
    process group is killed and the test fails with what it printed."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(
            f"{' '.join(map(str, proc.args))} still running after {timeout_s:g} s: killed with its process group\n"
            f"----- stdout -----\n{_tail(out or '')}\n----- stderr -----\n{_tail(err or '')}"
        ) from None
    finally:
        kill_group(proc.pid)  # what it left behind (a rank its launcher did not wait for)
    return out or "", err or ""


def run_command(
    cmd: Sequence[str], *, timeout_s: float = TIMEOUT_S, **popen_kw: Any
) -> subprocess.CompletedProcess[str]:
    """``cmd`` run to its end, output captured (like ``subprocess.run(..., capture_output=True,
    text=True)``), under a deadline that kills its whole process group."""
    proc = start_command(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_kw)
    out, err = finish(proc, timeout_s)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ---------------------------------------------------------------- helper processes, order


def reap(procs: Iterable[Any], timeout_s: float = 60.0) -> None:
    """Join multiprocessing.Process helpers; kill those still alive after ``timeout_s`` and fail."""
    procs = list(procs)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    stuck = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if stuck:
        raise AssertionError(f"helper processes {stuck} still running after {timeout_s:g} s: killed (a hang?)")


def mark(path: str) -> None:
    """Tell whoever waits in :func:`wait_for` that this point was reached."""
    with open(path, "x"):
        pass


def wait_for(path: str, timeout_s: float = 120.0) -> None:
    """Block until :func:`mark` made ``path``. The timeout only ends a hang (the other side
    never got there), with an error; it is no claim about how long the wait should be."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not marked within {timeout_s:g} s: the other side never got there")
        time.sleep(0.05)
