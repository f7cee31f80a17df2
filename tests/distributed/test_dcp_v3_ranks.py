"""``dcp.load`` through ``shardckpt.dcp.StorageReader`` of a format-3 checkpoint on 2 gloo
ranks, resharded (issue #16): saved as ``Shard(0)``, loaded as ``Shard(1)``, bitwise, with
DCP's own planner. What the real writer does for a rank with nothing to store (the loader's
fixture, tests/support/v3_fixture.py, writes no data file for it): with no write item, no data
file but an index record; with only an empty DTensor piece, a data file of a header alone and
the empty chunk listed beside the rule (docs/format.md 12.1 allows it). Both load."""

from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp
from distributed import run_ranks
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import shardckpt
from shardckpt.convert import materialize_checkpoint
from shardckpt.convert.audit import verify_checkpoint
from shardckpt.dcp import StorageReader
from shardckpt.format import layout

FAST_START: dict = {"preload": ["torch.distributed.checkpoint", "shardckpt.dcp", __name__]}
W = torch.arange(11 * 6, dtype=torch.float32).reshape(11, 6) / 7  # 11 rows over 2 ranks: 6 + 5
ROW = torch.linspace(-2, 2, 6).reshape(1, 6)  # one row: rank 1's Shard(0) piece is empty
REP = torch.arange(10, dtype=torch.int64)  # a plain tensor, the same on both ranks: stored by one


def _save(rank: int, world: int, root: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    state = {"model": {"w": distribute_tensor(W, mesh, [Shard(0)])}, "row": distribute_tensor(ROW, mesh, [Shard(0)])}
    shardckpt.save(state | {"step": 5}, os.path.join(root, "split"), format_version=3)
    shardckpt.save({"rep": REP.clone()}, os.path.join(root, "one_rank"), format_version=3)


def _load(rank: int, world: int, root: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    target = {"model": {"w": distribute_tensor(torch.zeros_like(W), mesh, [Shard(1)])}, "step": 0}
    reader = StorageReader(os.path.join(root, "split"))
    dcp.load(target, storage_reader=reader, planner=DefaultLoadPlanner())
    got = target["model"]["w"].full_tensor()  # type: ignore[index]
    assert torch.equal(got.view(torch.int32), W.view(torch.int32)) and target["step"] == 5
    mine = W[:, rank * 3 : rank * 3 + 3]
    assert torch.equal(target["model"]["w"].to_local(), mine)  # type: ignore[index]
    row = {"row": distribute_tensor(torch.zeros_like(ROW), mesh, [Replicate()])}
    dcp.load(row, storage_reader=StorageReader(os.path.join(root, "split")))
    assert torch.equal(row["row"].to_local(), ROW)
    rep = {"rep": distribute_tensor(torch.zeros_like(REP), mesh, [Shard(0)])}
    dcp.load(rep, storage_reader=StorageReader(os.path.join(root, "one_rank")))
    assert torch.equal(rep["rep"].to_local(), REP[rank * 5 : rank * 5 + 5])


def test_dcp_load_of_format_3_on_2_ranks_resharded(tmp_path):
    root = str(tmp_path)
    run_ranks(_save, 2, root, **FAST_START)
    data = sorted(os.listdir(tmp_path / "one_rank" / layout.DATA_DIR))
    indexes = [n for n in data if n.endswith(".index.json")]
    files = [n for n in data if n.endswith(layout.DATA_SUFFIX)]
    assert len(indexes) == 2 and len(files) == 1  # the rank that stored nothing: its index record only
    row = shardckpt.read_any_manifest(str(tmp_path / "split")).tensors["row"]
    assert row.rule is not None and [c.sizes for c in row.chunks] == [(0, 6)]  # rank 1's piece, listed
    assert verify_checkpoint(tmp_path / "split").ok  # its header-only data file too
    materialize_checkpoint(tmp_path / "split", tmp_path / "copy")
    flat = shardckpt.read_state_dict(tmp_path / "copy", flat=True)
    assert torch.equal(flat["model.w"], W) and torch.equal(flat["row"], ROW) and flat["step"] == 5
    run_ranks(_load, 2, root, **FAST_START)
