"""The per-tensor shortcuts of a load of many small tensors (issue #18) give what the
general paths give: chunk lists built only when asked, chunk look-ups, byte copies of
joined reads, and the checks they must not skip."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from damage import flip_byte
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

import shardckpt
from shardckpt.engine.load_items import ListedTensorMetadata, local_read_items
from shardckpt.engine.loading import check_loadable, read_manifest
from shardckpt.engine.reader import ListedChunks, Reader, manifest_to_metadata
from shardckpt.errors import IntegrityError, UnsupportedValueError
from shardckpt.format.manifest import ChunkRecord
from shardckpt.storage import open_storage
from tests.support.distributed import run_ranks


def _record(offsets: tuple[int, ...], sizes: tuple[int, ...]) -> ChunkRecord:
    return ChunkRecord(offsets, sizes, "f", 0, 4 * int(torch.Size(sizes).numel()), ())


def _listed(md: TensorStorageMetadata) -> ListedTensorMetadata:
    """``md`` as a format-1 load sees it: the same chunks, as manifest records."""
    records = [_record(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks]
    return ListedTensorMetadata(md.properties, md.size, records)


def test_a_listed_tensor_builds_dcps_chunk_list_when_first_asked_and_equals_the_plain_one() -> None:
    eager = TensorStorageMetadata(
        TensorProperties(torch.float32),
        torch.Size([6, 2]),
        [
            ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([4, 2])),
            ChunkStorageMetadata(torch.Size([4, 0]), torch.Size([2, 2])),
        ],
    )
    lazy = _listed(eager)
    assert lazy._chunks is None
    assert lazy.chunks == eager.chunks and lazy.chunks is lazy.chunks
    assert isinstance(lazy.chunks[1].offsets, torch.Size) and lazy.size == eager.size
    lazy.chunks = []
    assert lazy.chunks == []


def test_a_same_layout_plan_reads_the_manifests_records_and_a_resharded_one_dcps_chunks() -> None:
    whole = TensorStorageMetadata(
        TensorProperties(torch.float32),
        torch.Size([6, 2]),
        [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([6, 2]))],
    )
    rows = TensorStorageMetadata(
        TensorProperties(torch.float32),
        torch.Size([6, 2]),
        [
            ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([3, 2])),
            ChunkStorageMetadata(torch.Size([3, 0]), torch.Size([3, 2])),
        ],
    )
    flat = {"same": torch.zeros(6, 2), "resharded": torch.zeros(6, 2)}
    eager = Metadata({"same": whole, "resharded": rows})
    lazy = Metadata({"same": _listed(whole), "resharded": _listed(rows)})
    items = local_read_items(flat, lazy)
    assert items == create_default_local_load_plan(flat, eager, False).items
    assert [(i.dest_index.fqn, i.storage_index.index) for i in items] == [
        ("same", 0),
        ("resharded", 0),
        ("resharded", 1),
    ]
    assert lazy.state_dict_metadata["same"]._chunks is None  # never built: the record was the box
    assert lazy.state_dict_metadata["resharded"]._chunks is not None


def _compare_listed_with_dcp(rank: int, world: int) -> None:
    from tests.unit.test_load_items import _state_and_metadata

    flat, eager = _state_and_metadata(world)
    lazy = Metadata(
        {k: _listed(md) if isinstance(md, TensorStorageMetadata) else md for k, md in eager.state_dict_metadata.items()}
    )
    ours = local_read_items(flat, lazy)
    theirs = create_default_local_load_plan(flat, eager, False).items
    assert len(theirs) > 300 and ours == theirs
    assert [i.storage_index.index for i in ours] == [i.storage_index.index for i in theirs]
    built = sum(
        md._chunks is not None for md in lazy.state_dict_metadata.values() if isinstance(md, ListedTensorMetadata)
    )
    assert 0 < built < len(flat)  # resharded keys asked for DCP's list, same-layout ones did not
    _compare_whole_with_dcp(flat, eager, theirs)
    # A DTensor whose shard is a meta tensor is refused by name, however its shard is found.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    meta = DTensor.from_local(torch.empty(2, 3, device="meta"), mesh, [Shard(0)], run_check=False)
    manifest = SimpleNamespace(tensors={"m": None})  # check_loadable reads its keys only
    with pytest.raises(UnsupportedValueError, match="key 'm': the state_dict holds a meta tensor"):
        check_loadable(manifest, {"m": meta})  # type: ignore[arg-type]


def _compare_whole_with_dcp(flat: dict[str, Any], eager: Metadata, theirs: list[Any]) -> None:
    """The keys planned as whole chunks are exactly DCP's keys of one item that reads one
    whole saved chunk into the whole local tensor; the other keys keep DCP's items in its order."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    lazy = Metadata(
        {k: _listed(md) if isinstance(md, TensorStorageMetadata) else md for k, md in eager.state_dict_metadata.items()}
    )
    whole: list[Any] = []
    ours = local_read_items(flat, lazy, None, None, whole)
    keys = [k for k, _, _ in whole]
    assert len(set(keys)) == len(keys) > 20 and len(ours) > 100, (len(keys), len(ours))  # both kinds, each key once
    assert ours == [i for i in theirs if i.dest_index.fqn not in set(keys)]
    dcp = DefaultLoadPlanner(allow_partial_load=True)
    dcp.set_up_planner(dict(flat), eager, False)
    by_key: dict[str, list[Any]] = {}
    for item in theirs:
        by_key.setdefault(item.dest_index.fqn, []).append(item)
    for key, chunk, local in whole:
        (item,) = by_key[key]
        saved = lazy.state_dict_metadata[key].saved  # type: ignore[union-attr]
        assert chunk is saved[item.storage_index.index]  # the manifest's own record
        assert (tuple(item.storage_index.offset), tuple(item.lengths)) == (chunk.offsets, chunk.sizes)
        assert not any(item.dest_offsets) and not any(item.storage_offsets)
        want = dcp.resolve_tensor(item)
        assert local.shape == want.shape and local.data_ptr() == want.data_ptr(), key
    # What DCP reads with more than one item, or reads part of a chunk with, stays a read item.
    for i in ours:
        if i.type.name == "TENSOR" and len(by_key[i.dest_index.fqn]) == 1:
            chunk = lazy.state_dict_metadata[i.dest_index.fqn].saved[i.storage_index.index]  # type: ignore[union-attr]
            assert chunk.sizes != tuple(i.lengths) or any(i.storage_offsets), i


