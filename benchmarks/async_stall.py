"""Async save: how long training is blocked, how long the save runs on, host memory, and
how much a save in flight slows training steps. shardckpt vs DCP, measured in one run.

    python benchmarks/async_stall.py --quick          # ~150 MiB, 2 measured repetitions, < 1 min
    python benchmarks/async_stall.py                  # ~1.1 GiB, 5 measured repetitions, 10 consecutive saves
    python benchmarks/async_stall.py --world-size 4 --mib 1024 --repeats 5 --dir /work/bench-tmp/as

Every rank (gloo on CPU, spawned here) holds its rows of the same model-like fp32 state
as benchmarks/save_load.py and runs a small CPU "training" loop: matmuls and, like
DDP, one all_reduce per step on the default (training) process group. Systems:

    none                no save: the training steps alone (the step-time reference)
    copy_floor          no save: copy the rank's local tensors into buffers allocated (and
                        touched) once, with Tensor.copy_ - the floor of any staging copy here
    shardckpt_async     shardckpt.async_save (defaults); blocking = until it returns
    shardckpt_async_AA  the same, under a second name (A/A control)
    shardckpt_async_bounded  async_save(max_staging_bytes = a quarter of the rank's shard):
                        writes 3/4 from the live tensors before returning, stages the rest
    shardckpt_sync      shardckpt.save
    dcp_sync            dcp.save(FileSystemWriter)
    dcp_async           dcp.async_save(storage_writer=FileSystemWriter(path), process_group=<new gloo
                        group>): DCP's recommended CPU setting (the writer's own BlockingAsyncStager,
                        a fresh host copy per save; cache_staged_state_dict=True needs an accelerator
                        here and DefaultStager's default options fail without one)
    dcp_async_stager    dcp.async_save with async_stager=DefaultStager(StagingOptions(False, False,
                        True, False)) (staging on a helper thread, one stager kept across saves);
                        blocking = until staging_completion is done (only then may training
                        mutate the state)

Phase 1, consecutive saves (this also warms every system up): each async system saves
``--consecutive`` times in a row (each waited for); resident memory (VmRSS) after every
save, and the peak (VmHWM, reset before each save) against the rank's shard size. The
first shardckpt async save is checked for correctness: a tensor is overwritten right
after async_save returns and the checkpoint must still hold the old values.

Phase 2, interleaved: every repetition runs every system once in a shuffled order (first
repetition dropped). After an async call returns, training steps run until the save
has finished on every rank. Blocking and completion times are max over ranks, from a
barrier before the call.

"Training time lost" per save is the stall plus, for async saves, the extra time of the
steps that ran while the save was in flight (their sum minus as many no-save steps of
the same repetition).

Writes benchmarks/results/async_stall.json (async_stall_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

SYSTEMS = [
    "none",
    "copy_floor",
    "shardckpt_async",
    "shardckpt_async_AA",
    "shardckpt_async_bounded",
    "shardckpt_sync",
    "dcp_sync",
    "dcp_async",
    "dcp_async_stager",
]
ASYNC_SYSTEMS = ["shardckpt_async", "shardckpt_async_AA", "shardckpt_async_bounded", "dcp_async", "dcp_async_stager"]
CONSECUTIVE_SYSTEMS = ["shardckpt_async", "shardckpt_async_bounded", "dcp_async", "dcp_async_stager"]
BOUNDED_FRACTION = 0.25  # shardckpt_async_bounded: max_staging_bytes = this fraction of the rank's shard


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small state and 2 repetitions (< 1 min)")
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument(
        "--mib",
        type=int,
        default=None,
        help="total state size in MiB (default 1024, quick 128; rounded up to the layout)",
    )
    ap.add_argument("--dir", default="/work/bench-tmp/async_stall", help="scratch folder (deleted at the end)")
    ap.add_argument("--repeats", type=int, default=None, help="measured repetitions (default 5, quick 2)")
    ap.add_argument("--warmup", type=int, default=1, help="dropped warm-up repetitions")
    ap.add_argument(
        "--consecutive", type=int, default=None, help="consecutive saves per async system (default 10, quick 3)"
    )
    ap.add_argument("--train-dim", type=int, default=512, help="matmul size of the training step")
    ap.add_argument(
        "--baseline-steps", type=int, default=None, help="steps of the no-save reference (default 40, quick 10)"
    )
    ap.add_argument("--seed", type=int, default=0)
    common.add_wait_quiet(ap)
    ap.add_argument("--name", default=None, help="results file name (default async_stall or async_stall_quick)")
    ap.add_argument("--out", default=common.RESULTS_DIR, help="folder of the results JSON")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    args.mib = args.mib or (128 if args.quick else 1024)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.consecutive = args.consecutive or (3 if args.quick else 10)
    args.baseline_steps = args.baseline_steps or (10 if args.quick else 40)
    args.name = args.name or ("async_stall_quick" if args.quick else "async_stall")
    return args


# ------------------------------------------------------------------ training


class Trainer:
    """A stand-in for a training step: 3 matmuls and a DDP-like all_reduce (256 x dim fp32) on the
    default group. The all_reduce also carries a flag, so every rank agrees on when to stop."""

    def __init__(self, dim: int) -> None:
        import torch

        g = torch.Generator().manual_seed(1)
        self.w1 = torch.randn(dim, dim, generator=g) / dim**0.5
        self.w2 = torch.randn(dim, dim, generator=g) / dim**0.5
        self.x = torch.randn(256, dim, generator=g)
        self.grad = torch.zeros(256 * dim + 1)

    def step(self, still_busy: bool) -> bool:
        """One step; returns True while any rank still reports ``still_busy``."""
        import torch
        import torch.distributed as dist

        h = torch.tanh(self.x @ self.w1) @ self.w2
        gw = self.x.t() @ h
        self.w1.sub_(gw, alpha=1e-6)
        self.grad[:-1].copy_(h.reshape(-1)[: self.grad.numel() - 1])
        self.grad[-1] = 1.0 if still_busy else 0.0
        dist.all_reduce(self.grad)
        return bool(self.grad[-1].item() > 0)

    def run(self, busy: Any, min_steps: int = 0, max_steps: int = 100_000) -> list[float]:
        """Steps until no rank is ``busy()`` any more (and at least ``min_steps``)."""
        times = []
        for i in range(max_steps):
            t0 = time.perf_counter()
            any_busy = self.step(busy() or i + 1 < min_steps)
            times.append(time.perf_counter() - t0)
            if not any_busy:
                break
        return times


# ------------------------------------------------------------------ the systems


class Bench:
    def __init__(self, rank: int, world: int, args: argparse.Namespace) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        import shardckpt

        self.rank, self.world, self.args = rank, world, args
        self.shardckpt = shardckpt
        self.specs = common.model_layout(args.mib, world)
        self.src = common.make_state(self.specs, rank, world, fill=True)
        self.global_bytes = common.global_bytes(self.specs)
        self.local_bytes = common.local_bytes(self.specs, rank, world)
        self.trainer = Trainer(args.train_dim)
        # DCP's async save needs its own gloo group: its background collectives must not
        # share the training group (see shared ENVIRONMENT notes and KempnerForge#104).
        self.dcp_group = dist.new_group(backend="gloo")
        self.stager = DefaultStager(StagingOptions(False, False, True, False))
        self.floor_buffers = [t.clone() for t in common.local_tensors(self.src)]  # allocated and touched once
        # Each shardckpt mode has its own Checkpointer (its own staging buffers), as it would
        # in a job that uses one mode: with one, switching modes frees the other mode's
        # buffers (by design), and the interleaved loop would re-allocate them at every switch.
        self.checkpointers = {"full": shardckpt.Checkpointer(), "bounded": shardckpt.Checkpointer()}
        self.counter = 0

    def one_save_at_a_time(self, mode: str) -> None:
        """Finish the other Checkpointer's save (the one using ``mode`` finishes its own):
        as when one engine served both modes, no two shardckpt saves overlap."""
        for name, ckpt in self.checkpointers.items():
            if name != mode:
                ckpt.wait()

    def fresh_path(self, system: str) -> str:
        """A new, empty folder for this save (rank 0 creates it; collective)."""
        import torch.distributed as dist

        self.counter += 1
        path = os.path.join(self.args.dir, system, f"save_{self.counter:04d}")
        if self.rank == 0:
            common.remove_tree(os.path.join(self.args.dir, system))
            os.makedirs(path, exist_ok=True)
        dist.barrier()
        return path

    def start(self, system: str, path: str, done: threading.Event, finished: list[float]) -> Any:
        """Start a save; return when training may mutate the state. ``done`` is set (and
        ``finished`` gets the time) when the save has finished on this rank."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

        def mark(*_: Any) -> None:
            finished.append(time.perf_counter())
            done.set()

        if system == "none":
            mark()
            return None
        if system == "copy_floor":
            for buf, t in zip(self.floor_buffers, common.local_tensors(self.src), strict=True):
                buf.copy_(t)
            mark()
            return None
        if system in ("shardckpt_async", "shardckpt_async_AA", "shardckpt_async_bounded"):
            bounded = system == "shardckpt_async_bounded"
            budget = int(self.local_bytes * BOUNDED_FRACTION) if bounded else None
            mode = "bounded" if bounded else "full"
            self.one_save_at_a_time(mode)
            handle = self.checkpointers[mode].async_save(self.src, path, max_staging_bytes=budget)
            threading.Thread(target=_wait_then, args=(handle, mark), daemon=True).start()
            return handle
        if system == "shardckpt_sync":
            self.one_save_at_a_time("full")
            self.checkpointers["full"].save(self.src, path)
        elif system == "dcp_sync":
            dcp.save(self.src, storage_writer=dcp.FileSystemWriter(path))
        elif system == "dcp_async":
            fut = dcp.async_save(self.src, storage_writer=dcp.FileSystemWriter(path), process_group=self.dcp_group)
            assert isinstance(fut, Future), "the writer's blocking stager gives a plain Future"
            fut.add_done_callback(mark)
            return fut
        elif system == "dcp_async_stager":
            resp = dcp.async_save(
                self.src,
                storage_writer=dcp.FileSystemWriter(path),
                process_group=self.dcp_group,
                async_stager=self.stager,
            )
            assert isinstance(resp, AsyncSaveResponse), "an async-staging stager gives an AsyncSaveResponse"
            resp.staging_completion.result()
            resp.upload_completion.add_done_callback(mark)
            return resp.upload_completion
        else:
            raise ValueError(system)
        mark()
        return None

    @staticmethod
    def finish(system: str, handle: Any) -> None:
        if handle is None:
            return
        if system.startswith("shardckpt"):
            handle.wait()
        else:
            handle.result()


