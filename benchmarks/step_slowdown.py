"""Fast recovery tier: how much a local save every step slows a real training loop.

Two torchrun agents on 127.0.0.1 (``SHARDCKPT_NODE_ID=node0``/``node1``, 2 ranks each by
default: two simulated nodes, so ``replicas=1`` sends each shard to the other "node") train
a data-parallel MLP with AdamW on gloo/CPU: forward, backward, one all_reduce per gradient
on the training group, optimizer step, then ``CheckpointManager.save``. Configurations:

- ``none`` and ``none_AA``: no checkpointing, twice under two names (the A/A control: their
  paired ratio is the noise floor of this machine at that moment);
- ``local_r1``: a local save every step, one copy on the other node (``replicas=1``);
- ``local_r0``: a local save every step, no copy (``replicas=0``);
- ``durable_async``: ``async_save=True`` to a durable root on the local disk every step,
  for comparison (no local tier).

Each repetition runs every configuration once, in an order shuffled per repetition (the
same on every rank), as a segment of ``--steps`` measured steps after ``--warmup-steps``
unmeasured ones, with a fresh manager (and fresh folders) per segment; the first repetition
is a dropped warm-up. A segment's value is its median step; results are medians over
repetitions with min-max, and paired ratios to ``none`` (same repetition, back to back).

Per step: ``step_s`` (compute + save), ``compute_s`` (forward, backward, all_reduce,
optimizer step: what background work on the same cores slows down), ``stall_s`` (the time
inside ``mgr.save``), with three parts of it: ``wait_previous_s`` (joining the previous
save's background thread: one save in flight), ``staging_s`` (the copy into the staging
buffer) and ``collectives_s`` (the object collectives of the save, each waiting for every
rank: a local save makes one, the previous save's outcome and the staging agreed on
together). ``stall_after_last_arrival_s``: from the moment the last rank entered
``save`` until the last rank left it (a rank that arrives early also waits for the late
one, as it would at the next all_reduce without any save: ``arrival_skew_s``).
``background_s`` is one local save's background work (hash, write to ``local_dir``,
replication, commit of the replica, retention). ``staging_alone`` is ``stage_image`` on the
same state with nothing else running, and ``memcpy_alone`` a plain copy of the same bytes
into a preallocated buffer: the floor of any staging copy. Times are the max over ranks of
each rank's median (the ranks step in lockstep through the all_reduce).

    python benchmarks/step_slowdown.py --out benchmarks/results/step_slowdown.json
    python benchmarks/step_slowdown.py --quick          # seconds, toy sizes (the test's form)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import common
import torch
import torch.distributed as dist
from torch import nn

import shardckpt
from shardckpt.engine.saving import AsyncSaveHandle
from shardckpt.engine.staging import Stager
from shardckpt.format import local_step
from shardckpt.manager import local_tier, replication, shard_image
from shardckpt.manager.local_store import LocalStore

CONFIGS = ("none", "none_AA", "local_r1", "local_r0", "durable_async")
NEVER = 10**9  # a save_interval_steps no step reaches: the durable tier stays idle


# ------------------------------------------------------------------ the training loop (one rank)


class Recorder:
    """Seconds spent inside the wrapped calls, by label, since :meth:`take`; and each local
    save's background work. Wrapping is this benchmark's instrumentation, in its own process."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self.background: dict[str, list[float]] = {}  # label -> seconds of each call

    def timed(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                if label.startswith("background"):
                    self.background.setdefault(label, []).append(took)
                else:
                    self.spent[label] = self.spent.get(label, 0.0) + took

        return wrapper

    def take(self) -> dict[str, float]:
        out, self.spent = self.spent, {}
        return out


def instrument(rec: Recorder) -> None:
    """Time the phases of a save: the wait for the previous save, the staging copy, and
    the local tier's background work (module and class attributes, looked up per call)."""
    shard_image.stage_image = rec.timed(shard_image.stage_image, "staging")  # type: ignore[method-assign]
    # the previous local save's thread joined (since one collective per save, _join; before, wait: with its gather)
    joined = "_join" if hasattr(local_tier.LocalTier, "_join") else "wait"
    setattr(local_tier.LocalTier, joined, rec.timed(getattr(local_tier.LocalTier, joined), "wait_previous"))
    local_tier.LocalTier.write_step = rec.timed(local_tier.LocalTier.write_step, "background")  # type: ignore[method-assign]
    replication.exchange = rec.timed(replication.exchange, "background_replication")
    local_step.digest_of = rec.timed(local_step.digest_of, "background_digest")
    LocalStore.commit = rec.timed(LocalStore.commit, "background_commit")  # type: ignore[method-assign]
    AsyncSaveHandle.wait = rec.timed(AsyncSaveHandle.wait, "wait_previous")  # type: ignore[method-assign]
    Stager.stage = rec.timed(Stager.stage, "staging")  # type: ignore[method-assign]
    # the object collectives RankGroup.agree/decide run on (looked up on torch.distributed per call)
    dist.all_gather_object = rec.timed(dist.all_gather_object, "collectives")
    dist.broadcast_object_list = rec.timed(dist.broadcast_object_list, "collectives")


def build_model(hidden: int, layers: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same replica on every rank, as data parallelism keeps it
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(hidden, hidden), nn.Tanh())])
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optim


