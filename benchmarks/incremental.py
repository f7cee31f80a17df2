"""Incremental checkpoints (issue #17): bytes written and save/load time of
``CheckpointManager(incremental=True)`` against the same manager with ``incremental=False``,
measured in one run.

    python benchmarks/incremental.py --quick      # 4 ranks, ~32 MiB, 2 measured repetitions, < 1 min
    python benchmarks/incremental.py              # 4 ranks, 2 GiB fp32, 5 measured repetitions
    python benchmarks/incremental.py --wait-quiet 900 --repeats 7 --dir /work/bench-tmp/incremental

Every rank (gloo on CPU, spawned here) holds its rows of Shard(0) DTensors on a 1-D mesh
(small norms and the rotary table are Replicate). Two states, one after the other:

    adapter         a frozen transformer-like base (embedding, head, 2 blocks of qkv/out/up/down,
                    norms, rotary table; no optimizer state) plus LoRA adapters on the 8 block
                    linears (lora_a r x in, lora_b out x r) with their AdamW exp_avg and exp_avg_sq:
                    1% of the parameters trainable (r chosen for that, a multiple of the world size).
                    A training step adds 1e-3 to every trainable tensor and both moments.
    full_training   common.model_layout: every parameter with both AdamW moments; a training step
                    changes every tensor.

Systems, each its own CheckpointManager on its own root (sync saves, keep_last=2):

    incremental, incremental_AA   incremental=True, full_every=None (the same system twice: A/A)
    full, full_AA                 incremental=False (the same system twice: A/A)

Each repetition of the adapter case: one training step; every system saves it (shuffled
order); every system's newest step is loaded cold (shuffled; the files of its whole root
are fsynced and evicted from the page cache first; values checked bitwise against the
state); then the two incremental systems save again with nothing changed (case 2). Each
repetition of full_training: one training step, then incremental, full, full_AA save it.
The first repetition is a dropped warm-up, and holds each incremental manager's first,
full save. A time is the wall time from a barrier before the call to a barrier after it,
max over ranks; ratios are medians of per-repetition ratios.

Bytes written by a save, counted twice on rank 0 after it: the sizes of the files in its
step folder (``data/*`` and ``manifest.json``), and from its manifest the sizes of the data
files it did not reference from an older step (``FileRecord.checkpoint is None``). "Changed
bytes" are the logical bytes of the tensors the training step changed.

Then a trace for the plot: ``--trace-steps`` training steps, each saved by a fresh
incremental manager with ``full_every=--trace-full-every`` and a fresh full one: bytes
written per step -> ``docs/img/incremental_bytes.png`` (plots.py; needs matplotlib).

Writes benchmarks/results/incremental.json (incremental_quick.json with --quick) and prints
tables of medians, spreads, paired ratios and the issue's targets.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import plots

DEFAULT_DOCS_IMG = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "img"))
ADAPTER_SAVE_SYSTEMS = ["incremental", "incremental_AA", "full", "full_AA"]
DIGEST = "digest_pass"  # not a save: the xxh3-128 pass an incremental save makes over the state, alone
UNCHANGED_SYSTEMS = ["incremental", "incremental_AA"]
FULL_TRAINING_SYSTEMS = ["incremental", "full", "full_AA", DIGEST]
STEP_DELTA = 1e-3  # what a "training step" adds to every changing tensor: changes every element
# the targets
BYTES_OVER_CHANGED_AT_MOST = 1.1
ADAPTER_SPEEDUP_AT_LEAST = 10.0
FULL_TRAINING_SLOWDOWN_AT_MOST = 1.05
LOAD_SLOWDOWN_AT_MOST = 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~32 MiB, 2 repetitions, 6 trace steps (< 1 min)")
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--mib", type=int, default=None, help="size of each state in MiB (default 2048, quick 32)")
    ap.add_argument("--trainable-fraction", type=float, default=0.01, help="adapter parameters / all parameters")
    ap.add_argument("--cases", nargs="+", choices=["adapter", "full_training"], default=["adapter", "full_training"])
    ap.add_argument("--repeats", type=int, default=None, help="measured repetitions (default 5, quick 2)")
    ap.add_argument("--warmup", type=int, default=1, help="dropped warm-up repetitions")
    ap.add_argument("--keep-last", type=int, default=2, help="every manager's keep_last")
    ap.add_argument("--trace-steps", type=int, default=None, help="steps of the plot's trace (default 10, quick 6)")
    ap.add_argument("--trace-full-every", type=int, default=None, help="full_every of the trace (default 5, quick 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled orders")
    ap.add_argument(
        "--dir", default="/work/bench-tmp/incremental", help="a fresh folder is made (and removed) under this one"
    )
    ap.add_argument("--out", default=common.RESULTS_DIR, help="folder of the results JSON")
    ap.add_argument("--name", default=None, help="results file name (default incremental or incremental_quick)")
    ap.add_argument("--plots-dir", default=None, help="'none' for no plot (default docs/img; quick: a temp folder)")
    common.add_wait_quiet(ap)
    args = ap.parse_args(argv)
    q = args.quick
    args.mib = args.mib or (32 if q else 2048)
    args.repeats = args.repeats or (2 if q else 5)
    args.trace_steps = args.trace_steps or (6 if q else 10)
    args.trace_full_every = args.trace_full_every or (3 if q else 5)
    args.name = args.name or ("incremental_quick" if q else "incremental")
    args.plots_dir = args.plots_dir or (
        os.path.join(tempfile.gettempdir(), "shardckpt-incremental") if q else DEFAULT_DOCS_IMG
    )
    if not 0 < args.trainable_fraction < 1:
        raise SystemExit(f"--trainable-fraction must be in (0, 1), got {args.trainable_fraction}")
    return args


# ------------------------------------------------------------------ the adapter layout


LINEARS = [("qkv", 3, 1), ("out", 1, 1), ("up", 4, 1), ("down", 1, 4)]  # (name, out/h, in/h)


def adapter_layout(total_mib: int, world_size: int, fraction: float) -> tuple[list[common.TensorSpec], set[str]]:
    """The specs of a frozen base of at least ``total_mib`` MiB (fp32, parameters only) plus
    LoRA adapters holding ``fraction`` of all parameters (rounded: the LoRA rank is a
    multiple of ``world_size``) with their AdamW moments, and the names that train."""
    step = 16 * world_size
    units = 4 + 4 + 2 * sum(o * i for _, o, i in LINEARS)  # the base, in h*h elements
    h = max(step, math.ceil(math.sqrt(total_mib * common.MiB / (units * 4)) / step) * step)
    lora_units = 2 * sum(o + i for _, o, i in LINEARS)  # adapter elements per unit of r*h
    r = max(world_size, round(fraction / (1 - fraction) * units * h / lora_units / world_size) * world_size)
    specs = [common.TensorSpec(f"param.{n}", 4 * h, h, True) for n in ("embed", "head")]
    adapters = []
    for b in range(2):
        for name, o, i in LINEARS:
            specs.append(common.TensorSpec(f"param.blocks.{b}.{name}", o * h, i * h, True))
            adapters += [(f"blocks.{b}.{name}.lora_a", r, i * h), (f"blocks.{b}.{name}.lora_b", o * h, r)]
        specs += [common.TensorSpec(f"param.blocks.{b}.{n}", 1, h, False) for n in ("norm1", "norm2")]
    specs += [common.TensorSpec("param.final_norm", 1, h, False), common.TensorSpec("param.rope", h // 4, 64, False)]
    trainable = set()
    for group in ("param", "exp_avg", "exp_avg_sq"):
        for n, rows, cols in adapters:
            specs.append(common.TensorSpec(f"{group}.{n}", rows, cols, True))
            trainable.add(f"{group}.{n}")
    return specs, trainable


def layout_facts(specs: list[common.TensorSpec], changing: set[str]) -> dict[str, Any]:
    params = [s for s in specs if s.name.startswith("param.")]
    trainable = sum(s.rows * s.cols for s in params if s.name in changing)
    return {
        "state_bytes": common.global_bytes(specs),
        "changed_bytes_per_step": sum(s.nbytes for s in specs if s.name in changing),
        "tensors": len(specs),
        "changing_tensors": len(changing),
        "parameters": sum(s.rows * s.cols for s in params),
        "trainable_parameters": trainable,
        "trainable_fraction": trainable / sum(s.rows * s.cols for s in params),
        "largest_tensor_bytes": max(s.nbytes for s in specs),
        "placement": "Shard(0) DTensors on a 1-D CPU mesh; 1-row norms and the rotary table Replicate",
    }


# ------------------------------------------------------------------ one state, its managers (every rank)


@dataclass
class Case:
    """One state on this rank, the tensors a training step changes, and one manager per system."""

    rank: int
    world: int
    root: str
    specs: list[common.TensorSpec]
    changing: set[str]
    src: dict[str, Any]
    dst: dict[str, Any] | None
    managers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def make(
        cls, rank: int, world: int, root: str, specs: list[common.TensorSpec], changing: set[str], loads: bool
    ) -> Case:
        src = common.make_state(specs, rank, world, fill=True)
        dst = common.make_state(specs, rank, world, fill=False) if loads else None
        return cls(rank, world, root, specs, changing, src, dst)

    def open(self, system: str, keep_last: int, full_every: int | None = None) -> Any:
        """Collective: a CheckpointManager on ``root/system``."""
        import shardckpt

        incremental = system.startswith(("incremental", "trace_incremental"))
        kwargs = {"incremental": incremental, "keep_last": keep_last}
        if incremental:
            kwargs["full_every"] = full_every
        mgr = shardckpt.CheckpointManager(os.path.join(self.root, system), **kwargs)
        self.managers[system] = mgr
        return mgr

    def close(self) -> None:
        """Collective: close every manager (in the order they were opened), drop the roots."""
        import torch.distributed as dist

        for mgr in self.managers.values():
            mgr.close()
        dist.barrier()
        if self.rank == 0:
            common.remove_tree(self.root)
        self.managers.clear()

    def train_step(self) -> None:
        """Change every element of the tensors in ``changing`` (never back to an older value)."""
        for part in ("model", "optim"):
            for name, t in self.src[part].items():
                if name in self.changing:
                    t.to_local().add_(STEP_DELTA)
        self.src["step"] += 1

    def save(self, system: str, step: int) -> dict[str, Any]:
        """Collective: a timed save of ``src`` as ``step`` by ``system``'s manager; rank 0's
        dict also holds the bytes it wrote. ``DIGEST``: the timed digest pass alone."""
        if system == DIGEST:
            return {"step": step, "s": timed(self.digest_pass)}
        mgr = self.managers[system]
        sample = {"step": step, "s": timed(lambda: mgr.save(step, self.src))}
        if self.rank == 0:
            sample.update(written_bytes(mgr.path(step)))
        return sample

    def digest_pass(self) -> None:
        """What an incremental save computes before it writes: the xxh3-128 of every local
        tensor, on as many threads as the save's default I/O threads (the engine's own
        digest function; replicated tensors digested by every rank here, by one in a save)."""
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from shardckpt.engine.options import DEFAULT_SAVE_IO_THREADS
        from shardckpt.format.integrity import digest_hex

        views = [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in common.local_tensors(self.src)]
        with ThreadPoolExecutor(DEFAULT_SAVE_IO_THREADS) as pool:
            list(pool.map(digest_hex, views))

    def load(self, system: str) -> dict[str, Any]:
        """Collective: a timed cold load of ``system``'s newest step into ``dst``, checked
        bitwise against ``src``."""
        import torch.distributed as dist

        import shardckpt

        assert self.dst is not None
        mgr = self.managers[system]
        step = mgr.latest_step()
        common.zero_state(self.dst)
        if self.rank == 0:
            common.evict_tree(mgr.root)
        dist.barrier()
        io0 = common.proc_io()
        seconds = timed(lambda: shardckpt.load(self.dst, mgr.path(step)))
        read = common.gather_to_all(common.proc_io()["rchar"] - io0["rchar"])
        equal = all(common.gather_to_all(common.state_equal(self.dst, self.src)))
        if not equal:
            raise AssertionError(f"{system}: step {step} loaded values that differ from the saved ones")
        return {"step": step, "s": seconds, "rchar": sum(read), "verified": equal}


def timed(call: Callable[[], Any]) -> float:
    """Collective: barrier, call, barrier; wall seconds, max over ranks."""
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    call()
    dist.barrier()
    return common.max_over_ranks(time.perf_counter() - t0)


def written_bytes(step_dir: str) -> dict[str, Any]:
    """What a save wrote into its step folder: on disk and by its manifest's account."""
    import shardckpt

    files = common.files_under(os.path.join(step_dir, "data"))
    m = shardckpt.read_manifest(step_dir)
    own = [f for f in m.files.values() if f.checkpoint is None]
    return {
        "data_files": len(files),
        "data_bytes": sum(os.path.getsize(f) for f in files),
        "manifest_bytes": os.path.getsize(os.path.join(step_dir, "manifest.json")),
        "manifest_own_files": len(own),
        "manifest_own_bytes": sum(f.size for f in own),
        "manifest_referenced_bytes": sum(f.size for f in m.files.values() if f.checkpoint is not None),
        "bases": sorted(m.bases),
    }


