"""Peak host memory of `shardckpt export` against the bound: 2 x largest tensor + a fixed buffer.

    python benchmarks/export_memory.py                       # ~1 GiB checkpoint, largest tensor 64 MiB
    python benchmarks/export_memory.py --total-mib 256 --largest-mib 16     # quick
    python benchmarks/export_memory.py --json /tmp/export_memory.json

A checkpoint of many fp32 tensors (sizes halving from --largest-mib, so most tensors are
small and a few are large) is saved by 2 gloo ranks with 2-D tensors column-sharded
(Shard(1)), the worst case for assembly: a column chunk is not contiguous in the global
tensor, so it passes through a chunk-sized buffer. Then each export mode runs in a fresh
Python process that reports its resident memory from /proc/self/status: VmRSS after
imports (the baseline: interpreter, torch, shardckpt) and VmHWM (peak resident) after the
export. The streamed modes (safetensors, hf) must stay within baseline + 2 x largest +
--buffer-mib; torch.save holds every tensor at once and is reported for comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

MiB = 2**20
CHILD = r"""
import json, sys, time
def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
import torch
from shardckpt.convert import export_checkpoint
baseline = status("VmRSS")
t0 = time.perf_counter()
kwargs = {"max_shard_bytes": "256MiB"} if sys.argv[3] == "hf" else {}
export_checkpoint(sys.argv[1], sys.argv[2], format=sys.argv[3], **kwargs)
print(json.dumps({"baseline_rss": baseline, "peak_hwm": status("VmHWM"), "seconds": time.perf_counter() - t0}))
"""


def tensor_sizes(total_mib: int, largest_mib: int, classes: int = 4) -> list[int]:
    """Sizes in MiB: ``classes`` size classes halving from the largest, each holding an equal share of bytes."""
    sizes: list[int] = []
    for c in range(classes):
        size = max(1, largest_mib >> c)
        sizes += [size] * max(1, total_mib // classes // size)
    return sizes


def _rank(rank: int, world: int, port: int, path: str, sizes: list[int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import shardckpt

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (world,))
    state = {}
    for i, mib in enumerate(sizes):
        cols = 1024
        rows = mib * MiB // 4 // cols
        local = torch.full((rows, cols // world), float(i * world + rank))  # this rank's columns, built in place
        state[f"model.t{i:03d}"] = DTensor.from_local(local, mesh, [Shard(1)], run_check=False)
    shardckpt.save(state, path)
    dist.barrier()
    dist.destroy_process_group()


def save_checkpoint(path: str, sizes: list[int]) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, path, sizes), nprocs=2, join=True)


def measure(ckpt: str, out: str, fmt: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD, ckpt, out, fmt], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"export {fmt} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--total-mib", type=int, default=1024)
    p.add_argument("--largest-mib", type=int, default=64)
    p.add_argument("--buffer-mib", type=int, default=64, help="the fixed allowance on top of 2 x largest")
    p.add_argument("--modes", nargs="+", default=["safetensors", "hf", "torch"])
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    scratch = args.dir or tempfile.mkdtemp(prefix="export_memory_")
    sizes = tensor_sizes(args.total_mib, args.largest_mib)
    ckpt = os.path.join(scratch, "ckpt")
    try:
        t0 = time.perf_counter()
        save_checkpoint(ckpt, sizes)
        print(
            f"checkpoint: {len(sizes)} fp32 tensors, {sum(sizes)} MiB, largest {max(sizes)} MiB, "
            f"saved by 2 ranks (Shard(1)) in {time.perf_counter() - t0:.1f} s"
        )
        bound = (2 * max(sizes) + args.buffer_mib) * MiB
        rows = []
        for fmt in args.modes:
            out = os.path.join(
                scratch, "out.safetensors" if fmt == "safetensors" else "out.pt" if fmt == "torch" else "hf"
            )
            r = measure(ckpt, out, fmt)
            shutil.rmtree(out, ignore_errors=True) if os.path.isdir(out) else os.remove(out)
            extra = r["peak_hwm"] - r["baseline_rss"]
            rows.append({"format": fmt, **r, "extra": extra, "bound_extra": bound, "within_bound": extra <= bound})
            print(
                f"{fmt:12s} baseline {r['baseline_rss'] / MiB:7.1f} MiB  peak {r['peak_hwm'] / MiB:7.1f} MiB  "
                f"peak-baseline {extra / MiB:7.1f} MiB  "
                f"bound 2x{max(sizes)}+{args.buffer_mib} = {bound / MiB:.0f} MiB  "
                f"{'OK' if extra <= bound else 'OVER'}  {r['seconds']:.1f} s"
            )
        result = {
            "total_mib": sum(sizes),
            "num_tensors": len(sizes),
            "largest_mib": max(sizes),
            "buffer_mib": args.buffer_mib,
            "ratio_checkpoint_to_bound": sum(sizes) * MiB / bound,
            "modes": rows,
        }
        print(f"checkpoint / bound = {result['ratio_checkpoint_to_bound']:.1f}x")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
