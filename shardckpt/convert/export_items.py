"""What an export writes and where, shared by its writers: the selected tensors as
(output name, key) items and their bytes in the output dtype, the output's storage (an
existing file is refused unless overwritten), the progress bar and the :class:`ExportReport`.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from shardckpt.convert.progress import byte_bar
from shardckpt.convert.source import CheckpointSource, Selection
from shardckpt.storage import Storage, as_url, open_storage


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote. ``files``: URLs of the files written, in write order;
    ``skipped_values``: non-tensor keys left out (safetensors holds tensors only);
    ``dropped_tied``: declared tied names not written, each -> the name written in its place
    (checked bitwise equal); ``num_tensors`` and the byte counts cover what was written."""

    format: str
    files: list[str]
    num_tensors: int
    tensor_bytes: int
    largest_tensor_bytes: int
    skipped_values: list[str] = field(default_factory=list)
    dropped_tied: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def selected_tensors(
    source: CheckpointSource, selection: Selection, allow_empty: bool = False
) -> tuple[list[tuple[str, str]], list[str]]:
    """(output name, key) of the selected tensors, and the selected non-tensor keys."""
    try:
        names = source.select(selection)
    except ValueError:
        if allow_empty:
            return [], []
        raise
    tensors = [(n, k) for n, k in names.items() if k in source.manifest.tensors]
    if not tensors and not allow_empty:
        raise ValueError(
            f"{source.path}: the selected keys hold no tensor (only values: {sorted(names.values())[:10]})"
        )
    return tensors, sorted(k for k in names.values() if k not in source.manifest.tensors)


def out_bytes(source: CheckpointSource, selection: Selection, key: str) -> int:
    return math.prod(source.manifest.tensors[key].shape) * selection.out_dtype(source.dtype(key)).itemsize


def build_report(
    fmt: str,
    files: list[str],
    source: CheckpointSource,
    selection: Selection,
    items: list[tuple[str, str]],
    skipped: list[str],
    dropped_tied: dict[str, str] | None = None,
) -> ExportReport:
    sizes = [out_bytes(source, selection, k) for _, k in items]
    return ExportReport(fmt, files, len(items), sum(sizes), max(sizes, default=0), skipped, dropped_tied or {})


def progress_bar(progress: bool, source: CheckpointSource, items: list[tuple[str, str]], selection: Selection) -> Any:
    total = sum(out_bytes(source, selection, k) for _, k in items)
    return byte_bar(total, "export", enabled=progress)


def parent_and_name(out: str | os.PathLike[str]) -> tuple[Storage, str]:
    out = as_url(out, "output path")
    parent, _, name = out.rstrip("/").rpartition("/")
    if not name:
        raise ValueError(f"output {out!r} must name a file")
    if not parent:
        parent = "/" if out.startswith("/") else "."
    return open_storage(parent), name


def refuse_existing(storage: Storage, names: list[str], overwrite: bool) -> None:
    there = [n for n in names if storage.exists(n)]
    if there and not overwrite:
        raise FileExistsError(
            f"{storage.url}: {', '.join(there[:5])} already exist(s); choose another output "
            "or pass overwrite=True (CLI: --overwrite)"
        )


def file_url(storage: Storage, name: str) -> str:
    return f"{storage.url.rstrip('/')}/{name}"
