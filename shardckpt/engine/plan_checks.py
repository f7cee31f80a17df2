"""The coordinator's checks of a save's global plan, before any byte is written: values
and tensor shapes agree across ranks, the manifest stays within what readers accept, each
data-file header entry fits, and every tensor's chunks tile it exactly.

Called by :class:`shardckpt.engine.planner.SavePlanner` (local and global planning) and,
for a reused plan, by its ``adopt_global_plan``; every refusal is an UnsupportedValueError
naming the key.
"""

from __future__ import annotations

import array
import json
import math
from collections import defaultdict
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, WriteItem

from shardckpt.engine.rule_table import compress_table
from shardckpt.errors import ManifestError, UnsupportedValueError
from shardckpt.format import datafile, manifest
from shardckpt.format.overlap import first_overlap

ValueSummary = tuple[dict[str, str], dict[str, int]]
"""One rank's values: each value's digest and the length of its JSON, by key."""


def value_summary(plan: SavePlan) -> ValueSummary:
    """The digests and JSON sizes of a local plan's values (what :func:`check_values` needs)."""
    return dict(plan.planner_data.value_digests), dict(plan.planner_data.value_bytes)


def manifest_key_bytes(all_plans: list[SavePlan]) -> int:
    """What the keys of every rank's items take in a manifest at least: each key twice
    (in ``tensors``/``values`` and in ``paths``), as JSON strings. O(all items): counted
    when a global plan is made, not on a save that reuses it (the keys, and so this
    count, change only with the layout that :func:`~shardckpt.engine.planner.layout_fingerprint` covers)."""
    keys: set[str] = set()
    for plan in all_plans:
        keys.update(it.index.fqn for it in plan.items)
    return sum(2 * len(json.dumps(k)) for k in keys)


def check_values(values: list[ValueSummary], key_bytes: int) -> None:
    """The global checks that depend on the values (``values``: each rank's
    :func:`value_summary`): equal on every rank holding one, and a manifest within bounds
    with the keys' ``key_bytes`` (:func:`manifest_key_bytes`); UnsupportedValueError
    naming the key otherwise. O(ranks x values), whatever the number of tensors."""
    _check_values_agree([digests for digests, _ in values])
    _check_manifest_size([sizes for _, sizes in values], key_bytes)


# An upper bound, per key character and per dimension, on the bytes of a header entry: a
# character escapes to at most 12 (a surrogate pair), a dimension adds an offset and a size
# of at most 19 digits and the end offset's digits (up to ~19 more, the product of the sizes);
# the "+ 1" term covers the fixed part (dtype, data_offsets, "__metadata__", padding).
# tests/unit/test_planner.py checks it against the worst entries.
_HEADER_ENTRY_BOUND = 256


def _check_header_entry(item: WriteItem) -> None:
    """Refuse a tensor whose entry alone would make a data-file header larger than
    readers accept (``datafile.MAX_HEADER_BYTES``; safetensors has the same limit).

    The entry is measured with ``datafile.build_header`` under its longest possible name
    (``key@offsets``). Only a key of about that length can do this. The sum over a
    file's entries depends on how the writer splits the rank's items into files, which
    is not known here, so it is not checked at planning time.
    """
    assert item.tensor_data is not None
    sizes = tuple(item.tensor_data.chunk.sizes)
    if _HEADER_ENTRY_BOUND * (len(item.index.fqn) + 1 + len(sizes)) <= datafile.MAX_HEADER_BYTES:
        return  # even at its longest the entry fits; spares a header per item (#18)
    offsets = ",".join(map(str, item.index.offset or ()))
    dtype = datafile.dtype_name(item.tensor_data.properties.dtype, key=item.index.fqn)
    end = math.prod(sizes) * datafile.itemsize(dtype)
    entry = datafile.HeaderEntry(f"{item.index.fqn}@{offsets}", dtype, sizes, 0, end)
    length = len(datafile.build_header([entry], {})) - datafile.HEADER_LEN_BYTES
    if length > datafile.MAX_HEADER_BYTES:
        fqn = item.index.fqn
        shown = repr(fqn) if len(fqn) <= 80 else f"{fqn[:80]!r} (and {len(fqn) - 80} more characters)"
        raise UnsupportedValueError(
            f"key {shown}: its entry in a safetensors data-file header takes {length} bytes; a header may hold at most "
            f"{datafile.MAX_HEADER_BYTES} bytes (readers and safetensors refuse larger ones). Use a shorter key."
        )


