"""The same-layout planning path of a format-1/2 load (issue #18): DTensors against the
manifest's chunk records, and check_target's quick pass, agree with the exact paths."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
import torch
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from shardckpt.engine.load_items import ListedTensorMetadata
from shardckpt.engine.loading import check_target
from shardckpt.engine.mismatch import wrong_kind, wrong_kinds
from shardckpt.errors import ManifestError, StateDictMismatchError
from tests.support.distributed import run_ranks
from tests.unit.test_load_items import _state_and_metadata, dcp_boxes_asked


class _Record(NamedTuple):
    """A saved chunk as the manifest lists it: tuples, like ``ChunkRecord``'s."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def _listed(metadata: Metadata, seed: int) -> Metadata:
    """``metadata`` with every tensor's chunks as manifest records, in a shuffled order (so
    the chunk of a key is often not where the last key's was)."""
    rng = random.Random(seed)
    sd: dict[str, Any] = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            records = [_Record(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks]
            rng.shuffle(records)
            sd[key] = ListedTensorMetadata(md.properties, md.size, records)
        else:
            sd[key] = md
    return Metadata(state_dict_metadata=sd)


def _compare_listed_with_dcp(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor

    from shardckpt.engine.load_items import local_read_items

    flat, plain = _state_and_metadata(world)
    listed = _listed(plain, seed=rank)
    with dcp_boxes_asked() as asked:
        targets: dict[str, torch.Tensor] = {}
        ours = local_read_items(flat, listed, targets)
    assert not asked, f"DCP was asked for {len(asked)} boxes: the fast path was not taken"
    # DCP's items against the same (shuffled) chunk lists, as DCP's own objects
    dcp_view = Metadata(
        state_dict_metadata={
            k: TensorStorageMetadata(md.properties, md.size, md.chunks) if isinstance(md, ListedTensorMetadata) else md
            for k, md in _listed(plain, seed=rank).state_dict_metadata.items()
        }
    )
    theirs = create_default_local_load_plan(flat, dcp_view, False).items
    assert len(theirs) > 300 and ours == theirs
    assert [(i.dest_index.index, i.storage_index.index) for i in ours] == [
        (i.dest_index.index, i.storage_index.index) for i in theirs
    ]
    # chunks found away from the last key's place, and same-layout reads, both occur
    assert len({i.storage_index.index for i in ours}) > 2
    whole = [i for i in ours if i.dest_index.fqn in targets and i.lengths == targets[i.dest_index.fqn].shape]
    assert len(whole) > 50
    for item in whole:  # the local tensor planned for it is the DTensor's own shard
        obj = flat[item.dest_index.fqn]
        if isinstance(obj, DTensor):
            assert targets[item.dest_index.fqn] is obj._local_tensor


def test_listed_chunks_in_any_order_plan_as_dcp_over_layouts_and_meshes() -> None:
    run_ranks(_compare_listed_with_dcp, 4)


def _record(dtype: str, shape: tuple[int, ...]) -> Any:
    return SimpleNamespace(dtype=dtype, shape=shape, chunks=())


def test_the_quick_pass_of_check_target_finds_what_the_exact_one_finds() -> None:
    manifest: Any = SimpleNamespace(
        tensors={
            "same": _record("F32", (2, 3)),
            "shape": _record("F32", (2, 3)),
            "cast": _record("BF16", (2, 3)),
            "int": _record("I64", (4,)),
            "scalar": _record("F32", ()),
            "value_saved_as_tensor": _record("F32", (1,)),
            "param": _record("F32", (3,)),
        },
        values={"tensor_saved_as_value": 1, "step": 7},
    )
    flat = {
        "same": torch.zeros(2, 3),
        "shape": torch.zeros(3, 2),
        "cast": torch.zeros(2, 3),
        "int": torch.zeros(4, dtype=torch.int32),
        "scalar": torch.tensor(1.0),
        "value_saved_as_tensor": 5,
        "param": torch.nn.Parameter(torch.zeros(3)),
        "tensor_saved_as_value": torch.zeros(1),
        "step": 0,
        "new": torch.zeros(1),
    }
    exact = {k: m for k, v in flat.items() if (m := wrong_kind(manifest, k, v)) is not None}
    assert set(exact) == {"shape", "cast", "int", "value_saved_as_tensor", "tensor_saved_as_value"}
    assert wrong_kinds(manifest, flat) == exact
    assert exact["cast"].castable and not exact["int"].castable
    with pytest.raises(StateDictMismatchError, match=r"'shape': saved shape \[2, 3\].*\n.*strict=False"):
        check_target(manifest, {k: flat[k] for k in ("same", "shape")}, strict=True, source="s")
    result = check_target(
        manifest, {"cast": flat["cast"], "new": flat["new"]}, strict=False, source="s", allow_dtype_cast=True
    )
    assert result.missing_keys == ["new"] and "same" in result.unexpected_keys and "step" in result.unexpected_keys


def test_an_unknown_saved_dtype_is_named_with_the_first_key_that_has_it() -> None:
    manifest: Any = SimpleNamespace(
        tensors={"a": _record("F32", (1,)), "b": _record("Q7", (1,)), "c": _record("Q7", (1,))}, values={}
    )
    flat = {"a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(1)}
    with pytest.raises(ManifestError, match=r"^b: unknown dtype 'Q7'"):
        wrong_kinds(manifest, flat)


def _as_manifest_v3(plain: Metadata, values: dict[str, Any]) -> Any:
    """A format-3 manifest whose tensors are ``plain``'s, each saved chunk in a file of its
    own (a block grid is one rule, any other layout listed; no data file is ever read)."""
    from shardckpt.format import rules
    from shardckpt.format.file_table import FileGroup, FileTable, Page
    from shardckpt.format.manifest_v3 import Chunk, ManifestV3, Tensor

    tensors: dict[str, Tensor] = {}
    files = 0
    for key, md in plain.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        boxes = [rules.Chunk(tuple(c.offsets), tuple(c.sizes), files + i, 0) for i, c in enumerate(md.chunks)]
        files += len(boxes)
        rule, rest = rules.compress(tuple(md.size), boxes)  # None: not a block grid, listed
        listed = tuple(Chunk(c.offsets, c.sizes, c.file, 0, 4 * math.prod(c.sizes)) for c in rest)
        tensors[key] = Tensor("F32", tuple(md.size), rule, listed)
    group = FileGroup("ab", None, files, ((files, 1),), files, (Page(10, "0" * 16),))
    return ManifestV3(
        world_size=files,
        hash_block_bytes=4096,
        bases=(),
        file_table=FileTable((group,)),
        tensors=tensors,
        values=values,
        paths={k: [k] for k in [*tensors, *values]},
        created_at="now",
        shardckpt_version="0",
        torch_version="2",
    )


def _compare_rule_plan_with_dcp(rank: int, world: int) -> None:
    """A format-3 load plans each box that is exactly one cell while listing its chunks
    (``needed_metadata``'s planned items): the plan is DCP's over the same listing."""
    from torch.distributed.tensor import DTensor

    from shardckpt.engine.plan_v3 import RulePlanner
    from shardckpt.engine.reader import manifest_to_metadata
    from shardckpt.format.manifest_v3 import Chunk

    flat, plain = _state_and_metadata(world)
    manifest = _as_manifest_v3(plain, {"step": 7})
    planner = RulePlanner(manifest, allow_partial_load=True)
    with dcp_boxes_asked() as asked:
        planner.set_up_planner(dict(flat), manifest_to_metadata(manifest))
        ours = planner.create_local_plan().items
    planned = planner._planned
    assert len(planned) > 25, "the one-cell path was not taken"  # a target in the layout of its save
    assert {"param", "scalar"} <= set(planned)  # plain tensors saved whole: one cell each
    assert {id(flat[k]) for k in planned}.isdisjoint(map(id, asked)), "DCP was asked for a planned box"
    assert planner.metadata is not None
    dcp_view = Metadata(
        state_dict_metadata={
            k: TensorStorageMetadata(md.properties, md.size, md.chunks) if isinstance(md, ListedTensorMetadata) else md
            for k, md in planner.metadata.state_dict_metadata.items()
        }
    )
    theirs = create_default_local_load_plan(flat, dcp_view, False).items
    assert len(theirs) > 300 and ours == theirs
    assert [(i.dest_index.index, i.storage_index.index) for i in ours] == [
        (i.dest_index.index, i.storage_index.index) for i in theirs
    ]
    # the chunk each planned item reads is the one the reader is handed for it
    for key, (item, local) in planned.items():
        chunk = planner.found[(key, tuple(item.storage_index.offset))]
        assert (chunk.offsets, chunk.sizes) == (tuple(item.storage_index.offset), tuple(item.lengths))
        fields = (chunk.offsets, chunk.sizes, chunk.file, chunk.byte_offset, chunk.byte_length)
        assert (
            chunk == Chunk(*fields)
            and repr(chunk) == repr(Chunk(*fields))
            and chunk.byte_length == 4 * item.lengths.numel()
        )
        obj = flat[key]
        assert local is (obj._local_tensor if isinstance(obj, DTensor) else obj)
    # every key planned by DCP boxes or as one cell lists exactly the chunks its box overlaps
    assert {k for k in planned} <= {i.dest_index.fqn for i in ours}


def test_a_format_3_load_plans_one_cell_boxes_as_dcp_over_layouts_and_meshes() -> None:
    run_ranks(_compare_rule_plan_with_dcp, 4)
