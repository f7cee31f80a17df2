"""A long-lived helper process spoken to in lines: the test writes a request line to its
stdin, a reader thread queues each line it prints. The crash trials use it for servers
that import torch once and fork a child per trial or rank (tests/support/trial_server.py,
tests/slow/test_crash_ranks.py with tests/support/crash_job.py --serve)."""

from __future__ import annotations

import os
import queue
import subprocess
import threading


class LineServer:
    """``argv`` started with one intra-op thread; :meth:`send` a line, :meth:`next_line` to
    read one (None when nothing came within the timeout), :meth:`stop` to end it (closing
    its stdin is its signal to exit; killed if it has not after 60 s)."""

    def __init__(self, argv: list[str]) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def next_line(self, timeout_s: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
