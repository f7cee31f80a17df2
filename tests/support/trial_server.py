"""A fork server for crash trials: one process imports torch and shardckpt once, then
forks one child per trial that runs a given piece of code as ``python -c CODE ARGV...``
would (a fresh interpreter per trial cost seconds of imports, dozens of times).

Used by tests/slow/test_crash.py (its CHILD code) and tests/slow/test_crash_incremental.py
(tests/support/incremental_crash_job.py). Only imports run in the server, no torch op and
no thread, so a fork loses nothing; the child leaves the server's loop and ends the way that
interpreter would (non-daemon threads joined, atexit handlers run, the exit status of an
exception or ``sys.exit``), or dies of its SIGKILL; only the module teardown is skipped
(``os._exit``), which costs seconds per trial after torch was imported.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap

from line_server import LineServer

SUPPORT = os.path.dirname(os.path.abspath(__file__))

# argv: CHILD_CODE, then modules to import before forking (from tests/support too). Per
# line on stdin, ``OUT_PATH<TAB>ARG<TAB>ARG...``, it answers ``PID <pid>`` and, once that
# child exited, ``RC <returncode>``; the child's argv is ``["-c", ARG, ARG, ...]``.
SERVER = textwrap.dedent(
    """
    import atexit, importlib, os, sys, threading, traceback
    sys.path.insert(0, SUPPORT)

    def leave(code):
        # What the interpreter does at exit that a trial can see: join the non-daemon
        # threads (and executors' workers), run the atexit handlers, flush. Then _exit:
        # tearing down the modules of a process that imported torch costs 2-3 s, paid by
        # every trial that ends normally (a dozen per test) and seen by none.
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    import torch
    import shardckpt
    import shardckpt.storage.local, shardckpt.engine.checkpointer
    import shardckpt.engine.saving, shardckpt.manager.checkpoint_manager, shardckpt.engine.loading

    child_code, trial = sys.argv[1], None
    for module in sys.argv[2:]:
        importlib.import_module(module)
    for line in sys.stdin:
        out_path, *argv = line.rstrip("\\n").split("\\t")
        pid = os.fork()
        if pid == 0:
            trial = (out_path, argv)
            break
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"RC {os.waitstatus_to_exitcode(status)}", flush=True)
    if trial is None:
        leave(0)  # stdin closed: the test module is done with the server
    out_path, argv = trial
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.argv = ["-c", *argv]
    try:
        exec(compile(child_code, "<string>", "exec"), {"__name__": "__main__"})
        code = 0
    except SystemExit as e:  # sys.exit(...) in the trial code, as the interpreter reads it
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    leave(code)
    """
).replace("SUPPORT", repr(SUPPORT))


class TrialServer(LineServer):
    """The SERVER above as one process (per test module, typically); :meth:`run` is one
    trial. ``preload``: modules the server imports before forking (the trial code's own
    imports then cost nothing per trial)."""

    def __init__(self, work: str, child_code: str, preload: tuple[str, ...] = ()) -> None:
        super().__init__([sys.executable, "-c", SERVER, child_code, *preload])
        self.work = work
        self.count = 0

    def _answer(self, prefix: str, timeout_s: float) -> str | None:
        line = self.next_line(timeout_s)
        if line is None:
            return None
        assert line.startswith(prefix), f"trial server said {line!r}, expected {prefix}..."
        return line.split()[1]

    def run(self, *argv: object, timeout_s: float = 120) -> tuple[int, str]:
        """Run one trial child with ``argv``; its return code (-9: SIGKILL) and output."""
        self.count += 1
        out_path = os.path.join(self.work, f"child{self.count}.out")
        self.send("\t".join([out_path, *map(str, argv)]))
        pid = self._answer("PID ", timeout_s)
        assert pid is not None, "trial server went silent (did it die? its stderr is in the test output)"
        rc = self._answer("RC ", timeout_s)
        if rc is None:  # a hang: end it, and fail with what it printed
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
            rc = self._answer("RC ", 60)
            with open(out_path, errors="replace") as f:
                raise AssertionError(f"trial child still running after {timeout_s} s: killed (a hang?)\n{f.read()}")
        with open(out_path, errors="replace") as f:
            return int(rc), f.read()
