"""Incremental format-3 saves over 2 gloo ranks (docs/format.md 12.7): FSDP-like Shard(0)
DTensors and a replicated tensor, saved in full, then against that base after one sharded
tensor changed. Only that tensor's bytes are written (each rank its own shard); each rank
read only the base's manifest, page and its own index record; the checkpoint loads bitwise on 2 ranks
and on 1 process; a 1-process save against it reuses only the replicated tensor; a tampered
base file is an IntegrityError naming it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from v3files import assemble, read_v3

import shardckpt
from shardckpt.errors import IntegrityError
from shardckpt.format import layout
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.storage.local import LocalStorage


def full_state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "frozen": torch.randn(64, 32, generator=g),  # 8 KiB
        "train": torch.randn(18, 32, generator=g) + step,  # 18 rows: 9 + 9
        "rep": torch.randn(16, generator=g),
    }


class Reads(LocalStorage):
    """Records the pages and index records read as whole records (``read_bytes``)."""

    def read_bytes(self, name: str) -> bytes:
        with open(os.environ["READS_LOG"], "a") as f:
            f.write(f"{os.path.basename(self.root)}/{name}\n")
        return super().read_bytes(name)

    def sibling(self, name: str) -> LocalStorage:
        return Reads(os.path.join(os.path.dirname(self.root), name))


def _sharded(step: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (2,))
    return {
        k: distribute_tensor(v, mesh, [Replicate()] if k == "rep" else [Shard(0)]) for k, v in full_state(step).items()
    }


def _save_twice_and_load(rank: int, world: int, root: str) -> None:
    shardckpt.save(_sharded(1), f"{root}/step_1", format_version=3, incremental=True, timeout_s=60)
    os.environ["READS_LOG"] = f"{root}/reads-{rank}.txt"
    with shardckpt.Checkpointer(storage_factory=lambda url, *_: Reads(url)) as ckpt:
        ckpt.save(_sharded(2), f"{root}/step_2", format_version=3, base=f"{root}/step_1", timeout_s=60)
    target = {k: torch.zeros_like(v) if not isinstance(v, DTensor) else v * 0 for k, v in _sharded(0).items()}
    shardckpt.load(target, f"{root}/step_2", timeout_s=60)
    for k, want in full_state(2).items():
        got = target[k].full_tensor() if isinstance(target[k], DTensor) else target[k]
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), k


def test_incremental_format_3_on_2_ranks(tmp_path: Path) -> None:
    root = str(tmp_path)
    run_ranks(_save_twice_and_load, 2, root, timeout_s=180)
    m0, _ = read_v3(f"{root}/step_1")
    m1, chunks = read_v3(f"{root}/step_2")  # every page, record, file hash, block hash and digest
    assert m1.bases == ("step_1",) and m1.world_size == 2
    group1 = m0.file_table.groups[0]
    for rank in (0, 1):  # the base's manifest, page and the rank's own index record, nothing else
        with open(f"{root}/reads-{rank}.txt") as f:
            reads = sorted(set(f.read().split()))
        want = [
            f"step_1/{layout.rank_index_name(group1.save_id, rank)}",
            f"step_1/{layout.rank_page_name(group1.save_id, 0)}",
            f"step_1/{layout.MANIFEST_NAME}",
        ]
        assert reads == sorted(want), (rank, reads)
    # Only "train" was written: one 9-row shard per rank, in each rank's own file.
    assert [c.folder for c in chunks["train"]] == [None, None] and sorted(c.rank for c in chunks["train"]) == [0, 1]
    assert {c.folder for k in ("frozen", "rep") for c in chunks[k]} == {"step_1"}
    data = Path(root, "step_2", layout.DATA_DIR)
    written = sum(f.stat().st_size for f in data.iterdir() if f.name.endswith(".safetensors"))
    payload = full_state(2)["train"].nbytes
    assert payload <= written < payload + 2 * 512
    for k, want in full_state(2).items():
        assert torch.equal(assemble(chunks[k], tuple(want.shape), want.dtype), want), k
    # One process, plain tensors.
    one = {k: torch.zeros_like(v) for k, v in full_state(0).items()}
    shardckpt.load(one, f"{root}/step_2")
    assert all(torch.equal(one[k], v) for k, v in full_state(2).items())
    # A resharded incremental save (2 ranks -> 1 process): only the replicated tensor has the
    # same box as in the base (in step 1's files, flattened); the others are written again.
    m3 = shardckpt.save(full_state(2), f"{root}/step_3", format_version=3, base=f"{root}/step_2")
    assert isinstance(m3, ManifestV3) and m3.bases == ("step_1",)
    _, chunks3 = read_v3(f"{root}/step_3")
    assert {k: [c.folder for c in cs] for k, cs in chunks3.items()} == {
        "frozen": [None],
        "train": [None],
        "rep": ["step_1"],
    }
    # Tamper with rank 1's base file (its half of "frozen"): the load names it and its folder.
    name = layout.data_file_name(group1.save_id, 1, 0)
    with open(Path(root, "step_1", name), "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\x7f")
    with pytest.raises(IntegrityError) as err:
        shardckpt.load({k: torch.zeros_like(v) for k, v in full_state(0).items()}, f"{root}/step_2")
    assert name in str(err.value) and "step_1" in str(err.value)
