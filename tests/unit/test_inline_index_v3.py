"""The manifest's inline index (docs/format.md 12.8) in one process: a format-3 save puts the
coordinator's small tensors in a last data file whose index the manifest copies; a load reads
them with no index record; a copy that disagrees with the bytes fails the read; verify names a
copy that differs from rank 0's record; a manifest without the copy (older saves) still loads."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.convert.audit import verify_checkpoint
from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.errors import IntegrityError
from shardckpt.format import layout
from shardckpt.format.manifest import seal
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.storage.local import LocalStorage


def _state(fill: bool) -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    big = torch.randn(20_000, generator=g) if fill else torch.zeros(20_000)  # 80 KB: not small
    steps = {f"p{i}": torch.tensor(float(i + 1) if fill else 0.0) for i in range(5)}
    return {"w": big, "step": steps, "norm": torch.arange(6.0) if fill else torch.zeros(6), "epoch": 3}


class _Counting(LocalStorage):
    def __init__(self, root: str, log: Counter[str]) -> None:
        super().__init__(root)
        self.log = log

    def read_bytes(self, name: str) -> bytes:
        self.log[name] += 1
        return super().read_bytes(name)


def _load(path: Path) -> tuple[dict[str, Any], Counter[str]]:
    state, log = _state(fill=False), Counter[str]()
    ckpt = Checkpointer(storage_factory=lambda url, opts, *rest: _Counting(url, log))
    try:
        ckpt.load(state, path)
    finally:
        ckpt.close()
    return state, log


def _manifest(path: Path) -> ManifestV3:
    m = shardckpt.read_any_manifest(path)
    assert isinstance(m, ManifestV3)
    return m


def _rewrite(path: Path, change: Any) -> None:
    """Edit the manifest's JSON and seal it again (a hostile but well-formed manifest)."""
    doc = json.loads((path / layout.MANIFEST_NAME).read_bytes())
    doc.pop("manifest_hash")
    change(doc)
    (path / layout.MANIFEST_NAME).write_bytes(seal(json.dumps(doc).encode()))


def _saved(tmp_path: Path) -> Path:
    path = tmp_path / "c"
    shardckpt.save(_state(fill=True), path, format_version=3, num_io_threads=1)
    return path


def test_small_tensors_are_read_through_the_manifest_copy_alone(tmp_path):
    path = _saved(tmp_path)
    m = _manifest(path)
    assert m.file_table.groups[0].files == ((1, 2),)  # w; then the steps and norm
    assert m.inline_index is not None and m.inline_index.file == 1 and len(m.inline_index.index.entries) == 6
    record = json.loads((path / layout.rank_index_name(m.file_table.groups[0].save_id, 0)).read_bytes())
    assert json.loads((path / layout.MANIFEST_NAME).read_bytes())["inline_index"] == {"file": 1, **record["files"][1]}
    state = _state(fill=False)
    del state["w"]  # only the small tensors: the page and the record are not needed at all
    log = Counter[str]()
    ckpt = Checkpointer(storage_factory=lambda url, opts, *rest: _Counting(url, log))
    try:
        ckpt.load(state, path, strict=False)
    finally:
        ckpt.close()
    assert state["step"]["p4"].item() == 5.0 and torch.equal(state["norm"], torch.arange(6.0))
    assert set(log) == {layout.MANIFEST_NAME}, sorted(log)  # no page, no index record
    full, log = _load(path)
    assert torch.equal(full["w"], _state(fill=True)["w"]) and full["epoch"] == 3
    assert sum(1 for n in log if n.endswith(".index.json")) == 1  # w's file: rank 0's record, once
    assert verify_checkpoint(path).ok


def test_a_checkpoint_without_the_copy_loads_through_the_records(tmp_path):
    path = _saved(tmp_path)
    _rewrite(path, lambda doc: doc.pop("inline_index"))
    assert _manifest(path).inline_index is None
    state = _state(fill=False)
    del state["w"]
    log = Counter[str]()
    ckpt = Checkpointer(storage_factory=lambda url, opts, *rest: _Counting(url, log))
    try:
        ckpt.load(state, path, strict=False)
    finally:
        ckpt.close()
    assert state["step"]["p0"].item() == 1.0 and torch.equal(state["norm"], torch.arange(6.0))
    assert sum(1 for n in log if n.endswith(".index.json")) == 1 and sum(1 for n in log if n.endswith(".ranks.json"))
    assert verify_checkpoint(path).ok


def _flip_hash(doc: dict[str, Any]) -> None:
    entry = doc["inline_index"]["entries"][0]
    entry[2] = ("0" if entry[2][0] != "0" else "1") + entry[2][1:]


