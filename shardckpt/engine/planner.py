"""DCP planner subclasses: JSON for non-tensor values, balanced dedup of replicated items.

DCP's default planners serialize non-tensor values with ``torch.save`` and read them
back with ``torch.load(weights_only=False)``; ours encode them as JSON (see
:func:`shardckpt.format.values.encode_value`) and never unpickle anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
from collections import ChainMap, defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_global_save_plan,
)
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem, SavePlan, WriteItem, WriteItemType

from shardckpt.engine._torch_private import hook_skipped_error
from shardckpt.engine.local_items import ItemCache, local_shards, local_write_items, resolved_shards
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
        items: ItemCache | None = None,
    ) -> None:
        """``mappings``: when the state was flattened before (async staging), the original
        key paths, so the manifest records them rather than the already-flat keys.
        ``source``: a bounded async save's tensor source (see :class:`BoundedSource`).
        ``items``: the DTensors' items of the last save by the same owner (a Checkpointer),
        reused where their layout did not change (see :class:`ItemCache`)."""
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True)
        self._json_values: dict[str, bytes] = {}
        self._shards: dict[str, torch.Tensor] = {}  # what resolve_data gives for plain DTensors
        self._original_mappings = mappings
        self._source = source
        self._items = items
        self._global_checks_ran = False

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
        check_values(all_plans)
        _check_tensors_agree(all_plans)
        plans = [dataclasses.replace(p, planner_data=p.planner_data.mappings) for p in all_plans]
        # DCP's own _create_global_plan, with our validation instead of its
        # _validate_global_plan, which compares every pair of chunks of a tensor split
        # along a dimension other than its largest (minutes at thousands of ranks).
        global_plan, metadata = create_default_global_save_plan(self._dedup_save_plans(plans))
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
        return balance_replicated(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        # Second guard, for a DCP that plans globally without calling create_global_plan.
        if self.is_coordinator:
            self._require_global_checks()
        plan = super().finish_plan(new_plan)
        if self._source is not None:
            self._source.expect(plan.items, self._resolve_tensor)
        return plan

    def adopt_global_plan(self, all_plans: list[SavePlan]) -> None:
        """Coordinator: this save reuses a global plan made by :meth:`create_global_plan`
        for local plans of the same layout (:func:`layout_fingerprint`), so only the checks
        that depend on the values run again (``all_plans``: the cached local plans carrying
        this save's value digests and sizes)."""
        check_values(all_plans)
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


def layout_fingerprint(plan: SavePlan) -> str:
    """A digest of what a rank's local plan contributes to the global plan, values
    aside: every item (key, offsets, kind, chunk, dtype, global shape) and the key paths.
    Equal fingerprints on every rank mean the last save's global plan fits this save
    too; the values, which may change every step, are checked anew (:func:`check_values`)."""
    mappings = plan.planner_data.mappings if isinstance(plan.planner_data, _LocalPlannerData) else None
    text = repr((plan.items, sorted(mappings.items()) if mappings else None))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def with_values(plan: SavePlan, value_digests: dict[str, str], value_bytes: dict[str, int]) -> SavePlan:
    """``plan`` (a local plan of ours) carrying other values' digests and JSON sizes."""
    data = dataclasses.replace(plan.planner_data, value_digests=value_digests, value_bytes=value_bytes)
    return dataclasses.replace(plan, planner_data=data)


def value_summary(plan: SavePlan) -> tuple[dict[str, str], dict[str, int]]:
    """The digests and JSON sizes of a local plan's values (what :func:`check_values` needs)."""
    return dict(plan.planner_data.value_digests), dict(plan.planner_data.value_bytes)


def check_values(all_plans: list[SavePlan]) -> None:
    """The global checks that depend on the values: equal on every rank holding one, and
    a manifest within bounds (UnsupportedValueError naming the key otherwise)."""
    _check_values_agree([p.planner_data.value_digests for p in all_plans])
    _check_manifest_size(all_plans)


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


def _check_manifest_size(all_plans: list[SavePlan]) -> None:
    """Refuse a save whose manifest would exceed what readers accept
    (``manifest.MAX_MANIFEST_BYTES``), counting only what is known at planning time:
    the values' JSON (stored inline) and every key (in ``tensors``/``values`` and
    ``paths``). A lower bound: chunk records and checksums come on top."""
    value_bytes: dict[str, int] = {}
    keys: set[str] = set()
    for plan in all_plans:
        value_bytes.update(plan.planner_data.value_bytes)
        keys.update(it.index.fqn for it in plan.items)
    total = sum(value_bytes.values()) + sum(2 * len(json.dumps(k)) for k in keys)
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
    copy differs would otherwise be dropped without a word."""
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
    """Every tensor's chunks lie inside it, do not overlap and cover it exactly."""
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata) or len(md.size) == 0:
            continue
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


def balance_replicated(all_plans: list[SavePlan]) -> list[SavePlan]:
    """Keep each item on exactly one rank, spreading replicated bytes evenly.

    Items held by one rank stay there; replicated items go, largest first, to the
    least-loaded rank that holds them (LPT scheduling). Deterministic for given plans.
    """
    holders: dict[MetadataIndex, list[int]] = defaultdict(list)
    items: dict[MetadataIndex, WriteItem] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            holders[item.index].append(rank)
            items[item.index] = item
    load = [0] * len(all_plans)
    keep: list[set[MetadataIndex]] = [set() for _ in all_plans]

    def size(idx: MetadataIndex) -> int:
        return item_bytes(items[idx]) or 1

    for idx, ranks in holders.items():
        if len(ranks) == 1:
            keep[ranks[0]].add(idx)
            load[ranks[0]] += size(idx)
    shared = [idx for idx, ranks in holders.items() if len(ranks) > 1]
    shared.sort(key=lambda i: (-size(i), i.fqn, tuple(i.offset or ())))
    for idx in shared:
        rank = min(holders[idx], key=lambda r: (load[r], r))
        keep[rank].add(idx)
        load[rank] += size(idx)
    return [
        dataclasses.replace(plan, items=[it for it in plan.items if it.index in keep[r]])
        for r, plan in enumerate(all_plans)
    ]


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