def train_step(model: nn.Module, optim: torch.optim.Optimizer, batch: torch.Tensor, world: int) -> float:
    optim.zero_grad(set_to_none=False)
    out = model(batch)
    loss = (out - batch).pow(2).mean()
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    optim.step()
    return float(loss.detach())


def state_bytes(state: dict[str, Any]) -> int:
    sd = {"model": state["model"].state_dict(), "optim": state["optim"].state_dict()}
    total = 0
    for part in (sd["model"], *sd["optim"]["state"].values()):
        total += sum(t.numel() * t.element_size() for t in part.values() if isinstance(t, torch.Tensor))
    return total


def open_manager(config: str, durable: str, local: str) -> shardckpt.CheckpointManager | None:
    if config.startswith("none"):
        return None
    if config == "durable_async":
        return shardckpt.CheckpointManager(durable, save_interval_steps=1, async_save=True, keep_last=1)
    return shardckpt.CheckpointManager(
        durable,
        save_interval_steps=NEVER,
        local_dir=local,
        local_interval_steps=1,
        replicas=1 if config == "local_r1" else 0,
        keep_last_local=1,
    )


def run_segment(
    config: str,
    folders: tuple[str, str],
    args: argparse.Namespace,
    state: dict[str, Any],
    rec: Recorder,
    first_step: int,
) -> dict[str, list[float]]:
    """One configuration for warm-up + measured steps with a fresh manager (durable root
    ``folders[0]``, this node's local_dir under ``folders[1]``); per-step times."""
    world = dist.get_world_size()
    gen = torch.Generator().manual_seed(first_step + dist.get_rank())
    node = os.environ.get("SHARDCKPT_NODE_ID", "node")
    mgr = open_manager(config, folders[0], os.path.join(folders[1], node))
    rec.background.clear()
    keys = ("step_s", "compute_s", "stall_s", "wait_previous_s", "staging_s", "collectives_s")
    rows: dict[str, list[float]] = {k: [] for k in keys}
    clock: list[tuple[float, float]] = []  # (entered save, left it), time.time(): comparable across ranks
    try:
        for i in range(args.warmup_steps + args.steps):
            batch = torch.randn(args.batch, args.hidden, generator=gen)
            rec.take()
            t0 = time.perf_counter()
            train_step(state["model"], state["optim"], batch, world)
            t1, w1 = time.perf_counter(), time.time()
            if mgr is not None:
                mgr.save(first_step + i, state)
            t2, w2 = time.perf_counter(), time.time()
            parts = rec.take()
            if i >= args.warmup_steps:
                clock.append((w1, w2))
                rows["step_s"].append(t2 - t0)
                rows["compute_s"].append(t1 - t0)
                rows["stall_s"].append(t2 - t1)
                rows["wait_previous_s"].append(parts.get("wait_previous", 0.0))
                rows["staging_s"].append(parts.get("staging", 0.0))
                rows["collectives_s"].append(parts.get("collectives", 0.0))
        t3 = time.perf_counter()
        if mgr is not None:
            mgr.wait()
        rows["drain_s"] = [time.perf_counter() - t3]
    finally:
        if mgr is not None:
            mgr.close()
    for label, took in rec.background.items():
        # per call; write_step, exchange, digest_of once per save, commit once per shard kept
        rows[f"{label}_s"] = took[args.warmup_steps * (2 if label.endswith("commit") else 1) :]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, clock)
    # A step's stall once the last rank reached save(): what the save costs the job beyond
    # the ranks' skew (an early rank also waits there for the late one, as it would at the
    # next all_reduce without a save).
    rows["stall_after_last_arrival_s"] = [
        max(c[i][1] for c in everyone) - max(c[i][0] for c in everyone) for i in range(len(clock))
    ]
    rows["arrival_skew_s"] = [
        max(c[i][0] for c in everyone) - min(c[i][0] for c in everyone) for i in range(len(clock))
    ]
    return rows


