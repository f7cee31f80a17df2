"""The benchmark suite: one command for every throughput figure of shardckpt against DCP,
the per-rank file baselines and the raw disk, measured in one run.

    python benchmarks/suite.py --quick                 # ~1-2 min: 2 ranks, 16 MiB, 1 repetition
    python benchmarks/suite.py                         # publication: 1,2,4,8 ranks, 256 MiB..4 GiB, 5 repetitions
    python benchmarks/suite.py --world-sizes 1 2 4 --size-mib 256 1024 --repeats 5 --dir /work/bench-tmp/suite
    python benchmarks/suite.py --sections save checksum --dtype bfloat16

Sections (``--sections``), each a few process trees of gloo/CPU ranks spawned from here,
every system of a section measured in the same repetitions, interleaved in a shuffled
order, the first repetition a dropped warm-up (see benchmarks/common.py):

    save       sync save at the main world size and state size: shardckpt (twice: A/A
               control), dcp.save with FileSystemWriter defaults (1 thread) and 2 and 4
               threads, per-rank torch.save + fsync, per-rank safetensors.save_file + fsync,
               raw os.write + fsync, and dd conv=fdatasync (rank 0 alone, and every rank at
               once): the raw-disk limit of the same run
    checksum   what hashing costs a save. The writer cannot skip hashing (no option), so:
               xxh3 of the same bytes as the writer hashes them, timed alone (hash_only),
               and a save with shardckpt's hash functions replaced by no-ops in the
               benchmark process (shardckpt_nohash; its checkpoint is never loaded)
    load       cold loads of a checkpoint saved on the main world size, on the same world
               size and resharded (4 -> 2, 4 -> 3), shardckpt vs dcp.load vs a cold dd read,
               with the bytes each rank read (/proc/self/io rchar) against the bytes it needs
    scaling    save and cold load, shardckpt vs DCP vs dd, for every world size x state size
    async      benchmarks/async_stall.py's measurement (stall, completion, memory, step
               slowdown vs dcp.async_save) at the main world and state size

Writes benchmarks/results/suite.json (suite_quick.json with --quick) with every sample
and the machine facts, and PNG plots into docs/img/ (skipped, and said so, without
matplotlib: pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import async_stall
import common
import plots
import save_load

SECTIONS = ["save", "checksum", "load", "scaling", "async"]
SAVE_SYSTEMS = [
    "dd",
    "dd_x4",
    "raw",
    "shardckpt",
    "shardckpt_AA",
    "torch_save",
    "safetensors",
    "dcp",
    "dcp_t2",
    "dcp_t4",
]
DCP_VARIANTS = {"dcp": 1, "dcp_t2": 2, "dcp_t4": 4}  # system -> FileSystemWriter thread_count
CHECKSUM_SYSTEMS = ["dd", "shardckpt", "shardckpt_nohash", "hash_only"]
LOAD_SYSTEMS = ["shardckpt", "shardckpt_AA", "shardckpt_noverify", "dcp", "dd"]  # noverify: load(verify=False)
SCALING_SAVE = ["shardckpt", "dcp", "dd"]
SCALING_LOAD = ["shardckpt", "dcp"]
DEFAULT_DOCS_IMG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "img")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 ranks, 16 MiB, 1 repetition: about 1-2 minutes")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    ap.add_argument("--world-sizes", nargs="+", type=int, default=None, help="default 1 2 4 8 (quick: 2)")
    ap.add_argument(
        "--size-mib",
        nargs="+",
        type=int,
        default=None,
        help="state sizes in MiB for scaling (default 256 1024 4096; quick 16); the other sections use the largest",
    )
    ap.add_argument(
        "--main-world",
        type=int,
        default=None,
        help="world size of the save/checksum/load/async sections (default 4 if listed, else the largest)",
    )
    ap.add_argument(
        "--dir",
        "--url",
        dest="dir",
        default="/work/bench-tmp/suite",
        help="scratch folder on the disk under test: a local path or file:// URL (object stores: "
        "benchmarks/s3.py); emptied at the end",
    )
    ap.add_argument("--dtype", choices=sorted(common.DTYPES), default="float32")
    ap.add_argument(
        "--format3",
        action="store_true",
        help="the load section also saves in format 3 and loads it (system shardckpt_v3), same world and resharded",
    )
    ap.add_argument("--repeats", type=int, default=None, help="measured repetitions (default 5; quick 1)")
    ap.add_argument("--warmup", type=int, default=1, help="dropped warm-up repetitions")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled orders")
    ap.add_argument("--out", default=common.RESULTS_DIR, help="folder of the results JSON")
    ap.add_argument("--name", default=None, help="results file name (default suite or suite_quick)")
    ap.add_argument(
        "--plots-dir",
        default=None,
        help="folder of the PNG plots, 'none' for no plots (default docs/img; quick: a temp folder)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        metavar="SECONDS",
        help="first wait up to this long for a 1-min load average < 0.8 (default 60; quick 0)",
    )
    args = ap.parse_args(argv)
    return resolve_defaults(args)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    q = args.quick
    args.world_sizes = sorted(set(args.world_sizes or ([2] if q else [1, 2, 4, 8])))
    args.size_mib = sorted(set(args.size_mib or ([16] if q else [256, 1024, 4096])))
    args.main_world = args.main_world or (4 if 4 in args.world_sizes else args.world_sizes[-1])
    args.main_mib = args.size_mib[-1]
    args.repeats = args.repeats or (1 if q else 5)
    args.name = args.name or ("suite_quick" if q else "suite")
    args.wait_quiet = (0.0 if q else 60.0) if args.wait_quiet is None else args.wait_quiet
    args.plots_dir = args.plots_dir or (
        os.path.join(tempfile.gettempdir(), "shardckpt-suite-quick") if q else DEFAULT_DOCS_IMG
    )
    if "://" in args.dir and not args.dir.startswith("file://"):
        raise SystemExit(
            f"--dir {args.dir}: the suite measures a local disk (dd, fsync, page-cache eviction); "
            "for object stores run benchmarks/s3.py"
        )
    args.dir = os.path.abspath(args.dir.removeprefix("file://"))
    return args


# ------------------------------------------------------------------ one process tree


@dataclass(frozen=True)
class Job:
    """One spawned process tree: ``world`` ranks each build their rows of a ``mib`` MiB
    state (rows laid out for ``layout_world``), then run save_load.measure_interleaved.
    Also the ``args`` that save_load.Bench reads."""

    world: int
    mib: int
    dtype: str
    dir: str
    save_systems: tuple[str, ...]
    load_systems: tuple[str, ...]
    repeats: int
    warmup: int
    seed: int
    out_path: str
    layout_world: int | None = None
    dd_mode: str = "fdatasync"


def job_worker(rank: int, world: int, job: Job) -> None:
    """Rank body of a Job; rank 0 writes the samples and byte counts to ``job.out_path``."""
    b = save_load.Bench(rank, world, job)  # type: ignore[arg-type]  # Job carries the fields Bench reads
    m = save_load.measure_interleaved(
        b, list(job.save_systems), list(job.load_systems), job.repeats, job.warmup, job.seed
    )
    b.close()
    if rank == 0:
        m["state_bytes"] = b.global_bytes
        m["needed_bytes_by_rank"] = [common.local_bytes(b.specs, r, world) for r in range(world)]
        m["tensors"] = len(b.specs)
        with open(job.out_path, "w") as f:
            json.dump(m, f)


def run_job(
    args: argparse.Namespace,
    world: int,
    mib: int,
    save_systems: list[str],
    load_systems: list[str],
    *,
    repeats: int | None = None,
    warmup: int | None = None,
    layout_world: int | None = None,
    clean: bool = True,
) -> dict[str, Any]:
    """Spawn ``world`` ranks for one Job and return its results (plus the load average
    before it). ``clean``: remove the scratch folder first."""
    if clean:
        common.remove_tree(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    fd, out_path = tempfile.mkstemp(prefix="suite-job-", suffix=".json", dir=args.dir)
    os.close(fd)
    job = Job(
        world,
        mib,
        args.dtype,
        args.dir,
        tuple(save_systems),
        tuple(load_systems),
        args.repeats if repeats is None else repeats,
        args.warmup if warmup is None else warmup,
        args.seed,
        out_path,
        layout_world,
    )
    print(f"-- {world} ranks, {mib} MiB: save {save_systems} load {load_systems}", flush=True)
    loadavg = common.loadavg()
    common.spawn_ranks(job_worker, world, job)
    with open(out_path) as f:
        res = json.load(f)
    os.unlink(out_path)
    res["loadavg_before"] = loadavg
    res["config"] = {k: v for k, v in asdict(job).items() if k not in ("out_path", "dir")}
    return res


# ------------------------------------------------------------------ summaries


def summarize_phase(job: dict[str, Any], phase: str, systems: list[str]) -> dict[str, Any]:
    """GB/s and seconds of every system (aggregate; per rank = aggregate / ranks that
    moved bytes), with paired ratios against dd, dcp and shardckpt."""
    samples = job["samples"][phase]
    world = job["config"]["world"]
    out: dict[str, Any] = {}
    for name in systems:
        if name not in samples:
            continue
        s = save_load.phase_summary(name, samples[name], job["state_bytes"])
        active = 1 if name == "dd" else world
        s["per_rank_gbps"] = common.summarize([g / active for g in s["gbps"]["samples"]])
        s["samples"] = samples[name]
        out[name] = s
    gb = {k: v["gbps"]["samples"] for k, v in out.items()}
    ratios = {
        f"{n}/{ref}": common.paired_ratios(gb[n], gb[ref])
        for n in gb
        for ref in ("dd", "dcp", "shardckpt")
        if ref in gb and ref != n
    }
    return {"systems": out, "paired_ratios_of_gbps": ratios}


def median(s: dict[str, Any] | None) -> float | None:
    return None if not s or not s.get("n") else float(s["median"])


def save_section(job: dict[str, Any]) -> dict[str, Any]:
    res = summarize_phase(job, "save", SAVE_SYSTEMS)
    dcp = {k: median(res["systems"][k]["gbps"]) or 0.0 for k in DCP_VARIANTS if k in res["systems"]}
    best = max(dcp, key=lambda k: dcp[k]) if dcp else None
    if best:
        res["dcp_best"] = {
            "system": best,
            "thread_count": DCP_VARIANTS[best],
            "shardckpt_over_best": common.paired_ratios(
                res["systems"]["shardckpt"]["gbps"]["samples"], res["systems"][best]["gbps"]["samples"]
            ),
        }
    return res


def checksum_section(job: dict[str, Any]) -> dict[str, Any]:
    """Hash time against save time, paired per repetition, and the no-hash save."""
    from shardckpt.engine.writer import WriterOptions

    res = summarize_phase(job, "save", CHECKSUM_SYSTEMS)
    sy = res["systems"]
    res["writer_options"] = list(WriterOptions.__dataclass_fields__)
    res["writer_can_skip_hashing"] = False
    if "hash_only" in sy and "shardckpt" in sy:
        res["hash_seconds_over_save_seconds"] = common.paired_ratios(
            sy["hash_only"]["seconds"]["samples"], sy["shardckpt"]["seconds"]["samples"]
        )
    if "shardckpt_nohash" in sy and "shardckpt" in sy:
        res["save_seconds_with_over_without_hashing"] = common.paired_ratios(
            sy["shardckpt"]["seconds"]["samples"], sy["shardckpt_nohash"]["seconds"]["samples"]
        )
    return res


def load_systems(args: argparse.Namespace) -> list[str]:
    """The load section's systems: :data:`LOAD_SYSTEMS`, plus format 3 with ``--format3``."""
    return LOAD_SYSTEMS + (["shardckpt_v3"] if getattr(args, "format3", False) else [])


