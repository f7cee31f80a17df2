"""Fast recovery tier, one process: restoring one step from the local tier against restoring
the same step from the durable tier, on a local disk with its pages evicted first (a cold
read, as after a restart on another node) and, with ``--s3``, from S3 (a moto server on
loopback); plus the time of a save() due in both tiers.

    python benchmarks/local_tier.py --mib 1024 --local-dir /dev/shm/lt --durable-dir /var/tmp/lt --s3

One process restores its own local copy: no partner transfer (the node-loss case adds one
gloo send of the shard; launch/recovery_demo.sh shows that end to end). Every system is
measured once per repetition, in a shuffled order, after a dropped warm-up
(common.interleaved); ``local_again`` is the local restore measured a second time under
another name (the A/A control: its ratio to ``local`` is the noise floor). Every restore is
checked bitwise. Medians, spreads and paired ratios of wall time, and the process's CPU
time per restore (less sensitive than wall time to other jobs on a busy machine), are
printed as JSON and written with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import common
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "support"))

import shardckpt  # noqa: E402


def build_state(mib: int, device: str) -> dict:
    specs = common.model_layout(mib, 1)
    state: dict = {"model": {}, "optim": {}, "step": 1}
    for spec in specs:
        t = torch.empty((spec.rows, spec.cols), dtype=torch.float32)
        common.fill_local(spec, 0, 1, t)
        state["model" if spec.name.startswith("param.") else "optim"][spec.name] = t.to(device)
    return state


def blank_like(state: dict) -> dict:
    return {
        "model": {k: torch.zeros_like(v) for k, v in state["model"].items()},
        "optim": {k: torch.zeros_like(v) for k, v in state["optim"].items()},
        "step": 0,
    }


def same(a: dict, b: dict) -> bool:
    return a["step"] == b["step"] and all(torch.equal(a[p][k], v) for p in ("model", "optim") for k, v in b[p].items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--local-dir", required=True)
    ap.add_argument("--durable-dir", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--s3", action="store_true", help="also restore from S3 (a moto server on loopback)")
    ap.add_argument("--cuda", action="store_true", help="state on the GPU")
    ap.add_argument("--out", default="", help="also write the results here (JSON)")
    args = ap.parse_args()
    for d in (args.local_dir, args.durable_dir):
        shutil.rmtree(d, ignore_errors=True)
    torch.set_num_threads(1)
    state = build_state(args.mib, "cuda" if args.cuda else "cpu")
    nbytes = sum(t.numel() * t.element_size() for part in ("model", "optim") for t in state[part].values())
    target = blank_like(state)
    server = None
    managers: list[shardckpt.CheckpointManager] = []
    try:
        mgr = shardckpt.CheckpointManager(
            args.durable_dir, local_dir=args.local_dir, save_interval_steps=1, keep_last_local=1, keep_last=1
        )
        managers.append(mgr)
        stalls = []
        for step in (1, 2, 3):  # both tiers each time
            state["step"] = step
            t0 = time.perf_counter()
            mgr.save(step, state)
            stalls.append(time.perf_counter() - t0)
            mgr.wait()
        systems: dict[str, Callable[[], int | None]] = {
            "local": lambda: mgr.restore(target),
            "local_again": lambda: mgr.restore(target),
            "disk_cold": lambda: (common.evict_tree(mgr.path(3)), mgr.restore(target, step=3))[1],
        }
        if args.s3:
            from s3server import S3Server

            server = S3Server(extra_env={"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(2 * nbytes)})
            bucket = server.create_bucket("local-tier")
            s3 = shardckpt.CheckpointManager(f"s3://{bucket}/run", storage_options=server.storage_options())
            managers.append(s3)
            s3.save(3, state)
            systems["s3"] = lambda: s3.restore(target, step=3)
        samples: dict[str, list[float]] = {name: [] for name in systems}
        cpu: dict[str, list[float]] = {name: [] for name in systems}  # this process's CPU seconds, all threads
        bitwise = True
        for _rep, warmup, order in common.interleaved(list(systems), args.repeats):
            for name in order:
                for part in ("model", "optim"):
                    for t in target[part].values():
                        t.zero_()
                target["step"] = 0
                t0, c0 = time.perf_counter(), time.process_time()
                step = systems[name]()
                took, used = time.perf_counter() - t0, time.process_time() - c0
                bitwise &= step == 3 and same(target, state)
                if not warmup:
                    samples[name].append(took)
                    cpu[name].append(used)
    finally:
        for m in managers:
            m.close()
        if server is not None:
            server.stop()
        shutil.rmtree(args.durable_dir, ignore_errors=True)
    out: dict[str, Any] = {name: common.summarize(v) for name, v in samples.items()}
    out["cpu_s"] = {name: common.summarize(v) for name, v in cpu.items()}
    # save() of a step due in both tiers: the local staging copy plus the synchronous durable
    # save (the local write runs on after it); the first one also allocates the staging buffer
    out["save_both_tiers_s"] = common.summarize(stalls[1:])
    out["ratios"] = {
        f"{name}/local": common.paired_ratios(samples[name], samples["local"]) for name in systems if name != "local"
    }
    out.update(state_bytes=nbytes, cuda=args.cuda, bitwise=bitwise, repeats=args.repeats)
    out["machine"] = common.machine_facts(args.durable_dir if os.path.isdir(args.durable_dir) else HERE)
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
