"""DCP planner subclasses: JSON for non-tensor values, balanced dedup of replicated items.

DCP's default planners serialize non-tensor values with ``torch.save`` and read them
back with ``torch.load(weights_only=False)``; ours encode them as JSON (see
:func:`shardckpt.format.values.encode_value`) and never unpickle anything.
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import hashlib
import heapq
import io
import json
import math
from collections import ChainMap, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_global_save_plan,
)
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem, SavePlan, WriteItem, WriteItemType

from shardckpt.engine._torch_private import hook_skipped_error
from shardckpt.engine.local_items import ItemCache, local_shards, local_write_items, resolved_shards
from shardckpt.engine.rule_table import compress_table
from shardckpt.engine.staging import BoundedSource, StagedShard, item_bytes
from shardckpt.engine.state import check_savable, flattening_errors
from shardckpt.errors import ManifestError, UnsupportedValueError
from shardckpt.format import datafile, integrity, manifest
from shardckpt.format.overlap import first_overlap
from shardckpt.format.values import decode_value, encode_value


@dataclass(frozen=True)
class _LocalPlannerData:
    mappings: dict[str, Any]
    value_digests: dict[str, str]
    value_bytes: dict[str, int]  # length of each value's JSON, as the manifest will hold it


class SavePlanner(DefaultSavePlanner):
    """Encodes non-tensor values as JSON at planning time (so a bad value fails on every
    rank before any byte is written) and spreads replicated tensors evenly over ranks.

    Planning also refuses, with UnsupportedValueError naming the key, everything the
    load side would refuse (shared limits: ``datafile.MAX_NDIM``, ``datafile.check_shape``,
    ``datafile.MAX_HEADER_BYTES``, ``manifest.MAX_MANIFEST_BYTES``,
    ``values.MAX_VALUE_DEPTH``, UTF-8-encodable keys) and tensors DCP cannot write
    (sparse, nested, meta): see :func:`shardckpt.engine.state.check_savable`.

    The cross-rank checks run in ``_create_global_plan``, a private hook of DCP's
    ``DefaultSavePlanner`` (see :mod:`shardckpt.engine._torch_private`). On the coordinator,
    ``create_global_plan`` and ``finish_plan`` raise ShardckptError if DCP did not call
    it, rather than saving without the checks.
    """

    def __init__(
        self,
        *,
        mappings: dict[str, Any] | None = None,
        source: BoundedSource | None = None,
        small_replicated_to: int | None = None,
        items: ItemCache | None = None,
    ) -> None:
        """``mappings``: when the state was flattened before (async staging), the original
        key paths, so the manifest records them rather than the already-flat keys.
        ``source``: a bounded async save's tensor source (see :class:`BoundedSource`).
        ``small_replicated_to``: the rank (the coordinator, in a format-3 save) that stores
        the small replicated tensors it holds (:func:`balance_replicated`); None spreads them.
        ``items``: the DTensors' items of the last save by the same owner (a Checkpointer),
        reused where their layout did not change (see :class:`ItemCache`)."""
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True)
        self.small_replicated_to = small_replicated_to
        self._json_values: dict[str, bytes] = {}
        self._shards: dict[str, torch.Tensor] = {}  # what resolve_data gives for plain DTensors
        self._original_mappings = mappings
        self._source = source
        self._items = items
        self._global_checks_ran = False
        self.manifest_key_bytes: int | None = None  # set by the global plan (see manifest_key_bytes)

    def set_up_planner(self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False) -> None:
        with flattening_errors():
            super().set_up_planner(state_dict, storage_meta, is_coordinator)
        if self._original_mappings is not None:
            self.mappings = dict(self._original_mappings)
        self._global_checks_ran = False  # a planner may be set up for another save

    def create_local_plan(self) -> SavePlan:
        # Before DCP's planning, which fails on sparse/nested/meta tensors without naming
        # the key (and such failures would read as a dead peer).
        locals_ = local_shards(self.state_dict)
        check_savable(self.state_dict, locals_)
        # DCP's local plan, DTensors of Shard/Replicate placements computed here (#18).
        plan = SavePlan(local_write_items(self.state_dict, locals_, self.is_coordinator, self._items))
        self._shards = resolved_shards(self.state_dict, locals_)
        digests, sizes = {}, {}
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                value = self.lookup_object(item.index)
                text = json.dumps(encode_value(value, key=fqn), allow_nan=False, separators=(",", ":")).encode()
                self._json_values[fqn] = text
                digests[fqn] = integrity.hash_hex(text)
                sizes[fqn] = len(text)
            else:
                assert item.tensor_data is not None
                datafile.dtype_name(item.tensor_data.properties.dtype, key=fqn)
                _check_header_entry(item)
        plan = dataclasses.replace(plan, planner_data=_LocalPlannerData(self.mappings, digests, sizes))
        self.plan = plan
        return plan

    def _create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Any]:
        self.manifest_key_bytes = manifest_key_bytes(all_plans)
        check_values([value_summary(p) for p in all_plans], self.manifest_key_bytes)
        _check_tensors_agree(all_plans)
        plans = [dataclasses.replace(p, planner_data=p.planner_data.mappings) for p in all_plans]
        # DCP's own _create_global_plan, with our validation instead of its
        # _validate_global_plan, which compares every pair of chunks of a tensor split
        # along a dimension other than its largest (minutes at thousands of ranks). The
        # items keep the ranks' index hints: a hint is where a chunk sits in DCP's
        # .metadata, which we never write, and nothing of ours reads one (rewriting them
        # copied every item twice: half of this step at scale).
        global_plan, metadata = create_default_global_save_plan(
            self._dedup_save_plans(plans), rewrite_index_hints=False
        )
        merged = dict(ChainMap(*[p.planner_data for p in global_plan]))
        metadata = dataclasses.replace(metadata, planner_data=merged)
        _check_tiling(metadata)
        self._global_checks_ran = True
        return global_plan, metadata

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        """DCP's, then refuse if it did not go through our ``_create_global_plan`` (so a
        torch whose DCP stops calling that hook fails before any byte is written)."""
        result = super().create_global_plan(all_plans)
        self._require_global_checks()
        return result

    def _dedup_save_plans(self, all_plans: list[SavePlan]) -> list[SavePlan]:
        return balance_replicated(all_plans, small_to=self.small_replicated_to)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        # Second guard, for a DCP that plans globally without calling create_global_plan.
        if self.is_coordinator:
            self._require_global_checks()
        plan = super().finish_plan(new_plan)
        if self._source is not None:
            self._source.expect(plan.items, self._resolve_tensor)
        return plan

    def adopt_global_plan(self, values: list[ValueSummary], key_bytes: int) -> None:
        """Coordinator: this save reuses a global plan made by :meth:`create_global_plan`
        for local plans of the same layout (:func:`layout_fingerprint`), so only the checks
        that depend on the values run again: ``values``, each rank's :func:`value_summary`
        of this save; ``key_bytes``, the :attr:`manifest_key_bytes` of the plan made (the
        keys change only with the layout, so they are not counted again)."""
        self.manifest_key_bytes = key_bytes
        check_values(values, key_bytes)
        self._global_checks_ran = True

    def _require_global_checks(self) -> None:
        """Raise ShardckptError unless our ``_create_global_plan`` ran for this save."""
        if not self._global_checks_ran:
            raise hook_skipped_error("_create_global_plan", torch.__version__)

    def resolve_data(self, write_item: WriteItem) -> Any:
        """The item's bytes: JSON for values, else the tensor (thread-safe)."""
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._json_values[write_item.index.fqn])
        tensor = self._resolve_tensor(write_item)
        return tensor if self._source is None else self._source.resolve(write_item, tensor)

    def release_data(self, write_item: WriteItem) -> None:
        """The writer is done with the tensor that ``resolve_data`` gave for this item."""
        if self._source is not None:
            self._source.written(write_item)

    def _resolve_tensor(self, write_item: WriteItem) -> Any:
        shard = self._shards.get(write_item.index.fqn)
        if shard is not None:
            return shard
        obj = self.state_dict.get(write_item.index.fqn)
        if isinstance(obj, StagedShard):
            return obj.local
        return super().resolve_data(write_item)


