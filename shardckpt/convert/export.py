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
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from shardckpt.convert.progress import byte_bar, human_bytes
from shardckpt.convert.source import CheckpointSource, Selection, strip_path
from shardckpt.convert.ties import check_tied, describe_difference, tensors_are_tied
from shardckpt.engine.state import nest
from shardckpt.errors import ShardckptError
from shardckpt.format import datafile
from shardckpt.storage import Storage, as_url, open_storage

log = logging.getLogger("shardckpt")

HF_INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"
_SAFETENSORS_METADATA = {"format": "pt"}  # what transformers expects in __metadata__
_HF_SHARD = re.compile(r"^model-[0-9]{5}-of-[0-9]{5}\.safetensors$")
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


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
    storage, name = _parent_and_name(out)
    _refuse_existing(storage, [name], overwrite)
    items, skipped = _tensor_items(source, selection)
    items, dropped = drop_tied(source, selection, items, tied or {})
    if overwrite:
        storage.delete([name])  # storage creates files exclusively: never writes into an existing one
    with _bar(progress, source, items, selection) as bar:
        _write_safetensors(source, selection, storage, name, items, bar.update)
    return _report("safetensors", [_url(storage, name)], source, selection, items, skipped, dropped)


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
    _refuse_existing(storage, existing, overwrite)
    items, skipped = _tensor_items(source, selection)
    items, dropped = drop_tied(source, selection, items, tied or {})  # may refuse: before anything is touched
    storage.delete([HF_INDEX_NAME])  # uncommit before any shard is replaced
    shards = plan_shards([(n, _out_bytes(source, selection, k)) for n, k in items], max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    by_name = dict(items)
    storage.delete([n for n in existing if n in names])  # rewritten below; storage creates files exclusively
    with _bar(progress, source, items, selection) as bar:
        for file_name, shard in zip(names, shards, strict=True):
            _write_safetensors(source, selection, storage, file_name, [(n, by_name[n]) for n in shard], bar.update)
    weight_map = {n: f for f, shard in zip(names, shards, strict=True) for n in shard}
    total = sum(_out_bytes(source, selection, k) for _, k in items)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    storage.write_atomic(HF_INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    storage.delete([n for n in existing if n not in names and n != HF_INDEX_NAME])
    files = [_url(storage, n) for n in [*names, HF_INDEX_NAME]]
    return _report("hf", files, source, selection, items, skipped, dropped)


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


# ---------------------------------------------------------------- torch.save


def read_state_dict(
    source: CheckpointSource, selection: Selection, *, flat: bool = False, progress: bool = False
) -> dict[str, Any]:
    """Every selected tensor and value, in memory: nested as saved (from the manifest's
    ``paths``, with ``selection.strip_prefix`` removed), or ``flat`` by dotted key."""
    names = source.select(selection)
    tensor_items = [(n, k) for n, k in names.items() if k in source.manifest.tensors]
    leaves = []
    with _bar(progress, source, tensor_items, selection) as bar:
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
    storage, name = _parent_and_name(out)
    _refuse_existing(storage, [name], overwrite)
    tensor_items, _ = _tensor_items(source, selection, allow_empty=True)
    needed = sum(_out_bytes(source, selection, k) for _, k in tensor_items)
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
    return _report("torch", [_url(storage, name)], source, selection, tensor_items, [])


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


# ---------------------------------------------------------------- shared


def _tensor_items(
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


def _out_bytes(source: CheckpointSource, selection: Selection, key: str) -> int:
    return math.prod(source.manifest.tensors[key].shape) * selection.out_dtype(source.dtype(key)).itemsize


def _report(
    fmt: str,
    files: list[str],
    source: CheckpointSource,
    selection: Selection,
    items: list[tuple[str, str]],
    skipped: list[str],
    dropped_tied: dict[str, str] | None = None,
) -> ExportReport:
    sizes = [_out_bytes(source, selection, k) for _, k in items]
    return ExportReport(fmt, files, len(items), sum(sizes), max(sizes, default=0), skipped, dropped_tied or {})


def _bar(progress: bool, source: CheckpointSource, items: list[tuple[str, str]], selection: Selection) -> Any:
    total = sum(_out_bytes(source, selection, k) for _, k in items)
    return byte_bar(total, "export", enabled=progress)


def _parent_and_name(out: str | os.PathLike[str]) -> tuple[Storage, str]:
    out = as_url(out, "output path")
    parent, _, name = out.rstrip("/").rpartition("/")
    if not name:
        raise ValueError(f"output {out!r} must name a file")
    if not parent:
        parent = "/" if out.startswith("/") else "."
    return open_storage(parent), name


def _refuse_existing(storage: Storage, names: list[str], overwrite: bool) -> None:
    there = [n for n in names if storage.exists(n)]
    if there and not overwrite:
        raise FileExistsError(
            f"{storage.url}: {', '.join(there[:5])} already exist(s); choose another output "
            "or pass overwrite=True (CLI: --overwrite)"
        )


def _url(storage: Storage, name: str) -> str:
    return f"{storage.url.rstrip('/')}/{name}"
