"""Every file and folder name inside a checkpoint root. Pure string functions, no I/O.

A manager root holds one checkpoint folder per step, ``step_0000000100/`` for step 100
(:func:`step_dir_name`: exactly one name per step), plus ``.shardckpt-owner.json`` naming
the manager that writes there. A checkpoint saved with ``shardckpt.save`` into a folder
with another name (``step_100/``, ``final/``) may sit beside them: it is a checkpoint,
but not a manager step.

A checkpoint folder looks like::

    <root>/
      .shardckpt-save.json                        the save marker: created (exclusively) by the
                                                  coordinator before any data byte is written
      manifest.json                               written last; its presence commits the checkpoint
      .manifest.json.tmp-<hex>, ..shardckpt-save.json.tmp-<hex>   the manifest and marker while
                                                  they are being written (POSIX)
      data/<save_id>-r<rank:05d>-<k:02d>.safetensors   one or more per rank, written in parallel
      data/<save_id>-r<rank:05d>.index.json       format 3: each rank's index record, after its data files
      data/<save_id>-p<page:05d>.ranks.json       format 3: the pages of the rank table (coordinator)

These are the only names shardckpt ever creates or deletes in a checkpoint folder
(:func:`is_checkpoint_name`). A folder holding any other name is not a shardckpt
checkpoint: ``save`` refuses to write into it, and no clean-up touches it.

Names that come from a manifest are untrusted: :func:`check_relative_name` is the
only gate through which such a name reaches storage.
"""

from __future__ import annotations

import re

from shardckpt.errors import ManifestError

MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
DATA_SUFFIX = ".safetensors"

STEP_DIR_PREFIX = "step_"
STEP_DIGITS = 10
OWNER_NAME = ".shardckpt-owner.json"
SAVE_MARKER_NAME = ".shardckpt-save.json"
REFERENCED_NAME = ".shardckpt-referenced.json"  # in a checkpoint whose data files a sibling reads

_STEP_DIR = re.compile(r"^step_([0-9]{10,})$")
_STEP_LIKE = re.compile(r"^step_[0-9]+$")
_DATA_NAME = re.compile(r"^data/[0-9a-f]{1,32}-r[0-9]{5,}-[0-9]{2,}\.safetensors$")
_INDEX_NAME = re.compile(r"^data/[0-9a-f]{1,32}-r[0-9]{5,}\.index\.json$")
_PAGE_NAME = re.compile(r"^data/[0-9a-f]{1,32}-p[0-9]{5,}\.ranks\.json$")
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9._-]+$")
_TMP_NAME = re.compile(r"^\.(manifest\.json|\.shardckpt-save\.json|\.shardckpt-referenced\.json)\.tmp-[0-9a-f]{12}$")


def data_file_name(save_id: str, rank: int, index: int) -> str:
    """Name (relative to the checkpoint root) of the ``index``-th data file of ``rank``."""
    return f"{DATA_DIR}/{save_id}-r{rank:05d}-{index:02d}{DATA_SUFFIX}"


def rank_index_name(save_id: str, rank: int) -> str:
    """Format 3 (docs/format.md 12.4): the index record of every data file of ``rank``."""
    return f"{DATA_DIR}/{save_id}-r{rank:05d}.index.json"


def rank_page_name(save_id: str, page: int) -> str:
    """Format 3 (docs/format.md 12.3): the ``page``-th page of a save's rank table."""
    return f"{DATA_DIR}/{save_id}-p{page:05d}.ranks.json"


def step_dir_name(step: int) -> str:
    """Folder of ``step`` under a manager root: zero-padded so names sort like steps."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{STEP_DIR_PREFIX}{step:0{STEP_DIGITS}d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a folder named by :func:`step_dir_name`, else None.

    Only that exact spelling counts: ``step_100`` and ``step_00000000100`` are not
    step 100, so a step never has two folders (the manager reads and deletes
    ``step_dir_name(step)``, and nothing else)."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    m = _STEP_DIR.match(base)
    if m is None:
        return None
    step = int(m.group(1))
    return step if step_dir_name(step) == base else None


def looks_like_step_dir(name: str) -> bool:
    """``step_`` followed by digits, in any padding (``step_100``): what a user may name
    a checkpoint folder and expect a manager to treat as a step."""
    return bool(_STEP_LIKE.match(name.rstrip("/").rsplit("/", 1)[-1]))


def is_data_file_name(name: str) -> bool:
    return bool(_DATA_NAME.fullmatch(name))


def is_save_file_name(name: str) -> bool:
    """A file one save writes under ``data/``: a data file, or (format 3) a rank's index
    record or a page of the rank table. All carry the save id: ``data/<save_id>-...``."""
    return bool(_DATA_NAME.fullmatch(name) or _INDEX_NAME.fullmatch(name) or _PAGE_NAME.fullmatch(name))


def is_temp_name(name: str) -> bool:
    """A temporary file of an atomic write inside a checkpoint folder (POSIX only)."""
    return bool(_TMP_NAME.fullmatch(name))


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` (relative to a checkpoint folder) is one that shardckpt writes there."""
    return name in (MANIFEST_NAME, SAVE_MARKER_NAME, REFERENCED_NAME) or is_save_file_name(name) or is_temp_name(name)


def referenced_marker() -> bytes:
    """The content of :data:`REFERENCED_NAME` (its presence is what counts)."""
    return (
        b'{"format": "shardckpt", "note": "data files of this checkpoint are read by incremental '
        b'checkpoints beside it; delete it only through a CheckpointManager (it keeps what they need)"}\n'
    )


def check_relative_name(name: object, *, where: str) -> str:
    """Return ``name`` if it is a safe relative name inside a checkpoint, else raise.

    Safe means: a non-empty str of ``/``-separated components made only of letters,
    digits, ``.``, ``_`` and ``-``, none of them ``.`` or ``..``. That excludes absolute
    paths, ``../`` escapes, backslashes, drive letters, URLs and NUL bytes.
    """
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: expected a relative file name, found {name!r}")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", "..") or not _SAFE_COMPONENT.fullmatch(part):
            raise ManifestError(
                f"{where}: file name {name!r} is not a plain relative name inside the "
                "checkpoint folder (absolute paths, '..', and unusual characters are refused); "
                "the manifest was not written by shardckpt or has been tampered with"
            )
    return name
