"""Reading a committed checkpoint with no process group: boxes, whole tensors, values.

This is the read side of export, diff and the Lightning plugin. It reads chunk bytes
straight from the data files where the manifest says they are, verifies every byte
against the block hashes recorded at save time, and assembles global tensors from
whatever chunks any world size saved. It never calls DCP and never unpickles.

:class:`CheckpointSource` is not collective and not thread-safe; call it from one
thread of one process. :class:`Selection` says which keys leave a checkpoint, under
which names and in which dtype.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shardckpt.engine.boxes import BoxReader
from shardckpt.engine.load_v3 import RuleChunks
from shardckpt.engine.loading import read_any_manifest
from shardckpt.errors import ShardckptError
from shardckpt.format import datafile
from shardckpt.format.manifest import ChunkRecord, Manifest
from shardckpt.format.manifest_v3 import ManifestV3, Tensor
from shardckpt.format.values import decode_value
from shardckpt.storage import as_url, open_storage

_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "f64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"``, ``"float16"``, ``torch.bfloat16``, ... -> a floating torch dtype."""
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        key = name.lower().removeprefix("torch.")
        if key not in _DTYPE_ALIASES:
            raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(_DTYPE_ALIASES))}")
        dtype = _DTYPE_ALIASES[key]
    if not dtype.is_floating_point:
        raise ValueError(f"cast dtype must be floating point (casts apply to floating tensors only), got {dtype}")
    return dtype


@dataclass(frozen=True)
class Selection:
    """Which keys to take out of a checkpoint, how to name them, which dtype to give them.

    ``keys``: shell-style patterns (``fnmatch``, case-sensitive); a key is taken when it
    matches any of them. A pattern without ``*?[`` is a prefix of whole components:
    ``"model"`` takes ``model`` and every ``model.*`` key. Empty: every key.
    ``strip_prefix``: removed from the start of every taken key that has it (``"model."``).
    ``dtype``: floating tensors are cast to it; integer and bool tensors are kept as saved.
    """

    keys: tuple[str, ...] = ()
    strip_prefix: str = ""
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if isinstance(self.keys, str):
            raise TypeError("Selection.keys is a tuple of patterns, not one str; write keys=(pattern,)")
        if self.dtype is not None:
            parse_dtype(self.dtype)

    def takes(self, key: str) -> bool:
        return not self.keys or any(_matches(key, p) for p in self.keys)

    def rename(self, key: str) -> str:
        return key[len(self.strip_prefix) :] if self.strip_prefix and key.startswith(self.strip_prefix) else key

    def out_dtype(self, saved: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None and saved.is_floating_point else saved

    def cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.out_dtype(tensor.dtype))


