"""Cold load of one checkpoint by two builds of shardckpt, interleaved, with per-rank
safetensors as the floor (issue #18's small-tensor load).

Each call is one spawn of ``--world-size`` gloo ranks running the shardckpt found on
PYTHONPATH: it saves the ``--mix`` once (shardckpt and per-rank safetensors files, kept
in ``--dir`` for the next calls), then ``--repeats`` times (after one warm-up) loads both,
in shuffled order, each cold (rank 0 evicts the files first; then every rank touches and
frees fresh memory, ``common.warm_memory``, unless ``--cold-memory``), and prints one JSON line:
the seconds of each load (max over ranks) and their ratio, and the median CPU seconds
of a load summed over the ranks (``process_time``: every thread of each rank).
``--profile FILE`` writes a cProfile of rank 0's measured shardckpt loads. ``--phases``
adds the median CPU seconds of each phase of a load, summed over the ranks
(``time.thread_time`` of the calling thread around each; ``read_data`` also as
``process_time``, which counts its reader threads): the functions are wrapped by name, so
the same command measures an older build, and a name a build lacks is left out. Interleave
builds by calling it alternately, e.g. with a checkout of the old commit::

    git archive OLD shardckpt | tar -x -C /tmp/old
    for b in old new new old old new; do
      PYTHONPATH=$([ $b = old ] && echo /tmp/old || pwd) \
        python benchmarks/load_ab.py --mix small --mib 64 --label $b --dir /tmp/ab_small
    done
"""

from __future__ import annotations

import argparse
import cProfile
import os
import random
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import save_load

# (module, attribute) of each phase timed by --phases; a class attribute is "Class.method"
PHASES = (
    ("shardckpt.format.datafile", "json_limits_problem"),
    ("shardckpt.engine.loading", "parse_any_manifest"),
    ("shardckpt.format.manifest_parser", "bulk_tensors"),
    ("shardckpt.engine.loading", "check_loadable"),
    ("shardckpt.engine.loading", "check_target"),
    ("shardckpt.engine.planner", "LoadPlanner.create_local_plan"),
    ("shardckpt.engine.reader", "Reader.read_metadata"),
    ("shardckpt.engine.reader", "Reader.read_data"),
    ("shardckpt.engine.reader", "read_runs"),  # inside read_data: the read's planning, on the calling thread
    ("shardckpt.engine.plan_v3", "needed_metadata"),  # format 3: the chunks of this rank's boxes
    ("shardckpt.engine.load_v3", "RuleChunks.prepare"),  # format 3, inside read_data: resolving the chunks
)


def worker(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    import torch.distributed as dist

    common.ab_init(rank, world, port)
    import shardckpt

    spent: dict[str, float] = {}  # phase -> CPU seconds of this rank, this load
    phases: dict[str, list[float]] = {}  # phase -> CPU seconds of each measured load, summed over ranks
    if args.phases:
        common.time_phases(PHASES, spent)

    specs = save_load.mix_layout(args.mix, args.mib, world)
    src = common.make_state(specs, rank, world, fill=True)
    dst = common.make_state(specs, rank, world, fill=False)
    ckpt, st = os.path.join(args.dir, "shardckpt"), os.path.join(args.dir, f"safetensors-r{rank}.bin")
    if not os.path.exists(os.path.join(ckpt, "manifest.json")):
        shardckpt.save(src, ckpt, **({} if args.format_version is None else {"format_version": args.format_version}))
    if not os.path.exists(st):
        save_load.per_rank_file_save("safetensors", st, src)
    dist.barrier()
    st_files = [os.path.join(args.dir, f"safetensors-r{r}.bin") for r in range(world)]
    files = {"shardckpt": common.files_under(ckpt), "safetensors": st_files}
    seconds: dict[str, list[float]] = {"shardckpt": [], "safetensors": []}
    cpu: dict[str, list[float]] = {"shardckpt": [], "safetensors": []}  # CPU seconds of a load, all ranks
    profile = cProfile.Profile() if args.profile and rank == 0 else None
    warm = 0 if args.cold_memory else common.warm_bytes(common.local_bytes(specs, rank, world), world)
    for rep in range(args.repeats + 1):
        order = ["shardckpt", "safetensors"]
        random.Random(rep).shuffle(order)
        for system in order:
            common.zero_state(dst)
            if rank == 0:
                common.evict_files(files[system])
            common.warm_memory(warm)
            dist.barrier()
            t0, cpu0 = time.perf_counter(), time.process_time()
            if system == "shardckpt":
                if profile is not None and rep > 0:
                    profile.enable()
                spent.clear()
                t_load = time.thread_time()
                shardckpt.load(dst, ckpt)
                spent["load_thread"] = time.thread_time() - t_load
                if profile is not None:
                    profile.disable()
            else:
                save_load.per_rank_file_load(st, dst)
            cpu_s = time.process_time() - cpu0  # this rank's CPU, all its threads, before the barrier
            dist.barrier()
            dt = max(common.gather_to_all(time.perf_counter() - t0))
            cpu_all = sum(common.gather_to_all(cpu_s))
            if rep == 0:
                if system == "shardckpt" and not all(common.gather_to_all(common.state_equal(dst, src))):
                    raise AssertionError("shardckpt: loaded values differ from the saved ones")
            else:
                seconds[system].append(dt)
                cpu[system].append(cpu_all)
                if system == "shardckpt" and args.phases:
                    per_rank = common.gather_to_all(dict(spent))
                    for phase in sorted(set().union(*per_rank)):
                        phases.setdefault(phase, []).append(sum(r.get(phase, 0.0) for r in per_rank))
    if profile is not None:
        profile.dump_stats(args.profile)
    if rank == 0:
        report: dict[str, Any] = {f"{k}_cpu_s": round(statistics.median(v), 4) for k, v in cpu.items()}
        if phases:
            report["phases_cpu_s"] = {k: round(statistics.median(v), 4) for k, v in phases.items()}
        common.ab_report(args, world, seconds, **report)
    dist.destroy_process_group()


def main() -> None:
    ap = common.ab_parser(__doc__, save_load.MIXES)
    ap.add_argument("--format-version", type=int, default=None, choices=[3], help="save the checkpoint in format 3")
    ap.add_argument("--profile", default="", help="write a cProfile of rank 0's measured loads here")
    ap.add_argument("--phases", action="store_true", help="report each phase's CPU seconds, summed over ranks")
    ap.add_argument("--dir", required=True, help="scratch folder, reused across calls (delete it yourself)")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    common.ab_spawn(worker, args)


if __name__ == "__main__":
    main()
