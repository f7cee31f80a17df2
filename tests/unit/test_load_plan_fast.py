"""The shortcuts of a same-layout load plan (issue #18) build what DCP builds: read items
equal in every field, DCP's metadata objects only when asked, one look-up per mesh, and
the planner's resolved targets."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_local_load_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from shardckpt.engine import savable
from shardckpt.engine._torch_private import whole_chunk_item
from shardckpt.engine.load_items import ListedTensorMetadata, local_read_items
from shardckpt.engine.planner import LoadPlanner
from shardckpt.engine.savable import tensor_problem
from shardckpt.errors import ManifestError
from shardckpt.format.manifest import ChunkRecord, TensorRecord
from tests.support.distributed import run_ranks

pytestmark = pytest.mark.compat  # pins DCP's ReadItem and metadata classes: run on other torch releases too


def _fields(item: Any) -> dict[str, Any]:
    """Every attribute of a DCP item, its indexes' hints included (``==`` ignores them)."""
    return {k: _fields(v) if isinstance(v, MetadataIndex) else v for k, v in vars(item).items()}


def _record(shape: tuple[int, ...], rows: list[int], dtype: str = "F32") -> TensorRecord:
    """A tensor saved as row blocks of ``rows`` rows each."""
    chunks, start = [], 0
    for n in rows:
        sizes = (n, *shape[1:])
        chunks.append(ChunkRecord((start, 0), sizes, "f", 0, 4 * n * shape[1], ()))
        start += n
    return TensorRecord(dtype, shape, tuple(chunks))


def test_a_whole_chunk_item_equals_dcps_in_every_field_and_hint() -> None:
    chunks = [ChunkStorageMetadata(torch.Size([r, 0]), torch.Size([2, 3])) for r in (0, 2, 4)]
    md = TensorStorageMetadata(TensorProperties(torch.float32), torch.Size([6, 3]), chunks)
    (theirs,) = create_read_items_for_chunk_list("w", md, [chunks[2]])
    ours = whole_chunk_item("w", torch.Size([4, 0]), torch.Size([2, 3]), 2, torch.Size([0, 0]))
    assert ours == theirs and hash(ours.storage_index) == hash(theirs.storage_index)
    assert _fields(ours) == _fields(theirs)
    assert (ours.dest_index.index, ours.storage_index.index) == (0, 2)
    # Every field of DCP's classes is set (a field added by a newer torch would be missing).
    for obj in (ours, ours.dest_index):
        assert set(vars(obj)) == {f.name for f in dataclasses.fields(obj)}
    with pytest.raises(dataclasses.FrozenInstanceError):
        ours.lengths = torch.Size([1, 3])  # type: ignore[misc]


def test_a_listed_tensor_of_a_record_builds_dcps_objects_only_when_asked() -> None:
    md = ListedTensorMetadata.of_record("w", _record((6, 3), [4, 2], dtype="BF16"))
    assert (md._properties, md._size, md._chunks) == (None, None, None)
    assert md.shape == (6, 3)
    assert md.properties == TensorProperties(torch.bfloat16) and md.properties is md.properties
    assert md.size == torch.Size([6, 3]) and isinstance(md.size, torch.Size)
    assert md.chunks == [
        ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4, 3])),
        ChunkStorageMetadata(torch.Size([4, 0]), torch.Size([2, 3])),
    ]
    md.size = torch.Size([2, 9])
    assert md.shape == (2, 9)
    # A dtype the parser let through by mistake is named with its key when DCP asks.
    odd = ListedTensorMetadata.of_record("odd", _record((2, 3), [2], dtype="F99"))
    with pytest.raises(ManifestError, match="odd: unknown dtype 'F99'"):
        _ = odd.properties


