"""Fast recovery tier, one process: the stall of a local save, and a restore from the local
tier against a restore of the same step from the durable tier (a folder on disk, its pages
evicted first: a cold read, as after a restart on another node).

    python benchmarks/local_tier.py --mib 1024 --local-dir /dev/shm/lt --durable-dir /tmp/lt [--cuda]

One process restores its own local copy: no partner transfer (the node-loss case adds one
gloo send of the shard; launch/recovery_demo.sh shows that end to end). Repetitions are
interleaved with a dropped warm-up (common.interleaved); medians printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import common
import torch

import shardckpt


def build_state(mib: int, device: str) -> dict:
    specs = common.model_layout(mib, 1)
    state: dict = {"model": {}, "optim": {}, "step": 1}
    for spec in specs:
        t = torch.empty((spec.rows, spec.cols), dtype=torch.float32)
        common.fill_local(spec, 0, 1, t)
        state["model" if spec.name.startswith("param.") else "optim"][spec.name] = t.to(device)
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--local-dir", required=True)
    ap.add_argument("--durable-dir", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cuda", action="store_true", help="state on the GPU")
    args = ap.parse_args()
    for d in (args.local_dir, args.durable_dir):
        shutil.rmtree(d, ignore_errors=True)
    state = build_state(args.mib, "cuda" if args.cuda else "cpu")
    nbytes = sum(t.numel() * t.element_size() for part in ("model", "optim") for t in state[part].values())
    samples: dict[str, list[float]] = {"local_stall_s": [], "local_total_s": [], "local_restore_s": []}
    samples["durable_restore_cold_s"] = []
    bitwise = True
    with shardckpt.CheckpointManager(
        args.durable_dir,
        local_dir=args.local_dir,
        local_interval_steps=1,
        save_interval_steps=1000,
        keep_last_local=1,
        keep_last=1,
    ) as mgr:
        step = 0
        for _rep, warmup, _order in common.interleaved(["once"], args.repeats):
            step += 1
            t0 = time.perf_counter()
            mgr.save(step, state)  # local only: staging, then the background write
            stall = time.perf_counter() - t0
            mgr.wait()
            total = time.perf_counter() - t0
            mgr.save(step, state, force=True)  # the same step in the durable tier
            target = {
                "model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
                "optim": {k: torch.zeros_like(v) for k, v in state["optim"].items()},
                "step": 0,
            }
            t0 = time.perf_counter()
            assert mgr.restore(target) == step
            local_restore = time.perf_counter() - t0
            bitwise &= all(torch.equal(target["model"][k], v) for k, v in state["model"].items())
            common.evict_tree(mgr.path(step))
            t0 = time.perf_counter()
            mgr.restore(target, step=step)
            durable_restore = time.perf_counter() - t0
            if not warmup:
                samples["local_stall_s"].append(stall)
                samples["local_total_s"].append(total)
                samples["local_restore_s"].append(local_restore)
                samples["durable_restore_cold_s"].append(durable_restore)
    out = {k: common.summarize(v)["median"] for k, v in samples.items()}
    out["durable_over_local_restore"] = out["durable_restore_cold_s"] / out["local_restore_s"]
    out.update(state_bytes=nbytes, cuda=args.cuda, bitwise=bitwise, repeats=args.repeats, samples=samples)
    print(json.dumps(out, indent=1))
    shutil.rmtree(args.durable_dir, ignore_errors=True)
    os.makedirs(args.local_dir, exist_ok=True)


if __name__ == "__main__":
    main()
