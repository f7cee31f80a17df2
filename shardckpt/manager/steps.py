"""What a manager root holds, step by step, and the metrics a step carries.

:func:`committed_steps` is what a manager lists, restores and retains; :func:`list_root`
is what ``shardckpt ls`` shows (committed steps, interrupted saves, folders that are not
shardckpt's), :func:`list_other_checkpoints` the checkpoints beside them that are not
manager steps; :func:`check_metrics` and :func:`metrics_of` are the
two directions of the JSON metrics a :class:`~shardckpt.manager.CheckpointManager`
stores in each step's manifest. Nothing here is collective or writes anything.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shardckpt.engine.loading import read_any_manifest
from shardckpt.errors import UnsupportedValueError
from shardckpt.format import layout
from shardckpt.format.manifest import Manifest
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.storage import Storage, as_url, folder, open_storage

__all__ = [
    "OtherCheckpoint",
    "StepInfo",
    "check_metrics",
    "committed_steps",
    "list_other_checkpoints",
    "list_root",
    "metrics_of",
]


@dataclass(frozen=True)
class StepInfo:
    """What ``shardckpt ls`` shows for one step folder."""

    step: int
    committed: bool
    size_bytes: int
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    world_size: int | None = None
    foreign: bool = False
    """Uncommitted and not written by shardckpt (no save marker): never restored or deleted."""
    bases: tuple[str, ...] = ()
    """Incremental (format 2): the step folders it reads unchanged tensors from."""
    base_bytes: int = 0
    """Of ``size_bytes``, the bytes of data files that live in ``bases``, not in this folder."""
    retired: bool = False
    """Uncommitted, deleted by retention, but committed incremental steps still read data
    files in it (it holds ``.shardckpt-referenced.json``): swept once none does."""


@dataclass(frozen=True)
class OtherCheckpoint:
    """A committed checkpoint directly under a manager root whose folder is not a step's
    name (``step_100``, ``final``; a manager's step 100 is ``step_0000000100``): saved with
    ``shardckpt.save`` to a folder of its own. Loadable with ``shardckpt.load``; a
    CheckpointManager never restores, retains or deletes it. ``shardckpt ls`` lists it as
    "checkpoint (not a manager step)"."""

    name: str
    size_bytes: int
    created_at: str | None = None
    world_size: int | None = None


def metrics_of(manifest: Manifest | ManifestV3) -> dict[str, Any]:
    """The manager's metrics in a manifest's metadata, or {} when they are absent or not
    a dict (a manifest from another version or tool, or a hand edit): never a crash."""
    found = manifest.metadata.get("metrics")
    return dict(found) if isinstance(found, dict) else {}


def check_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """``metrics`` as a plain dict, or UnsupportedValueError naming the offending entry.

    Metrics are stored as JSON in the manifest: a dict with str keys whose values are
    str, bool, None, finite int/float, or lists and dicts of those."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise UnsupportedValueError(
            f"metrics must be a dict of str -> JSON values, e.g. {{'val_loss': 0.42}}; got "
            f"{type(metrics).__name__} {_short(metrics)}"
        )
    for key in metrics:
        if not isinstance(key, str):
            raise UnsupportedValueError(
                f"metrics keys must be str (JSON object keys); got {type(key).__name__} {key!r}"
            )
    plain = dict(metrics)
    _check_json(plain, "metrics")
    return plain


def _check_json(value: Any, where: str) -> None:
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise UnsupportedValueError(
                f"{where} is {value}; JSON has no NaN or infinity. Leave the metric out for this step, "
                "or store it as a string"
            )
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise UnsupportedValueError(
                    f"{where}: keys must be str (JSON object keys); got {type(k).__name__} {k!r}"
                )
            _check_json(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]")
        return
    hint = "; pass a number: value.item()" if type(value).__module__.split(".")[0] in ("torch", "numpy") else ""
    kind = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
    raise UnsupportedValueError(
        f"{where} is a {kind}, not a JSON value (str, int, float, bool, None, list, dict){hint}"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def committed_steps(storage: Storage) -> list[int]:
    """The committed steps under the manager root ``storage`` (step folders with a
    manifest), ascending."""
    found = []
    for name in storage.list_dirs(""):
        step = layout.parse_step_dir(name)
        if step is not None and folder.is_committed(storage, name):
            found.append(step)
    return sorted(found)


def list_root(root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> list[StepInfo]:
    """Every step folder under ``root``, committed or not, ascending (for ``shardckpt ls``).

    Step folders are named by :func:`shardckpt.format.layout.step_dir_name`
    (``step_0000000100``); other folders are not steps (see :func:`list_other_checkpoints`).
    A root that does not exist holds no steps."""
    storage = open_storage(as_url(root, "root"), storage_options)
    infos = []
    for name in storage.list_dirs(""):
        step = layout.parse_step_dir(name)
        if step is None:
            continue
        sub = storage.child(name)
        if folder.is_committed(sub):
            m = read_any_manifest(sub)
            in_bases = (
                _v3_base_bytes(storage, m)
                if isinstance(m, ManifestV3)
                else sum(f.size for f in m.files.values() if f.checkpoint is not None)
            )
            infos.append(
                StepInfo(
                    step,
                    True,
                    _size(sub, m) + (in_bases if isinstance(m, ManifestV3) else 0),  # as for v2: its bases' bytes too
                    metrics_of(m),
                    m.created_at,
                    m.world_size,
                    bases=m.bases,
                    base_bytes=in_bases,
                )
            )
        else:
            found = folder.contents(sub)
            size = sum(sub.size(n) for n in sub.list_files(""))
            infos.append(
                StepInfo(
                    step, False, size, foreign=not found.is_ours and not found.is_empty, retired=found.is_referenced
                )
            )
    return sorted(infos, key=lambda i: i.step)


def list_other_checkpoints(
    root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> list[OtherCheckpoint]:
    """The committed checkpoints directly under ``root`` that are not manager steps, by
    name: folders with a ``manifest.json`` whose name is not ``step_dir_name(step)``."""
    storage = open_storage(as_url(root, "root"), storage_options)
    found = []
    for name in sorted(storage.list_dirs("")):
        if layout.parse_step_dir(name) is not None or not folder.is_committed(storage, name):
            continue
        sub = storage.child(name)
        m = read_any_manifest(sub)
        found.append(OtherCheckpoint(name, _size(sub, m), m.created_at, m.world_size))
    return found


def _v3_base_bytes(root: Storage, m: ManifestV3) -> int:
    """The bytes of the data files of a format-3 step's base groups (each base folder's data
    files of that group's save: the whole group is what the step keeps alive, format.md 11.5),
    one listing per base; a missing base counts 0 (``shardckpt verify`` names it)."""
    total = 0
    for group in m.file_table.groups:
        if group.checkpoint is None:
            continue
        base = root.child(group.checkpoint)
        prefix = f"{layout.DATA_DIR}/{group.save_id}-"
        names = [n for n in base.list_files(layout.DATA_DIR) if n.startswith(prefix) and n.endswith(layout.DATA_SUFFIX)]
        total += sum(base.size(n) for n in names)
    return total


def _size(storage: Storage, m: Manifest | ManifestV3) -> int:
    """The bytes of a committed checkpoint's data files; format 3 keeps their sizes in the
    index records, so there it is the bytes in its folder (one listing, as for an
    uncommitted step; a version-3 base's shared files are counted apart, ``_v3_base_bytes``)."""
    if isinstance(m, ManifestV3):
        return sum(storage.size(n) for n in storage.list_files(""))
    return sum(f.size for f in m.files.values())