def test_a_same_layout_plan_builds_no_dcp_metadata_and_a_resharded_one_plans_as_dcp() -> None:
    records = {"same": _record((6, 3), [6]), "resharded": _record((6, 3), [3, 3]), "empty": _record((0, 3), [0])}
    lazy = Metadata({k: ListedTensorMetadata.of_record(k, r) for k, r in records.items()})
    eager = Metadata(
        {
            k: TensorStorageMetadata(
                TensorProperties(torch.float32),
                torch.Size(r.shape),
                [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in r.chunks],
            )
            for k, r in records.items()
        }
    )
    flat = {"same": torch.zeros(6, 3), "resharded": torch.zeros(6, 3), "empty": torch.zeros(0, 3)}
    targets: dict[str, torch.Tensor] = {}
    ours = local_read_items(flat, lazy, targets)
    theirs = create_default_local_load_plan(flat, eager, False).items
    assert [_fields(i) for i in ours] == [_fields(i) for i in theirs]
    assert [i.dest_index.fqn for i in ours] == ["same", "resharded", "resharded"]
    same = lazy.state_dict_metadata["same"]
    assert isinstance(same, ListedTensorMetadata)
    assert (same._properties, same._size, same._chunks) == (None, None, None)
    assert all(targets[k] is flat[k] for k in flat)


def test_resolve_tensor_gives_the_whole_local_tensor_itself_and_dcps_part_otherwise() -> None:
    records = {"same": _record((6, 3), [6]), "resharded": _record((6, 3), [4, 2])}
    metadata = Metadata({k: ListedTensorMetadata.of_record(k, r) for k, r in records.items()})
    flat = {"same": torch.arange(18.0).reshape(6, 3), "resharded": torch.arange(18.0).reshape(6, 3)}
    ours, dcps = LoadPlanner(allow_partial_load=True), DefaultLoadPlanner(allow_partial_load=True)
    for planner in (ours, dcps):
        planner.set_up_planner(dict(flat), metadata, False)
    items: list[ReadItem] = ours.create_local_plan().items
    assert len(items) == 3
    assert ours.resolve_tensor(items[0]) is flat["same"]
    for item in items[1:]:
        got, want = ours.resolve_tensor(item), dcps.resolve_tensor(item)
        assert torch.equal(got, want) and got.data_ptr() == want.data_ptr() and got.shape[0] < 6


def _plan_meshes_once(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    flat = {f"w{i}": distribute_tensor(torch.rand(2 * world + i, 3), mesh, [Shard(0)]) for i in range(20)}

    def rows(n: int) -> list[int]:  # Shard(0)'s blocks, as torch.chunk cuts them
        step = -(-n // world)
        return [min(step, n - step * r) for r in range(world)]

    md = Metadata(
        {k: ListedTensorMetadata.of_record(k, _record(tuple(v.shape), rows(v.shape[0]))) for k, v in flat.items()}
    )
    calls = {"shape": 0, "get_coordinate": 0}
    shape, coordinate = DeviceMesh.shape, DeviceMesh.get_coordinate

    def counted_shape(self: Any) -> Any:
        calls["shape"] += 1
        return shape.fget(self)  # type: ignore[attr-defined]

    def counted_coordinate(self: Any) -> Any:
        calls["get_coordinate"] += 1
        return coordinate(self)

    DeviceMesh.shape = property(counted_shape)  # type: ignore[assignment,method-assign]
    DeviceMesh.get_coordinate = counted_coordinate  # type: ignore[method-assign]
    try:
        ours = local_read_items(flat, md)
    finally:
        DeviceMesh.shape, DeviceMesh.get_coordinate = shape, coordinate  # type: ignore[method-assign]
    assert calls == {"shape": 1, "get_coordinate": 1}
    theirs = create_default_local_load_plan(flat, md, False).items
    assert len(ours) == 20 and [_fields(i) for i in ours] == [_fields(i) for i in theirs]


def test_a_plan_looks_each_mesh_up_once_and_plans_as_dcp() -> None:
    run_ranks(_plan_meshes_once, 2)


def test_tensor_problems_quick_answer_agrees_with_its_full_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "plain": torch.zeros(2, 3),
        "param": torch.nn.Parameter(torch.zeros(2)),
        "scalar": torch.tensor(1.0),
        "meta": torch.empty(2, 3, device="meta"),
        "meta param": torch.nn.Parameter(torch.empty(2, device="meta")),
        "sparse": torch.zeros(2, 3).to_sparse(),
        "nested": torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)], layout=torch.jagged),
    }
    for loading in (True, False):
        quick = {k: tensor_problem(v, loading=loading) for k, v in values.items()}
        with monkeypatch.context() as m:
            m.setattr(savable, "_PLAIN_TYPES", frozenset())  # every tensor takes the full checks
            full = {k: tensor_problem(v, loading=loading) for k, v in values.items()}
        assert quick == full
        assert {k for k, p in quick.items() if p is not None} == {"meta", "meta param", "sparse", "nested"}
