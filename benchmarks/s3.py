"""Save and load throughput on S3 (moto over HTTP): shardckpt vs DCP's FsspecWriter/FsspecReader.

All systems talk to the same moto server (``python -m moto.server`` on 127.0.0.1, a
child process) through s3fs, in one run, interleaved: after a warm-up repetition
(dropped; it also picks DCP's best ``thread_count``), each of ``--reps`` repetitions
runs every system once, in a fresh random order, save then load, and deletes what it
wrote. Reported: medians of the repetitions, MiB/s of the state's bytes.

Systems:
  raw_s3fs          the bytes as one object per writer, ``fs.pipe``/``fs.cat`` (s3fs's own
                    concurrency): what the client and this server can move at all
  dcp_default       FsspecWriter(thread_count=1), FsspecReader: DCP's defaults
  dcp_default_aa    the same again under another name: the A/A control for noise
  dcp_best          FsspecWriter(thread_count=best of --dcp-threads), FsspecReader
  shardckpt_default shardckpt.save/load with their defaults
  shardckpt_tuned   shardckpt.save/load with num_io_threads=--tuned-threads

    python benchmarks/s3.py                       # 256 MiB, 5 reps, ~5 min here
    python benchmarks/s3.py --size-mib 512 --reps 5 --out benchmarks/results/s3.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "support"))
sys.path.insert(0, os.path.join(HERE, ".."))

from s3server import S3Server  # noqa: E402

import shardckpt  # noqa: E402

MiB = 2**20


def make_state(size_mib: int, tensor_mib: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = size_mib // tensor_mib
    return {f"layer{i:03d}.weight": torch.randn(tensor_mib * MiB // 4, generator=g) for i in range(n)}


def blank_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty_like(v) for k, v in state.items()}


def server_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class System:
    """One way to save and load ``state`` under a URL; ``save``/``load`` are timed."""

    def __init__(self, name: str, save: Callable[[str], None], load: Callable[[str], dict[str, torch.Tensor]]) -> None:
        self.name, self.save, self.load = name, save, load


def build_systems(
    state: dict[str, torch.Tensor],
    options: dict[str, Any],
    raw_fs: Any,
    dcp_threads: int,
    tuned_threads: int,
    raw_objects: int,
) -> dict[str, System]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    def dcp_system(name: str, threads: int) -> System:
        def save(url: str) -> None:
            dcp.save(state, storage_writer=FsspecWriter(url, thread_count=threads, **options), no_dist=True)

        def load(url: str) -> dict[str, torch.Tensor]:
            target = blank_like(state)
            dcp.load(target, storage_reader=FsspecReader(url, **options), no_dist=True)
            return target

        return System(name, save, load)

    def ours(name: str, save_threads: int | None, load_threads: int | None) -> System:
        save_kw = {} if save_threads is None else {"num_io_threads": save_threads}
        load_kw = {} if load_threads is None else {"num_io_threads": load_threads}

        def save(url: str) -> None:
            shardckpt.save(state, url, storage_options=options, **save_kw)

        def load(url: str) -> dict[str, torch.Tensor]:
            target = blank_like(state)
            shardckpt.load(target, url, storage_options=options, **load_kw)
            return target

        return System(name, save, load)

    keys = list(state)
    groups = [keys[i::raw_objects] for i in range(raw_objects)]
    blobs = [b"".join(memoryview(state[k].numpy()).cast("B") for k in g) for g in groups]

    def raw_save(url: str) -> None:
        raw_fs.pipe({f"{url}/obj{i}": blob for i, blob in enumerate(blobs)})

    def raw_load(url: str) -> dict[str, torch.Tensor]:
        got = raw_fs.cat([f"{url}/obj{i}" for i in range(raw_objects)])
        out = blank_like(state)
        for i, g in enumerate(groups):
            data, at = got[f"{url.removeprefix('s3://')}/obj{i}"], 0
            for k in g:
                n = out[k].numel() * 4
                out[k].view(torch.uint8).copy_(torch.frombuffer(bytearray(data[at : at + n]), dtype=torch.uint8))
                at += n
        return out

    return {
        "raw_s3fs": System("raw_s3fs", raw_save, raw_load),
        "dcp_default": dcp_system("dcp_default", 1),
        "dcp_default_aa": dcp_system("dcp_default_aa", 1),
        "dcp_best": dcp_system("dcp_best", dcp_threads),
        "shardckpt_default": ours("shardckpt_default", None, None),
        "shardckpt_tuned": ours("shardckpt_tuned", tuned_threads, tuned_threads),
    }


def run_once(
    system: System, state: dict[str, torch.Tensor], url: str, server: S3Server, raw_fs: Any
) -> dict[str, float]:
    cpu0 = server_cpu_s(server._proc.pid)
    t0 = time.perf_counter()
    system.save(url)
    save_s = time.perf_counter() - t0
    cpu1 = server_cpu_s(server._proc.pid)
    t0 = time.perf_counter()
    loaded = system.load(url)
    load_s = time.perf_counter() - t0
    cpu2 = server_cpu_s(server._proc.pid)
    bad = [k for k in state if not torch.equal(loaded[k], state[k])]
    if bad:
        raise AssertionError(f"{system.name}: loaded values differ for {bad[:3]}")
    del loaded
    raw_fs.rm(url.removeprefix("s3://"), recursive=True)
    return {"save_s": save_s, "load_s": load_s, "server_cpu_save_s": cpu1 - cpu0, "server_cpu_load_s": cpu2 - cpu1}


def pick_dcp_threads(
    candidates: list[int],
    state: dict[str, torch.Tensor],
    options: dict[str, Any],
    server: S3Server,
    raw_fs: Any,
    bucket: str,
    tuned: int,
    raw_objects: int,
) -> dict[int, float]:
    """Save time of DCP for each thread count (one run each, in the warm-up)."""
    timings = {}
    for t in candidates:
        system = build_systems(state, options, raw_fs, t, tuned, raw_objects)["dcp_best"]
        timings[t] = run_once(system, state, f"s3://{bucket}/sweep-dcp{t}", server, raw_fs)["save_s"]
        print(f"  warm-up: dcp thread_count={t}: save {timings[t]:.2f} s", flush=True)
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--tensor-mib", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dcp-threads", default="2,4,8", help="thread counts tried for dcp_best")
    ap.add_argument("--tuned-threads", type=int, default=8, help="num_io_threads of shardckpt_tuned")
    ap.add_argument("--systems", default="", help="comma-separated subset to run")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "s3.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent")
    torch.set_num_threads(1)

    server = S3Server(extra_env={"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(2 * args.size_mib * MiB)})
    try:
        bucket = server.create_bucket("bench")
        options = server.storage_options()
        raw_fs = server.admin()
        state = make_state(args.size_mib, args.tensor_mib)
        raw_objects = 4
        print(
            f"state: {len(state)} x {args.tensor_mib} MiB fp32 = {args.size_mib} MiB; "
            f"moto server on {server.endpoint_url}"
        )

        candidates = [int(t) for t in args.dcp_threads.split(",")]
        sweep = pick_dcp_threads(candidates, state, options, server, raw_fs, bucket, args.tuned_threads, raw_objects)
        best = min(sweep, key=sweep.__getitem__)
        systems = build_systems(state, options, raw_fs, best, args.tuned_threads, raw_objects)
        if args.systems:
            systems = {k: v for k, v in systems.items() if k in args.systems.split(",")}
        rng = random.Random(args.seed)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
        started = time.time()
        for rep in range(args.reps + 1):
            order = list(systems)
            rng.shuffle(order)
            for name in order:
                r = run_once(systems[name], state, f"s3://{bucket}/rep{rep}-{name}", server, raw_fs)
                tag = "warm-up" if rep == 0 else f"rep {rep}"
                print(
                    f"  {tag}: {name:18s} save {args.size_mib / r['save_s']:6.1f} MiB/s  "
                    f"load {args.size_mib / r['load_s']:6.1f} MiB/s",
                    flush=True,
                )
                if rep > 0:
                    runs[name].append(r)
        report = summarize(args, runs, sweep, best, time.time() - started, server.endpoint_url)
    finally:
        server.stop()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    print(f"wrote {args.out}")


def summarize(
    args: argparse.Namespace,
    runs: dict[str, list[dict[str, float]]],
    sweep: dict[int, float],
    best: int,
    elapsed_s: float,
    endpoint: str,
) -> dict[str, Any]:
    import aiobotocore
    import botocore
    import moto
    import s3fs

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    results = {}
    for name in runs:
        results[name] = {
            "save_mib_s": args.size_mib / med(name, "save_s"),
            "load_mib_s": args.size_mib / med(name, "load_s"),
            "save_s": [round(r["save_s"], 3) for r in runs[name]],
            "load_s": [round(r["load_s"], 3) for r in runs[name]],
            "server_cpu_save_s_median": med(name, "server_cpu_save_s"),
            "server_cpu_load_s_median": med(name, "server_cpu_load_s"),
        }
    ref = results.get("dcp_default")
    for r in results.values():
        if ref:
            r["save_vs_dcp_default"] = r["save_mib_s"] / ref["save_mib_s"]
            r["load_vs_dcp_default"] = r["load_mib_s"] / ref["load_mib_s"]
    return {
        "benchmark": "benchmarks/s3.py",
        "size_mib": args.size_mib,
        "tensor_mib": args.tensor_mib,
        "reps": args.reps,
        "statistic": "median of reps after one dropped warm-up; MiB/s of state bytes",
        "server": f"moto {moto.__version__} server mode, {endpoint} (loopback HTTP, child process)",
        "client": f"s3fs {s3fs.__version__}, aiobotocore {aiobotocore.__version__}, botocore {botocore.__version__}, "
        f"torch {torch.__version__}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average at end {os.getloadavg()}",
        "dcp_thread_sweep_save_s": {str(k): round(v, 3) for k, v in sweep.items()},
        "dcp_best_thread_count": best,
        "shardckpt_tuned_num_io_threads": args.tuned_threads,
        "elapsed_s": round(elapsed_s, 1),
        "results": results,
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['size_mib']} MiB, median of {report['reps']} (MiB/s; ratio to dcp_default)")
    print(f"{'system':20s} {'save':>8s} {'x':>6s} {'load':>8s} {'x':>6s}")
    for name, r in report["results"].items():
        print(
            f"{name:20s} {r['save_mib_s']:8.1f} {r.get('save_vs_dcp_default', 0):6.2f} "
            f"{r['load_mib_s']:8.1f} {r.get('load_vs_dcp_default', 0):6.2f}"
        )


if __name__ == "__main__":
    main()