def layout_fingerprint(
    plan: SavePlan, *, small_replicated_to: int | None = None, item_text: Callable[[WriteItem], str] = repr
) -> str:
    """A digest of what a rank's local plan contributes to the global plan, values
    aside: every item (key, offsets, kind, chunk, dtype, global shape) and the key paths,
    and the placement of small replicated items (``SavePlanner.small_replicated_to``: a
    format-3 save must not reuse a format-1 save's plan, nor the reverse).
    Equal fingerprints on every rank mean the last save's global plan fits this save
    too; the values, which may change every step, are checked anew (:func:`check_values`).
    ``item_text`` is an item's ``repr``, or one kept from the last save for the same item
    object (``protocol.ItemTexts``: a repr of every item was 20 ms a save at 3,000 items)."""
    mappings = plan.planner_data.mappings if isinstance(plan.planner_data, _LocalPlannerData) else None
    items = "[" + ", ".join(map(item_text, plan.items)) + "]"  # repr(plan.items), item by item
    text = f"({items}, {sorted(mappings.items()) if mappings else None!r})"
    if small_replicated_to is not None:
        text += f"|small replicated to {small_replicated_to}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


ValueSummary = tuple[dict[str, str], dict[str, int]]
"""One rank's values: each value's digest and the length of its JSON, by key."""


def value_summary(plan: SavePlan) -> ValueSummary:
    """The digests and JSON sizes of a local plan's values (what :func:`check_values` needs)."""
    return dict(plan.planner_data.value_digests), dict(plan.planner_data.value_bytes)


def manifest_key_bytes(all_plans: list[SavePlan]) -> int:
    """What the keys of every rank's items take in a manifest at least: each key twice
    (in ``tensors``/``values`` and in ``paths``), as JSON strings. O(all items): counted
    when a global plan is made, not on a save that reuses it (the keys, and so this
    count, change only with the layout that :func:`layout_fingerprint` covers)."""
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


