"""Format-3 checkpoints of 4 simulated ranks (tests/support/v3_fixture.py) loaded by 2 and 3
real ranks into other layouts (and a 2-rank one into the same layout), bitwise; and what each
rank reads (issue #16's load targets): metadata no more than the manifest plus the pages and
index records of the ranks whose files it reads, each once; data within 1.05x of the bytes it
needs for a 4 -> 3 reshard, verified. And a real 2-rank format-3 save with small replicated
tensors (AdamW-like 0-d steps), loaded again: the coordinator stored them in a file whose index
the manifest copies, so every rank reads no index record but its own.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from distributed import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from v3_fixture import SAVE_ID, Boxes, Split, write_v3

import shardckpt
from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.errors import ManifestError
from shardckpt.format import layout
from shardckpt.storage.local import LocalStorage

ROWS, COLS = 1200, 513  # 2052-byte rows: no reshard boundary falls on a 4 KiB block boundary
BLOCK = 4096


def _big() -> torch.Tensor:
    return torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS)


def _grid() -> torch.Tensor:
    return torch.arange(6 * 8, dtype=torch.int32).reshape(6, 8)


def _irregular() -> torch.Tensor:
    return torch.arange(7 * 3, dtype=torch.float64).reshape(7, 3)


def _write(path: str) -> dict[str, Any]:
    w = write_v3(
        path,
        {
            "big": (_big(), Split((4, 1))),  # FSDP Shard(0) over 4
            "grid": (_grid(), Split((2, 2))),  # a 2 x 2 mesh
            "bias": (torch.arange(5, dtype=torch.float32), Split((1,))),  # replicated
            "irr": (_irregular(), Boxes((((0, 0), (2, 3)), ((2, 0), (1, 3)), ((3, 0), (4, 3))))),
        },
        ranks=4,
        values={"step": 11},
        hash_block_bytes=BLOCK,
        ranks_per_page=2,  # pages: ranks 0-1, ranks 2-3
    )
    return {
        "pages": w.page_names,
        "index": w.index_names,
        "files": w.files_of_rank,
    }


class CountingStorage(LocalStorage):
    def __init__(self, root: str, log: Counter[str], calls: Counter[str]) -> None:
        super().__init__(root)
        self.log, self.calls = log, calls

    def read_bytes(self, name: str) -> bytes:
        data = super().read_bytes(name)
        self.log[name] += len(data)
        self.calls[name] += 1
        return data

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        super().read_into(name, offset, out)
        self.log[name] += len(out)
        self.calls[name] += 1


def _rows(rank: int, world: int, n: int) -> slice:
    block = -(-n // world)
    return slice(min(rank * block, n), min((rank + 1) * block, n))


def _four_to_three(rank: int, world_size: int, path: str, written: dict[str, Any]) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    big = distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)])
    grid = distribute_tensor(torch.zeros(6, 8, dtype=torch.int32), mesh, [Shard(1)])  # 2 x 2 cells -> columns 3, 3, 2
    irr = distribute_tensor(torch.zeros(7, 3, dtype=torch.float64), mesh, [Shard(0)])
    state = {"big": big, "grid": grid, "bias": torch.zeros(5), "irr": irr, "step": 0}
    log: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    ckpt = Checkpointer(storage_factory=lambda url, opts, *rest: CountingStorage(url, log, calls))
    try:
        ckpt.load(state, path)
    finally:
        ckpt.close()
    rows = _rows(rank, world_size, ROWS)
    assert torch.equal(big.to_local(), _big()[rows])
    assert torch.equal(grid.to_local(), _grid()[:, _rows(rank, world_size, 8)])
    assert torch.equal(irr.to_local(), _irregular()[_rows(rank, world_size, 7)])
    assert torch.equal(state["bias"], torch.arange(5, dtype=torch.float32)) and state["step"] == 11

    # Which simulated ranks' files this rank read, and the metadata it fetched for them.
    read_from = {r for r, names in written["files"].items() if any(n in log for n in names)}
    expected_meta = {layout.MANIFEST_NAME}
    expected_meta |= {written["index"][r] for r in read_from}
    expected_meta |= {written["pages"][r // 2] for r in read_from}
    data = {n for names in written["files"].values() for n in names}
    meta_read = {n for n in log if n not in data}
    assert meta_read == expected_meta, (rank, meta_read, expected_meta)
    assert all(calls[n] == 1 for n in meta_read), calls
    # big's rows are the bulk: the other tensors add < 1 KiB of need and < 5 blocks of rounding
    needed = (rows.stop - rows.start) * COLS * 4
    data_read = sum(log[n] for n in data)
    assert needed <= data_read <= 1.05 * needed, (rank, data_read, needed)
    print(f"rank {rank}: data read {data_read} for {needed} needed ({data_read / needed:.4f}x)")


def test_four_ranks_to_three_bitwise_reading_only_what_is_needed(tmp_path):
    path = os.fspath(tmp_path / "c")
    written = _write(path)
    run_ranks(_four_to_three, 3, path, written)


def _four_to_two(rank: int, world_size: int, path: str, damaged: bool) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    # damaged: big is sharded, so only rank 1 reads simulated rank 3's files (rows 900-1199)
    big = distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0) if damaged else Replicate()])
    grid = distribute_tensor(torch.zeros(6, 8, dtype=torch.int32), mesh, [Shard(0)])
    irr = distribute_tensor(torch.zeros(7, 3, dtype=torch.float64), mesh, [Shard(1)])
    state = {"big": big, "grid": grid, "bias": torch.zeros(5), "irr": irr, "step": 0}
    if damaged:
        try:
            shardckpt.load(state, path)
        except ManifestError as e:  # rank 1's error, on both ranks
            assert "failed on rank 1" in str(e) and "(rank 1): the index record of rank 3" in str(e), e
            assert "is missing" in str(e), e
        else:
            raise AssertionError("a load with a missing index record succeeded")
        dist.barrier()
        return
    shardckpt.load(state, path)
    assert torch.equal(big.to_local(), _big())
    assert torch.equal(grid.to_local(), _grid()[_rows(rank, world_size, 6)])
    assert torch.equal(irr.to_local(), _irregular()[:, _rows(rank, world_size, 3)])

    # The same layout (2 simulated ranks, Shard(0)): each rank reads its own data file, its own
    # index record and the one page, and exactly the bytes of its shard.
    same = os.path.join(os.path.dirname(path), "same")
    if rank == 0:
        write_v3(same, {"big": (_big(), Split((2, 1)))}, ranks=2, hash_block_bytes=BLOCK)
    dist.barrier()
    log: Counter[str] = Counter()
    ckpt = Checkpointer(storage_factory=lambda url, opts, *rest: CountingStorage(url, log, Counter()))
    mine = distribute_tensor(torch.zeros(ROWS, COLS), mesh, [Shard(0)])
    try:
        ckpt.load({"big": mine}, same)
    finally:
        ckpt.close()
    assert torch.equal(mine.to_local(), _big()[_rows(rank, world_size, ROWS)])
    own = layout.data_file_name(SAVE_ID, rank, 0)
    expected = {layout.MANIFEST_NAME, layout.rank_page_name(SAVE_ID, 0), layout.rank_index_name(SAVE_ID, rank), own}
    assert set(log) == expected, log
    assert log[own] == ROWS // world_size * COLS * 4


def test_four_ranks_to_two_other_grids_and_the_same_layout_then_a_missing_index_record_fails_every_rank(tmp_path):
    path = os.fspath(tmp_path / "c")
    written = _write(path)
    run_ranks(_four_to_two, 2, path, False)
    os.remove(os.path.join(path, written["index"][3]))  # only rank 1 reads rank 3's files: rank 0 fails too
    run_ranks(_four_to_two, 2, path, True)


STEPS = 12  # 0-d replicated tensors, like AdamW's one step per parameter


def _steps_state(mesh: Any, fill: bool) -> dict[str, Any]:
    weight = _big() if fill else torch.zeros(ROWS, COLS)
    steps = {f"p{i}": torch.tensor(float(i + 1) if fill else 0.0) for i in range(STEPS)}
    bias = torch.arange(5, dtype=torch.float32) if fill else torch.zeros(5)
    return {"w": distribute_tensor(weight, mesh, [Shard(0)]), "step": steps, "bias": bias}


def _small_replicated(rank: int, world_size: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    saver = Checkpointer()
    try:  # a format-1 save first: the format-3 save of the same layout must not reuse its placement
        saver.save(_steps_state(mesh, fill=True), f"{path}-v1")
        saver.save(_steps_state(mesh, fill=True), path, format_version=3)
    finally:
        saver.close()
    state = _steps_state(mesh, fill=False)
    log: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    ckpt = Checkpointer(storage_factory=lambda url, opts, *rest: CountingStorage(url, log, calls))
    try:
        ckpt.load(state, path)
    finally:
        ckpt.close()
    assert torch.equal(state["w"].to_local(), _big()[_rows(rank, world_size, ROWS)])
    assert all(state["step"][f"p{i}"].item() == i + 1 for i in range(STEPS)), state["step"]
    assert torch.equal(state["bias"], torch.arange(5, dtype=torch.float32))

    m = shardckpt.read_any_manifest(path)
    (group,) = m.file_table.groups
    # The coordinator's small tensors are in its last file, whose index the manifest copies
    # (format.md 12.8): no rank reads another rank's page or index record for them.
    assert m.inline_index is not None and len(m.inline_index.index.entries) == STEPS + 1  # the steps and bias
    assert m.file_table.locate(m.inline_index.file).rank == 0
    last = m.file_table.locate(m.inline_index.file).name
    expected = {
        layout.MANIFEST_NAME,
        layout.rank_page_name(group.save_id, 0),
        layout.rank_index_name(group.save_id, rank),
    }
    meta_read = {n for n in log if not n.endswith(".safetensors")}
    assert meta_read == expected, (rank, sorted(meta_read))  # its own record only, on every rank
    assert all(calls[n] == 1 for n in meta_read), calls
    others = {n for n in log if n.endswith(".safetensors") and f"-r{rank:05d}-" not in n}
    assert others == ({last} if rank else set()), (rank, sorted(others))  # steps and bias: the coordinator's file
    assert last in log  # rank 0 too reads them from that file


def test_small_replicated_tensors_are_read_from_the_coordinator_alone(tmp_path):
    run_ranks(_small_replicated, 2, os.fspath(tmp_path / "c"))