def test_listed_metadata_plans_as_dcp_does_over_layouts_reshardings_and_meshes() -> None:
    run_ranks(_compare_listed_with_dcp, 4)


@pytest.fixture
def many_small(tmp_path: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """A checkpoint of small tensors of several dtypes and shapes, back to back in one file."""
    g = torch.Generator().manual_seed(1)
    state = {
        "f32": torch.rand(5, 3, generator=g),
        "bf16": torch.rand(4, 3, generator=g).to(torch.bfloat16),
        "f16": torch.rand(7, generator=g).to(torch.float16),
        "i8": torch.randint(-100, 100, (3, 3), generator=g, dtype=torch.int8),
        "bool": torch.rand(9, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "f8": torch.rand(4, generator=g).to(torch.float8_e4m3fn),
    }
    path = str(tmp_path / "ck")
    shardckpt.save(state, path)
    return path, state


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values and dtype (float8 has no ``torch.equal``: compared as float32)."""
    return a.dtype == b.dtype and torch.equal(a.detach().float(), b.float())


def _zeros_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def test_a_joined_read_fills_every_dtype_and_non_contiguous_targets(many_small: Any) -> None:
    path, state = many_small
    target = _zeros_like(state)
    shardckpt.load(target, path)
    assert all(_same(target[k], v) for k, v in state.items())
    # Non-contiguous targets, a parameter that requires grad and a cast target take the torch copy.
    odd: dict[str, Any] = {k: torch.zeros(v.shape[::-1], dtype=v.dtype).T for k, v in state.items() if v.dim() == 2}
    odd["f16"] = torch.nn.Parameter(torch.zeros(7, dtype=torch.float16))
    assert not odd["f32"].is_contiguous()
    shardckpt.load(odd, path, strict=False)
    assert all(_same(odd[k], state[k]) for k in odd) and odd["f16"].requires_grad
    cast = {"f32": torch.zeros(5, 3, dtype=torch.float64)}
    shardckpt.load(cast, path, strict=False, allow_dtype_cast=True)
    assert torch.equal(cast["f32"], state["f32"].double())


def test_a_load_reads_same_layout_chunks_without_read_items_unless_the_planner_commits(
    many_small: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardckpt.engine import planner as planner_module
    from shardckpt.engine import reader as reader_module

    path, state = many_small
    seen: list[tuple[int, int]] = []  # (read items, whole chunks) of each read_runs
    original = reader_module.read_runs

    def counting(items: Any, chunks: Any, boxes: Any, whole: Any = ()) -> Any:
        seen.append((len(items), len(whole)))
        return original(items, chunks, boxes, whole)

    monkeypatch.setattr(reader_module, "read_runs", counting)
    target = _zeros_like(state)
    shardckpt.load(target, path)
    assert seen == [(0, len(state))] and all(_same(target[k], v) for k, v in state.items())
    # A planner that commits each tensor takes read items: it is handed every one.
    committed: list[str] = []

    class Committing(planner_module.LoadPlanner):
        def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
            committed.append(read_item.dest_index.fqn)

    monkeypatch.setattr("shardckpt.engine.plan_v3.LoadPlanner", Committing)
    seen.clear()
    target = _zeros_like(state)
    shardckpt.load(target, path)
    assert seen == [(len(state), 0)] and sorted(committed) == sorted(state)
    assert all(_same(target[k], v) for k, v in state.items())


def test_a_flipped_byte_in_a_joined_read_names_its_key(many_small: Any) -> None:
    path, state = many_small
    manifest = read_manifest(path)
    rec = manifest.tensors["i8"].chunks[0]
    data = os.path.join(path, rec.file)
    flip_byte(data, rec.byte_offset + 4)
    with pytest.raises(IntegrityError, match=r"key 'i8'.*checksum mismatch"):
        shardckpt.load(_zeros_like(state), path)


@pytest.mark.parametrize("scan_max", [0, 16])
def test_listed_chunks_finds_each_chunk_by_scan_or_index_and_names_a_missing_one(
    many_small: Any, scan_max: int
) -> None:
    path, _ = many_small
    manifest = read_manifest(path)
    chunks = ListedChunks(open_storage(path), manifest, verify=True, where=path)
    chunks.SCAN_MAX_CHUNKS = scan_max  # 0: every tensor is indexed
    for key, rec in manifest.tensors.items():
        assert chunks.chunk(key, rec.chunks[0].offsets) is rec.chunks[0]
    with pytest.raises(IntegrityError, match=r"key 'f32': no chunk at offsets \(1, 0\)"):
        chunks.chunk("f32", (1, 0))
    with pytest.raises(IntegrityError, match="key 'nope'"):
        chunks.chunk("nope", (0,))


def test_the_readers_metadata_lists_format_1_chunks_lazily(many_small: Any) -> None:
    path, _ = many_small
    manifest = read_manifest(path)
    md = Reader(open_storage(path), manifest, verify=True, num_io_threads=1).read_metadata()
    f32 = md.state_dict_metadata["f32"]
    assert isinstance(f32, ListedTensorMetadata) and f32._chunks is None
    assert f32.chunks == manifest_to_metadata(manifest).state_dict_metadata["f32"].chunks
    assert f32.chunks == [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([5, 3]))]