def _check_manifest_size(value_bytes_by_rank: list[dict[str, int]], key_bytes: int) -> None:
    """Refuse a save whose manifest would exceed what readers accept
    (``manifest.MAX_MANIFEST_BYTES``), counting only what is known at planning time:
    the values' JSON (stored inline) and every key (``key_bytes``). A lower bound: chunk
    records and checksums come on top."""
    value_bytes: dict[str, int] = {}
    for sizes in value_bytes_by_rank:
        value_bytes.update(sizes)
    total = sum(value_bytes.values()) + key_bytes
    if total > manifest.MAX_MANIFEST_BYTES:
        largest = sorted(value_bytes.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        shown = f" (largest values: {', '.join(f'{k!r}: {n} bytes' for k, n in largest)})" if largest else ""
        raise UnsupportedValueError(
            f"the manifest would take at least {total} bytes{shown}; readers refuse "
            f"manifests above {manifest.MAX_MANIFEST_BYTES} bytes. Non-tensor values are stored inline "
            "as JSON: save large data as tensors instead (e.g. torch.tensor(list))."
        )


def _check_values_agree(digests_by_rank: list[dict[str, str]]) -> None:
    """Non-tensor values are saved once for all ranks; refuse to silently keep one rank's."""
    per_rank = [[(fqn, d) for fqn, d in digests.items()] for digests in digests_by_rank]
    for fqn, variants in _disagreements(per_rank):
        groups = "; ".join(f"ranks {ranks}" for ranks in variants.values())
        raise UnsupportedValueError(
            f"key {fqn!r}: non-tensor value differs across ranks ({groups} hold different values). "
            "Non-tensor values are saved once for the whole job. Save per-rank values under "
            "rank-specific keys (e.g. f'rng.rank{rank}') or make them equal on every rank."
        )


def _check_tensors_agree(all_plans: list[SavePlan]) -> None:
    """Every rank holding a key must agree on its global shape and dtype. A plain tensor
    on several ranks is taken as replicated and written by one of them, so a rank whose
    copy differs would otherwise be dropped without a word. One pass comparing each item
    with the key's first; the ranks of each variant are gathered only to refuse."""
    first: dict[str, tuple[Any, Any]] = {}
    for plan in all_plans:
        for it in plan.items:
            data = it.tensor_data
            if data is not None:
                variant = (data.size, data.properties.dtype)
                if first.setdefault(it.index.fqn, variant) != variant:
                    _refuse_disagreeing_tensors(all_plans)
                    return


def _refuse_disagreeing_tensors(all_plans: list[SavePlan]) -> None:
    """UnsupportedValueError naming the first key whose ranks disagree on its shape or
    dtype, with the ranks holding each variant (none: returns)."""
    per_rank = [
        [
            (it.index.fqn, (tuple(it.tensor_data.size), str(it.tensor_data.properties.dtype).removeprefix("torch.")))
            for it in plan.items
            if it.tensor_data is not None
        ]
        for plan in all_plans
    ]
    for fqn, variants in _disagreements(per_rank):
        groups = "; ".join(
            f"ranks {ranks} hold shape {list(shape)} {dtype}" for (shape, dtype), ranks in variants.items()
        )
        raise UnsupportedValueError(
            f"key {fqn!r}: the tensor differs in shape or dtype across ranks ({groups}). A plain tensor "
            "present on several ranks is saved once, as a replicated tensor. Make it equal on every "
            "rank, save per-rank tensors under rank-specific keys, or make it a DTensor."
        )


def _disagreements(per_rank: list[list[tuple[str, Any]]]) -> list[tuple[str, dict[Any, list[int]]]]:
    """Keys (sorted) for which ranks report more than one variant, with the ranks of each."""
    seen: dict[str, dict[Any, list[int]]] = defaultdict(lambda: defaultdict(list))
    for rank, pairs in enumerate(per_rank):
        for fqn, variant in pairs:
            ranks = seen[fqn][variant]
            if not ranks or ranks[-1] != rank:
                ranks.append(rank)
    return [(fqn, variants) for fqn, variants in sorted(seen.items()) if len(variants) > 1]


def _check_tiling(metadata: Metadata) -> None:
    """Every tensor's chunks lie inside it, do not overlap and cover it exactly.

    Proven for all tensors at once (:func:`_regular_tilings`) where the chunks are the
    cells of a block grid, each once (every DTensor layout); the others are checked box by
    box (:func:`_check_tensor_tiling`), which also words every refusal."""
    tensors = [
        (fqn, md)
        for fqn, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata) and len(md.size) > 0
    ]
    for (fqn, md), proven in zip(tensors, _regular_tilings([md for _, md in tensors]), strict=True):
        if not proven:
            _check_tensor_tiling(fqn, md)