# ------------------------------------------------------------------ the cases


def run_adapter(case: Case, args: argparse.Namespace, log: list[dict[str, Any]]) -> dict[str, Any]:
    """Collective: the interleaved repetitions of cases 1, 2 and 4 on the adapter state."""
    for system in ADAPTER_SAVE_SYSTEMS:
        case.open(system, args.keep_last)
    samples: dict[str, dict[str, list[Any]]] = {"save": {}, "unchanged": {}, "load": {}}
    for rep, warm, order in common.interleaved([*ADAPTER_SAVE_SYSTEMS, DIGEST], args.repeats, args.warmup, args.seed):
        rng = random.Random(args.seed * 1000 + rep)
        loads, unchanged = list(ADAPTER_SAVE_SYSTEMS), list(UNCHANGED_SYSTEMS)
        rng.shuffle(loads)
        rng.shuffle(unchanged)
        log.append(
            {"case": "adapter", "rep": rep, "warmup": warm, "save": order, "load": loads, "unchanged": unchanged}
        )
        log[-1]["loadavg"] = common.loadavg()
        case.train_step()
        taken = [("save", s, case.save(s, 2 * rep)) for s in order]
        taken += [("load", s, case.load(s)) for s in loads]
        taken += [("unchanged", s, case.save(s, 2 * rep + 1)) for s in unchanged]
        for phase, system, sample in taken:
            if not warm:
                samples[phase].setdefault(system, []).append(sample)
        progress(case.rank, "adapter", rep, warm)
    return samples


