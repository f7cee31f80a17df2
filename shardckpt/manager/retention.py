"""Which committed steps to keep. Pure policy, no I/O; the manager applies it after a commit.

Rules, all combined (a step is kept if any rule keeps it):
- ``keep_last=N``: the N newest steps (None keeps every step);
- ``keep_every_n_steps=K``: steps divisible by K, forever;
- ``keep_best=K`` with ``monitor`` and ``mode``: the K steps with the best metric;
- the newest committed step, always.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RetentionPolicy:
    """Which committed steps to keep; a step is kept if any rule keeps it. Immutable;
    checked when created.

    ``keep_last`` (None: keep every step): the N newest steps. ``keep_every_n_steps``
    (None): also the steps divisible by K, forever. ``keep_best`` (None): also the K steps
    with the best value of the metric ``monitor`` (required with ``keep_best``), smallest
    first with ``mode="min"`` (the default) or largest with ``"max"``; steps saved without
    that metric never count as best. The newest committed step is always kept.

    Example::

        RetentionPolicy(keep_last=3, keep_every_n_steps=10_000, keep_best=1, monitor="val_loss")
    """

    keep_last: int | None = None
    keep_every_n_steps: int | None = None
    keep_best: int | None = None
    monitor: str | None = None
    mode: str = "min"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every_n_steps", "keep_best"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.keep_best is not None and not self.monitor:
            raise ValueError("keep_best needs monitor=<metric name>, e.g. monitor='val_loss'")

    def score(self, metrics: dict[str, object] | None) -> float | None:
        """The monitored metric as a number where smaller is better, or None if absent."""
        if not self.monitor or not metrics:
            return None
        v = metrics.get(self.monitor)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return None
        return float(v) if self.mode == "min" else -float(v)

    def best(self, steps: list[int], metrics: dict[int, dict[str, object]]) -> list[int]:
        """Steps ranked best first (ties: the newer step first); steps without the metric excluded."""
        scored = [(s, self.score(metrics.get(s))) for s in steps]
        ranked = sorted(((sc, -s) for s, sc in scored if sc is not None))
        return [-neg for _, neg in ranked]

    def to_delete(self, steps: list[int], metrics: dict[int, dict[str, object]]) -> list[int]:
        """Committed ``steps`` (any order) that no rule keeps, ascending."""
        steps = sorted(steps)
        if not steps:
            return []
        keep = set(steps if self.keep_last is None else steps[-self.keep_last :])
        if self.keep_every_n_steps:
            keep |= {s for s in steps if s % self.keep_every_n_steps == 0}
        if self.keep_best:
            keep |= set(self.best(steps, metrics)[: self.keep_best])
        keep.add(steps[-1])
        return [s for s in steps if s not in keep]
