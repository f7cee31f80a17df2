"""A load's ranks share the checks of the manifest's chunk records (issue #18): each rank
checks the chunks of its own share of the tensors, and the load's first round trip tells
every rank that all shares passed before any record is used. So a record damaged in one
share (validly sealed: only the parser stands between it and the machine) must fail every
rank, with the error of the rank that checked it, and an intact manifest loads bitwise.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from distributed import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import shardckpt
from shardckpt.errors import ManifestError
from shardckpt.format import layout
from shardckpt.format.manifest import Share, manifest_to_json, parse_manifest

KEYS = [f"w{i:02d}" for i in range(12)]


def _state(mesh, fill: bool) -> dict[str, object]:
    def tensor(i: int) -> torch.Tensor:
        return torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4) * (i + 1) if fill else torch.zeros(6, 4)

    return {"model": {k: distribute_tensor(tensor(i), mesh, [Shard(0)]) for i, k in enumerate(KEYS)}}


def _damage(path: str, key: str) -> bytes:
    """Write the manifest again with ``key``'s first chunk one element longer than its box
    (what the full parser refuses), sealed; returns the intact bytes."""
    manifest_path = os.path.join(path, layout.MANIFEST_NAME)
    with open(manifest_path, "rb") as f:
        raw = f.read()
    m = parse_manifest(raw, source="test")
    t = m.tensors[key]
    first = t.chunks[0].replace(byte_length=t.chunks[0].byte_length + 4)
    bad = dataclasses.replace(m, tensors={**m.tensors, key: type(t)(t.dtype, t.shape, (first, *t.chunks[1:]))})
    with open(manifest_path, "wb") as f:
        f.write(manifest_to_json(bad))
    return raw


def _ranks(rank: int, world_size: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    shardckpt.save(_state(mesh, fill=True), path)
    keys = list(parse_manifest(open(os.path.join(path, layout.MANIFEST_NAME), "rb").read(), source="t").tensors)
    last = keys[-1]  # in the last rank's share only
    assert [last in keys[slice(*Share(r, world_size).bounds(len(keys)))] for r in range(world_size)] == [
        r == world_size - 1 for r in range(world_size)
    ]
    dist.barrier()
    if rank == 0:
        intact = _damage(path, last)
    dist.barrier()
    target = _state(mesh, fill=False)
    try:
        shardckpt.load(target, path)
    except ManifestError as e:  # the last rank's error, on every rank
        assert f"failed on rank {world_size - 1}" in str(e) and repr(last) in str(e), e
        assert "byte length does not match" in str(e) or "byte_length" in str(e), e
    else:
        raise AssertionError(f"rank {rank}: a manifest with a damaged record in another rank's share loaded")
    dist.barrier()
    if rank == 0:
        with open(os.path.join(path, layout.MANIFEST_NAME), "wb") as f:
            f.write(intact)
    dist.barrier()
    shardckpt.load(target, path)
    expected = _state(mesh, fill=True)
    for k in KEYS:
        assert torch.equal(target["model"][k].to_local(), expected["model"][k].to_local()), k


def test_a_record_damaged_in_one_ranks_share_fails_every_rank_and_an_intact_one_loads(tmp_path):
    run_ranks(_ranks, 3, os.fspath(tmp_path / "c"))
