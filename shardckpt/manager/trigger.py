"""Whether ``CheckpointManager.save(step)`` writes: the stateful side of a SaveSchedule.

:class:`~shardckpt.manager.schedule.SaveSchedule` is the pure rule; :class:`SaveTrigger`
applies it with what changes during a run: rank 0's clock since the last save, and the
SIGTERM flag of ``save_on_preemption`` (:class:`SigtermFlag`). Both are shared across
ranks in one all-reduce, so every rank decides alike.

A scheduler that preempts a job sends SIGTERM and waits a grace period before SIGKILL.
The handler only records the signal; the manager's next ``save()`` saves that step
synchronously, commits it and exits the process. Nothing is done inside the handler
itself: a signal arrives between two bytecodes, and a save started there could
interleave with the one in progress.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from shardckpt.engine.collective import RankGroup
from shardckpt.manager.schedule import SaveSchedule


class SigtermFlag:
    """Installs a SIGTERM handler that sets :attr:`received`; :meth:`close` puts the
    previous handler back. Created and closed on the main thread (Python's rule for
    ``signal.signal``). Idempotent ``close``."""

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


class SaveTrigger:
    """One manager's save decisions. The time rule counts from the trigger's creation,
    then from each :meth:`saved`. Not thread-safe; :meth:`close` (idempotent) removes
    the SIGTERM handler of :meth:`watch_sigterm`."""

    def __init__(self, schedule: SaveSchedule, is_coordinator: bool) -> None:
        self.schedule = schedule
        self._is_coordinator = is_coordinator
        self._last_save_s = time.monotonic()
        self._sigterm: SigtermFlag | None = None

    def watch_sigterm(self) -> None:
        """Install the SIGTERM handler (``save_on_preemption``)."""
        self._sigterm = SigtermFlag()

    def shared_flags(self, ranks: Callable[[], RankGroup]) -> tuple[bool, bool]:
        """(any rank received SIGTERM, rank 0's clock says a save is due). Collective on
        ``ranks()`` (one all-reduce) only when the schedule has a time rule or SIGTERM is
        watched; else local, with nothing to share."""
        preempted = self._sigterm is not None and self._sigterm.received
        needs_collective = self.schedule.save_interval_s is not None or self._sigterm is not None
        time_due = self._is_coordinator and self.schedule.due_after(time.monotonic() - self._last_save_s)
        if not needs_collective:
            return preempted, bool(time_due)
        preempted, time_due = ranks().any_true([preempted, bool(time_due)])
        return preempted, time_due

    def saved(self) -> None:
        """A save starts now: the time rule counts from here."""
        self._last_save_s = time.monotonic()

    def close(self) -> None:
        if self._sigterm is not None:
            self._sigterm.close()
