"""The read side of a CheckpointManager: listing the committed steps under its root, and
restoring one (all a ``read_only=True`` manager does). The coordinator picks the step
(:func:`restore_candidates`); every rank loads it, past damaged steps
(:func:`load_first_good`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.engine.collective import RankGroup
from shardckpt.engine.loading import read_any_manifest
from shardckpt.engine.saving import forked_child_problem
from shardckpt.errors import CheckpointNotFoundError, IntegrityError, ManifestError, ShardckptError
from shardckpt.format import layout
from shardckpt.format.manifest import Manifest
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.manager.local_tier import LocalTier, restore_tiers
from shardckpt.manager.retention import RetentionPolicy
from shardckpt.manager.run_options import RunOptions
from shardckpt.manager.steps import committed_steps, metrics_of
from shardckpt.storage import Storage

log = logging.getLogger("shardckpt")


class StepReader:
    """Listing and restore, the methods of :class:`~shardckpt.manager.CheckpointManager`
    that read its root; the manager (the only subclass) sets the attributes below in its
    constructor and provides :meth:`wait`. Listing reads storage on the calling rank
    only; restores are collective."""

    root: str
    retention: RetentionPolicy
    _storage: Storage
    _metrics: dict[int, dict[str, Any]]
    _local: LocalTier | None
    _run: RunOptions
    _checkpointer: Checkpointer
    _group: RankGroup
    _agreements: RankGroup | None
    _closed: bool
    _pid: int  # the process that opened it (a forked child's copy refuses: see CheckpointManager)

    def wait(self) -> None:
        """Collective. Finish the pending async save (:meth:`CheckpointManager.wait`)."""
        raise NotImplementedError

    def steps(self) -> list[int]:
        """Committed steps, ascending. Reads storage on the calling rank only."""
        return committed_steps(self._storage)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The committed step with the best monitored metric (None without keep_best/monitor)."""
        if not self.retention.monitor:
            return None
        steps = self.steps()
        ranked = self.retention.best(steps, {s: self.metrics(s) for s in steps})
        return ranked[0] if ranked else None

    def metrics(self, step: int) -> dict[str, Any]:
        """The metrics saved with committed ``step`` (from its manifest); {} when the
        manifest holds none or something that is not a dict (another tool, a hand edit)."""
        if step not in self._metrics:
            self._metrics[step] = metrics_of(self.manifest(step))
        return self._metrics[step]

    def manifest(self, step: int) -> Manifest | ManifestV3:
        """The manifest of committed ``step``, of any format a load reads (read on the calling
        rank only)."""
        return read_any_manifest(self._step_storage(step))

    def path(self, step: int) -> str:
        """The checkpoint folder of ``step`` (usable with shardckpt.load directly)."""
        return f"{self.root}/{layout.step_dir_name(step)}"

    # ------------------------------------------------------------ restore

    def restore(
        self,
        state_dict: dict[str, Any],
        step: int | None = None,
        *,
        strict: bool = True,
        allow_dtype_cast: bool = False,
    ) -> int | None:
        """Collective. Load ``step`` (default: the latest committed one) into ``state_dict``.
        ``strict`` and ``allow_dtype_cast`` as in :meth:`shardckpt.Checkpointer.load`.

        Returns the step loaded, or None when the root holds no committed step (a fresh
        start). With ``step=None``, a latest step that fails verification is skipped
        with a warning and the next older committed step is tried. With ``local_dir`` and
        ``step=None``, a local step at least as new as the newest durable one is loaded
        instead when every rank's shard is on a live rank (docs/recovery.md); a log line
        names the tier.
        """

        def load_step(s: int) -> None:
            path = self.path(s)
            self._run.load(self._checkpointer, state_dict, path, strict=strict, allow_dtype_cast=allow_dtype_cast)

        local_step = self.restore_local(state_dict) if step is None else None
        return local_step if local_step is not None else self.restore_with(load_step, step)

    def restore_local(self, state_dict: dict[str, Any]) -> int | None:
        """Collective. Load the newest local step into ``state_dict`` in place if it is at
        least as new as the newest durable step and every rank's shard is on a live rank;
        returns it, or None (no ``local_dir``, or the durable tier must be read; a log line
        says why). ``restore`` and ``TrainState.restore`` call it first."""
        if self._local is None:
            return None
        self._check_open()
        self.wait()
        durable = self._ranks().decide(
            f"listing {self.root}", lambda: restore_candidates(self._storage, self.root, None)
        )
        return restore_tiers(self._local, state_dict, durable[0] if durable else None, self.root)

    def restore_with(self, load_step: Callable[[int], None], step: int | None = None) -> int | None:
        """Collective. The restore protocol with a caller's own loader (TrainState uses it).

        Finishes a pending async save, has the coordinator pick the step (``step``, or the
        latest committed), and calls ``load_step(step)`` on every rank. With ``step=None``,
        a step that fails verification (IntegrityError, ManifestError) is skipped with a
        warning for the next older committed one. Returns the step loaded, or None.
        """
        self._check_open()
        self.wait()
        candidates = self._ranks().decide(
            f"listing {self.root}", lambda: restore_candidates(self._storage, self.root, step)
        )
        return load_first_good(self.root, candidates, load_step, step)

    def _check_open(self) -> None:
        if self._pid != os.getpid():
            raise ShardckptError(
                forked_child_problem(
                    f"{self.root}",
                    "CheckpointManager",
                    self._pid,
                    holds="its hold on the root (owner record and heartbeat), its pending save and its groups",
                    remedy="open a CheckpointManager in this process (read_only=True to only read)",
                )
            )
        if self._closed:
            raise ShardckptError(f"{self.root}: this CheckpointManager is closed")

    def _ranks(self) -> RankGroup:
        """The group the manager's own agreements run on: a gloo group whose timeout is
        the arrival bound of ``timeout_s`` (600 s by default), so a rank that never opens
        the manager, or never reaches retention, makes the others raise RankTimeoutError
        instead of waiting for the training group's timeout; separate from the one an
        async save uses in the background. Created on first use, which every rank
        reaches at the same call."""
        if self._agreements is None:
            group = self._group
            if group.is_distributed:
                group = RankGroup.current(
                    self._checkpointer.group(self._run.process_group, self._run.timeouts.arrive_s, purpose="manager")
                )
            self._agreements = group
        return self._agreements

    def _step_storage(self, step: int) -> Storage:
        return self._storage.child(layout.step_dir_name(step))


def restore_candidates(storage: Storage, root: str, step: int | None) -> list[int]:
    """Coordinator. The steps to try, in order: every committed step newest first
    (``step=None``), or ``[step]`` (CheckpointNotFoundError unless it is committed)."""
    steps = committed_steps(storage)
    if step is None:
        return list(reversed(steps))
    if step not in steps:
        raise CheckpointNotFoundError(
            f"{root}: no committed checkpoint for step {step}; committed steps are {steps or 'none'}"
        )
    return [step]


def load_first_good(root: str, candidates: list[int], load_step: Callable[[int], None], step: int | None) -> int | None:
    """Every rank. ``load_step`` the first of ``candidates`` that loads and return it (None
    when there is none). With ``step=None``, a step that fails verification
    (IntegrityError, ManifestError) is skipped with a warning for the next one."""
    for i, s in enumerate(candidates):
        try:
            load_step(s)
            return s
        except (IntegrityError, ManifestError) as e:
            if step is not None or i == len(candidates) - 1:
                raise
            log.warning("shardckpt: step %d under %s is damaged (%s); trying step %d", s, root, e, candidates[i + 1])
    return None
