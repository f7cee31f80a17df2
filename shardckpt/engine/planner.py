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
from collections import ChainMap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_global_save_plan,
)
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem, SavePlan, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor

from shardckpt.engine._torch_private import hook_skipped_error
from shardckpt.engine.load_items import PlannedItem, WholeChunk, local_read_items
from shardckpt.engine.local_items import ItemCache, local_shards, local_write_items, resolved_shards
from shardckpt.engine.placement import balance_replicated
from shardckpt.engine.plan_checks import (
    ValueSummary,
    _check_header_entry,
    _check_tensors_agree,
    _check_tiling,
    check_values,
    manifest_key_bytes,
    value_summary,
)
from shardckpt.engine.savable import check_savable
from shardckpt.engine.staging import BoundedSource, StagedShard
from shardckpt.engine.state import flatten_plain_dicts, flattening_errors
from shardckpt.format import datafile, integrity
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
    (sparse, nested, meta): see :func:`shardckpt.engine.savable.check_savable`.

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
        the small replicated tensors it holds
        (:func:`~shardckpt.engine.placement.balance_replicated`); None spreads them.
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
        plain = flatten_plain_dicts(state_dict)
        if plain is None:
            with flattening_errors():
                super().set_up_planner(state_dict, storage_meta, is_coordinator)
        else:  # what DCP's set_up_planner sets, without its flattening passes (#18)
            self.state_dict, self.mappings = plain
            self.is_coordinator = is_coordinator
        if self._original_mappings is not None:
            self.mappings = dict(self._original_mappings)
        self._global_checks_ran = False  # a planner may be set up for another save

    def create_local_plan(self) -> SavePlan:
        # Before DCP's planning, which fails on sparse/nested/meta tensors without naming
        # the key (and such failures would read as a dead peer).
        cache = self._items
        if cache is not None:
            cache.start()
        locals_ = local_shards(self.state_dict)
        # The key, dtype and shape checks of what the last save of this owner checked
        # and has not changed are not repeated (ItemCache), nor the checks of its items.
        check_savable(self.state_dict, locals_, cache)
        # DCP's local plan, DTensors of Shard/Replicate placements computed here (#18).
        plan = SavePlan(local_write_items(self.state_dict, locals_, self.is_coordinator, cache))
        self._shards = resolved_shards(self.state_dict, locals_)
        checked = cache.reused if cache is not None and cache.trusted else set()
        digests, sizes = {}, {}
        for item in plan.items:
            fqn = item.index.fqn
            if id(item) in checked:
                continue  # a DTensor's item the last save made and checked, reused as it is
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
        if cache is not None:
            cache.mark_checked()
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
        that depend on the values run again: ``values``, each rank's
        :func:`~shardckpt.engine.plan_checks.value_summary`
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
    too; the values, which may change every step, are checked anew (:func:`~shardckpt.engine.plan_checks.check_values`).
    ``item_text`` is an item's ``repr``, or one kept from the last save for the same item
    object (``protocol.ItemTexts``: a repr of every item was 20 ms a save at 3,000 items)."""
    mappings = plan_mappings(plan)
    items = "[" + ", ".join(map(item_text, plan.items)) + "]"  # repr(plan.items), item by item
    text = f"({items}, {sorted(mappings.items()) if mappings else None!r})"
    if small_replicated_to is not None:
        text += f"|small replicated to {small_replicated_to}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def plan_mappings(plan: SavePlan) -> dict[str, Any] | None:
    """The key paths a local plan made by :meth:`SavePlanner.create_local_plan` carries, else None."""
    return plan.planner_data.mappings if isinstance(plan.planner_data, _LocalPlannerData) else None


class LoadPlanner(DefaultLoadPlanner):
    """Decodes non-tensor values from JSON; never calls torch.load. Plans its reads with
    :func:`~shardckpt.engine.load_items.local_read_items`: DCP's items, those of plain
    tensors and Shard/Replicate DTensors computed there (issue #18)."""

    def __init__(
        self, *, allow_partial_load: bool, flattened: tuple[dict[str, Any], dict[str, Any]] | None = None
    ) -> None:
        """``flattened``: DCP's flattening (``state.flatten``) of the state_dict that
        :meth:`set_up_planner` will be given, when the caller made it already; used when
        it holds only plain tensors, DTensors and values, none on the meta device, where
        DCP's own set-up would flatten it again and change nothing else."""
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True, allow_partial_load=allow_partial_load)
        self._flattened = flattened
        self._targets: dict[str, torch.Tensor] = {}  # key -> the local tensor its read items fill
        self._planned: dict[str, PlannedItem] = {}  # keys planned before create_local_plan (a subclass's)
        self.whole: list[WholeChunk] = []
        """The keys planned without a ReadItem (:data:`~shardckpt.engine.load_items.WholeChunk`):
        filled by :meth:`create_local_plan` when :attr:`reads_whole_chunks`; the reader
        (``reader.Reader``) reads them with the plan's items."""

    reads_whole_chunks = False
    """Whether the plan hands whole chunks to the reader instead of ReadItems (:attr:`whole`,
    or a format-3 planner's cells): set by a load through ``reader.Reader``, which reads
    them (``loading.load_from``). Never for a subclass that overrides ``resolve_tensor``
    or ``commit_tensor`` (they take ReadItems): :meth:`plans_whole_chunks`."""

    lists_records = True
    """Whether the chunks the metadata lists are the manifest's records (formats 1 and 2),
    which :attr:`whole` takes; a format-3 planner's are cells of rules, not yet resolved to
    their files, and go whole by another way (``plan_v3.RulePlanner.cells``)."""

    def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False) -> None:
        flattened, self._flattened = self._flattened, None
        self._targets, self._planned, self.whole = {}, {}, []
        if flattened is not None and _nothing_to_set_up(flattened[0]):
            self.original_state_dict = state_dict
            self.state_dict, self.mappings = flattened
            self.metadata, self.is_coordinator = metadata, is_coordinator
            return
        with flattening_errors():
            super().set_up_planner(state_dict, metadata, is_coordinator)

    def create_local_plan(self) -> LoadPlan:
        if self.metadata is None:
            raise AssertionError("set_up_planner was not given the checkpoint's metadata")
        if not self.allow_partial_load or self.metadata.state_dict_metadata.keys() - self.state_dict.keys():
            # DCP's own: a strict plan, or a key the state lacks (DCP then tries the
            # flattening of checkpoints saved before torch 2.4).
            return super().create_local_plan()
        self._targets, self.whole = {}, []
        whole = self.whole if self.lists_records and self.plans_whole_chunks() else None
        return LoadPlan(local_read_items(self.state_dict, self.metadata, self._targets, self._planned, whole))

    def plans_whole_chunks(self) -> bool:
        """Whether this plan hands whole chunks to the reader without ReadItems: asked by
        the reader (:attr:`reads_whole_chunks`), and no ``resolve_tensor`` or
        ``commit_tensor`` of a subclass to give them to."""
        kind = type(self)
        return (
            self.reads_whole_chunks
            and kind.resolve_tensor is LoadPlanner.resolve_tensor
            and kind.commit_tensor is DefaultLoadPlanner.commit_tensor
        )

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        """The part of the target that ``read_item`` fills (thread-safe): of the local tensor
        planned by :meth:`create_local_plan` without asking the DTensor again, else DCP's."""
        local = self._targets.get(read_item.dest_index.fqn)
        if local is None:
            return super().resolve_tensor(read_item)  # type: ignore[no-any-return]
        if read_item.lengths == local.shape:  # the whole local tensor (a box that long starts at 0)
            return local
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            if offset != 0 or length != local.shape[dim]:
                local = local.narrow(dim, offset, length)
        return local

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = decode_value(json.loads(value.getvalue()), where=f"value {fqn!r}")
        if self.flatten_state_dict:
            set_in_place(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _nothing_to_set_up(flat: dict[str, Any]) -> bool:
    """Whether DCP's ``set_up_planner`` would change nothing in the flattened ``flat`` but
    flatten it: no ShardedTensor to split, no meta tensor to materialize."""
    return all(
        not isinstance(v, torch.Tensor) or (type(v) in _PLAIN_TARGETS and not v.is_meta)  # not device.type: 2 us
        for v in flat.values()
    )


_PLAIN_TARGETS = (torch.Tensor, torch.nn.Parameter, DTensor)


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