def _wait_then(handle: Any, then: Any) -> None:
    try:
        handle.wait()
    except BaseException:  # noqa: BLE001 - the main thread's wait() raises it
        pass
    then()


def measure(b: Bench, system: str, train: bool) -> dict[str, Any]:
    """One save of ``system`` (train: run steps while it is in flight). Per-rank figures."""
    import torch.distributed as dist

    path = b.fresh_path(system)
    done, finished = threading.Event(), list[float]()
    common.reset_peak_rss()
    rss0 = common.rss_bytes()
    dist.barrier()
    t0 = time.perf_counter()
    handle = b.start(system, path, done, finished)
    t_unblocked = time.perf_counter()
    steps: list[float] = []
    if train:
        min_steps = b.args.baseline_steps if system == "none" else 1
        steps = b.trainer.run(lambda: not done.is_set(), min_steps=min_steps)
    b.finish(system, handle)
    done.wait()
    out = {
        "blocking_s": t_unblocked - t0,
        "completion_s": finished[0] - t0,
        "steps_s": steps,
        "peak_extra_bytes": common.peak_rss_bytes() - rss0,
        "rss_after": common.rss_bytes(),
        "path": path,
    }
    dist.barrier()
    return out


# ------------------------------------------------------------------ phases


def consecutive_phase(b: Bench) -> dict[str, Any]:
    """Each async system saves ``--consecutive`` times in a row; RSS after each save."""
    import torch.distributed as dist

    res: dict[str, Any] = {}
    for system in CONSECUTIVE_SYSTEMS:
        import gc

        gc.collect()
        baseline = common.rss_bytes()
        rows = []
        for i in range(b.args.consecutive):
            m = measure(b, system, train=False)
            rows.append({k: m[k] for k in ("blocking_s", "completion_s", "peak_extra_bytes", "rss_after")})
            if i == 0:
                rows[-1]["peak_over_baseline_bytes"] = common.peak_rss_bytes() - baseline
        per_rank = common.gather_to_all({"baseline_rss": baseline, "saves": rows})
        res[system] = per_rank
        if b.rank == 0:
            print(f"consecutive {system}: done", flush=True)
        dist.barrier()
    return res