def test_a_copy_that_disagrees_with_the_bytes_fails_the_read_and_verify(tmp_path):
    path = _saved(tmp_path)
    _rewrite(path, _flip_hash)
    m = _manifest(path)
    assert m.inline_index is not None
    name = m.file_table.locate(m.inline_index.file).name
    with pytest.raises(IntegrityError, match=name.split("/")[-1]):
        _load(path)
    report = verify_checkpoint(path)
    assert not report.ok
    (problem,) = [p for p in report.problems if "inline_index" in p.message]
    assert problem.file == name and "differ at entry 0" in problem.message


def test_verify_names_a_copy_of_another_size(tmp_path):
    path = _saved(tmp_path)
    _rewrite(path, lambda doc: doc["inline_index"].update(size=doc["inline_index"]["size"] + 1))
    with pytest.raises(IntegrityError):  # the file has another size than the copy says
        _load(path)
    (problem,) = [p for p in verify_checkpoint(path).problems if "inline_index" in p.message]
    assert "size" in problem.message and "ManifestError" in problem.message


def _item(fqn: str, shape: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> Any:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
    data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=torch.float32), size=torch.Size(shape))
    return WriteItem(index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.TENSOR, tensor_data=data)


def test_split_inline_sets_apart_the_coordinators_small_whole_tensors_only():
    from shardckpt.engine.placement import SMALL_REPLICATED_BYTES
    from shardckpt.engine.rank_result import split_inline

    big = _item("big", (SMALL_REPLICATED_BYTES // 4 + 1,), (0,), (SMALL_REPLICATED_BYTES // 4 + 1,))
    shard = _item("w", (100, 4), (50, 0), (50, 4))  # small, but a piece of a tensor: not whole
    step, norm = _item("step", (), (), ()), _item("norm", (SMALL_REPLICATED_BYTES // 4,), (0,), (8192 * 2,))
    empty = _item("empty", (0, 3), (0, 0), (0, 3))
    items = [big, shard, step, norm, empty]
    rest, small = split_inline(items, rank=0)
    assert [i.index.fqn for i in small] == ["step", "norm"]  # smallest first, each <= 64 KiB, whole
    assert [i.index.fqn for i in rest] == ["big", "w", "empty"]  # in their order
    assert split_inline(items, rank=1) == (items, [])  # other ranks keep every item
    assert split_inline([step, norm, empty], rank=0) == ([step, norm, empty], [])  # nothing else: one file


def test_split_inline_takes_the_smallest_whole_tensors_within_the_budget(monkeypatch):
    from shardckpt.engine import rank_result

    # whole tensors of 8, 4, 4 and 12 bytes (ties by key), shards and a big one around them
    a, b = _item("b", (1,), (0,), (1,)), _item("a", (1,), (0,), (1,))
    two, three = _item("two", (2,), (0,), (2,)), _item("three", (3,), (0,), (3,))
    shards = [_item(f"s{i}", (8, 2), (4, 0), (4, 2)) for i in range(3)]
    items = [shards[0], two, b, shards[1], three, a, shards[2]]
    monkeypatch.setattr(rank_result, "SMALL_REPLICATED_BUDGET_BYTES", 16)
    rest, small = rank_result.split_inline(items, rank=0)
    assert [i.index.fqn for i in small] == ["a", "b", "two"]  # 4 + 4 + 8 = 16; "three" (12) no longer fits
    assert [i.index.fqn for i in rest] == ["s0", "s1", "three", "s2"]  # in their order
    monkeypatch.setattr(rank_result, "SMALL_REPLICATED_BUDGET_BYTES", 7)
    rest, small = rank_result.split_inline(items, rank=0)
    assert [i.index.fqn for i in small] == ["a"]  # 4; "b" (4 more) does not fit in 7
    assert len(rest) == len(items) - 1


def test_dcp_load_and_materialize_read_the_coordinators_small_file(tmp_path):
    """The DCP reader resolves through the copy; materialize copies the file from rank 0's
    record (which still lists it) into a version-1 checkpoint that loads the same."""
    import torch.distributed.checkpoint as dcp

    from shardckpt.convert import materialize_checkpoint
    from shardckpt.dcp import StorageReader

    path = _saved(tmp_path)
    flat = {"w": torch.zeros(20_000), "norm": torch.zeros(6), **{f"step.p{i}": torch.tensor(0.0) for i in range(5)}}
    dcp.load(flat, storage_reader=StorageReader(path))
    assert torch.equal(flat["norm"], torch.arange(6.0)) and flat["step.p2"].item() == 3.0
    materialize_checkpoint(path, tmp_path / "v1")
    state = _state(fill=False)
    shardckpt.load(state, tmp_path / "v1")
    assert torch.equal(state["w"], _state(fill=True)["w"]) and state["step"]["p4"].item() == 5.0
