"""Checkpoints in and out of shardckpt: export, import, diff. The entry points live here.

- :func:`export_checkpoint`: a checkpoint saved by any world size -> one safetensors
  file (streamed), a Hugging Face sharded folder (streamed) or one ``torch.save`` file,
  with key selection, prefix stripping and dtype casting. No process group needed.
- :func:`import_checkpoint`: a safetensors file, a Hugging Face folder, a ``torch.save``
  file (``weights_only=True`` only) or a DCP folder (only with ``trust_pickle=True``)
  -> a checkpoint that loads on any world size.
- :func:`diff_checkpoints`: keys added, removed and changed; max abs difference per tensor.
- :func:`read_state_dict`: a checkpoint as one in-memory nested dict, without a target.
- :func:`materialize_checkpoint`: an incremental checkpoint (which reads unchanged tensors
  from base checkpoints beside it) -> a standalone copy that reads nothing elsewhere.

The work is split by direction: :mod:`~shardckpt.convert.source` (assembling tensors
from chunks, verified), :mod:`~shardckpt.convert.export` (with
:mod:`~shardckpt.convert.safetensors_export` and :mod:`~shardckpt.convert.export_items`),
:mod:`~shardckpt.convert.importer` (with
:mod:`~shardckpt.convert.foreign`, the readers of the formats it imports, and
:mod:`~shardckpt.convert.regular_files`, how it opens their files),
:mod:`~shardckpt.convert.diff`, :mod:`~shardckpt.convert.materialize`, and
:mod:`~shardckpt.convert.audit` (``verify``/``inspect``).
None of them is collective except the save at the end of an import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from shardckpt.convert.diff import DiffReport, TensorComparison, diff_checkpoints
from shardckpt.convert.export import (
    DEFAULT_MAX_SHARD_BYTES,
    HF_INDEX_NAME,
    ExportReport,
    export_hf,
    export_safetensors,
    export_torch,
    parse_size,
)
from shardckpt.convert.export import read_state_dict as _read_state_dict
from shardckpt.convert.foreign import SOURCE_FORMATS, detect_format
from shardckpt.convert.importer import ImportReport, PickleNotTrustedError, import_checkpoint
from shardckpt.convert.materialize import MaterializeReport, materialize_checkpoint
from shardckpt.convert.source import CheckpointSource, Selection, parse_dtype
from shardckpt.convert.ties import hf_tied_weights, parse_tied

__all__ = [
    "EXPORT_FORMATS",
    "HF_INDEX_NAME",
    "SOURCE_FORMATS",
    "CheckpointSource",
    "DiffReport",
    "ExportReport",
    "ImportReport",
    "MaterializeReport",
    "PickleNotTrustedError",
    "Selection",
    "TensorComparison",
    "detect_format",
    "diff_checkpoints",
    "export_checkpoint",
    "hf_tied_weights",
    "import_checkpoint",
    "materialize_checkpoint",
    "parse_dtype",
    "parse_size",
    "parse_tied",
    "read_state_dict",
]

EXPORT_FORMATS = ("safetensors", "hf", "torch")


def export_checkpoint(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    format: str,
    keys: tuple[str, ...] | list[str] = (),
    strip_prefix: str = "",
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    flat: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
    tied: Mapping[str, str] | None = None,
) -> ExportReport:
    """Export the checkpoint at ``path`` to ``out`` in ``format`` (one of :data:`EXPORT_FORMATS`).

    ``format="safetensors"``: ``out`` is one file; ``"hf"``: ``out`` is a folder that
    receives ``model-0000k-of-0000n.safetensors`` (each at most ``max_shard_bytes`` of
    tensor data, e.g. ``"5GB"``) and ``model.safetensors.index.json``; ``"torch"``: ``out``
    is one file for ``torch.load(out, weights_only=True)``, nested as saved (``flat``:
    keyed by dotted name instead) and including non-tensor values. safetensors formats
    hold tensors only; the report lists the values left out.

    ``keys``, ``strip_prefix``, ``dtype``: see :class:`Selection` (``dtype="bf16"`` casts
    floating tensors for serving). ``verify``: check every byte against the checksums.
    Existing outputs are refused unless ``overwrite``. Memory: safetensors and hf stream
    (about twice the largest tensor); torch holds every selected tensor at once.

    ``tied`` (safetensors and hf): ``{tied name: kept name}``, output names (after
    ``strip_prefix``) that are one tensor in the model, e.g. ``{"lm_head.weight":
    "transformer.wte.weight"}`` for GPT-2, or :func:`hf_tied_weights` of the model's
    ``config.json``, or a transformers model's ``all_tied_weights_keys``. Each tied name is
    written once, as its kept name, as ``save_pretrained`` does, after checking the two
    are bitwise equal (a declared tie whose tensors differ is refused). Equal tensors
    that are not declared tied are all written.
    """
    if tied and format == "torch":
        raise ValueError("tied applies to format='safetensors' and 'hf'; torch.save keeps every name")
    selection = Selection(tuple(keys), strip_prefix, parse_dtype(dtype) if dtype is not None else None)
    source = CheckpointSource(path, storage_options=storage_options, verify=verify)
    if format == "safetensors":
        return export_safetensors(source, out, selection, overwrite=overwrite, progress=progress, tied=tied)
    if format == "hf":
        return export_hf(
            source,
            out,
            selection,
            max_shard_bytes=parse_size(max_shard_bytes),
            overwrite=overwrite,
            progress=progress,
            tied=tied,
        )
    if format == "torch":
        return export_torch(source, out, selection, flat=flat, overwrite=overwrite, progress=progress)
    raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {format!r}")


def read_state_dict(
    path: str | os.PathLike[str],
    *,
    keys: tuple[str, ...] | list[str] = (),
    strip_prefix: str = "",
    dtype: str | torch.dtype | None = None,
    flat: bool = False,
    verify: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint at ``path`` as one in-memory dict of CPU tensors and plain values,
    nested as it was saved (or ``flat``); what ``export_checkpoint(format="torch")`` writes.

    Needs no target state_dict and no process group. Dict keys that were not str when
    saved come back as their ``str()`` (the manifest records paths as str).
    """
    selection = Selection(tuple(keys), strip_prefix, parse_dtype(dtype) if dtype is not None else None)
    return _read_state_dict(
        CheckpointSource(path, storage_options=storage_options, verify=verify), selection, flat=flat
    )
