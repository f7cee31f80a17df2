"""Fast recovery tier, one process: restoring one step from the local tier against restoring
the same step from the durable tier, on a local disk with its pages evicted first (a cold
read, as after a restart on another node) and, with ``--s3``, from S3 (a moto server on
loopback); plus the time of a save() due in both tiers.

Cold means cold for both tiers where the system allows it: before every restore, the files
of both tiers are fsynced and evicted with ``posix_fadvise(POSIX_FADV_DONTNEED)``
(``common.evict_files``), and ``fincore`` reports how many of their bytes stayed in memory
(``resident_after_evict``): 0 for the durable tier's disk files, all of them for a local
tier on ``/dev/shm`` (a RAM disk's pages are the file: that is the tier's point). The
``components`` section is the profile: the same bytes copied (memcpy), hashed (xxh3-64,
the restore's checksum), read with ``pread`` from the local tier's file and from the
durable tier's files evicted and not, each on one thread, in GB/s.

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


def read_files(paths: list[str], into: torch.Tensor) -> int:
    """``pread`` the files one after another into ``into`` (8 MiB at a time, one thread)."""
    view = memoryview(into.numpy())  # type: ignore[arg-type]
    done = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            at = 0
            while True:
                n = os.preadv(fd, [view[done : done + (8 << 20)]], at)
                if n == 0:
                    break
                at, done = at + n, done + n
        finally:
            os.close(fd)
    return done


def components(local_files: list[str], durable_files: list[str], repeats: int) -> dict[str, Any]:
    """Where a restore's time can go, on the same bytes, one thread each, in GB/s: the copy,
    the hash, and the reads of each tier's files (the durable ones cold and warm)."""
    from shardckpt.format import integrity

    local_data = [p for p in local_files if p.endswith(".safetensors")]
    size = max(sum(os.path.getsize(p) for p in local_data), sum(os.path.getsize(p) for p in durable_files))
    buf, other = torch.empty(size, dtype=torch.uint8), torch.ones(size, dtype=torch.uint8)
    other.copy_(buf)  # both allocated and touched before anything is timed

    def hash_all() -> int:
        h = integrity.new_file_hasher()
        view = memoryview(buf.numpy())  # type: ignore[arg-type]
        for i in range(0, size, 1 << 20):
            h.update(view[i : i + (1 << 20)])
        return size

    steps: dict[str, Callable[[], int]] = {
        "memcpy": lambda: (buf.copy_(other), size)[1],
        "xxh3_64": hash_all,
        "pread_local_tier": lambda: read_files(local_data, buf),
        "pread_disk_warm": lambda: read_files(durable_files, buf),
        "pread_disk_cold": lambda: read_files(durable_files, buf),
    }
    rates: dict[str, list[float]] = {k: [] for k in steps}
    for _rep, warmup, order in common.interleaved(list(steps), repeats, seed=1):
        for name in order:
            if name == "pread_disk_cold":
                common.evict_files(durable_files)
            elif name == "pread_disk_warm":
                read_files(durable_files, buf)  # make sure it is in the page cache
            t0 = time.perf_counter()
            n = steps[name]()
            took = time.perf_counter() - t0
            if not warmup:
                rates[name].append(n / took / 1e9)
    return {"gb_per_s": {k: common.summarize(v) for k, v in rates.items()}, "bytes": size}


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
    for d in (args.local_dir, args.durable_dir):  # never a folder with someone's files in it
        if os.path.exists(d) and (not os.path.isdir(d) or os.listdir(d)):
            raise SystemExit(
                f"local_tier.py: {d} exists and is not an empty folder; give a new path (it is removed after)"
            )
    made = [d for d in (args.local_dir, args.durable_dir) if not os.path.exists(d)]
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
            "disk_cold": lambda: mgr.restore(target, step=3),
        }
        local_files = common.files_under(args.local_dir)
        durable_files = common.files_under(mgr.path(3))
        resident: dict[str, list[int | None]] = {"local": [], "durable": []}
        sizes = {
            name: sum(os.path.getsize(p) for p in files)
            for name, files in (("local", local_files), ("durable", durable_files))
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
                common.evict_files(local_files + durable_files)  # both tiers, before every restore
                if warmup:
                    resident["local"].append(common.resident_bytes(local_files))
                    resident["durable"].append(common.resident_bytes(durable_files))
                t0, c0 = time.perf_counter(), time.process_time()
                step = systems[name]()
                took, used = time.perf_counter() - t0, time.process_time() - c0
                bitwise &= step == 3 and same(target, state)
                if not warmup:
                    samples[name].append(took)
                    cpu[name].append(used)
        parts = components(local_files, durable_files, args.repeats)
    finally:
        for m in managers:
            m.close()
        if server is not None:
            server.stop()
        for d in made:  # made by this run; an empty folder that was given stays
            shutil.rmtree(d, ignore_errors=True)
    out: dict[str, Any] = {name: common.summarize(v) for name, v in samples.items()}
    out["cpu_s"] = {name: common.summarize(v) for name, v in cpu.items()}
    # save() of a step due in both tiers: the local staging copy plus the synchronous durable
    # save (the local write runs on after it); the first one also allocates the staging buffer
    out["save_both_tiers_s"] = common.summarize(stalls[1:])
    out["ratios"] = {
        f"{name}/local": common.paired_ratios(samples[name], samples["local"]) for name in systems if name != "local"
    }
    out["resident_after_evict"] = {
        "local_bytes": resident["local"],
        "durable_bytes": resident["durable"],
        "local_files_bytes": sizes["local"],
        "durable_files_bytes": sizes["durable"],
    }
    out["components"] = parts
    out.update(state_bytes=nbytes, cuda=args.cuda, bitwise=bitwise, repeats=args.repeats)
    out["machine"] = common.machine_facts(args.durable_dir if os.path.isdir(args.durable_dir) else HERE)
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
