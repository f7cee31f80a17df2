"""CheckpointManager: step folders, commit discovery, resume, and the order of a run's calls.

A step exists if and only if ``<root>/step_<N>/manifest.json`` exists. Listing,
restore and retention only ever see committed steps. Decisions that ranks must share
(which step to restore, whether a time interval has passed, whether any rank was
preempted, the base of an incremental save) are made once and given to every rank.

This module is the collective protocol; each policy lives beside it: what is deleted
and when in :mod:`~shardckpt.manager.cleanup` (interrupted saves at start-up, retention
after a commit), who owns the root in :mod:`~shardckpt.manager.ownership`, when a save
is due in :mod:`~shardckpt.manager.schedule` (the rule) and
:mod:`~shardckpt.manager.trigger` (the clock and the SIGTERM flag), the base of an incremental save in
:mod:`~shardckpt.manager.chain`, listing and restore in :mod:`~shardckpt.manager.step_reader`,
and what every save and restore passes on to the Checkpointer in
:mod:`~shardckpt.manager.run_options`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.engine.collective import RankGroup
from shardckpt.engine.options import IOOptions, SaveKwargs, resolve_format_version
from shardckpt.engine.saving import AsyncSaveHandle
from shardckpt.errors import ShardckptError
from shardckpt.manager import ownership
from shardckpt.manager.chain import CHAIN_KEY, IncrementalChain
from shardckpt.manager.cleanup import RootCleaner
from shardckpt.manager.local_tier import LocalTier, LocalTierOptions, open_local_tier
from shardckpt.manager.retention import RetentionPolicy
from shardckpt.manager.run_options import RunOptions
from shardckpt.manager.schedule import SaveSchedule, policy_or_shortcuts
from shardckpt.manager.step_reader import StepReader
from shardckpt.manager.steps import check_metrics
from shardckpt.manager.trigger import SaveTrigger
from shardckpt.storage import as_url

log = logging.getLogger("shardckpt")


class CheckpointManager(StepReader):
    """Saves and restores numbered checkpoints under one root (local path or fsspec URL).

    Collective: construct it, and call ``save``/``restore``/``close``, on every rank
    of the group (the default group when torch.distributed is initialized). The
    coordinator (rank 0) lists, cleans up, applies retention and owns the root.
    Not thread-safe. Every parameter but ``root`` is keyword-only; docs/manager.md has
    the same list with examples.

    Which steps to keep, after each commit (``retention``, or its shortcuts):

    - ``retention``: a :class:`RetentionPolicy` (default: keep every step).
    - ``keep_last``, ``keep_every_n_steps``, ``keep_best``, ``monitor``, ``mode``: shortcuts
      for ``retention=RetentionPolicy(...)`` with those fields (see it for their meaning).

    When ``save(step, ...)`` writes (``schedule``, or its shortcuts):

    - ``schedule``: a :class:`SaveSchedule` (default: every step, no time rule, no
      preemption handling).
    - ``save_interval_steps``, ``save_interval_s``, ``save_on_preemption``,
      ``preemption_exit_code``: shortcuts for ``schedule=SaveSchedule(...)`` with those fields.

    Passing a policy object and one of its shortcuts is an error (ValueError).

    How saves and restores run:

    - ``async_save`` (False): ``save`` returns once the state is staged in host memory;
      the commit is confirmed by the next ``save``/``wait``/``restore``/``close``.
    - ``max_staging_bytes`` (None: no bound): bounds the host memory of those staged
      copies per rank (see ``shardckpt.async_save``).
    - ``incremental`` (False): write only what changed. Every save records a digest of each
      chunk; a chunk whose bytes equal the newest committed step's is not written again, the
      new step points at the file that holds it. Loads, verify and export follow the
      references; retention deletes a step at once but keeps the bytes a kept step reads.
    - ``full_every`` (20; None: never): with ``incremental``, every ``full_every``-th save
      writes everything, so a step never depends on more than the last ``full_every``
      saves' folders. docs/manager.md, "Incremental checkpoints".
    - ``format_version`` (None: 1): 1 saves every step in version 1, 2 with ``incremental``
      (each base a format-2 step); 3 in format 3 (docs/format.md section 12), also with
      ``incremental`` (each base a format-3 step).
    - ``process_group`` (None: the whole job): the ranks taking part.
    - ``storage_options`` (None): handed to fsspec for an fsspec root (credentials, endpoint).
    - ``io`` (None: the checkpointer's :class:`IOOptions`): threads, checksum block size,
      object-store transfer and retry settings of every save and restore, and of the
      manager's own listing and deletes on the root. ``num_io_threads`` (None): a shortcut
      that replaces ``io.num_io_threads``.
    - ``timeout_s`` (None): bounds every wait for other ranks, in saves, restores and the
      manager's own agreements (opening, listing, retention): a rank that does not arrive
      makes the others raise RankTimeoutError; a rank whose process died, RankFailureError.
      None: a rank that has not made the call is reported after 600 s, and ranks wait
      1800 s for the slowest rank's writes or reads; a number sets both.
    - ``checkpointer`` (None): the :class:`shardckpt.engine.Checkpointer` saves and restores
      run on (its staging buffers, gloo groups and storage factory; the root itself is
      opened with its factory too). Without one the manager creates its own, with ``io``,
      and closes it in ``close``; one passed in stays open, for its creator to close.

    The fast recovery tier (docs/recovery.md):

    - ``local_dir`` (None: off): a node-local folder (RAM disk, local NVMe); every
      ``local_interval_steps`` (1) steps ``save`` also stages a local step there and returns,
      while a background thread writes it and sends a copy to ``replicas`` (1) rank(s) on
      other nodes; the newest ``keep_last_local`` (2) local steps are kept, and ``close``
      removes the ones it wrote. ``restore`` loads the newest step of either tier.

    Who owns the root:

    - ``read_only`` (False): open the root for ``restore``/listing only: no owner record,
      no cleanup, and ``save`` refuses (so it takes no ``save_on_preemption``).
    - ``takeover`` (False), ``stale_owner_after_s`` (600): a writing manager owns the root
      (see :mod:`shardckpt.manager.ownership`): its coordinator claims the owner record when
      it opens, refreshes it from a background thread every ``stale_owner_after_s / 4``
      seconds until ``close`` (call it: the thread belongs to the manager), and re-reads
      it before every save and every delete; one that lost the root to another manager
      raises RootInUseError on ``save`` and deletes nothing. A record not refreshed for
      ``stale_owner_after_s``, or any record with ``takeover=True``, is taken over.

    Example::

        with CheckpointManager(
            "s3://bucket/run1",
            retention=RetentionPolicy(keep_last=3, keep_best=1, monitor="val_loss"),
            schedule=SaveSchedule(save_interval_steps=500, save_on_preemption=True),
            io=IOOptions(transfer=TransferOptions(retry=RetryPolicy(max_total_s=300))),
            async_save=True,
        ) as mgr:
            ...
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        retention: RetentionPolicy | None = None,
        keep_last: int | None = None,
        keep_every_n_steps: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: str | None = None,
        schedule: SaveSchedule | None = None,
        save_interval_steps: int | None = None,
        save_interval_s: float | None = None,
        save_on_preemption: bool | None = None,
        preemption_exit_code: int | None = None,
        async_save: bool = False,
        incremental: bool = False,
        full_every: int | None = 20,
        format_version: int | None = None,
        max_staging_bytes: int | None = None,
        process_group: Any = None,
        storage_options: dict[str, Any] | None = None,
        io: IOOptions | None = None,
        num_io_threads: int | None = None,
        timeout_s: float | None = None,
        checkpointer: Checkpointer | None = None,
        read_only: bool = False,
        takeover: bool = False,
        stale_owner_after_s: float = 600.0,
        local_dir: str | os.PathLike[str] | None = None,
        local_interval_steps: int = 1,
        replicas: int = 1,
        keep_last_local: int = 2,
    ) -> None:
        self.retention = policy_or_shortcuts(
            "retention",
            retention,
            RetentionPolicy,
            keep_last=keep_last,
            keep_every_n_steps=keep_every_n_steps,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
        )
        self.schedule = policy_or_shortcuts(
            "schedule",
            schedule,
            SaveSchedule,
            save_interval_steps=save_interval_steps,
            save_interval_s=save_interval_s,
            save_on_preemption=save_on_preemption,
            preemption_exit_code=preemption_exit_code,
        )
        if read_only and self.schedule.save_on_preemption:
            raise ValueError(
                "a read_only=True CheckpointManager cannot save, so it cannot save on preemption; "
                "drop save_on_preemption (its SIGTERM handler would only keep the process alive)"
            )
        self._format_version = resolve_format_version(format_version)
        # every rank: what it saved; the coordinator: the base
        self._chain = IncrementalChain(full_every, format_version=self._format_version)
        # Passed on by every save and restore (io None: the Checkpointer's own).
        self._run = RunOptions(process_group, storage_options, io, num_io_threads, timeout_s, max_staging_bytes)
        local = None
        if local_dir is not None:
            local = LocalTierOptions(os.fspath(local_dir), local_interval_steps, replicas, keep_last_local)
        if not stale_owner_after_s > 0:
            raise ValueError(f"stale_owner_after_s must be > 0, got {stale_owner_after_s}")
        self.root = as_url(root, "root").rstrip("/") or "/"
        self.read_only = read_only
        self.async_save = async_save
        self.incremental = incremental
        self.full_every = full_every
        self._pending: tuple[int, AsyncSaveHandle] | None = None
        self._local: LocalTier | None = None
        self.cleaned_up: list[str] = []
        self._group = RankGroup.current(process_group)
        self._agreements: RankGroup | None = None  # see _ranks()
        # Our own Checkpointer (closed by close()) unless one was given; a given one's
        # storage factory opens the root too, so injected storage sees every access.
        self._pid = os.getpid()  # a forked child's copy neither saves nor lets go of the root (_check_open, close)
        self._owns_checkpointer = checkpointer is None
        self._checkpointer = Checkpointer(io=io) if checkpointer is None else checkpointer
        self._storage = self._checkpointer.open_storage(self.root, storage_options, io=io)
        self._metrics: dict[int, dict[str, Any]] = {}
        self._trigger = SaveTrigger(self.schedule, self._group.is_coordinator)  # the time rule counts from here
        self._closed = False
        self._owner = ownership.OwnerRecord.for_this_process()
        self._ownership = ownership.RootOwnership(self._storage, self._owner)
        self._cleaner = RootCleaner(self._storage, self.root, self._ownership.check)
        self._open(takeover, stale_owner_after_s, local)

    def _open(self, takeover: bool, stale_owner_after_s: float, local: LocalTierOptions | None) -> None:
        """Collective, the end of the constructor. Unless read-only, the coordinator claims
        the root and cleans it up (:meth:`_start`); then the local tier opens and, with
        ``save_on_preemption``, the SIGTERM handler is installed. A failure closes what
        was opened."""
        if not self.read_only:
            try:
                self._ranks().decide(f"opening {self.root}", lambda: self._start(takeover, stale_owner_after_s))
            except BaseException:
                self._ownership.let_go()  # a failed open must not leave the root locked by a record nobody refreshes
                self._close_checkpointer()
                raise
        try:
            self._local = open_local_tier(
                self._checkpointer,
                self._run.process_group,
                self._run.timeouts.arrive_s,
                local,
                self._storage,
                create_record=not self.read_only,
            )
        except BaseException:
            self.close()
            raise
        if self.schedule.save_on_preemption:
            self._trigger.watch_sigterm()  # only once open: a failed open leaves no handler behind

    # ------------------------------------------------------------ save

    def save(
        self, step: int, state_dict: dict[str, Any], *, metrics: Mapping[str, Any] | None = None, force: bool = False
    ) -> bool:
        """Collective. Save ``state_dict`` as ``step`` if the interval says so (or ``force``).

        Call it every step: it returns False at once when no save is due. A save is
        due every ``save_interval_steps`` steps, or when ``save_interval_s`` has passed
        since the last save (decided on rank 0), or when any rank received SIGTERM with
        ``save_on_preemption`` (then the process exits after the save is committed).
        Retention runs after the commit. With ``async_save=True`` this returns once the
        state is staged in host memory; the commit (and retention) completes in the
        background and is confirmed by the next ``save``, ``wait``, ``restore`` or
        ``close``. Returns whether a checkpoint was started.

        ``metrics``: a dict of str -> JSON values (numbers finite), checked on every call
        before anything is written (UnsupportedValueError otherwise). Raises
        RootInUseError, writing nothing, if another manager took the root over. Errors
        while deleting after the commit (retention) are logged, never raised: the step
        is committed once the manifest is written.
        """
        self._check_open()
        if self.read_only:
            raise ShardckptError(f"{self.root}: this CheckpointManager was opened read_only=True; it cannot save")
        checked = check_metrics(metrics)  # before anything is written, due or not: a bad call fails at once
        preempted, time_due = self._trigger.shared_flags(self._ranks)
        due = force or preempted or time_due or self.schedule.due_at_step(step)
        local_due = self._local is not None and self._local.due(step) and not preempted
        if not due:
            if local_due:
                self._local.save(step, state_dict)  # type: ignore[union-attr]
            return local_due
        self.wait()  # the previous async save: commit it (or raise its error) and apply retention
        if local_due:  # after wait(), which would otherwise wait for this local save too
            self._local.save(step, state_dict)  # type: ignore[union-attr]
        base, chain = self._ranks().decide(
            f"checking that this manager still owns {self.root}", lambda: self._owner_and_base(step)
        )
        kwargs = self._save_kwargs(step, checked, base, chain)
        self._metrics[step] = dict(checked)
        self._trigger.saved()
        if self.async_save and not preempted:
            handle = self._checkpointer.async_save(
                state_dict, self.path(step), max_staging_bytes=self._run.max_staging_bytes, **kwargs
            )
            self._pending = (step, handle)
            return True
        self._checkpointer.save(state_dict, self.path(step), **kwargs)
        self._after_commit()
        if preempted:
            log.warning("shardckpt: preempted (SIGTERM); step %d committed under %s, exiting", step, self.root)
            self.close()
            sys.exit(self.schedule.preemption_exit_code)
        return True

    def _save_kwargs(self, step: int, metrics: dict[str, Any], base: int | None, chain: int) -> SaveKwargs:
        """The Checkpointer's keywords for saving ``step``: the run options and the
        manifest's metadata, plus, with ``incremental``, the base (recorded in the chain)."""
        meta = {"step": step, "metrics": metrics, "saved_at": time.time()}
        kwargs = self._run.save_kwargs(meta)
        kwargs["format_version"] = self._format_version
        if self.incremental:
            meta[CHAIN_KEY] = chain
            kwargs["incremental"] = True
            kwargs["base"] = None if base is None else self.path(base)
            self._chain.record(step, chain)
        return kwargs

    def _owner_and_base(self, step: int) -> tuple[int | None, int]:
        """Coordinator: RootInUseError unless we own the root; then the base of an
        incremental save of ``step`` (the newest committed step, None for a full save) and
        how many saves since the last full one this save makes."""
        self._ownership.check()
        if not self.incremental:
            return None, 0
        return self._chain.base_for(step, self.latest_step(), self.manifest)

    def _after_commit(self) -> None:
        """Collective: rank 0 applies retention while the others wait, so no rank lists a
        step that is being deleted once save/wait has returned. Never raises for what
        happens on storage: the step is committed, and a failed delete is retried by the
        next commit (retention) or start (clean-up)."""
        self._ranks().decide(
            f"retention under {self.root}", lambda: self._cleaner.retain(self.retention, self.metrics, self._forget)
        )

    def _forget(self, step: int) -> None:
        """``step`` is being deleted: drop what this manager remembers of it."""
        self._metrics.pop(step, None)
        self._chain.forget(step)

    # ------------------------------------------------------------ lifecycle

    def _start(self, takeover: bool, stale_after_s: float) -> None:
        """Coordinator. Claim the root, start the heartbeat, clean up interrupted saves
        (:meth:`RootCleaner.remove_interrupted`)."""
        self._ownership.claim(takeover=takeover, stale_after_s=stale_after_s)
        self.cleaned_up += self._cleaner.remove_interrupted()

    def wait(self) -> None:
        """Collective. Block until the pending async save is committed, then apply retention.

        Raises the pending save's error (on every rank) if it failed; nothing of it is
        committed then, and earlier steps are untouched.
        """
        if self._local is not None:
            self._local.wait()
        if self._pending is None:
            return
        step, handle = self._pending
        self._pending = None
        try:
            handle.wait()
        except BaseException:
            self._metrics.pop(step, None)
            raise
        self._after_commit()

    def close(self) -> None:
        """Collective. Finish a pending async save, stop the heartbeat thread, release the
        root (owner record, if still ours) and the SIGTERM handler, and close the
        Checkpointer if the manager created it. Idempotent."""
        if self._closed:
            return
        if self._pid != os.getpid():
            self._closed = True  # a forked child: the root, the heartbeat and the saves are the parent's
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._trigger.close()
            try:
                self._ownership.let_go()
                if self._local is not None:
                    self._local.close()
            finally:
                self._close_checkpointer()

    def _close_checkpointer(self) -> None:
        # Frees the staging copy and destroys the manager's gloo groups; a given
        # Checkpointer belongs to its creator.
        if self._owns_checkpointer:
            self._checkpointer.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
