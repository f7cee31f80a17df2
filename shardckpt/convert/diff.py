"""Compare two checkpoints key by key, reading tensors piece by piece: ``shardckpt diff A B``.

Keys only in B are *added*, keys only in A *removed*. A key in both is *changed* when
its kind (tensor or value) differs, when a tensor's dtype or shape differs, when a
tensor's largest element-wise ``|a - b|`` exceeds ``atol`` (NaN where the other side
is not NaN counts as a difference; NaN against NaN does not), or when a value's JSON
differs. Tensors are compared in boxes of about ``piece_bytes`` along dim 0, whatever
world sizes saved A and B, so memory stays bounded by a few pieces. Every byte read is
verified against its checkpoint's checksums. Not collective; call from one process.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from shardckpt.convert.progress import byte_bar
from shardckpt.convert.source import CheckpointSource, Selection, row_pieces
from shardckpt.storage import as_url

DEFAULT_PIECE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class TensorComparison:
    """One tensor present in both checkpoints. ``max_abs_diff`` is None when the shapes
    differ (nothing to compare element-wise), NaN when NaNs do not line up."""

    key: str
    dtype: tuple[str, str]
    shape: tuple[list[int], list[int]]
    max_abs_diff: float | None
    bitwise_equal: bool
    changed: bool

    def to_json(self) -> dict[str, Any]:
        d = self.max_abs_diff
        return {
            "key": self.key,
            "dtype": list(self.dtype),
            "shape": list(self.shape),
            "bitwise_equal": self.bitwise_equal,
            "max_abs_diff": d if d is None or math.isfinite(d) else str(d),
            "changed": self.changed,
        }


@dataclass(frozen=True)
class DiffReport:
    a: str
    b: str
    atol: float
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    tensors: list[TensorComparison] = field(default_factory=list)
    changed_values: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (A's JSON, B's JSON)
    kind_changed: list[str] = field(default_factory=list)
    values_compared: int = 0

    @property
    def changed(self) -> list[str]:
        return sorted([t.key for t in self.tensors if t.changed] + list(self.changed_values) + self.kind_changed)

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "atol": self.atol,
            "identical": self.identical,
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "kind_changed": self.kind_changed,
            "tensors": [t.to_json() for t in self.tensors],
            "values": {k: {"a": va, "b": vb} for k, (va, vb) in sorted(self.changed_values.items())},
            "values_compared": self.values_compared,
        }


def diff_checkpoints(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    atol: float = 0.0,
    keys: tuple[str, ...] = (),
    piece_bytes: int = DEFAULT_PIECE_BYTES,
    verify: bool = True,
    progress: bool = False,
) -> DiffReport:
    """Compare the checkpoints at ``a`` and ``b`` (keys matching ``keys`` patterns, or all)."""
    a, b = as_url(a, "checkpoint A"), as_url(b, "checkpoint B")
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    sa, sb = CheckpointSource(a, verify=verify), CheckpointSource(b, verify=verify)
    take = Selection(keys=keys).takes
    ka = {k for k in (*sa.manifest.tensors, *sa.manifest.values) if take(k)}
    kb = {k for k in (*sb.manifest.tensors, *sb.manifest.values) if take(k)}
    both_tensors = sorted(k for k in ka & kb if k in sa.manifest.tensors and k in sb.manifest.tensors)
    both_values = sorted(k for k in ka & kb if k in sa.manifest.values and k in sb.manifest.values)
    kind_changed = sorted(ka & kb - set(both_tensors) - set(both_values))
    total = sum(sa.nbytes(k) for k in both_tensors)
    with byte_bar(total, "diff", enabled=progress) as bar:
        tensors = [_compare_tensor(sa, sb, k, atol, piece_bytes, bar) for k in both_tensors]
    changed_values = {
        k: (sa.manifest.values[k], sb.manifest.values[k])
        for k in both_values
        if _canonical(sa.manifest.values[k]) != _canonical(sb.manifest.values[k])
    }
    return DiffReport(
        a, b, atol, sorted(kb - ka), sorted(ka - kb), tensors, changed_values, kind_changed, len(both_values)
    )


def _canonical(encoded: Any) -> str:
    # The encoded JSON tells 1 from 1.0 and a tuple from a list, and NaN equals NaN.
    return json.dumps(encoded, sort_keys=True, allow_nan=False)


def _compare_tensor(
    sa: CheckpointSource, sb: CheckpointSource, key: str, atol: float, piece_bytes: int, bar: Any
) -> TensorComparison:
    ra, rb = sa.manifest.tensors[key], sb.manifest.tensors[key]
    dtype, shape = (ra.dtype, rb.dtype), (list(ra.shape), list(rb.shape))
    if ra.shape != rb.shape:
        bar.update(sa.nbytes(key))
        return TensorComparison(key, dtype, shape, None, False, True)
    same_dtype = ra.dtype == rb.dtype
    bitwise, worst = same_dtype, 0.0
    itemsize = max(sa.dtype(key).itemsize, sb.dtype(key).itemsize)
    for offsets, sizes in row_pieces(ra.shape, itemsize, piece_bytes):
        pa, pb = sa.read_box(key, offsets, sizes), sb.read_box(key, offsets, sizes)
        piece_equal = same_dtype and torch.equal(pa.reshape(-1).view(torch.uint8), pb.reshape(-1).view(torch.uint8))
        bitwise = bitwise and piece_equal
        if not piece_equal:
            d = max_abs_diff(pa, pb)
            worst = d if math.isnan(d) or math.isnan(worst) else max(worst, d)
        bar.update(pa.numel() * pa.element_size())
    changed = not same_dtype or not (bitwise or worst <= atol)
    return TensorComparison(key, dtype, shape, worst, bitwise, changed)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; equal values (NaN with NaN, inf with inf) count as 0."""
    if a.numel() == 0:
        return 0.0
    x, y = a.to(torch.float64), b.to(torch.float64)
    same = (x == y) | (torch.isnan(x) & torch.isnan(y))
    return float(torch.where(same, 0.0, (x - y).abs()).max())