_MAX_TABLE_COORDINATE = 2**62  # above it, offset + size could wrap in int64: left to the box-by-box check


def _regular_tilings(tensors: list[TensorStorageMetadata]) -> list[bool]:
    """Per tensor: True if its chunks provably tile it, False if not proven here. Proven:
    every chunk has the tensor's dimensions and lies inside it, and the non-empty chunks
    are the cells of one block grid, each exactly once (the test of a format-3 rule,
    :func:`shardckpt.engine.rule_table.compress_table`, run for every tensor in one set of
    vector operations). O(chunks), with one short Python step per chunk."""
    if not tensors:
        return []
    dims = max(len(md.size) for md in tensors)
    width = 2 + 2 * dims  # compress_table's columns: file, byte offset (both 0 here), offsets, sizes
    rows = array.array("q")
    counts: list[int] = []
    try:
        for md in tensors:
            d, start = len(md.size), len(rows)
            zeros, ones = (0,) * (dims - d), (1,) * (dims - d)
            for c in md.chunks:
                if len(c.offsets) != d or len(c.sizes) != d:
                    del rows[start:]  # not proven: left to the box-by-box check
                    break
                rows.extend((0, 0, *c.offsets, *zeros, *c.sizes, *ones))
            counts.append((len(rows) - start) // width)
        shape = torch.tensor([[*md.size, *(1,) * (dims - len(md.size))] for md in tensors], dtype=torch.int64)
    except (OverflowError, RuntimeError):  # a coordinate beyond int64
        return [False] * len(tensors)
    table = (
        torch.frombuffer(rows, dtype=torch.int64).view(-1, width)
        if rows
        else torch.zeros((0, width), dtype=torch.int64)
    )
    if any(bool((t >= _MAX_TABLE_COORDINATE).any() or (t <= -_MAX_TABLE_COORDINATE).any()) for t in (table, shape)):
        return [False] * len(tensors)
    tid = torch.repeat_interleave(torch.arange(len(tensors)), torch.tensor(counts, dtype=torch.int64))
    offsets, sizes = table[:, 2 : 2 + dims], table[:, 2 + dims :]
    inside = ((offsets >= 0) & (sizes >= 0) & (offsets + sizes <= shape[tid])).all(dim=1)
    outside = torch.bincount(tid[~inside], minlength=len(tensors)).tolist()
    grids = compress_table([tuple(md.size) for md in tensors], tid, table).rules
    return [
        n == len(md.chunks) and not out and grid is not None
        for md, n, out, grid in zip(tensors, counts, outside, grids, strict=True)
    ]


def _check_tensor_tiling(fqn: str, md: TensorStorageMetadata) -> None:
    """:func:`_check_tiling` of one tensor, box by box: refuses naming the first chunk out
    of bounds, the first overlapping pair or the elements missing."""
    boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks]
    for off, size in boxes:
        if (
            len(off) != len(md.size)
            or len(size) != len(md.size)
            or any(o < 0 or n < 0 or o + n > dim for o, n, dim in zip(off, size, md.size, strict=True))
        ):
            raise UnsupportedValueError(
                f"key {fqn!r}: a shard at offsets {list(off)} with sizes {list(size)} lies outside the "
                f"tensor's global shape {list(md.size)}; the DTensor's placements do not match its shape"
            )
    try:
        pair = first_overlap(boxes)
    except ManifestError as e:  # a layout too irregular for the reader's overlap check
        raise UnsupportedValueError(
            f"key {fqn!r}: the load side would refuse this tensor's shard layout ({e})"
        ) from None
    covered = sum(math.prod(size) for _, size in boxes)
    if pair is not None or covered != math.prod(md.size):
        what = (
            f"shards at {list(boxes[pair[0]][0])} and {list(boxes[pair[1]][0])} overlap"
            if pair
            else f"the shards hold {covered} elements, the tensor {math.prod(md.size)}"
        )
        raise UnsupportedValueError(
            f"key {fqn!r}: the ranks' shards do not tile the global shape {list(md.size)} ({what}). "
            "Every element must be saved by exactly one shard: check the DTensor placements on every rank."
        )