def run_full_training(case: Case, args: argparse.Namespace, log: list[dict[str, Any]]) -> dict[str, Any]:
    """Collective: the interleaved repetitions of case 3 (every tensor changes every step)."""
    for system in FULL_TRAINING_SYSTEMS[:-1]:
        case.open(system, args.keep_last)
    samples: dict[str, list[Any]] = {}
    for rep, warm, order in common.interleaved(FULL_TRAINING_SYSTEMS, args.repeats, args.warmup, args.seed + 1):
        log.append({"case": "full_training", "rep": rep, "warmup": warm, "save": order, "loadavg": common.loadavg()})
        case.train_step()
        for system in order:
            sample = case.save(system, rep)
            if not warm:
                samples.setdefault(system, []).append(sample)
        progress(case.rank, "full_training", rep, warm)
    return {"save": samples}


def run_trace(case: Case, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Collective: ``trace_steps`` training steps, each saved by a fresh incremental manager
    (``full_every=trace_full_every``) and a fresh full one, in a seeded order per step."""
    systems = ["trace_incremental", "trace_full"]
    for system in systems:
        case.open(system, args.keep_last, full_every=args.trace_full_every)
    rng = random.Random(args.seed + 2)
    steps = []
    for step in range(args.trace_steps):
        if step:
            case.train_step()
        order = rng.sample(systems, len(systems))
        row = {"step": step, "order": order}
        for system in order:
            row[system.removeprefix("trace_")] = case.save(system, step)
        steps.append(row)
    return steps


def progress(rank: int, name: str, rep: int, warm: bool) -> None:
    if rank == 0:
        print(f"{name}: repetition {rep}{' (warm-up)' if warm else ''} done", flush=True)


# ------------------------------------------------------------------ the run


def worker(rank: int, world: int, args: argparse.Namespace, facts: dict[str, Any]) -> None:
    import torch.distributed as dist

    box = [None]
    if rank == 0:
        os.makedirs(args.dir, exist_ok=True)
        box = [tempfile.mkdtemp(prefix="run-", dir=args.dir)]  # ours alone: removed at the end
    dist.broadcast_object_list(box, src=0)
    run_dir = str(box[0])
    t0 = time.perf_counter()
    log: list[dict[str, Any]] = []
    out: dict[str, Any] = {"cases": {}}
    try:
        if "adapter" in args.cases:
            specs, trainable = adapter_layout(args.mib, world, args.trainable_fraction)
            case = Case.make(rank, world, os.path.join(run_dir, "adapter"), specs, trainable, loads=True)
            announce(rank, "adapter", specs, trainable, args)
            out["cases"]["adapter"] = summarize_adapter(run_adapter(case, args, log), layout_facts(specs, trainable))
            case.close()
            out["trace"] = {"full_every": args.trace_full_every, "steps": run_trace(case, args)}
            case.close()
            del case
        if "full_training" in args.cases:
            specs = common.model_layout(args.mib, world)
            changing = {s.name for s in specs}
            case = Case.make(rank, world, os.path.join(run_dir, "full_training"), specs, changing, loads=False)
            announce(rank, "full_training", specs, changing, args)
            facts_ft = layout_facts(specs, changing)
            out["cases"]["full_training"] = summarize_full_training(run_full_training(case, args, log), facts_ft)
            case.close()
    finally:
        if rank == 0:
            common.remove_tree(run_dir)
    if rank == 0:
        results = build_results(args, facts, world, out, log, time.perf_counter() - t0)
        common.publish(args.name, results, args.out, print_report)


def announce(
    rank: int, name: str, specs: list[common.TensorSpec], changing: set[str], args: argparse.Namespace
) -> None:
    if rank == 0:
        f = layout_facts(specs, changing)
        print(
            f"{name}: {f['tensors']} tensors, {f['state_bytes'] / 2**20:.0f} MiB, {f['changing_tensors']} change per "
            f"step ({f['changed_bytes_per_step'] / 2**20:.1f} MiB); {args.repeats} repetitions + {args.warmup} warm-up",
            flush=True,
        )


def column(samples: list[dict[str, Any]], key: str) -> list[float]:
    return [x[key] for x in samples]


def system_summary(samples: list[dict[str, Any]], changed_bytes: int) -> dict[str, Any]:
    out = {"seconds": common.summarize(column(samples, "s"))}
    if samples and "data_bytes" in samples[0]:
        for key in ("data_bytes", "data_files", "manifest_bytes", "manifest_own_bytes"):
            out[key] = common.summarize(column(samples, key))
        out["data_bytes_over_changed"] = common.summarize(
            [x["data_bytes"] / changed_bytes for x in samples] if changed_bytes else []
        )
        out["accounting_agrees"] = all(x["data_bytes"] == x["manifest_own_bytes"] for x in samples)
        out["bases"] = sorted({b for x in samples for b in x["bases"]})
    if samples and "rchar" in samples[0]:
        out["bytes_read"] = common.summarize(column(samples, "rchar"))
        out["verified"] = all(x["verified"] for x in samples)
    out["samples"] = samples
    return out


def time_ratio(phase: dict[str, list[Any]], num: str, den: str) -> dict[str, Any]:
    return common.paired_ratios(column(phase[num], "s"), column(phase[den], "s"))


def summarize_adapter(samples: dict[str, Any], layout: dict[str, Any]) -> dict[str, Any]:
    changed = layout["changed_bytes_per_step"]
    save, unchanged, load = samples["save"], samples["unchanged"], samples["load"]
    return {
        "layout": layout,
        "save": {k: system_summary(v, changed) for k, v in save.items()},
        "unchanged": {k: system_summary(v, 0) for k, v in unchanged.items()},
        "load": {k: system_summary(v, 0) for k, v in load.items()},
        "paired_time_ratios": {
            "save full/incremental": time_ratio(save, "full", "incremental"),
            "save full_AA/incremental_AA": time_ratio(save, "full_AA", "incremental_AA"),
            "save incremental_AA/incremental": time_ratio(save, "incremental_AA", "incremental"),
            "save full_AA/full": time_ratio(save, "full_AA", "full"),
            "digest_pass/save incremental": time_ratio(save, DIGEST, "incremental"),
            "digest_pass/save full": time_ratio(save, DIGEST, "full"),
            "unchanged: save full/incremental": common.paired_ratios(
                column(save["full"], "s"), column(unchanged["incremental"], "s")
            ),
            "unchanged incremental_AA/incremental": time_ratio(unchanged, "incremental_AA", "incremental"),
            "load incremental/full": time_ratio(load, "incremental", "full"),
            "load incremental_AA/full_AA": time_ratio(load, "incremental_AA", "full_AA"),
            "load incremental_AA/incremental": time_ratio(load, "incremental_AA", "incremental"),
            "load full_AA/full": time_ratio(load, "full_AA", "full"),
        },
    }


def summarize_full_training(samples: dict[str, Any], layout: dict[str, Any]) -> dict[str, Any]:
    save = samples["save"]
    return {
        "layout": layout,
        "save": {k: system_summary(v, layout["changed_bytes_per_step"]) for k, v in save.items()},
        "paired_time_ratios": {
            "save incremental/full": time_ratio(save, "incremental", "full"),
            "save incremental/full_AA": time_ratio(save, "incremental", "full_AA"),
            "save full_AA/full": time_ratio(save, "full_AA", "full"),
            "digest_pass/save full": time_ratio(save, DIGEST, "full"),
            "(save incremental - digest_pass)/save full": common.paired_ratios(
                [a - b for a, b in zip(column(save["incremental"], "s"), column(save[DIGEST], "s"), strict=True)],
                column(save["full"], "s"),
            ),
        },
    }


def build_targets(cases: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the measured value, the bound, and met (None: not run)."""
    targets: dict[str, Any] = {}
    if "adapter" in cases:
        a = cases["adapter"]
        changed = a["layout"]["changed_bytes_per_step"]
        inc = [x for s in UNCHANGED_SYSTEMS for x in a["save"][s]["samples"]]
        worst = max(x["data_bytes"] for x in inc) / changed
        targets["adapter_bytes"] = {
            "what": "data bytes of every steady-state incremental save / changed bytes (the manifest comes on top)",
            "worst": worst,
            "manifest_bytes_median": a["save"]["incremental"]["manifest_bytes"]["median"],
            "bound": BYTES_OVER_CHANGED_AT_MOST,
            "met": worst <= BYTES_OVER_CHANGED_AT_MOST,
        }
        targets["adapter_speedup"] = at_least(a, "save full/incremental", ADAPTER_SPEEDUP_AT_LEAST, "save full_AA/full")
        un = [x for s in UNCHANGED_SYSTEMS for x in a["unchanged"][s]["samples"]]
        targets["unchanged_no_data"] = {
            "what": "data files and bytes of every incremental save with nothing changed (must be 0)",
            "data_files_max": max(x["data_files"] for x in un),
            "data_bytes_max": max(x["data_bytes"] for x in un),
            "manifest_own_bytes_max": max(x["manifest_own_bytes"] for x in un),
            "met": all(x["data_files"] == 0 and x["data_bytes"] == 0 and x["manifest_own_bytes"] == 0 for x in un),
        }
        targets["load_as_fast"] = at_most(a, "load incremental/full", LOAD_SLOWDOWN_AT_MOST, "load full_AA/full")
    if "full_training" in cases:
        f = cases["full_training"]
        targets["full_training_within_5pct"] = at_most(
            f, "save incremental/full", FULL_TRAINING_SLOWDOWN_AT_MOST, "save full_AA/full"
        )
    return targets


def at_least(case: dict[str, Any], key: str, bound: float, aa: str) -> dict[str, Any]:
    r = case["paired_time_ratios"][key]
    return {"ratio": key, "median": r.get("median"), "range": [r.get("min"), r.get("max")], "bound": bound,
            "aa": aa, "aa_median": case["paired_time_ratios"][aa].get("median"),
            "aa_range": [case["paired_time_ratios"][aa].get("min"), case["paired_time_ratios"][aa].get("max")],
            "met": None if not r.get("n") else r["median"] >= bound}  # fmt: skip


def at_most(case: dict[str, Any], key: str, bound: float, aa: str) -> dict[str, Any]:
    out = at_least(case, key, bound, aa)
    out["met"] = None if out["median"] is None else out["median"] <= bound
    return out


def build_results(
    args: argparse.Namespace, facts: dict[str, Any], world: int, out: dict[str, Any], log: list[Any], elapsed_s: float
) -> dict[str, Any]:
    results = {
        "benchmark": "incremental",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": dict(facts, loadavg_end=common.loadavg()),
        "config": {
            "world_size": world,
            "mib_requested": args.mib,
            "trainable_fraction_requested": args.trainable_fraction,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "keep_last": args.keep_last,
            "seed": args.seed,
            "quick": args.quick,
            "managers": "CheckpointManager(root, incremental=..., keep_last=...), sync saves; "
            "incremental ones full_every=None (trace: --trace-full-every)",
        },
        "elapsed_s": elapsed_s,
        **out,
        "targets": build_targets(out["cases"]),
        "orders": log,
    }
    if "trace" in out:
        path = os.path.join(args.plots_dir, f"{args.name}_bytes.png")
        results["plots"] = (
            {"skipped": "--plots-dir none"} if args.plots_dir == "none" else plots.write_incremental_plot(results, path)
        )
    return results


# ------------------------------------------------------------------ the report


def mib(x: float | None) -> float | None:
    return None if x is None else x / 2**20


def med(s: dict[str, Any] | None) -> float | None:
    return s.get("median") if s else None


def print_report(r: dict[str, Any]) -> None:
    cfg = r["config"]
    print(
        f"\n{cfg['world_size']} ranks, {cfg['repeats']} measured repetitions (+{cfg['warmup']} warm-up); "
        f"loadavg start {r['machine']['loadavg_start']} end {r['machine']['loadavg_end']}; {r['elapsed_s']:.0f} s"
    )
    rows = []
    for name, case in r["cases"].items():
        lay = case["layout"]
        print(
            f"{name}: {lay['state_bytes'] / 2**30:.2f} GiB state, trainable {lay['trainable_fraction']:.2%} of "
            f"parameters, changed per step {lay['changed_bytes_per_step'] / 2**20:.1f} MiB"
        )
        for phase in ("save", "unchanged", "load"):
            ref = case.get("load" if phase == "load" else "save", {}).get("full")
            for system, s in case.get(phase, {}).items():
                rows.append([
                    name, phase, system, med(s["seconds"]), common.spread(s["seconds"]),
                    None if ref is None else med(common.paired_ratios(column(ref["samples"], "s"),
                                                                      column(s["samples"], "s"))),
                    mib(med(s.get("data_bytes"))), med(s.get("data_files")), mib(med(s.get("manifest_bytes"))),
                    s.get("verified", s.get("accounting_agrees")),
                ])  # fmt: skip
    print("\ntimes max over ranks; 'full / this': full's time (its save, or its load) over this one's, median of")
    print("per-repetition ratios (> 1: this is faster); data/files/manifest: what the save wrote, medians")
    headers = ["case", "phase", "system", "s median", "s min-max", "full / this", "data MiB", "files",
               "manifest MiB", "verified/accounted"]  # fmt: skip
    print(common.format_table(headers, rows))
    print("\npaired time ratios (median, min-max):")
    for name, case in r["cases"].items():
        for key, s in case["paired_time_ratios"].items():
            if s.get("n"):
                print(f"  {name}: {key} {s['median']:.3g} ({common.spread(s)})")
    if "trace" in r:
        print_trace(r["trace"])
    for key, t in r["targets"].items():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        shown = {k: v for k, v in t.items() if k not in ("met", "what")}
        print(f"target {key}: {verdict} {shown}")
    if "plots" in r:
        print(f"plot: {r['plots']}")


def print_trace(trace: dict[str, Any]) -> None:
    rows = []
    for row in trace["steps"]:
        inc, full = row["incremental"], row["full"]
        rows.append([row["step"], mib(inc["data_bytes"]), "full" if not inc["bases"] else ",".join(inc["bases"]),
                     inc["s"], mib(full["data_bytes"]), full["s"]])  # fmt: skip
    print(f"\ntrace (full_every={trace['full_every']}): bytes written per step")
    print(common.format_table(["step", "incremental data MiB", "references", "s", "full data MiB", "s"], rows))


def main(argv: list[str] | None = None) -> None:
    common.run_benchmark(worker, parse_args(argv))


if __name__ == "__main__":
    main()
