"""What a checkpoint folder holds, whether it is committed, and removing exactly
shardckpt's names from it.

Every removal in shardckpt (an overwriting save, retention, a manager's clean-up of an
interrupted step, the Lightning plugin's ``remove_checkpoint``) goes through
:func:`remove_checkpoint`, which deletes only names the format defines
(:func:`shardckpt.format.layout.is_checkpoint_name`) and only in a folder it can prove is a
shardckpt checkpoint: one with a manifest or a save marker (or the marker's temp file). Anything else in the
folder is left where it is, and the folder with it. There is no recursive delete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from shardckpt.format import layout
from shardckpt.storage import Storage

log = logging.getLogger("shardckpt")


@dataclass(frozen=True)
class FolderContents:
    """The entries of a checkpoint folder, split into shardckpt's names and the rest."""

    checkpoint_files: tuple[str, ...]
    foreign: tuple[str, ...]

    @property
    def is_empty(self) -> bool:
        return not self.checkpoint_files and not self.foreign

    @property
    def has_manifest(self) -> bool:
        return layout.MANIFEST_NAME in self.checkpoint_files

    @property
    def has_marker(self) -> bool:
        return layout.SAVE_MARKER_NAME in self.checkpoint_files

    @property
    def is_referenced(self) -> bool:
        """Incremental checkpoints beside it read its data files (they wrote the marker)."""
        return layout.REFERENCED_NAME in self.checkpoint_files

    @property
    def is_ours(self) -> bool:
        """Proven to be a shardckpt checkpoint (committed or interrupted): a manifest, a save
        marker, or the marker's temp file (a save killed before its marker was linked, the
        only thing in the folder then; the name is as specific as the marker's)."""
        marker_temp = f".{layout.SAVE_MARKER_NAME}.tmp-"
        return self.has_manifest or self.has_marker or any(n.startswith(marker_temp) for n in self.checkpoint_files)


def is_committed(storage: Storage, name: str = "") -> bool:
    """Whether the folder ``name`` below ``storage``'s root (the root itself for ``""``)
    is a committed checkpoint. A checkpoint exists if and only if its manifest does: the
    coordinator writes it last and atomically, so listing, resume and retention ask this
    and nothing else. A storage error raises (it is not a "no")."""
    return storage.exists(f"{name}/{layout.MANIFEST_NAME}" if name else layout.MANIFEST_NAME)


def contents(storage: Storage) -> FolderContents:
    """List the folder at ``storage``'s root (two levels: the root and ``data/``).

    A ``data`` entry that is not a real folder (a symlink, a file) is foreign, and so is
    any sub-folder of ``data/``: shardckpt never creates them. Reads only what it lists;
    a user's large folder costs one listing of its top level."""
    ours: list[str] = []
    foreign: list[str] = []
    for name in storage.list_names(""):
        if name == f"{layout.DATA_DIR}/":
            for sub in storage.list_names(layout.DATA_DIR):
                full = f"{layout.DATA_DIR}/{sub}"
                (ours if layout.is_save_file_name(full) else foreign).append(full)
        elif layout.is_checkpoint_name(name):
            ours.append(name)
        else:
            foreign.append(name)
    return FolderContents(tuple(sorted(ours)), tuple(sorted(foreign)))


def remove_checkpoint(storage: Storage, *, why: str) -> bool:
    """Remove the checkpoint at ``storage``'s root, if it can be proven to be one.

    Order: the manifest first (uncommit: nobody may load it from here on), then data
    and temp files, then the save marker (the proof, last, so a crash part-way leaves
    a folder the next clean-up still recognises), then the empty folders. Foreign
    names are left, with a warning, and so is the folder. Returns whether the folder
    is gone. A folder without a manifest or marker is not touched (False)."""
    found = contents(storage)
    if found.is_empty:  # an empty data/ may still be there
        return storage.remove_empty_dir(layout.DATA_DIR) and storage.remove_empty_dir("")
    if not found.is_ours:
        log.warning(
            "shardckpt: not removing %s (%s): it holds neither %s nor %s, so it was not written by shardckpt",
            storage.url,
            why,
            layout.MANIFEST_NAME,
            layout.SAVE_MARKER_NAME,
        )
        return False
    if found.is_referenced:
        log.warning(
            "shardckpt: not removing %s (%s): incremental checkpoints beside it read its data files (it holds %s). "
            "Delete it through the CheckpointManager that wrote them (retention keeps exactly the files a kept "
            "step needs), or materialize the checkpoints that depend on it first (python -m shardckpt materialize)",
            storage.url,
            why,
            layout.REFERENCED_NAME,
        )
        return False
    _remove_in_order(storage, found)
    if found.foreign:
        log.warning(
            "shardckpt: removed the checkpoint files of %s (%s) but left %d other entries there, "
            "e.g. %s: shardckpt did not write them",
            storage.url,
            why,
            len(found.foreign),
            found.foreign[0],
        )
        return False
    storage.remove_empty_dir(layout.DATA_DIR)
    return storage.remove_empty_dir("")


def _remove_in_order(storage: Storage, found: FolderContents) -> None:
    """Delete shardckpt's names of ``found``: the manifest, then data and temp files, then
    the markers (the proof of ownership, last, so a crash part-way leaves a folder the next
    clean-up still recognises)."""
    names = list(found.checkpoint_files)
    first = [n for n in names if n == layout.MANIFEST_NAME]
    flag = [n for n in names if n == layout.REFERENCED_NAME]
    last = [n for n in names if n == layout.SAVE_MARKER_NAME]
    middle = [n for n in names if n not in first + flag + last]
    for batch in (first, middle, flag, last):
        if batch:
            storage.delete(batch)


def remove_unreferenced(storage: Storage, live: set[str], *, why: str) -> tuple[bool, int]:
    """In the uncommitted checkpoint folder at ``storage``'s root (one that incremental
    checkpoints may read, :attr:`FolderContents.is_referenced`), delete the data files not
    in ``live`` (the names of this folder's files that a committed checkpoint still reads),
    and once none is left, the rest of shardckpt's names and the folder.

    The caller proves ``live`` complete: it lists every file of this folder that any
    committed checkpoint beside it points at. A committed folder is never touched here.
    Returns (whether the folder is gone, data files kept)."""
    found = contents(storage)
    if found.has_manifest or not found.is_ours:
        return False, 0
    data = [n for n in found.checkpoint_files if layout.is_data_file_name(n)]
    dead = [n for n in data if n not in live]
    if dead:
        storage.delete(dead)
    kept = len(data) - len(dead)
    if kept:
        return False, kept
    rest = FolderContents(tuple(n for n in found.checkpoint_files if n not in data), found.foreign)
    _remove_in_order(storage, rest)
    if found.foreign:
        log.warning(
            "shardckpt: removed the checkpoint files of %s (%s) but left %d other entries there, e.g. %s",
            storage.url,
            why,
            len(found.foreign),
            found.foreign[0],
        )
        return False, 0
    storage.remove_empty_dir(layout.DATA_DIR)
    return storage.remove_empty_dir(""), 0
