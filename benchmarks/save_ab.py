"""Saves by two builds of shardckpt, interleaved, with per-rank safetensors as the floor
(issue #18's small-tensor save; the save counterpart of ``load_ab.py``).

Each call is one spawn of ``--world-size`` gloo ranks running the shardckpt found on
PYTHONPATH. Every rank keeps one ``Checkpointer`` for the whole spawn, as a training run
does, so after the first save its plan is reused (``engine/protocol.py``). Per
repetition (one warm-up first, dropped), in an order shuffled per repetition:

- ``shardckpt``: a save of the ``--mix`` to a new folder through that Checkpointer;
- ``safetensors``: each rank's ``save_file`` of its local tensors, then fsync.

A time is barrier to barrier, max over ranks; ``cpu_s`` is the CPU time (process time,
all threads) of a shardckpt save summed over ranks, less sensitive than wall time to the
load of a shared machine (``safetensors_cpu_s`` the floor's; ``sys_s`` the kernel's part of
each). Before each timed save every rank touches and frees fresh memory
(``common.warm_memory``: on this VM, pages free for ~2 s go back to the host and cost a
fault each when used again; ``--cold-memory`` skips it). The folders are removed after each
repetition, outside the timed window. One JSON line on rank 0: medians and the paired
ratios (safetensors seconds / shardckpt seconds, so 1.0 means as fast as the floor).
``--first`` makes every shardckpt save plan from scratch (a fresh Checkpointer per save,
its gloo group made before the timed window). ``--direct-writes`` saves with
``IOOptions(direct_writes=True)`` (O_DIRECT data files). ``--profile FILE`` writes a cProfile of
rank 0's measured shardckpt saves. Interleave builds by calling it alternately::

    git archive OLD shardckpt | tar -x -C /tmp/old
    for b in old new new old old new new old; do
      PYTHONPATH=$([ $b = old ] && echo /tmp/old || pwd) \
        python benchmarks/save_ab.py --mix small --mib 64 --label $b --dir /tmp/sab
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

# (module, attribute) of each phase timed by --phases; a class attribute is "Class.method",
# a function imported by name is wrapped where it is called from
PHASES = (
    ("shardckpt.engine.planner", "SavePlanner.create_local_plan"),
    ("shardckpt.engine.writer", "Writer.write_files"),
    ("shardckpt.engine.rank_result", "split_inline"),  # format 3, the coordinator's, before its writes
    ("shardckpt.engine.writer", "Writer._write_buckets"),
    ("shardckpt.engine.rank_result", "rank_results"),  # format 3: each rank's index record and report
    ("shardckpt.engine.writer", "Writer.finish"),  # the coordinator's commit
    ("shardckpt.engine.write_v3", "assemble"),
    ("shardckpt.engine.write_v3", "compress_table"),
    ("shardckpt.engine.write_v3", "commit"),
    ("shardckpt.format.manifest_v3", "manifest_v3_to_json"),
    ("shardckpt.engine.manifest_builder", "BuiltManifest.to_json"),  # format 1: the manifest text
)


def worker(rank: int, world: int, args: argparse.Namespace, port: int) -> None:
    import torch.distributed as dist

    common.ab_init(rank, world, port)
    import shardckpt

    specs = save_load.mix_layout(args.mix, args.mib, world)
    state = common.make_state(specs, rank, world, fill=True)
    options: dict[str, Any] = {} if args.format_version is None else {"format_version": args.format_version}
    if args.threads is not None:
        options["num_io_threads"] = args.threads
    if args.direct_writes:
        options["io"] = shardckpt.IOOptions(num_io_threads=args.threads, direct_writes=True)
        options.pop("num_io_threads", None)
    spent: dict[str, float] = {}  # phase -> CPU seconds of this rank, this save
    wall: dict[str, float] = {}  # phase -> seconds of this rank, this save
    phases: dict[str, list[float]] = {}  # phase -> CPU seconds of each measured save, summed over ranks
    walls: dict[str, list[float]] = {}  # phase -> rank 0's seconds of each measured save
    if args.phases:
        common.time_phases(PHASES, spent, wall)
    profile = cProfile.Profile() if args.profile and rank == 0 else None
    ckpt = shardckpt.Checkpointer()
    warm = 0 if args.cold_memory else common.warm_bytes(common.local_bytes(specs, rank, world), world)
    seconds: dict[str, list[float]] = {"shardckpt": [], "safetensors": []}
    cpu_s: list[float] = []
    floor_cpu_s: list[float] = []  # the same for per-rank safetensors, the floor
    sys_s: dict[str, list[float]] = {"shardckpt": [], "safetensors": []}  # of the CPU time, the kernel's
    for rep in range(args.repeats + 1):
        order = ["shardckpt", "safetensors"]
        random.Random(rep).shuffle(order)
        folder = os.path.join(args.dir, f"{args.label or 'run'}-{rep}")
        for system in order:
            if system == "shardckpt" and args.first:
                ckpt.close()
                ckpt = shardckpt.Checkpointer()
                ckpt.group(None, 600.0)  # its gloo group, outside the timed window
            common.warm_memory(warm)
            dist.barrier()
            t0, c0, k0 = time.perf_counter(), time.process_time(), os.times().system
            if system == "shardckpt":
                if profile is not None and rep > 0:
                    profile.enable()
                spent.clear()
                wall.clear()
                ckpt.save(state, os.path.join(folder, "shardckpt"), **options)
                if profile is not None:
                    profile.disable()
            else:
                save_load.per_rank_file_save("safetensors", os.path.join(folder, f"st-r{rank}.bin"), state)
            dist.barrier()
            dt = max(common.gather_to_all(time.perf_counter() - t0))
            cpu = sum(common.gather_to_all(time.process_time() - c0))
            kernel = sum(common.gather_to_all(os.times().system - k0))
            if rep > 0:
                seconds[system].append(dt)
                sys_s[system].append(kernel)
                if system == "safetensors":
                    floor_cpu_s.append(cpu)
                if system == "shardckpt":
                    cpu_s.append(cpu)
                    if args.phases:
                        per_rank = common.gather_to_all(dict(spent))
                        for phase in sorted(set().union(*per_rank)):
                            phases.setdefault(phase, []).append(sum(r.get(phase, 0.0) for r in per_rank))
                        for phase, seconds_0 in common.gather_to_all(dict(wall))[0].items():
                            walls.setdefault(phase, []).append(seconds_0)
        dist.barrier()
        if rank == 0:
            common.remove_tree(folder)
    ckpt.close()
    if profile is not None:
        profile.dump_stats(args.profile)
    if rank == 0:
        shardckpt_all = [round(s, 3) for s in seconds["shardckpt"]]
        common.ab_report(
            args,
            world,
            seconds,
            first=args.first,
            threads=args.threads,
            direct_writes=args.direct_writes,
            shardckpt_all=shardckpt_all,
            cpu_s=round(statistics.median(cpu_s), 3),
            cpu_all=[round(c, 3) for c in cpu_s],
            safetensors_cpu_s=round(statistics.median(floor_cpu_s), 3),
            safetensors_cpu_all=[round(c, 3) for c in floor_cpu_s],
            sys_s={k: round(statistics.median(v), 3) for k, v in sys_s.items()},
            **(
                {
                    "phases_cpu_s": {k: round(statistics.median(v), 4) for k, v in phases.items()},
                    "phases_rank0_s": {k: round(statistics.median(v), 4) for k, v in walls.items()},
                }
                if args.phases
                else {}
            ),
        )
    dist.destroy_process_group()


def main() -> None:
    ap = common.ab_parser(__doc__, save_load.MIXES)
    ap.add_argument("--format-version", type=int, default=None, choices=[3])
    ap.add_argument("--threads", type=int, default=None, help="num_io_threads of each save (default: shardckpt's)")
    ap.add_argument("--first", action="store_true", help="plan every save from scratch (no plan reuse)")
    ap.add_argument(
        "--direct-writes", action="store_true", help="save with IOOptions(direct_writes=True) (O_DIRECT data files)"
    )
    ap.add_argument("--profile", default="", help="write a cProfile of rank 0's measured saves here")
    ap.add_argument(
        "--phases", action="store_true", help="report each phase's CPU seconds summed over ranks, and rank 0's seconds"
    )
    ap.add_argument("--dir", required=True, help="scratch folder (each save's folder is removed after it)")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    common.ab_spawn(worker, args)


if __name__ == "__main__":
    main()