def _matches(key: str, pattern: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(key, pattern)
    return key == pattern or key.startswith(pattern.rstrip(".") + ".")


class CheckpointSource:
    """A committed checkpoint opened for reading without a process group.

    ``verify``: check every byte read against the manifest's block hashes (raises
    IntegrityError naming the file, key and block). Reads go through
    :mod:`shardckpt.storage`, so any URL ``shardckpt.load`` accepts works here.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None, verify: bool = True
    ) -> None:
        path = as_url(path)
        self.path = path
        self.storage = open_storage(path, storage_options)
        self.manifest: Manifest | ManifestV3 = read_any_manifest(self.storage)
        self.verify = verify
        # format 3: each chunk's file and block hashes come from its index record, fetched on first use
        self._rules = (
            RuleChunks(self.storage, self.manifest, verify=verify, where=path)
            if isinstance(self.manifest, ManifestV3)
            else None
        )
        self._boxes = (
            self._rules.boxes
            if self._rules is not None
            else BoxReader(self.storage, self.manifest, verify=verify, where=path)
        )

    # ------------------------------------------------------------ what is there

    def dtype(self, key: str) -> torch.dtype:
        return datafile.torch_dtype(self.manifest.tensors[key].dtype, where=key)

    def nbytes(self, key: str) -> int:
        rec = self.manifest.tensors[key]
        return math.prod(rec.shape) * datafile.itemsize(rec.dtype)  # the chunks tile the tensor

    def value(self, key: str) -> Any:
        return decode_value(self.manifest.values[key], where=f"{self.path}, values[{key!r}]")

    def path_of(self, key: str) -> list[str | int]:
        """Where ``key`` sat in the saved nested state_dict (manifest ``paths``)."""
        return list(self.manifest.paths.get(key) or [key])

    def select(self, selection: Selection) -> dict[str, str]:
        """Output name -> saved key for every key ``selection`` takes, sorted by output name.

        Raises ValueError when nothing matches or two keys end up with the same name.
        """
        saved = sorted({*self.manifest.tensors, *self.manifest.values})
        chosen: dict[str, str] = {}
        for key in saved:
            if not selection.takes(key):
                continue
            name = selection.rename(key)
            if not name or name in chosen:
                other = chosen.get(name, "(nothing)")
                raise ValueError(
                    f"{self.path}: stripping {selection.strip_prefix!r} maps {other!r} and {key!r} to the same "
                    f"name {name!r}; select fewer keys (--keys) or strip a different prefix"
                )
            chosen[name] = key
        if not chosen:
            shown = ", ".join(repr(k) for k in saved[:10]) + (" ..." if len(saved) > 10 else "")
            raise ValueError(
                f"{self.path}: no key matches {list(selection.keys)}; the checkpoint has {shown or 'no keys'}"
            )
        return dict(sorted(chosen.items()))

    # ------------------------------------------------------------ tensor bytes

    def read_tensor(self, key: str) -> torch.Tensor:
        """The whole global tensor ``key`` as one CPU tensor in its saved dtype.

        Memory: the result, plus one chunk-sized buffer while a chunk whose box is not
        contiguous in the result is copied in (chunks split along dim 0 are read straight
        into the result).
        """
        shape = self.manifest.tensors[key].shape
        return self.read_box(key, (0,) * len(shape), shape)

    def read_box(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """The box ``[offsets, offsets + sizes)`` of the global tensor ``key``."""
        rec = self.manifest.tensors[key]
        if (
            len(offsets) != len(rec.shape)
            or len(sizes) != len(rec.shape)
            or any(o + s > d for o, s, d in zip(offsets, sizes, rec.shape, strict=True))
        ):
            raise ValueError(f"key {key!r}: box {list(offsets)}+{list(sizes)} lies outside shape {list(rec.shape)}")
        out = torch.empty(tuple(sizes), dtype=self.dtype(key))
        if out.numel() == 0:
            return out
        for chunk in self._chunks(key, tuple(offsets), tuple(sizes)):
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets, strict=True)]
            hi = [min(o + s, c + n) for o, s, c, n in zip(offsets, sizes, chunk.offsets, chunk.sizes, strict=True)]
            if all(a < b for a, b in zip(lo, hi, strict=True)):
                dest = out[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, offsets, strict=True))]
                self._copy_from_chunk(key, chunk, [a - c for a, c in zip(lo, chunk.offsets, strict=True)], dest)
        return out

    def _chunks(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> Iterable[ChunkRecord]:
        """The chunks of ``key`` (those a format-3 rule places over the box, resolved through
        their index records; every listed chunk of formats 1 and 2)."""
        if self._rules is None:
            assert isinstance(self.manifest, Manifest)
            return self.manifest.tensors[key].chunks
        rec = self.manifest.tensors[key]
        assert isinstance(rec, Tensor)
        return [self._rules.chunk(key, c.offsets) for c in rec.chunks_for_box(offsets, sizes)]

    def _copy_from_chunk(self, key: str, chunk: ChunkRecord, start: list[int], dest: torch.Tensor) -> None:
        """Fill ``dest`` from the part of ``chunk`` that begins at ``start`` (chunk coordinates)."""
        self._boxes.check_file_sizes([chunk.file])
        self._boxes.read_box(key, chunk, start, dest)


def row_pieces(
    shape: Sequence[int], itemsize: int, piece_bytes: int
) -> Iterable[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Boxes (offsets, sizes) that tile ``shape`` along dim 0, each about ``piece_bytes``."""
    if not shape:
        yield (), ()
        return
    row_bytes = max(1, math.prod(shape[1:]) * itemsize)
    rows = max(1, piece_bytes // row_bytes)
    for r in range(0, shape[0], rows):
        yield (r, *([0] * (len(shape) - 1))), (min(rows, shape[0] - r), *shape[1:])


def strip_path(path: Sequence[str | int], prefix: str) -> list[str | int]:
    """``path`` with ``prefix`` removed from the front of the key it spells (``".".join``).

    ``["model", "w"]`` and ``["model.w"]`` both become ``["w"]`` for ``"model."``. The
    caller has checked that the flat key starts with ``prefix``.
    """
    pos = 0
    for i, part in enumerate(path):
        end = pos + len(str(part))
        if len(prefix) in (end, end + 1):
            return list(path[i + 1 :])
        if len(prefix) < end and isinstance(part, str):
            return [part[len(prefix) - pos :], *path[i + 1 :]]
        if len(prefix) < end:
            break
        pos = end + 1
    raise ShardckptError(
        f"cannot strip {prefix!r} from the nested key {'.'.join(map(str, path))!r}: it would cut a list index "
        "or the whole key; strip a shorter prefix"
    )
