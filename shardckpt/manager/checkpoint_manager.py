"""CheckpointManager: step folders, commit discovery, retention, resume, save on preemption.

A step exists if and only if ``<root>/step_<N>/manifest.json`` exists. Listing,
restore and retention only ever see committed steps; retention runs after the new
step is committed and deletes a step through :func:`shardckpt.storage.folder.remove_checkpoint`
(manifest first, so a crash mid-delete leaves an uncommitted folder that the next start
cleans up, never a committed step with missing data; only the format's own names, so
files a user put there stay). Decisions that ranks must share (which step to restore,
whether a time interval has passed, whether any rank was preempted) are made once and
given to every rank.

What the manager never deletes: a folder it cannot prove is shardckpt's (no manifest,
no save marker: a DCP checkpoint, a user's folder named ``step_*``), any file that is
not one of the format's names, and anything at all once it no longer owns the root
(:mod:`shardckpt.manager.ownership`). Errors while deleting after a commit are warnings: the
commit stands, and the next commit or start tries again.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.engine.collective import RankGroup
from shardckpt.engine.loading import read_manifest
from shardckpt.engine.options import IOOptions, SaveKwargs, Timeouts, check_io_threads
from shardckpt.engine.saving import AsyncSaveHandle
from shardckpt.errors import (
    CheckpointNotFoundError,
    IntegrityError,
    ManifestError,
    RootInUseError,
    ShardckptError,
)
from shardckpt.format import layout
from shardckpt.format.manifest import Manifest
from shardckpt.manager import ownership, references
from shardckpt.manager.retention import RetentionPolicy
from shardckpt.manager.schedule import SaveSchedule, policy_or_shortcuts
from shardckpt.manager.steps import check_metrics, metrics_of
from shardckpt.storage import Storage, as_url, folder

log = logging.getLogger("shardckpt")


class CheckpointManager:
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
        if full_every is not None and (
            isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 1
        ):
            raise ValueError(f"full_every must be a positive int or None (never), got {full_every!r}")
        if max_staging_bytes is not None and max_staging_bytes < 0:
            raise ValueError(f"max_staging_bytes must be >= 0 or None (no bound), got {max_staging_bytes}")
        if io is not None and not isinstance(io, IOOptions):
            raise TypeError(f"io must be a shardckpt.IOOptions or None, got {type(io).__name__}")
        if num_io_threads is not None:
            check_io_threads(num_io_threads)
        self._timeouts = Timeouts.of(timeout_s)
        if not stale_owner_after_s > 0:
            raise ValueError(f"stale_owner_after_s must be > 0, got {stale_owner_after_s}")
        self.root = as_url(root, "root").rstrip("/") or "/"
        self.read_only = read_only
        self.async_save = async_save
        self.incremental = incremental
        self.full_every = full_every
        self._chain: dict[int, int] = {}  # step -> saves since the last full one (0: full), coordinator
        self._max_staging_bytes = max_staging_bytes
        self._pending: tuple[int, AsyncSaveHandle] | None = None
        self.cleaned_up: list[str] = []
        self._process_group = process_group
        self._storage_options = storage_options
        # Passed on by every save and restore (None: the Checkpointer's own).
        self._io = io
        self._num_io_threads = num_io_threads
        self._group = RankGroup.current(process_group)
        self._agreements: RankGroup | None = None  # see _ranks()
        self._timeout_s = timeout_s
        # Our own Checkpointer (closed by close()) unless one was given; a given one's
        # storage factory opens the root too, so injected storage sees every access.
        self._owns_checkpointer = checkpointer is None
        self._checkpointer = Checkpointer(io=io) if checkpointer is None else checkpointer
        self._storage = self._checkpointer.open_storage(self.root, storage_options, io=io)
        self._metrics: dict[int, dict[str, Any]] = {}
        self._last_save_time = time.monotonic()
        self._preempted = False
        self._closed = False
        self._owner = ownership.OwnerRecord.for_this_process()
        self._heartbeat: ownership.Heartbeat | None = None  # the coordinator's, while it owns the root
        self._previous_sigterm: Any = None
        if not read_only:
            try:
                self._ranks().decide(f"opening {self.root}", lambda: self._start(takeover, stale_owner_after_s))
            except BaseException:
                self._let_go()  # a failed open must not leave the root locked by a record nobody refreshes
                self._close_checkpointer()
                raise
        if self.schedule.save_on_preemption:
            self._install_sigterm_handler()

    # ------------------------------------------------------------ listing

    def steps(self) -> list[int]:
        """Committed steps, ascending. Reads storage on the calling rank only."""
        found = []
        for name in self._storage.list_dirs(""):
            step = layout.parse_step_dir(name)
            if step is not None and folder.is_committed(self._storage, name):
                found.append(step)
        return sorted(found)

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

    def manifest(self, step: int) -> Manifest:
        """The manifest of committed ``step`` (read on the calling rank only)."""
        return read_manifest(self._step_storage(step))

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
        with a warning and the next older committed step is tried.
        """

        def load_step(s: int) -> None:
            self._checkpointer.load(
                state_dict,
                self.path(s),
                process_group=self._process_group,
                strict=strict,
                allow_dtype_cast=allow_dtype_cast,
                storage_options=self._storage_options,
                timeout_s=self._timeout_s,
                io=self._io,
                num_io_threads=self._num_io_threads,
            )

        return self.restore_with(load_step, step)

    def restore_with(self, load_step: Callable[[int], None], step: int | None = None) -> int | None:
        """Collective. The restore protocol with a caller's own loader (TrainState uses it).

        Finishes a pending async save, has the coordinator pick the step (``step``, or the
        latest committed), and calls ``load_step(step)`` on every rank. With ``step=None``,
        a step that fails verification (IntegrityError, ManifestError) is skipped with a
        warning for the next older committed one. Returns the step loaded, or None.
        """
        self._check_open()
        self.wait()
        candidates = self._ranks().decide(f"listing {self.root}", lambda: self._restore_candidates(step))
        for i, s in enumerate(candidates):
            try:
                load_step(s)
                return s
            except (IntegrityError, ManifestError) as e:
                if step is not None or i == len(candidates) - 1:
                    raise
                log.warning(
                    "shardckpt: step %d under %s is damaged (%s); trying step %d", s, self.root, e, candidates[i + 1]
                )
        return None

    def _restore_candidates(self, step: int | None) -> list[int]:
        steps = self.steps()
        if step is None:
            return list(reversed(steps))
        if step not in steps:
            raise CheckpointNotFoundError(
                f"{self.root}: no committed checkpoint for step {step}; committed steps are {steps or 'none'}"
            )
        return [step]

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
        preempted, time_due = self._shared_flags()
        due = force or preempted or time_due or self.schedule.due_at_step(step)
        if not due:
            return False
        self.wait()  # the previous async save: commit it (or raise its error) and apply retention
        base, chain = self._ranks().decide(
            f"checking that this manager still owns {self.root}", lambda: self._owner_and_base(step)
        )
        meta = {"step": step, "metrics": checked, "saved_at": time.time()}
        kwargs = SaveKwargs(
            process_group=self._process_group,
            storage_options=self._storage_options,
            metadata=meta,
            timeout_s=self._timeout_s,
            io=self._io,
            num_io_threads=self._num_io_threads,
        )
        if self.incremental:
            meta["incremental_chain"] = chain
            kwargs["incremental"] = True
            kwargs["base"] = None if base is None else self.path(base)
            self._chain[step] = chain
        self._metrics[step] = dict(checked)
        self._last_save_time = time.monotonic()
        if self.async_save and not preempted:
            handle = self._checkpointer.async_save(
                state_dict, self.path(step), max_staging_bytes=self._max_staging_bytes, **kwargs
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

    def _owner_and_base(self, step: int) -> tuple[int | None, int]:
        """Coordinator: RootInUseError unless we own the root; then the base of an
        incremental save of ``step`` (the newest committed step, None for a full save) and
        how many saves since the last full one this save makes."""
        self._check_owner()
        if not self.incremental:
            return None, 0
        latest = self.latest_step()
        if latest is None or latest >= step:
            return None, 0
        chain = self._chain_of(latest)
        if chain is None or (self.full_every is not None and chain + 1 >= self.full_every):
            return None, 0
        return latest, chain + 1

    def _chain_of(self, step: int) -> int | None:
        """Saves since the last full one at committed ``step``; None if it cannot be a base
        (not saved incrementally: no digests to compare)."""
        if step not in self._chain:
            m = self.manifest(step)
            chain = m.metadata.get("incremental_chain")
            ok = m.format_version >= 2 and isinstance(chain, int) and not isinstance(chain, bool) and chain >= 0
            self._chain[step] = chain if ok and isinstance(chain, int) else -1
        return None if self._chain[step] < 0 else self._chain[step]

    def _after_commit(self) -> None:
        """Collective: rank 0 applies retention while the others wait, so no rank lists a
        step that is being deleted once save/wait has returned. Never raises for what
        happens on storage: the step is committed, and a failed delete is retried by the
        next commit (retention) or start (clean-up)."""
        self._ranks().decide(f"retention under {self.root}", self._retain_quietly)

    def _retain_quietly(self) -> None:
        try:
            self._apply_retention()
        except RootInUseError:
            pass  # logged by the heartbeat when it noticed; the next save raises it
        except (OSError, ShardckptError) as e:
            log.warning(
                "shardckpt: retention under %s stopped after the commit (%s: %s); the new step is "
                "committed, and retention runs again after the next one",
                self.root,
                type(e).__name__,
                e,
            )

    def _shared_flags(self) -> tuple[bool, bool]:
        needs_collective = self.schedule.save_interval_s is not None or self._previous_sigterm is not None
        time_due = self._group.is_coordinator and self.schedule.due_after(time.monotonic() - self._last_save_time)
        if not needs_collective:
            return self._preempted, bool(time_due)
        preempted, time_due = self._ranks().any_true([self._preempted, bool(time_due)])
        return preempted, time_due

    def _apply_retention(self) -> None:
        """Coordinator. Raises (to _retain_quietly) if the steps or their metrics cannot be
        read: a metric lost to a storage error must not make a kept step look deletable."""
        steps = self.steps()
        metrics = {s: self._retention_metrics(s) for s in steps} if self.retention.keep_best else {}
        for s in self.retention.to_delete(steps, metrics):
            self._check_owner()  # right before each delete: a manager that lost the root deletes nothing
            try:
                self._delete_step(s)
            except OSError as e:
                log.warning(
                    "shardckpt: retention could not delete all of step %d (%s: %s); it is no longer "
                    "committed, and the next manager start removes the rest of %s",
                    s,
                    type(e).__name__,
                    e,
                    self.path(s),
                )
        self._sweep_retired()

    def _retention_metrics(self, step: int) -> dict[str, Any]:
        try:
            return self.metrics(step)
        except ManifestError:
            return {}  # a damaged manifest ranks as "no metric" (restore skips it anyway)

    def _delete_step(self, step: int) -> None:
        """Delete ``step``: at once if no step reads its files; else uncommit it (its
        manifest first) and leave its files to :meth:`_sweep_retired`."""
        self._metrics.pop(step, None)
        self._chain.pop(step, None)
        storage = self._step_storage(step)
        if storage.exists(layout.REFERENCED_NAME):
            storage.delete([layout.MANIFEST_NAME])
            log.info(
                "shardckpt: retention deleted step %d under %s (its shared files wait for the sweep)", step, self.root
            )
        elif folder.remove_checkpoint(storage, why=f"retention of step {step}"):
            log.info("shardckpt: retention deleted step %d under %s", step, self.root)

    def _sweep_retired(self) -> list[str]:
        """Coordinator: delete the files of uncommitted step folders that incremental steps
        may read and that no committed step reads any more (mark and sweep,
        :mod:`shardckpt.manager.references`). Returns the folders removed."""
        retired = references.retired_folders(self._storage)
        if not retired:
            return []
        # Every committed checkpoint under the root, not only the steps: one saved beside them
        # with base= a step reads that step's files too (docs/format.md, section 11.5).
        committed = [n for n in self._storage.list_dirs("") if folder.is_committed(self._storage, n)]
        try:
            live = references.LiveFiles.of(self._storage, committed)
        except references.UnknownReferences as e:
            log.warning("shardckpt: not deleting the shared files of retired steps under %s: %s", self.root, e)
            return []
        self._check_owner()
        return references.sweep(self._storage, retired, live)

    # ------------------------------------------------------------ lifecycle

    def _start(self, takeover: bool, stale_after_s: float) -> None:
        """Coordinator. Claim the root, start the heartbeat, clean up interrupted saves.

        Whether a folder is committed or shardckpt's is decided on answers that are not
        errors: a storage error there (EIO on a stat) raises and nothing is deleted.
        Errors while deleting are warnings: a half-deleted step never blocks opening."""
        ownership.claim(self._storage, self._owner, takeover=takeover, stale_after_s=stale_after_s)
        self._heartbeat = ownership.Heartbeat(self._storage, self._owner, interval_s=stale_after_s / 4)
        for name in self._storage.list_dirs(""):
            if layout.parse_step_dir(name) is None:
                self._warn_if_not_a_step(name)
                continue
            if folder.is_committed(self._storage, name):
                continue
            sub = self._storage.child(name)
            found = folder.contents(sub)
            if found.is_referenced:
                continue  # a retired step whose files kept steps may read: swept below
            if not found.is_ours and not found.is_empty:
                log.warning(
                    "shardckpt: leaving %s/%s alone: it has no %s and no %s, so shardckpt did not write "
                    "it (another tool's checkpoint?); it is never listed, restored or deleted. Move it "
                    "out of the manager's root to silence this warning.",
                    self.root,
                    name,
                    layout.MANIFEST_NAME,
                    layout.SAVE_MARKER_NAME,
                )
                continue
            self._check_owner()
            try:
                if found.is_empty:  # a folder (and data/) created before anything was written in it
                    sub.remove_empty_dir(layout.DATA_DIR)
                    if not sub.remove_empty_dir(""):
                        continue  # something appeared in it meanwhile: not ours to judge now
                    gone = True
                else:
                    gone = folder.remove_checkpoint(sub, why="left by an interrupted save")
            except OSError as e:
                log.warning(
                    "shardckpt: could not finish removing %s/%s, left by an interrupted save (%s: %s); "
                    "it is not committed, so it is never restored; the next start tries again",
                    self.root,
                    name,
                    type(e).__name__,
                    e,
                )
                continue
            self.cleaned_up.append(name)
            if gone:  # else remove_checkpoint warned about the files it left
                log.warning("shardckpt: removed %s/%s, left by an interrupted save (no manifest)", self.root, name)
        self.cleaned_up += self._sweep_retired()

    def _warn_if_not_a_step(self, name: str) -> None:
        """Coordinator: a checkpoint named like a step but not the manager's name for it
        (``step_100``, saved with ``shardckpt.save``) would otherwise be ignored without a
        word, and a fresh-looking restore would start training from scratch."""
        if not layout.looks_like_step_dir(name) or not folder.is_committed(self._storage, name):
            return
        step = int(name.rsplit("_", 1)[1])
        log.warning(
            "shardckpt: %s/%s is a checkpoint but not a step of this manager, whose step %d is %s: "
            "restore() never loads it and retention never deletes it. Load it yourself with "
            "shardckpt.load(state, %r).",
            self.root,
            name,
            step,
            layout.step_dir_name(step),
            f"{self.root}/{name}",
        )

    def _check_owner(self) -> None:
        """Coordinator: RootInUseError unless the owner record on storage is still ours."""
        if self._heartbeat is not None:
            self._heartbeat.check()

    def _let_go(self) -> None:
        """Stop the heartbeat and release the owner record if it is still ours. Coordinator
        (a no-op elsewhere). Best effort when the storage fails: a stale record is taken
        over by the next manager after stale_owner_after_s."""
        beat, self._heartbeat = self._heartbeat, None
        if beat is None:
            return
        beat.close()
        try:
            ownership.release(self._storage, self._owner)
        except OSError as e:
            log.warning(
                "shardckpt: could not release %s/%s (%s); the next manager takes it over once it is stale",
                self.root,
                layout.OWNER_NAME,
                e,
            )

    def _install_sigterm_handler(self) -> None:
        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self._preempted = True

        self._previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def wait(self) -> None:
        """Collective. Block until the pending async save is committed, then apply retention.

        Raises the pending save's error (on every rank) if it failed; nothing of it is
        committed then, and earlier steps are untouched.
        """
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
        try:
            self.wait()
        finally:
            self._closed = True
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            try:
                self._let_go()
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

    def _check_open(self) -> None:
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
                    self._checkpointer.group(self._process_group, self._timeouts.arrive_s, purpose="manager")
                )
            self._agreements = group
        return self._agreements

    def _step_storage(self, step: int) -> Storage:
        return self._storage.child(layout.step_dir_name(step))