def staging_alone(state: dict[str, Any], repeats: int) -> dict[str, Any]:
    """The staging copy with nothing else running on this rank: ``stage_image`` into a warm
    buffer, and a plain copy of the same tensors into one preallocated buffer."""
    stager = Stager()
    stage = functools.partial(
        shard_image.stage_image, stager, state, step=0, rank=0, world_size=1, tier="0" * 16, save_id="alone"
    )
    image = stage()  # allocates the arena
    tensors = [t for t in state["model"].state_dict().values()]
    tensors += [t for s in state["optim"].state_dict()["state"].values() for t in s.values() if t.dim() > 0]
    flat = torch.empty(sum(t.numel() * t.element_size() for t in tensors), dtype=torch.uint8)

    def memcpy() -> None:
        at = 0
        for t in tensors:
            n = t.numel() * t.element_size()
            flat[at : at + n].view(t.dtype).view(t.shape).copy_(t)
            at += n

    memcpy()
    out: dict[str, list[float]] = {"staging_alone_s": [], "memcpy_alone_s": []}
    for _ in range(repeats):
        for name, fn in (("staging_alone_s", stage), ("memcpy_alone_s", memcpy)):
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return {"image_bytes": int(image.numel()), **{k: statistics.median(v) for k, v in out.items()}}


def worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rec = Recorder()
    instrument(rec)
    model, optim = build_model(args.hidden, args.layers)
    state: dict[str, Any] = {"model": model, "optim": optim}
    train_step(model, optim, torch.zeros(args.batch, args.hidden), world)  # AdamW's state exists from here
    samples: dict[str, dict[str, list[float]]] = {c: {} for c in CONFIGS}
    orders: list[dict[str, Any]] = []
    step = 1
    for rep, warmup, order in common.interleaved(list(CONFIGS), args.repeats, seed=args.seed):
        orders.append({"rep": rep, "warmup": warmup, "order": order, "loadavg": common.loadavg()})
        for config in order:
            folders = (os.path.join(args.dir, f"r{rep}_{config}"), os.path.join(args.local_dir, f"r{rep}_{config}"))
            rows = run_segment(config, folders, args, state, rec, step)
            step += args.warmup_steps + args.steps
            dist.barrier()
            if rank == 0:
                for f in folders:  # made by this segment's managers (close() removed the local steps)
                    common.remove_tree(f)
            per_rank: list[Any] = [None] * world
            dist.all_gather_object(per_rank, {k: statistics.median(v) if v else 0.0 for k, v in rows.items()})
            if not warmup:
                for key in per_rank[0]:
                    samples[config].setdefault(key, []).append(max(r[key] for r in per_rank))
    alone: list[Any] = [None] * world
    dist.barrier()  # every rank done training: the copy alone has the cores to itself (and its rank's peers)
    dist.all_gather_object(alone, staging_alone(state, args.repeats))
    if rank == 0:
        write_report(args, samples, orders, alone, state_bytes(state))
    dist.destroy_process_group()