# Format 3: a replicated item of at most this many bytes, held by the coordinator among
# others, is stored by the coordinator, up to SMALL_REPLICATED_BUDGET_BYTES in all (see
# balance_replicated; docs/format.md section 12.3, "Small replicated tensors").
SMALL_REPLICATED_BYTES = 64 * 1024
SMALL_REPLICATED_BUDGET_BYTES = 64 * 1024 * 1024


def balance_replicated(all_plans: list[SavePlan], *, small_to: int | None = None) -> list[SavePlan]:
    """Keep each item on exactly one rank, spreading replicated bytes evenly.

    Items held by one rank stay there. With ``small_to`` (a rank, the coordinator of a
    format-3 save), replicated items of at most ``SMALL_REPLICATED_BYTES`` that this rank
    holds go to it first, smallest first, while their sum stays within
    ``SMALL_REPLICATED_BUDGET_BYTES``: then a loading rank finds all of them in one rank's
    index record (an AdamW ``step`` per parameter would otherwise send it to hundreds).
    The other replicated items go, largest first, to the least-loaded rank that holds
    them (LPT scheduling; ties to the lowest rank), counting what ``small_to`` already
    took. Deterministic for given plans. Items are keyed by (key, offsets), hashed in C,
    and an item held by every rank takes the least-loaded rank from a heap: a few dict
    steps per item, O(log ranks) per replicated item held everywhere.
    """
    holders: dict[tuple[str, Any], list[int]] = {}  # ranks in ascending order
    items: dict[tuple[str, Any], WriteItem] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            key = (item.index.fqn, item.index.offset)
            items[key] = item
            ranks = holders.get(key)
            if ranks is None:
                holders[key] = [rank]
            else:
                ranks.append(rank)
    load = [0] * len(all_plans)
    lost: list[set[tuple[str, Any]]] = [set() for _ in all_plans]

    def size(key: tuple[str, Any]) -> int:
        return item_bytes(items[key]) or 1

    def give(key: tuple[str, Any], rank: int) -> None:
        load[rank] += size(key)
        for r in holders[key]:
            if r != rank:
                lost[r].add(key)

    shared = []
    for key, ranks in holders.items():
        if len(ranks) == 1:
            load[ranks[0]] += size(key)
        else:
            shared.append(key)
    if small_to is not None:
        shared = _place_small(shared, small_to, holders, size, give)
    shared.sort(key=lambda k: (-size(k), k[0], tuple(k[1] or ())))
    everyone = list(range(len(all_plans)))
    least = [(n, r) for r, n in enumerate(load)]  # (load, rank), stale entries skipped
    heapq.heapify(least)
    for key in shared:
        ranks = holders[key]
        if ranks == everyone:
            while least[0][0] != load[least[0][1]]:
                heapq.heappop(least)
            rank = least[0][1]
        else:
            rank = min(ranks, key=lambda r: (load[r], r))
        give(key, rank)
        heapq.heappush(least, (load[rank], rank))
    return [
        dataclasses.replace(plan, items=[it for it in plan.items if (it.index.fqn, it.index.offset) not in gone])
        if gone
        else plan
        for plan, gone in zip(all_plans, lost, strict=True)
    ]


def _place_small(
    shared: list[tuple[str, Any]],
    small_to: int,
    holders: dict[tuple[str, Any], list[int]],
    size: Callable[[tuple[str, Any]], int],
    give: Callable[[tuple[str, Any], int], None],
) -> list[tuple[str, Any]]:
    """:func:`balance_replicated`'s first pass with ``small_to``: the small replicated items
    that rank holds go to it, smallest first, within the budget; returns the others."""
    budget = SMALL_REPLICATED_BUDGET_BYTES
    rest = []
    for key in sorted(shared, key=lambda k: (size(k), k[0], tuple(k[1] or ()))):
        n, ranks = size(key), holders[key]
        held = ranks[bisect.bisect_left(ranks, small_to) : bisect.bisect_right(ranks, small_to)]
        if n <= SMALL_REPLICATED_BYTES and n <= budget and held:
            give(key, small_to)
            budget -= n
        else:
            rest.append(key)
    return rest


class LoadPlanner(DefaultLoadPlanner):
    """Decodes non-tensor values from JSON; never calls torch.load."""

    def __init__(self, *, allow_partial_load: bool) -> None:
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True, allow_partial_load=allow_partial_load)

    def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False) -> None:
        with flattening_errors():
            super().set_up_planner(state_dict, metadata, is_coordinator)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = decode_value(json.loads(value.getvalue()), where=f"value {fqn!r}")
        if self.flatten_state_dict:
            set_in_place(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def set_in_place(root: Any, path: Any, value: Any) -> None:
    """Set ``value`` at ``path`` inside ``root``, keeping the target's own key types.

    DCP's flattening records dict keys as str (``{1: x}`` -> ``("1",)``); its
    set_element would then add a new str key next to the int one. Here a path element
    matches an existing key whose ``str()`` equals it, so int-keyed dicts (e.g. a plain
    ``optimizer.state_dict()``) are filled in place.
    """
    node = root
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        key = part if part in node else next((k for k in node if str(k) == str(part)), part)
        if last:
            node[key] = value
        else:
            node = node[key]
