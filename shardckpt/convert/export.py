"""Export a checkpoint for serving and other tools: safetensors, a Hugging Face folder, torch.save.

No process group is needed and any saved world size works: tensors are assembled from
their chunks by :class:`~shardckpt.convert.source.CheckpointSource`, every byte verified.

Memory. The safetensors and Hugging Face writers stream: the header (every name,
dtype and shape is known from the manifest) is written first, then one tensor at a
time is assembled, cast, written and dropped, so the peak is about twice the largest
single tensor plus a fixed overhead, however big the checkpoint. ``torch.save`` cannot
stream (it pickles one object holding every tensor), so :func:`export_torch` holds
all selected tensors at once; it refuses up front when they would not fit in the
memory available (Linux), rather than getting the process killed half way.

Outputs go through :mod:`shardckpt.storage`. A Hugging Face folder is committed like a
checkpoint: shards first, ``model.safetensors.index.json`` last. A single file is
written in place; an interrupted write leaves a file whose header promises more bytes
than it holds, which every safetensors reader refuses.

The safetensors and Hugging Face writers are in :mod:`~shardckpt.convert.safetensors_export`,
what every writer shares in :mod:`~shardckpt.convert.export_items`; this module writes
``torch.save`` files and is where the rest of shardckpt imports all of them from.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from shardckpt.convert.export_items import (
    ExportReport,
    build_report,
    file_url,
    out_bytes,
    parent_and_name,
    progress_bar,
    refuse_existing,
    selected_tensors,
)
from shardckpt.convert.progress import human_bytes
from shardckpt.convert.safetensors_export import (
    DEFAULT_MAX_SHARD_BYTES,
    HF_INDEX_NAME,
    drop_tied,
    export_hf,
    export_safetensors,
    parse_size,
    plan_shards,
)
from shardckpt.convert.source import CheckpointSource, Selection, strip_path
from shardckpt.engine.state import nest
from shardckpt.errors import ShardckptError
from shardckpt.storage import as_url

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "HF_INDEX_NAME",
    "ExportReport",
    "drop_tied",
    "export_hf",
    "export_safetensors",
    "export_torch",
    "parse_size",
    "plan_shards",
    "read_state_dict",
]

# ---------------------------------------------------------------- torch.save


def read_state_dict(
    source: CheckpointSource, selection: Selection, *, flat: bool = False, progress: bool = False
) -> dict[str, Any]:
    """Every selected tensor and value, in memory: nested as saved (from the manifest's
    ``paths``, with ``selection.strip_prefix`` removed), or ``flat`` by dotted key."""
    names = source.select(selection)
    tensor_items = [(n, k) for n, k in names.items() if k in source.manifest.tensors]
    leaves = []
    with progress_bar(progress, source, tensor_items, selection) as bar:
        for name, key in names.items():
            if key in source.manifest.tensors:
                leaf: Any = selection.cast(source.read_tensor(key))
                bar.update(leaf.numel() * leaf.dtype.itemsize)
            else:
                leaf = source.value(key)
            leaves.append((name, _out_path(source, selection, key), leaf))
    if flat:
        return {name: leaf for name, _, leaf in leaves}
    return nest((path, leaf) for _, path, leaf in leaves)


def _out_path(source: CheckpointSource, selection: Selection, key: str) -> list[str | int]:
    path = source.path_of(key)
    if selection.strip_prefix and key.startswith(selection.strip_prefix):
        return strip_path(path, selection.strip_prefix)
    return path


def export_torch(
    source: CheckpointSource,
    out: str | os.PathLike[str],
    selection: Selection,
    *,
    flat: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> ExportReport:
    """Write one ``torch.save`` file that ``torch.load(out, weights_only=True)`` reads.

    Holds every selected tensor in memory at once (see the module docstring); refuses
    before reading anything if that exceeds the memory available. Non-tensor values are
    included as plain Python (int, float, str, bool, None, list, tuple, dict).
    """
    out = as_url(out, "output path")
    storage, name = parent_and_name(out)
    refuse_existing(storage, [name], overwrite)
    tensor_items, _ = selected_tensors(source, selection, allow_empty=True)
    needed = sum(out_bytes(source, selection, k) for _, k in tensor_items)
    _check_fits_in_memory(needed, out)
    state = read_state_dict(source, selection, flat=flat, progress=progress)
    if overwrite:
        storage.delete([name])  # storage creates files exclusively: never writes into an existing one
    stream = storage.open_write(name)
    try:
        torch.save(state, _WriteAdapter(stream))  # type: ignore[arg-type]  # torch only calls write() and flush()
        stream.finish()
    except BaseException:
        stream.abort()
        raise
    return build_report("torch", [file_url(storage, name)], source, selection, tensor_items, [])


class _WriteAdapter:
    """The file-like object torch.save wants, over a storage WriteStream."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._stream.write(view)
        return view.nbytes

    def flush(self) -> None:
        """Nothing buffered here; the stream makes the bytes durable in finish()."""


def _check_fits_in_memory(needed: int, out: str) -> None:
    available = _available_memory_bytes()
    if available is not None and needed > available:
        raise ShardckptError(
            f"export to {out}: torch.save needs every selected tensor in memory at once ({human_bytes(needed)}) "
            f"but only {human_bytes(available)} is available. Export to safetensors or hf instead (streamed, "
            "about twice the largest tensor), or select fewer keys (--keys) or a smaller dtype (--dtype bf16)."
        )


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
