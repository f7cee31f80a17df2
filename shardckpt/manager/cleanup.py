"""Everything a CheckpointManager deletes under its root, and when.

- **At start-up** (:meth:`RootCleaner.remove_interrupted`): step folders without a
  manifest that carry shardckpt's save marker (a save that never committed), empty step
  folders, and the retired files of incremental steps that no committed step reads.
- **After each commit** (:meth:`RootCleaner.retain`): the committed steps the
  :class:`~shardckpt.manager.retention.RetentionPolicy` does not keep, then the same sweep.

A step is deleted through :func:`shardckpt.storage.folder.remove_checkpoint` (manifest
first, so a crash mid-delete leaves an uncommitted folder that the next start cleans up,
never a committed step with missing data; only the format's own names, so files a user
put there stay). A step whose files incremental steps read loses only its manifest; its
files are swept once no committed step reads them (:mod:`shardckpt.manager.references`).

What is never deleted: a folder not provably shardckpt's (no manifest, no save marker:
a DCP checkpoint, a user's folder named ``step_*``), any file that is not one of the
format's names, and anything at all once the manager no longer owns the root: the owner
check runs right before every delete. Errors while deleting are warnings: the commit
stands (or the root opens), and the next commit or start tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shardckpt.errors import ManifestError, RootInUseError, ShardckptError
from shardckpt.format import layout
from shardckpt.manager import references
from shardckpt.manager.retention import RetentionPolicy
from shardckpt.manager.steps import committed_steps
from shardckpt.storage import Storage, folder

log = logging.getLogger("shardckpt")


class RootCleaner:
    """The deletes of one manager root. Coordinator only, never collective, not
    thread-safe; holds no thread or handle (nothing to close).

    ``check_owner`` raises RootInUseError once the manager lost the root; it is called
    right before each delete. ``root`` is the root's URL, for messages."""

    def __init__(self, storage: Storage, root: str, check_owner: Callable[[], None]) -> None:
        self._storage = storage
        self._root = root
        self._check_owner = check_owner
        self._marks = references.MarkCache()  # what each committed folder reads, between sweeps

    # ------------------------------------------------------------ start-up

    def remove_interrupted(self) -> list[str]:
        """Remove the step folders left by interrupted saves and the retired files no
        committed step reads; returns the folder names removed.

        Whether a folder is committed or shardckpt's is decided on answers that are not
        errors: a storage error there (EIO on a stat) raises and nothing is deleted.
        Errors while deleting are warnings: a half-deleted step never blocks opening."""
        removed = []
        for name in self._storage.list_dirs(""):
            if layout.parse_step_dir(name) is None:
                self._warn_if_not_a_step(name)
            elif not folder.is_committed(self._storage, name) and self._remove_uncommitted(name):
                removed.append(name)
        return removed + self.sweep_retired()

    def _remove_uncommitted(self, name: str) -> bool:
        """Remove uncommitted step folder ``name`` if it is an interrupted save of
        shardckpt's; whether it is gone (or, after a warning, partly gone)."""
        sub = self._storage.child(name)
        found = folder.contents(sub)
        if found.is_referenced:
            return False  # a retired step whose files kept steps may read: swept later
        if not found.is_ours and not found.is_empty:
            log.warning(
                "shardckpt: leaving %s/%s alone: it has no %s and no %s, so shardckpt did not write "
                "it (another tool's checkpoint?); it is never listed, restored or deleted. Move it "
                "out of the manager's root to silence this warning.",
                self._root,
                name,
                layout.MANIFEST_NAME,
                layout.SAVE_MARKER_NAME,
            )
            return False
        self._check_owner()
        try:
            if found.is_empty:  # a folder (and data/) created before anything was written in it
                sub.remove_empty_dir(layout.DATA_DIR)
                if not sub.remove_empty_dir(""):
                    return False  # something appeared in it meanwhile: not ours to judge now
                gone = True
            else:
                gone = folder.remove_checkpoint(sub, why="left by an interrupted save")
        except OSError as e:
            log.warning(
                "shardckpt: could not finish removing %s/%s, left by an interrupted save (%s: %s); "
                "it is not committed, so it is never restored; the next start tries again",
                self._root,
                name,
                type(e).__name__,
                e,
            )
            return False
        if gone:  # else remove_checkpoint warned about the files it left
            log.warning("shardckpt: removed %s/%s, left by an interrupted save (no manifest)", self._root, name)
        return True

    def _warn_if_not_a_step(self, name: str) -> None:
        """A checkpoint named like a step but not the manager's name for it (``step_100``,
        saved with ``shardckpt.save``) would otherwise be ignored without a word, and a
        fresh-looking restore would start training from scratch."""
        if not layout.looks_like_step_dir(name) or not folder.is_committed(self._storage, name):
            return
        step = int(name.rsplit("_", 1)[1])
        log.warning(
            "shardckpt: %s/%s is a checkpoint but not a step of this manager, whose step %d is %s: "
            "restore() never loads it and retention never deletes it. Load it yourself with "
            "shardckpt.load(state, %r).",
            self._root,
            name,
            step,
            layout.step_dir_name(step),
            f"{self._root}/{name}",
        )

    # ------------------------------------------------------------ after a commit

    def retain(
        self,
        policy: RetentionPolicy,
        metrics: Callable[[int], dict[str, Any]],
        forget: Callable[[int], None],
    ) -> None:
        """Delete the committed steps ``policy`` does not keep, then sweep. ``metrics(step)``
        reads a step's metrics (for ``keep_best``); ``forget(step)`` is called before a step
        is deleted, to drop what the manager remembers of it.

        Never raises for what happens on storage: the new step is committed, and a failed
        delete is retried by the next commit (retention) or start (clean-up)."""
        try:
            self._apply(policy, metrics, forget)
        except RootInUseError:
            pass  # logged by the heartbeat when it noticed; the next save raises it
        except (OSError, ShardckptError) as e:
            log.warning(
                "shardckpt: retention under %s stopped after the commit (%s: %s); the new step is "
                "committed, and retention runs again after the next one",
                self._root,
                type(e).__name__,
                e,
            )

    def _apply(
        self,
        policy: RetentionPolicy,
        metrics: Callable[[int], dict[str, Any]],
        forget: Callable[[int], None],
    ) -> None:
        """Raises (to :meth:`retain`) if the steps or their metrics cannot be read: a
        metric lost to a storage error must not make a kept step look deletable."""
        steps = committed_steps(self._storage)
        found = {s: _metrics_or_empty(metrics, s) for s in steps} if policy.keep_best else {}
        for s in policy.to_delete(steps, found):
            self._check_owner()  # right before each delete: a manager that lost the root deletes nothing
            forget(s)
            try:
                self._delete_step(s)
            except OSError as e:
                log.warning(
                    "shardckpt: retention could not delete all of step %d (%s: %s); it is no longer "
                    "committed, and the next manager start removes the rest of %s",
                    s,
                    type(e).__name__,
                    e,
                    f"{self._root}/{layout.step_dir_name(s)}",
                )
        self.sweep_retired()

    def _delete_step(self, step: int) -> None:
        """Delete ``step``: at once if no step reads its files; else uncommit it (its
        manifest first) and leave its files to :meth:`sweep_retired`."""
        storage = self._storage.child(layout.step_dir_name(step))
        if storage.exists(layout.REFERENCED_NAME):
            storage.delete([layout.MANIFEST_NAME])
            log.info(
                "shardckpt: retention deleted step %d under %s (its shared files wait for the sweep)", step, self._root
            )
        elif folder.remove_checkpoint(storage, why=f"retention of step {step}"):
            log.info("shardckpt: retention deleted step %d under %s", step, self._root)

    def sweep_retired(self) -> list[str]:
        """Delete the files of uncommitted step folders that incremental steps may read and
        that no committed step reads any more (mark and sweep,
        :mod:`shardckpt.manager.references`). Returns the folders removed."""
        retired = references.retired_folders(self._storage)
        if not retired:
            return []
        # Every committed checkpoint under the root, not only the steps: one saved beside them
        # with base= a step reads that step's files too (docs/format.md, section 11.5).
        committed = [n for n in self._storage.list_dirs("") if folder.is_committed(self._storage, n)]
        try:
            live = references.LiveFiles.of(self._storage, committed, self._marks)
        except references.UnknownReferences as e:
            log.warning("shardckpt: not deleting the shared files of retired steps under %s: %s", self._root, e)
            return []
        self._check_owner()
        return references.sweep(self._storage, retired, live)


def _metrics_or_empty(metrics: Callable[[int], dict[str, Any]], step: int) -> dict[str, Any]:
    try:
        return metrics(step)
    except ManifestError:
        return {}  # a damaged manifest ranks as "no metric" (restore skips it anyway)