def load_section(jobs: dict[str, dict[str, Any]], save_world: int, systems: list[str]) -> dict[str, Any]:
    """Per load world size: GB/s, paired ratios, bytes read against bytes needed."""
    out: dict[str, Any] = {"save_world": save_world, "by_load_world": {}}
    for world, job in jobs.items():
        res = summarize_phase(job, "load", systems)
        needed = sum(job["needed_bytes_by_rank"])
        for name, s in res["systems"].items():
            if name == "dd":
                continue
            reads = [sum(x["rchar"]) for x in s["samples"]]
            s["bytes_read"] = common.summarize([float(r) for r in reads])
            s["bytes_needed"] = needed
            s["read_over_needed"] = common.summarize([r / needed for r in reads])
            s["read_over_needed_worst_rank"] = max(
                r / n for x in s["samples"] for r, n in zip(x["rchar"], job["needed_bytes_by_rank"], strict=True)
            )
        res["verified"] = job["verified"]
        res["eviction_check"] = job["residency"]
        res["resharded"] = int(world) != save_world
        out["by_load_world"][world] = res
    return out


def scaling_cell(job: dict[str, Any]) -> dict[str, Any]:
    return {
        "world": job["config"]["world"],
        "mib": job["config"]["mib"],
        "state_bytes": job["state_bytes"],
        "save": summarize_phase(job, "save", SCALING_SAVE),
        "load": summarize_phase(job, "load", SCALING_LOAD),
        "verified": job["verified"],
        "loadavg_before": job["loadavg_before"],
    }