def check_async_snapshot(b: Bench, system: str) -> bool:
    """Overwrite a tensor right after the async call returns; the checkpoint must hold
    the values from before. Returns True on every rank when it does."""
    import torch
    import torch.distributed.checkpoint as dcp

    victim = b.src["model"]["param.embed"].to_local()
    before = victim.clone()
    path = b.fresh_path(system + "_check")
    done, finished = threading.Event(), list[float]()
    handle = b.start(system, path, done, finished)
    victim.fill_(-1.0)  # training mutates the state while the save is in flight
    b.finish(system, handle)
    done.wait()
    victim.copy_(before)
    dst = common.make_state(b.specs, b.rank, b.world, fill=False)
    if system.startswith("shardckpt"):
        b.shardckpt.load(dst, path)
    else:
        dcp.load(dst, storage_reader=dcp.FileSystemReader(path))
    ok = common.state_equal(dst, b.src) and bool(torch.equal(dst["model"]["param.embed"].to_local(), before))
    return all(common.gather_to_all(ok))


def worker(rank: int, world: int, args: argparse.Namespace, facts: dict[str, Any]) -> None:
    import torch.distributed as dist

    if rank == 0:
        common.remove_tree(args.dir)
        os.makedirs(args.dir, exist_ok=True)
    dist.barrier()
    b = Bench(rank, world, args)
    if rank == 0:
        print(
            f"state: {len(b.specs)} tensors, {b.global_bytes / 2**20:.0f} MiB total, "
            f"{b.local_bytes / 2**20:.0f} MiB per rank; {args.consecutive} consecutive saves, "
            f"{args.repeats} repetitions + {args.warmup} warm-up",
            flush=True,
        )
    t_start = time.perf_counter()
    consecutive = consecutive_phase(b)
    snapshot_ok = {s: check_async_snapshot(b, s) for s in ("shardckpt_async", "shardckpt_async_bounded", "dcp_async")}
    samples: dict[str, list[Any]] = {}
    orders = []
    for rep, warm, order in common.interleaved(SYSTEMS, args.repeats, args.warmup, args.seed):
        orders.append({"rep": rep, "warmup": warm, "order": order, "loadavg": common.loadavg()})
        for system in order:
            m = measure(b, system, train=system == "none" or system in ASYNC_SYSTEMS)
            per_rank = common.gather_to_all({k: v for k, v in m.items() if k != "path"})
            if not warm:
                samples.setdefault(system, []).append(per_rank)
        if rank == 0:
            print(
                f"repetition {rep}{' (warm-up)' if warm else ''} done at {time.perf_counter() - t_start:.0f} s",
                flush=True,
            )
    b.stager.close()
    b.checkpointers["bounded"].wait()
    staging = common.gather_to_all(b.checkpointers["full"].staging_stats())
    if rank == 0:
        results = build_results(
            args, facts, b, samples, consecutive, snapshot_ok, orders, time.perf_counter() - t_start
        )
        results["shardckpt_staging_stats_per_rank"] = staging
        path = common.write_results(args.name, results, args.out)
        print_report(results)
        print(f"\nresults: {path}")
        if not args.keep:
            common.remove_tree(args.dir)


