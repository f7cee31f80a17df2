"""Export to safetensors, streamed: one file (:func:`export_safetensors`) or a Hugging Face
sharded folder (:func:`export_hf`), declared tied weights written once (:func:`drop_tied`).
The memory bound and the commit order are in :mod:`~shardckpt.convert.export`'s docstring.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
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
from shardckpt.convert.source import CheckpointSource, Selection
from shardckpt.convert.ties import check_tied, describe_difference, tensors_are_tied
from shardckpt.errors import ShardckptError
from shardckpt.format import datafile
from shardckpt.storage import Storage, as_url, open_storage

log = logging.getLogger("shardckpt")

HF_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"
_SAFETENSORS_METADATA = {"format": "pt"}  # what transformers expects in __metadata__
_HF_SHARD = re.compile(r"^model-[0-9]{5}-of-[0-9]{5}\.safetensors$")
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5 * 10**9, ``"512MiB"`` -> 512 * 2**20, ``1000`` -> 1000 (as transformers reads sizes)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional unit such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "b").lower()
    scale = 1 if unit == "b" else (1024 if "i" in unit else 1000) ** ("kmgt".index(unit[0]) + 1)
    return int(float(m.group(1)) * scale)


# ---------------------------------------------------------------- safetensors


def export_safetensors(
    source: CheckpointSource,
    out: str | os.PathLike[str],
    selection: Selection,
    *,
    overwrite: bool = False,
    progress: bool = False,
    tied: Mapping[str, str] | None = None,
) -> ExportReport:
    """Write the selected tensors to the single safetensors file ``out``, streamed.

    ``tied``: see :func:`drop_tied`; the dropped names are left out of the file."""
    storage, name = parent_and_name(out)
    refuse_existing(storage, [name], overwrite)
    items, skipped = selected_tensors(source, selection)
    items, dropped = drop_tied(source, selection, items, tied or {})
    if overwrite:
        storage.delete([name])  # storage creates files exclusively: never writes into an existing one
    with progress_bar(progress, source, items, selection) as bar:
        _write_safetensors(source, selection, storage, name, items, bar.update)
    return build_report("safetensors", [file_url(storage, name)], source, selection, items, skipped, dropped)


def export_hf(
    source: CheckpointSource,
    out_dir: str | os.PathLike[str],
    selection: Selection,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = False,
    tied: Mapping[str, str] | None = None,
) -> ExportReport:
    """Write the Hugging Face sharded layout into the folder ``out_dir``.

    ``model-0000k-of-0000n.safetensors`` files hold at most ``max_shard_bytes`` of tensor
    data each (a single larger tensor gets a shard of its own, as in transformers), in
    natural key order so that a layer's tensors stay together; ``model.safetensors.index.json``
    (``metadata.total_size`` and ``weight_map``) is written last and commits the folder.

    ``tied``: ``{target: source}`` output names that are one tensor in the model (see
    :func:`drop_tied`); each target is written once, as its source, and the index does
    not list it, as transformers' ``save_pretrained`` writes it; ``from_pretrained`` ties
    it back.
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    storage = open_storage(as_url(out_dir, "output folder"))
    existing = (
        [n for n in storage.list_files("") if n == HF_INDEX_NAME or _HF_SHARD.match(n)] if storage.is_dir() else []
    )
    refuse_existing(storage, existing, overwrite)
    items, skipped = selected_tensors(source, selection)
    items, dropped = drop_tied(source, selection, items, tied or {})  # may refuse: before anything is touched
    storage.delete([HF_INDEX_NAME])  # uncommit before any shard is replaced
    shards = plan_shards([(n, out_bytes(source, selection, k)) for n, k in items], max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    by_name = dict(items)
    storage.delete([n for n in existing if n in names])  # rewritten below; storage creates files exclusively
    with progress_bar(progress, source, items, selection) as bar:
        for file_name, shard in zip(names, shards, strict=True):
            _write_safetensors(source, selection, storage, file_name, [(n, by_name[n]) for n in shard], bar.update)
    weight_map = {n: f for f, shard in zip(names, shards, strict=True) for n in shard}
    total = sum(out_bytes(source, selection, k) for _, k in items)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    storage.write_atomic(HF_INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    storage.delete([n for n in existing if n not in names and n != HF_INDEX_NAME])
    files = [file_url(storage, n) for n in [*names, HF_INDEX_NAME]]
    return build_report("hf", files, source, selection, items, skipped, dropped)


def drop_tied(
    source: CheckpointSource, selection: Selection, items: list[tuple[str, str]], tied: Mapping[str, str]
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``items`` (output name, key) without the declared tied targets, and ``{target: source}`` dropped.

    A target is dropped only when its source is exported too and both have the same
    saved dtype, shape and bytes (read and compared here, one pair at a time); a declared
    tie whose tensors differ is refused, because dropping either would lose a trained
    weight. Equal tensors that are not declared are all written (see
    :mod:`shardckpt.convert.ties` for why equality alone is not a tie). A declared
    target that is not exported is ignored; when no declared name at all is among the
    exported ones (names kept a prefix, say), a warning says so, since the ties then
    change nothing.
    """
    tied = check_tied(tied)
    by_name = dict(items)
    if tied and not (set(tied) | set(tied.values())) & set(by_name):
        example = min(by_name, default="(none)")
        log.warning(
            "%s: none of the %d declared tied name(s) (e.g. %r) is among the exported tensors (e.g. %r), so "
            "nothing is dropped; check the names (--strip-prefix) or leave tied out",
            source.path,
            len(tied),
            min(tied),
            example,
        )
    dropped: dict[str, str] = {}
    for target, kept in sorted(tied.items()):
        if target not in by_name:
            continue
        if kept not in by_name:
            raise ShardckptError(
                f"{source.path}: {target!r} is declared tied to {kept!r}, which is not among the exported tensors "
                f"(key {by_name[target]!r} is); export {kept!r} too (--keys) or leave the pair out of tied"
            )
        a, b = source.read_tensor(by_name[target]), source.read_tensor(by_name[kept])
        if not tensors_are_tied(a, b):
            raise ShardckptError(
                f"{source.path}: {target!r} is declared tied to {kept!r} but they differ: "
                f"{describe_difference(target, a, kept, b)} (keys {by_name[target]!r}, {by_name[kept]!r}). "
                "The model was trained with them untied; dropping one would lose a trained weight. Leave the "
                "pair out of tied (CLI: --tied), and for Hugging Face set tie_word_embeddings=false in config.json"
            )
        dropped[target] = kept
        del a, b
    return [(n, k) for n, k in items if n not in dropped], dropped


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split (name, bytes) into shards of at most ``max_shard_bytes``, greedily, in natural name order."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, n in sorted(sizes, key=lambda s: _natural(s[0])):
        if shards[-1] and filled + n > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += n
    return shards


def _natural(name: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"([0-9]+)", name)]


def _write_safetensors(
    source: CheckpointSource,
    selection: Selection,
    storage: Storage,
    file_name: str,
    items: list[tuple[str, str]],
    advance: Callable[[int], Any],
) -> None:
    """Header first, then one tensor at a time: assemble (verified), cast, write, drop.

    Tensors are laid out by decreasing element size, then name (as safetensors'
    ``save_file`` does), so every tensor starts aligned to its element size.
    """
    ordered = sorted(items, key=lambda it: (-selection.out_dtype(source.dtype(it[1])).itemsize, it[0]))
    entries, begin = [], 0
    for name, key in ordered:
        if name == "__metadata__":
            raise ShardckptError(
                f"key {key!r}: a safetensors tensor cannot be named '__metadata__'; strip or rename it"
            )
        dtype = selection.out_dtype(source.dtype(key))
        shape = source.manifest.tensors[key].shape
        end = begin + math.prod(shape) * dtype.itemsize
        entries.append(datafile.HeaderEntry(name, datafile.dtype_name(dtype, key=key), shape, begin, end))
        begin = end
    stream = storage.open_write(file_name)
    try:
        stream.write(datafile.build_header(entries, _SAFETENSORS_METADATA))
        for _name, key in ordered:
            tensor = selection.cast(source.read_tensor(key))
            if tensor.numel():
                stream.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
            advance(tensor.numel() * tensor.dtype.itemsize)
            del tensor
        stream.finish()
    except BaseException:
        stream.abort()
        raise