# ------------------------------------------------------------------ sections


def run_main(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """The save, checksum and load sections at the main world and state size. One job
    runs every save system asked for (one interleaving, one dd) and, for the load
    section, the same-world cold loads; then one job per resharded world size loads the
    checkpoints that job left behind. Rows are laid out for every load world size."""
    systems = [s for s in SAVE_SYSTEMS if "save" in args.sections]
    systems += [s for s in CHECKSUM_SYSTEMS if "checksum" in args.sections and s not in systems]
    load = "load" in args.sections
    loads = load_systems(args)
    systems += [s for s in loads if load and s not in systems and s in save_load.LOAD_SOURCE.values()]
    worlds = load_worlds(args.main_world) if load else [args.main_world]
    layout_world = math.lcm(*worlds)
    job = run_job(args, args.main_world, args.main_mib, systems, loads if load else [], layout_world=layout_world)
    out: dict[str, Any] = {}
    facts = {"world": args.main_world, "state_bytes": job["state_bytes"], "layout_world": layout_world}
    if "save" in args.sections:
        out["save"] = dict(save_section(job), **facts, orders=job["orders"], loadavg_before=job["loadavg_before"])
    if "checksum" in args.sections:
        out["checksum"] = dict(checksum_section(job), **facts, shared_job_with_save="save" in args.sections)
    if load:
        jobs = {str(args.main_world): job}
        jobs.update(
            {
                str(w): run_job(args, w, args.main_mib, [], loads, layout_world=layout_world, clean=False)
                for w in worlds[1:]
            }
        )
        out["load"] = dict(load_section(jobs, args.main_world, loads), state_bytes=job["state_bytes"])
    return out, job


def load_worlds(save_world: int) -> list[int]:
    """Same world size first, then half and three quarters (4 -> 4, 2, 3; 2 -> 2, 1)."""
    return list(dict.fromkeys(w for w in (save_world, save_world // 2, save_world * 3 // 4) if w >= 1))


def run_scaling(args: argparse.Namespace, main_job: dict[str, Any] | None) -> dict[str, Any]:
    """One job per world size x state size; the cell of the main world and size reuses
    the main job when it measured the same systems (its rows are laid out for every
    load world size, so its state may be a little larger: see each cell's state_bytes)."""
    cells = []
    for mib in args.size_mib:
        for w in args.world_sizes:
            reuse = (
                main_job is not None
                and (w, mib) == (args.main_world, args.main_mib)
                and set(SCALING_SAVE) <= set(main_job["samples"]["save"])
                and set(SCALING_LOAD) <= set(main_job["samples"]["load"])
            )
            job = main_job if reuse else run_job(args, w, mib, SCALING_SAVE, SCALING_LOAD)
            cells.append(dict(scaling_cell(job), from_main_job=reuse))
    return {"cells": cells}


def run_async(args: argparse.Namespace) -> dict[str, Any]:
    """benchmarks/async_stall.py at the main world and state size; its own JSON is kept
    next to the suite's, the headline figures are copied in."""
    name = f"{args.name}_async_stall"
    argv = [
        "--world-size",
        str(args.main_world),
        "--mib",
        str(args.main_mib),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--dir",
        os.path.join(args.dir, "async"),
        "--name",
        name,
        "--out",
        args.out,
        "--seed",
        str(args.seed),
    ]
    if args.quick:
        argv += ["--consecutive", "2", "--baseline-steps", "5"]
    a = async_stall.parse_args(argv)
    common.spawn_ranks(async_stall.worker, a.world_size, a, common.machine_facts(args.dir))
    with open(os.path.join(args.out, f"{name}.json")) as f:
        r = json.load(f)
    keep = ("blocking_s", "completion_s", "step_s", "training_time_lost_s", "peak_extra_over_shard")
    return {
        "results_file": f"{name}.json",
        "world": args.main_world,
        "state_bytes": r["config"]["state_bytes"],
        "systems": {k: {m: v[m] for m in keep} for k, v in r["systems"].items()},
        "paired_ratios": r["paired_ratios"],
        "targets": r["targets"],
        "consecutive_saves": {k: {m: v[m] for m in v if m != "per_rank"} for k, v in r["consecutive_saves"].items()},
        "snapshot_correct_after_mutation": r["snapshot_correct_after_mutation"],
    }


def run_sections(args: argparse.Namespace) -> dict[str, Any]:
    sections: dict[str, Any] = {}
    timings: dict[str, float] = {}
    main_job = None
    t0 = time.perf_counter()
    if {"save", "checksum", "load"} & set(args.sections):
        got, main_job = run_main(args)
        sections.update(got)
        timings["save+checksum+load"] = time.perf_counter() - t0
    for key, fn in (("scaling", lambda: run_scaling(args, main_job)), ("async", lambda: run_async(args))):
        if key in args.sections:
            t0 = time.perf_counter()
            sections[key] = fn()
            timings[key] = time.perf_counter() - t0
    return {"sections": sections, "section_seconds": timings}


# ------------------------------------------------------------------ report


def print_report(r: dict[str, Any]) -> None:
    sec = r["sections"]
    if "save" in sec:
        print("\nsave: " + _phase_table(sec["save"], ["dd", "dcp", "shardckpt"]))
        print(f"best DCP thread count: {sec['save'].get('dcp_best', {}).get('thread_count')}")
    if "checksum" in sec:
        c = sec["checksum"]
        print("\nchecksum: " + _phase_table(c, ["shardckpt"]))
        print(
            f"hash time / save time: {median(c.get('hash_seconds_over_save_seconds'))}; "
            f"save time with / without hashing: {median(c.get('save_seconds_with_over_without_hashing'))}"
        )
    for world, p in sec.get("load", {}).get("by_load_world", {}).items():
        print(f"\nload {sec['load']['save_world']} -> {world} ranks: " + _phase_table(p, ["dd", "dcp", "shardckpt"]))
        for name, s in p["systems"].items():
            if "read_over_needed" in s:
                print(
                    f"  {name}: read / needed {median(s['read_over_needed']):.3f} "
                    f"(worst rank {s['read_over_needed_worst_rank']:.3f})"
                )
    rows = [
        [
            c["world"],
            c["mib"],
            median(c["save"]["systems"]["shardckpt"]["gbps"]),
            median(c["save"]["systems"]["dcp"]["gbps"]),
            median(c["save"]["systems"]["dd"]["gbps"]),
            median(c["load"]["systems"]["shardckpt"]["gbps"]),
            median(c["load"]["systems"]["dcp"]["gbps"]),
        ]
        for c in sec.get("scaling", {}).get("cells", [])
    ]
    if rows:
        print(
            "\nscaling, GB/s medians\n"
            + common.format_table(
                ["ranks", "MiB", "save shardckpt", "save dcp", "dd", "load shardckpt", "load dcp"], rows
            )
        )
    if "async" in sec:
        a = sec["async"]["systems"]
        print("\nasync blocking s: " + ", ".join(f"{k} {median(v['blocking_s']):.3g}" for k, v in a.items()))


def _phase_table(p: dict[str, Any], refs: list[str]) -> str:
    rows = []
    for name, s in p["systems"].items():
        rat = p["paired_ratios_of_gbps"]
        rows.append(
            [name, median(s["gbps"]), common.spread(s["gbps"]), median(s["per_rank_gbps"]), median(s["seconds"])]
            + [median(rat.get(f"{name}/{ref}")) for ref in refs]
        )
    return "GB/s = 1e9 B/s, medians\n" + common.format_table(
        ["system", "GB/s", "min-max", "per rank", "s"] + [f"x {ref}" for ref in refs], rows
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.wait_quiet:
        common.wait_for_quiet(max_wait_s=args.wait_quiet, poll_s=10)
    facts = common.machine_facts(args.dir)
    t0 = time.perf_counter()
    try:
        results = run_sections(args)
    finally:
        common.remove_tree(args.dir)
    results = {
        "benchmark": "suite",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": dict(facts, loadavg_end=common.loadavg()),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "plots_dir")},
        "elapsed_s": time.perf_counter() - t0,
        **results,
    }
    results["plots"] = plots.write_suite_plots(results, args.plots_dir, args.name)
    print(f"plots: {results['plots']}; {results['elapsed_s']:.0f} s")
    common.publish(args.name, results, args.out, print_report)
    return results


if __name__ == "__main__":
    main()