# ------------------------------------------------------------------ results


def build_results(
    args: argparse.Namespace,
    facts: dict[str, Any],
    b: Bench,
    samples: dict[str, list[Any]],
    consecutive: dict[str, Any],
    snapshot_ok: dict[str, bool],
    orders: list[Any],
    elapsed_s: float,
) -> dict[str, Any]:
    shard = b.local_bytes
    systems: dict[str, Any] = {}
    for name, reps in samples.items():
        blocking = [max(r["blocking_s"] for r in per_rank) for per_rank in reps]
        completion = [max(r["completion_s"] for r in per_rank) for per_rank in reps]
        peak = [max(r["peak_extra_bytes"] for r in per_rank) for per_rank in reps]
        step_medians = [
            statistics.median([s for r in per_rank for s in r["steps_s"]]) if per_rank[0]["steps_s"] else None
            for per_rank in reps
        ]
        steps_n = [len(per_rank[0]["steps_s"]) for per_rank in reps]
        # Training time a save costs: the stall plus the extra time of the steps that ran
        # while it was in flight, against the no-save steps of the same repetition.
        lost = []
        for i, per_rank in enumerate(reps):
            ref = (
                statistics.median([s for r in samples["none"][i] for s in r["steps_s"]]) if "none" in samples else None
            )
            extra = statistics.mean(sum(r["steps_s"]) - len(r["steps_s"]) * ref for r in per_rank) if ref else 0.0
            lost.append(max(r["blocking_s"] for r in per_rank) + (extra if name != "none" else 0.0))
        systems[name] = {
            "blocking_s": common.summarize(blocking),
            "completion_s": common.summarize(completion),
            "peak_extra_rss_bytes": common.summarize(peak),
            "peak_extra_over_shard": common.summarize([p / shard for p in peak]),
            "step_s": common.summarize([s for s in step_medians if s is not None]),
            "training_time_lost_s": common.summarize(lost),
            "steps_per_rep": steps_n,
        }
    ratios: dict[str, Any] = {}

    def paired(num: str, den: str, key: str) -> None:
        if num in systems and den in systems and systems[num][key].get("n") and systems[den][key].get("n"):
            ratios[f"{num}/{den} {key}"] = common.paired_ratios(
                systems[num][key]["samples"], systems[den][key]["samples"]
            )

    for s in [*ASYNC_SYSTEMS, "dcp_sync", "copy_floor"]:
        paired(s, "shardckpt_sync", "blocking_s")
    for s in ASYNC_SYSTEMS:
        paired(s, "copy_floor", "blocking_s")
    for s in ("shardckpt_async", "shardckpt_async_AA"):
        paired(s, "dcp_async", "blocking_s")
        paired(s, "dcp_async_stager", "blocking_s")
    paired("shardckpt_async_AA", "shardckpt_async", "blocking_s")
    paired("shardckpt_async_AA", "shardckpt_async", "completion_s")
    paired("shardckpt_async_AA", "shardckpt_async", "step_s")
    for s in ASYNC_SYSTEMS:
        paired(s, "none", "step_s")
    cons = {}
    for system, per_rank in consecutive.items():
        rank_rows = []
        for r, d in enumerate(per_rank):
            rss = [row["rss_after"] for row in d["saves"]]
            rank_rows.append(
                {
                    "rank": r,
                    "baseline_rss": d["baseline_rss"],
                    "rss_after_each_save": rss,
                    "growth_after_first": (rss[-1] - rss[0]) / rss[0],
                    "max_growth_after_first": (max(rss) - rss[0]) / rss[0],
                    "first_save_peak_over_baseline_over_shard": d["saves"][0]["peak_over_baseline_bytes"] / shard,
                    "peak_extra_over_shard_each_save": [row["peak_extra_bytes"] / shard for row in d["saves"]],
                    "resident_after_first_over_baseline_over_shard": (rss[0] - d["baseline_rss"]) / shard,
                    "blocking_s_each_save": [row["blocking_s"] for row in d["saves"]],
                }
            )
        cons[system] = {
            "worst_rank_growth_after_first": max(x["growth_after_first"] for x in rank_rows),
            "worst_rank_first_save_peak_over_shard": max(
                x["first_save_peak_over_baseline_over_shard"] for x in rank_rows
            ),
            "worst_rank_peak_extra_over_shard_later_saves": max(
                max(x["peak_extra_over_shard_each_save"][1:] or [0]) for x in rank_rows
            ),
            "per_rank": rank_rows,
        }

    def ratio(key: str) -> float | None:
        return ratios.get(key, {}).get("median")

    sh = cons.get("shardckpt_async", {})
    targets = {
        "blocking_at_most_0.1x_sync": {
            "ratio": ratio("shardckpt_async/shardckpt_sync blocking_s"),
            "met": _le(ratio("shardckpt_async/shardckpt_sync blocking_s"), 0.1),
        },
        "blocking_below_dcp_async": {
            "ratio": ratio("shardckpt_async/dcp_async blocking_s"),
            "met": _le(ratio("shardckpt_async/dcp_async blocking_s"), 1.0, strict=True),
        },
        "blocking_below_dcp_async_stager": {
            "ratio": ratio("shardckpt_async/dcp_async_stager blocking_s"),
            "met": _le(ratio("shardckpt_async/dcp_async_stager blocking_s"), 1.0, strict=True),
        },
        "peak_extra_at_most_1.1x_shard": {
            "value": sh.get("worst_rank_first_save_peak_over_shard"),
            "met": _le(sh.get("worst_rank_first_save_peak_over_shard"), 1.1),
        },
        "rss_growth_after_first_below_5pct": {
            "value": sh.get("worst_rank_growth_after_first"),
            "met": _le(sh.get("worst_rank_growth_after_first"), 0.05, strict=True),
        },
        "bounded_peak_extra_at_most_budget_plus_10pct_shard": {
            "value": cons.get("shardckpt_async_bounded", {}).get("worst_rank_first_save_peak_over_shard"),
            "met": _le(
                cons.get("shardckpt_async_bounded", {}).get("worst_rank_first_save_peak_over_shard"),
                BOUNDED_FRACTION + 0.1,
            ),
        },
    }
    return {
        "benchmark": "async_stall",
        "targets": targets,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": dict(facts, loadavg_end=common.loadavg()),
        "config": {
            "world_size": b.world,
            "mib_requested": args.mib,
            "state_bytes": b.global_bytes,
            "shard_bytes_per_rank": shard,
            "tensors": len(b.specs),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "consecutive": args.consecutive,
            "train_dim": args.train_dim,
            "baseline_steps": args.baseline_steps,
            "seed": args.seed,
            "quick": args.quick,
        },
        "elapsed_s": elapsed_s,
        "systems": systems,
        "paired_ratios": ratios,
        "consecutive_saves": cons,
        "snapshot_correct_after_mutation": snapshot_ok,
        "orders": orders,
    }