def write_report(
    args: argparse.Namespace,
    samples: dict[str, dict[str, list[float]]],
    orders: list[dict[str, Any]],
    alone: list[dict[str, Any]],
    per_rank_bytes: int,
) -> None:
    world = len(alone)
    out: dict[str, Any] = {
        "configs": {c: {k: common.summarize(v) for k, v in rows.items()} for c, rows in samples.items()},
        "ratios_step_s_to_none": {
            c: common.paired_ratios(samples[c]["step_s"], samples["none"]["step_s"]) for c in CONFIGS if c != "none"
        },
        "ratios_compute_s_to_none": {
            c: common.paired_ratios(samples[c]["compute_s"], samples["none"]["compute_s"])
            for c in CONFIGS
            if c != "none"
        },
        "staging_alone_s": max(a["staging_alone_s"] for a in alone),
        "memcpy_alone_s": max(a["memcpy_alone_s"] for a in alone),
        "image_bytes_per_rank": alone[0]["image_bytes"],
        "state_bytes_per_rank": per_rank_bytes,
        "state_bytes_total": per_rank_bytes * world,
        "world_size": world,
        "orders": orders,
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "machine": common.machine_facts(args.dir),
    }
    with open(args.result, "w") as f:
        json.dump(out, f, indent=1, default=str)


# ------------------------------------------------------------------ the driver: two torchrun "nodes"


@contextmanager
def scratch(parent: str, prefix: str) -> Iterator[str]:
    """A folder this benchmark makes under ``parent`` and removes afterwards."""
    folder = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def launch(args: argparse.Namespace, argv: list[str], result: str, folders: tuple[str, str]) -> None:
    """Both nodes' torchrun agents, each in its own process group; killed at ``--timeout-s``.
    ``folders``: where the segments' durable roots and local_dirs go."""
    port = common.free_port()
    procs = []
    for node in range(2):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--node-rank",
            str(node),
            "--nproc-per-node",
            str(args.ranks_per_node),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            os.path.abspath(__file__),
            *argv,
            "--worker",
            "--result",
            result,
            "--dir",
            folders[0],
            "--local-dir",
            folders[1],
        ]
        env = dict(os.environ, SHARDCKPT_NODE_ID=f"node{node}", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    deadline = time.monotonic() + args.timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as e:
        raise SystemExit(f"step_slowdown: the ranks did not finish within --timeout-s {args.timeout_s}") from e
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    codes = [p.returncode for p in procs]
    if any(codes):
        raise SystemExit(f"step_slowdown: a node's torchrun exited with {codes}; its ranks' output is above")


def summary(r: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: per config, median step, compute and stall; the ratios."""
    med = {c: {k: v["median"] for k, v in rows.items() if v.get("n")} for c, rows in r["configs"].items()}
    return {
        "median_s": med,
        "step_ratio_to_none": {c: v["median"] for c, v in r["ratios_step_s_to_none"].items()},
        "staging_alone_s": r["staging_alone_s"],
        "memcpy_alone_s": r["memcpy_alone_s"],
        "state_bytes_total": r["state_bytes_total"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6, help="Linear layers (state: 3 x 4 bytes per parameter)")
    ap.add_argument("--batch", type=int, default=256, help="rows per step: sets the compute per step")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per segment")
    ap.add_argument("--warmup-steps", type=int, default=2, help="unmeasured steps per segment")
    ap.add_argument("--repeats", type=int, default=5, help="measured repetitions (after one warm-up)")
    ap.add_argument("--ranks-per-node", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--local-parent", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    ap.add_argument("--durable-parent", default=tempfile.gettempdir(), help="where the durable roots go (a disk)")
    ap.add_argument("--timeout-s", type=float, default=3600.0)
    ap.add_argument("--quick", action="store_true", help="toy sizes, 1 repetition: checks that it runs")
    ap.add_argument("--out", default="", help="also write the results here (JSON)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    ap.add_argument("--dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--local-dir", default="", help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw)
    if args.quick:
        args.hidden, args.layers, args.batch, args.steps, args.warmup_steps, args.repeats = 64, 2, 8, 2, 1, 1
    if args.worker:
        worker(args)
        return None
    with scratch(args.durable_parent, "step_slowdown_") as folder, scratch(args.local_parent, "step_slowdown_") as lf:
        result = os.path.join(folder, "result.json")
        launch(args, [a for a in raw if a != "--quick"] + _quick_args(args), result, (folder, lf))
        with open(result) as f:
            r = json.load(f)
    text = json.dumps(r, indent=1)
    print(json.dumps(summary(r), indent=1))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return r


def _quick_args(args: argparse.Namespace) -> list[str]:
    keys = ("hidden", "layers", "batch", "steps", "warmup_steps", "repeats")
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]


if __name__ == "__main__":
    main()
