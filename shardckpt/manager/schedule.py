"""When :meth:`CheckpointManager.save` writes a step. Pure policy, no I/O.

A save is due when any rule says so (the manager shares rank 0's clock and any rank's
SIGTERM, so every rank decides alike):
- ``save_interval_steps=N``: steps divisible by N (default 1: every step);
- ``save_interval_s=S``: S seconds have passed since the last save;
- ``save_on_preemption``: a SIGTERM arrived; the step is saved synchronously, then the
  process exits with ``preemption_exit_code``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

from shardckpt.manager.retention import RetentionPolicy


@dataclass(frozen=True)
class SaveSchedule:
    """When a save is due. Immutable; checked when created.

    ``save_interval_steps`` (1): a save is due at every step divisible by it.
    ``save_interval_s`` (None: no time rule): a save is also due once this many seconds
    passed since the last one (rank 0's clock decides). ``save_on_preemption`` (False):
    install a SIGTERM handler; the next ``save()`` call saves the step synchronously,
    commits it and exits the process with ``preemption_exit_code`` (0, in [0, 255]).

    Example::

        SaveSchedule(save_interval_steps=500, save_interval_s=1800, save_on_preemption=True)
    """

    save_interval_steps: int = 1
    save_interval_s: float | None = None
    save_on_preemption: bool = False
    preemption_exit_code: int = 0

    def __post_init__(self) -> None:
        n = self.save_interval_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"save_interval_steps must be an int >= 1, got {n!r}")
        s = self.save_interval_s
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < math.inf):
            raise ValueError(f"save_interval_s must be a number of seconds > 0, or None, got {s!r}")
        if not isinstance(self.save_on_preemption, bool):
            raise TypeError(f"save_on_preemption must be a bool, got {self.save_on_preemption!r}")
        code = self.preemption_exit_code
        if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 255:
            raise ValueError(f"preemption_exit_code must be an int in [0, 255] (a process exit status), got {code!r}")

    def due_at_step(self, step: int) -> bool:
        """Whether the step rule makes a save of ``step`` due."""
        return step % self.save_interval_steps == 0

    def due_after(self, elapsed_s: float) -> bool:
        """Whether the time rule makes a save due ``elapsed_s`` after the last one."""
        return self.save_interval_s is not None and elapsed_s >= self.save_interval_s


_Policy = TypeVar("_Policy", RetentionPolicy, SaveSchedule)


def policy_or_shortcuts(name: str, policy: _Policy | None, kind: type[_Policy], **shortcuts: Any) -> _Policy:
    """``policy``, or a ``kind`` built from the shortcuts given (not None); both is an error."""
    given = {field: value for field, value in shortcuts.items() if value is not None}
    if policy is None:
        return kind(**given)
    if not isinstance(policy, kind):
        raise TypeError(f"{name} must be a shardckpt.{kind.__name__} or None, got {type(policy).__name__}")
    if given:
        passed = ", ".join(f"{field}={value!r}" for field, value in given.items())
        raise ValueError(
            f"CheckpointManager got both {name}={kind.__name__}(...) and {passed}; set {', '.join(given)} "
            f"in the {kind.__name__} instead, or drop {name}= and keep the shortcuts"
        )
    return policy
