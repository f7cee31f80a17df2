"""Claiming a checkpoint folder and committing into it: the coordinator's side of the
write protocol (docs/format.md, section 3), shared by saves and ``materialize``.

:func:`claim_folder` refuses a folder that is not ours to write and creates the save
marker before any data byte; :func:`create_file` is the exclusive create that commits
(the manifest, last); :func:`discard_save` removes what a failed save wrote, and only that.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from shardckpt.engine.collective import rank_list
from shardckpt.errors import CheckpointExistsError, DestinationNotEmptyError, InconsistentRanksError, ShardckptError
from shardckpt.format import layout
from shardckpt.storage import Storage, folder

log = logging.getLogger("shardckpt")


def check_same_location(url: str, per_rank: list[dict[str, Any]]) -> None:
    """All ranks must write into one folder: a per-rank path (a timestamp in it, a
    relative path on nodes with different working directories) would commit a manifest
    that lists files living elsewhere."""
    places: dict[str, list[int]] = {}
    for r, data in enumerate(per_rank):
        places.setdefault(data["location"], []).append(r)
    if len(places) > 1:
        shown = "; ".join(f"ranks {ranks}: {loc}" for loc, ranks in sorted(places.items(), key=lambda kv: kv[1][0]))
        raise InconsistentRanksError(
            f"save to {url}: ranks passed different paths ({shown}). Every rank must pass the same path "
            "(compute it once, e.g. on rank 0, and broadcast it); nothing was written."
        )


AGREED_OPTIONS = {
    "hash_block_bytes": "hash_block_bytes",
    "format_version": "format_version",
    "incremental": "digests",
    "overwrite": "overwrite",
}
"""The save options every rank must pass alike, by the name errors use -> the writer
option's attribute: the block size each rank hashes with, the format and digests each lays
out, whether the coordinator may replace a checkpoint. Threads, direct writes and
``metadata`` (the coordinator's is stored) may differ."""


def agreed_options(options: Any) -> dict[str, Any]:
    """What a rank sends with its local plan for :func:`check_same_options`, from its
    ``WriterOptions``."""
    return {name: getattr(options, attr) for name, attr in AGREED_OPTIONS.items()}


def check_ranks_agree(url: str, per_rank: list[dict[str, Any]]) -> None:
    """Coordinator, before planning from the ranks' offers and before the claim: every
    rank's local plan ``storage_data`` names this folder and the same options;
    InconsistentRanksError (nothing written) otherwise."""
    check_same_location(url, per_rank)
    check_same_options(url, per_rank)


def check_same_options(url: str, per_rank: list[dict[str, Any]]) -> None:
    """All ranks must save with the options that shape the one checkpoint they write
    (``per_rank[r]["options"]``: name -> value, :func:`agreed_options`).
    Each rank hashes and lays out its files with its own, the coordinator builds the
    manifest and claims the folder with its own: ranks whose ``hash_block_bytes`` differed
    committed a checkpoint no reader accepts, and one rank's ``overwrite=True`` replaced a
    checkpoint another rank's caller meant to keep. Options are compared by name, in sorted
    order (never one rank's dict order); every differing one is named with its ranks."""
    options = [data.get("options", {}) for data in per_rank]  # a plan without any: every option differs
    names = sorted({name for mine in options for name in mine})
    parts = []
    for name in names:
        ranks_of: dict[str, list[int]] = {}
        for r, mine in enumerate(options):
            ranks_of.setdefault(repr(mine.get(name)), []).append(r)
        if len(ranks_of) > 1:
            groups = sorted(ranks_of.items(), key=lambda kv: kv[1][0])
            parts.append(f"{name} (" + "; ".join(f"{rank_list(ranks)}: {value}" for value, ranks in groups) + ")")
    if parts:
        raise InconsistentRanksError(
            f"save to {url}: ranks passed different save options: {', '.join(parts)}. These shape the one "
            "checkpoint every rank writes, so every rank must pass the same values (compute them once, e.g. "
            "on rank 0, and broadcast them); nothing was written."
        )


def claim_folder(storage: Storage, save_id: str, *, overwrite: bool, what: str = "save") -> list[str]:
    """Refuse a folder that is not ours to write; then create the save marker, the proof
    (for clean-up) that shardckpt owns what follows, before any data byte. Coordinator
    only; ``what`` names the operation in errors (``"save"``, ``"materialize"``).

    With ``overwrite`` an existing checkpoint there is uncommitted at once and the names of
    its data files are returned (the caller removes them after its own commit); else []."""
    url = storage.url
    found = folder.contents(storage)
    if found.foreign:
        shown = ", ".join(repr(n) for n in found.foreign[:5])
        raise DestinationNotEmptyError(
            f"{what} to {url}: the folder already holds {len(found.foreign)} "
            f"{'entry that is' if len(found.foreign) == 1 else 'entries that are'} not part of a "
            f"shardckpt checkpoint ({shown}); shardckpt saves only into a new or empty folder, or over its "
            "own checkpoint, so it never deletes or overwrites your files. Save to a new path (one folder "
            "per checkpoint, e.g. runs/exp1/step_100) or empty this one."
        )
    if found.is_referenced:
        raise CheckpointExistsError(
            f"{what} to {url}: incremental checkpoints beside this one read its data files (it holds "
            f"{layout.REFERENCED_NAME}), so it is never overwritten, even with overwrite=True: that would "
            "break them. Save to a new path; delete it through the CheckpointManager that wrote the "
            "incremental steps, which keeps every file a kept step needs."
        )
    if not overwrite and found.has_manifest:
        raise CheckpointExistsError(
            f"{url}: a committed checkpoint is already there; save to a new path, "
            "or pass overwrite=True to replace it (the old one stops being loadable at once)"
        )
    if not overwrite and found.has_marker:
        raise CheckpointExistsError(
            f"{what} to {url}: another save is writing into this folder, or an earlier one was interrupted "
            f"(it holds {layout.SAVE_MARKER_NAME} and no {layout.MANIFEST_NAME}). If no other job is saving "
            "here, pass overwrite=True to replace what the interrupted save left, or save to a new path."
        )
    marker = json.dumps(
        {
            "format": "shardckpt",
            "save_id": save_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": time.time(),
        }
    ).encode()
    replaced: list[str] = []
    if overwrite:
        # Listed now, deleted only after the new commit: the replaced save's files (its
        # data files and, for format 3, its index records and pages).
        replaced = [n for n in found.checkpoint_files if layout.is_save_file_name(n)]
        # Uncommit first: from here on nobody may trust the old files.
        storage.delete([layout.MANIFEST_NAME])
    create_file(
        storage,
        layout.SAVE_MARKER_NAME,
        marker,
        overwrite=overwrite,
        lost_race="another save started writing into this folder "
        "at the same moment; two saves to one path cannot both succeed. Save each to its own path.",
        what=what,
    )
    return replaced


def create_file(
    storage: Storage, name: str, data: bytes, *, overwrite: bool, lost_race: str, what: str = "save"
) -> None:
    """Create ``name`` exclusively (replace it with ``overwrite``); a lost race is
    CheckpointExistsError saying ``lost_race``. The commit of a save is this call for the
    manifest, after every data file is durable."""
    if overwrite:
        storage.write_atomic(name, data)
        return
    try:
        storage.create_exclusive(name, data)
    except FileExistsError as e:
        raise CheckpointExistsError(f"{what} to {storage.url}: {lost_race}") from e


def discard_save(storage: Storage, save_id: str) -> None:
    """After a failed save or materialize that did not commit (coordinator): remove the
    files of ``save_id``, so a failure in a new folder leaves nothing behind. Only names of
    this save id; the marker only while it is still this save's. Best effort: a failure
    here is logged, never raised over the save's own error."""
    try:
        if folder.is_committed(storage):
            return  # committed after all (or by a racing overwrite): not ours to touch
        prefix = f"{layout.DATA_DIR}/{save_id}-"
        storage.delete([n for n in storage.list_files(layout.DATA_DIR) if n.startswith(prefix)])
        if _marker_save_id(storage) == save_id:
            storage.delete([layout.SAVE_MARKER_NAME])
            if storage.remove_empty_dir(layout.DATA_DIR):
                storage.remove_empty_dir("")
    except (OSError, ShardckptError) as e:
        log.warning(
            "shardckpt: the failed save to %s left files behind (%s); a CheckpointManager "
            "removes them at its next start, or save again with overwrite=True",
            storage.url,
            e,
        )


def _marker_save_id(storage: Storage) -> str | None:
    try:
        doc = json.loads(storage.read_bytes(layout.SAVE_MARKER_NAME))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # not a marker we wrote
    return doc.get("save_id") if isinstance(doc, dict) else None