def _le(x: float | None, bound: float, strict: bool = False) -> bool | None:
    if x is None:
        return None
    return x < bound if strict else x <= bound


def print_report(r: dict[str, Any]) -> None:
    cfg = r["config"]
    print(
        f"\n{cfg['state_bytes'] / 2**30:.2f} GiB fp32 state ({cfg['shard_bytes_per_rank'] / 2**20:.0f} MiB per rank), "
        f"{cfg['world_size']} ranks, {cfg['repeats']} measured repetitions; loadavg start "
        f"{r['machine']['loadavg_start']} end {r['machine']['loadavg_end']}"
    )
    rat = r["paired_ratios"]
    rows = []
    for name in SYSTEMS:
        s = r["systems"].get(name)
        if s is None:
            continue
        rows.append(
            [
                name,
                s["blocking_s"]["median"],
                common.spread(s["blocking_s"]),
                rat.get(f"{name}/shardckpt_sync blocking_s", {}).get("median"),
                s["completion_s"]["median"],
                common.spread(s["completion_s"]),
                s["step_s"].get("median", None) and s["step_s"]["median"] * 1e3,
                rat.get(f"{name}/none step_s", {}).get("median"),
                s["training_time_lost_s"]["median"],
                s["peak_extra_over_shard"]["median"],
            ]
        )
    print("\nmedians over repetitions; times max over ranks; ratios are medians of per-repetition ratios")
    print(
        common.format_table(
            [
                "system",
                "blocking s",
                "blocking min-max",
                "x shardckpt_sync",
                "completion s",
                "completion min-max",
                "step ms",
                "step x none",
                "training s lost",
                "peak extra RSS / shard",
            ],
            rows,
        )
    )
    for key in (
        "shardckpt_async/copy_floor blocking_s",
        "shardckpt_async/dcp_async blocking_s",
        "shardckpt_async/dcp_async_stager blocking_s",
        "shardckpt_async_AA/shardckpt_async blocking_s",
        "shardckpt_async_AA/shardckpt_async completion_s",
        "shardckpt_async_AA/shardckpt_async step_s",
    ):
        s = rat.get(key)
        if s and s.get("n"):
            print(f"{key}: median {s['median']:.3f}, range {common.spread(s)}")
    print(f"\n{cfg['consecutive']} consecutive saves per system (worst rank):")
    rows = [
        [
            k,
            v["worst_rank_first_save_peak_over_shard"],
            v["worst_rank_peak_extra_over_shard_later_saves"],
            100 * v["worst_rank_growth_after_first"],
        ]
        for k, v in r["consecutive_saves"].items()
    ]
    print(
        common.format_table(
            ["system", "first save peak RSS / shard", "later saves peak extra / shard", "RSS growth after first %"],
            rows,
        )
    )
    print(f"values saved are the pre-mutation ones: {r['snapshot_correct_after_mutation']}")
    for k, v in r["targets"].items():
        x = v.get("ratio", v.get("value"))
        print(f"target {k}: {x if x is None else round(x, 4)} -> {'met' if v['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> None:
    common.run_benchmark(worker, parse_args(argv))


if __name__ == "__main__":
    main()
