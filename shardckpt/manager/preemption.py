"""The SIGTERM flag behind ``SaveSchedule(save_on_preemption=True)``.

A scheduler that preempts a job sends SIGTERM and waits a grace period before SIGKILL.
The handler only records the signal; the manager's next ``save()`` shares the flag
across ranks (any rank's SIGTERM counts), saves that step synchronously, commits it and
exits the process. Nothing is done inside the handler itself: a signal arrives between
two bytecodes, and a save started there could interleave with the one in progress.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any


class SigtermFlag:
    """Installs a SIGTERM handler that sets :attr:`received`; :meth:`close` puts the
    previous handler back. One per manager that saves on preemption, created and closed
    on the main thread (Python's rule for ``signal.signal``). Idempotent ``close``."""

    def __init__(self) -> None:
        self.received = False
        self._previous: Any = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._closed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def close(self) -> None:
        """Restore the handler that was there before (None: one not set from Python,
        which cannot be put back)."""
        if self._closed:
            return
        self._closed = True
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
