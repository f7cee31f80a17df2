"""Multi-rank save, then load on a different number of ranks; prints what it did and the throughput.

torchrun --nproc-per-node 4 launch/demo.py save --dir runs/demo --mib 256
torchrun --nproc-per-node 3 launch/demo.py load --dir runs/demo --mib 256
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import shardckpt


def make_state(mib: int, world: int, fill: bool) -> dict:
    """A model-like state: 8 large sharded matrices, AdamW-like moments, and counters."""
    mesh = init_device_mesh("cpu", (world,))
    rows = max(1, mib * 2**20 // (4 * 1024 * 24))  # 24 tensors of [rows, 1024] fp32
    g = torch.Generator().manual_seed(0)
    sd: dict = {"model": {}, "optim": {}, "step": 0}
    for i in range(8):
        for group, name in (
            ("model", f"layer{i}.weight"),
            ("optim", f"layer{i}.exp_avg"),
            ("optim", f"layer{i}.exp_avg_sq"),
        ):
            full = torch.randn(rows, 1024, generator=g) if fill else torch.zeros(rows, 1024)
            sd[group][name] = distribute_tensor(full, mesh, [Shard(0)])
    if fill:
        sd["step"] = 1000
    return sd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["save", "load"])
    ap.add_argument("--dir", required=True, help="checkpoint folder (local path or fsspec URL)")
    ap.add_argument("--mib", type=int, default=256, help="total state size in MiB")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sd = make_state(args.mib, world, fill=args.action == "save")
    nbytes = sum(t.numel() * 4 for part in ("model", "optim") for t in sd[part].values())
    dist.barrier()
    t0 = time.perf_counter()
    if args.action == "save":
        shardckpt.save(sd, args.dir, overwrite=True)
    else:
        shardckpt.load(sd, args.dir)
    dist.barrier()
    dt = time.perf_counter() - t0
    if args.action == "load":
        expected = make_state(args.mib, world, fill=True)
        ok = (
            all(torch.equal(sd[p][k].to_local(), expected[p][k].to_local()) for p in ("model", "optim") for k in sd[p])
            and sd["step"] == 1000
        )
        oks = [None] * world
        dist.all_gather_object(oks, ok)
        assert all(oks), f"loaded values differ on ranks {[r for r, o in enumerate(oks) if not o]}"
    if rank == 0:
        m = shardckpt.read_manifest(shardckpt.storage.open_storage(args.dir)) if args.action == "load" else None
        saved_on = f" (saved on {m.world_size} ranks)" if m else ""
        print(
            f"{args.action}: {nbytes / 2**20:.0f} MiB on {world} ranks{saved_on} in {dt:.2f} s = "
            f"{nbytes / dt / 1e9:.2f} GB/s -> {os.path.abspath(args.dir) if '://' not in args.dir else args.dir}"
            + ("; values verified bitwise" if args.action == "load" else "")
        )
    dist.barrier()  # leave together: a rank tearing down gloo after rank 0 (the store) exited can abort
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
