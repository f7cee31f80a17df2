"""The fixed cost of a tiny checkpoint: how many collectives one save or load makes, and how
long it takes when there is almost nothing to write (issue #18's "fixed cost" row).

    python benchmarks/collectives.py                       # 4 ranks, 1 MiB, 7 repetitions
    python benchmarks/collectives.py --world-size 8 --size-mib 1 --repeats 9

Every rank wraps torch.distributed's collective functions with counters (in this process
only: shardckpt and DCP call them as ``dist.<name>``, so the wrappers see every call they
make), then runs, interleaved in a shuffled order per repetition after one dropped
warm-up (which also creates the checkpoint groups): ``shardckpt.save`` (the same state
each time: its plan is reused, as in every step of a training run),
``shardckpt.save_new_layout`` (one more key each time: planned anew, as a first save),
``shardckpt.async_save`` + ``wait``, ``shardckpt.load`` (same world size), ``dcp.save``
with FileSystemWriter and ``dcp.load`` with FileSystemReader, each into a fresh folder
(loads from one saved before the timed repetitions). Counts are per call and per rank
(the coordinator's, rank 0, which makes the most); an ``all_gather_object`` is one call
here though torch runs it as two all_gathers (sizes, then payloads), and a shardckpt
``round_trip`` is one call (every rank sends the coordinator a size and a payload, and
the coordinator answers each with a size and a payload; see shardckpt/engine/exchange.py).
Times are the
slowest rank's, median and min-max over the repetitions.

Writes benchmarks/results/collectives.json (``--out``: another folder).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

COLLECTIVES = (
    "all_gather_object",
    "gather_object",
    "broadcast_object_list",
    "scatter_object_list",
    "all_gather",
    "all_reduce",
    "broadcast",
    "gather",
    "scatter",
    "reduce_scatter",
    "all_to_all",
    "barrier",
    "monitored_barrier",
    "new_group",
    "isend",
    "irecv",
    "send",
    "recv",
)
ROUND_TRIP = "round_trip"  # shardckpt's Exchange.round_trip: a monitored gather to rank 0 and its answer
OPS = (
    "shardckpt.save",
    "shardckpt.save_new_layout",
    "shardckpt.async_save",
    "shardckpt.load",
    "dcp.save",
    "dcp.load",
)


class CollectiveCounter:
    """Counts calls of torch.distributed's collectives while :attr:`active` (any thread),
    and shardckpt's ``Exchange.round_trip`` as one call each: the point-to-point messages
    it sends (a size and a payload each way per rank) are not counted one by one; any
    sent outside a round trip are."""

    def __init__(self, *, where: bool = False) -> None:
        import torch.distributed as dist

        from shardckpt.engine.exchange import Exchange

        self.counts: Counter[str] = Counter()
        self.active = False
        self.where = where  # count by "name @ the innermost shardckpt (else DCP) caller" instead
        self._lock = threading.Lock()
        self._inside = threading.local()  # depth of round trips on this thread
        self._originals: dict[tuple[Any, str], Any] = {}
        for name in COLLECTIVES:
            self._patch(dist, name, name)
        self._patch(Exchange, "round_trip", ROUND_TRIP)

    def _patch(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        self._originals[(owner, attr)] = original
        setattr(owner, attr, self._wrap(name, original))

    def _wrap(self, name: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._inside, "depth", 0)
            if self.active and depth == 0:
                key = f"{name} @ {_call_site()}" if self.where else name
                with self._lock:
                    self.counts[key] += 1
            if name != ROUND_TRIP:
                return original(*args, **kwargs)
            self._inside.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._inside.depth = depth

        return counted

    def close(self) -> None:
        for (owner, attr), original in self._originals.items():
            setattr(owner, attr, original)


def _call_site() -> str:
    """The innermost caller in shardckpt/, else in torch.distributed.checkpoint."""
    import traceback

    frames = traceback.extract_stack()[:-2]
    for marker in (f"{os.sep}shardckpt{os.sep}", f"{os.sep}distributed{os.sep}checkpoint{os.sep}"):
        for fr in reversed(frames):
            if marker in fr.filename:
                tail = fr.filename.split(marker, 1)[1]
                return f"{marker.strip(os.sep).replace(os.sep, '.')}/{tail}:{fr.lineno} {fr.name}"
    return "?"


def worker(rank: int, world_size: int, args: argparse.Namespace, facts: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import shardckpt

    specs = common.model_layout(args.size_mib, world_size)
    state = common.make_state(specs, rank, world_size, fill=True)
    root = os.path.join(args.dir, "collectives")
    if rank == 0:
        common.remove_tree(root)
        os.makedirs(root)
    dist.barrier()
    ours_src, dcp_src = os.path.join(root, "ours_src"), os.path.join(root, "dcp_src")
    shardckpt.save(state, ours_src)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(dcp_src))
    target = common.make_state(specs, rank, world_size, fill=False)

    counter = CollectiveCounter(where=args.where)
    # One Checkpointer per operation (created in the same order on every rank), so each
    # keeps its own last plan, as a training run that makes one kind of save does.
    engines = {op: shardckpt.Checkpointer() for op in OPS if op.startswith("shardckpt.")}
    seq = [0]

    def fresh(tag: str) -> str:
        seq[0] += 1
        return os.path.join(root, f"{tag}_{seq[0]}")

    def run(op: str) -> None:
        if op == "shardckpt.save":
            engines[op].save(state, fresh("save"))
        elif op == "shardckpt.save_new_layout":  # one more key each time: no plan to reuse
            engines[op].save({**state, f"extra_{seq[0]}": torch.zeros(1)}, fresh("new_layout"))
        elif op == "shardckpt.async_save":
            engines[op].async_save(state, fresh("async")).wait()
        elif op == "shardckpt.load":
            engines[op].load(target, ours_src)
        elif op == "dcp.save":
            dcp.save(state, storage_writer=dcp.FileSystemWriter(fresh("dcp")))
        elif op == "dcp.load":
            dcp.load(target, storage_reader=dcp.FileSystemReader(dcp_src))

    times: dict[str, list[float]] = {op: [] for op in OPS}
    counts: dict[str, list[dict[str, int]]] = {op: [] for op in OPS}
    for _rep, warmup, order in common.interleaved(OPS, args.repeats, seed=args.seed):
        for op in order:
            dist.barrier()  # not counted: every rank starts the op together
            counter.counts.clear()
            counter.active = True
            t0 = time.perf_counter()
            run(op)
            elapsed = time.perf_counter() - t0
            counter.active = False
            slowest = common.max_over_ranks(elapsed)
            if not warmup:
                times[op].append(slowest)
                counts[op].append(dict(counter.counts))
    counter.close()
    for engine in engines.values():
        engine.close()
    torch.distributed.barrier()
    if rank == 0:
        results = {
            "benchmark": "collectives",
            "command": " ".join(["python", *sys.argv]),
            "world_size": world_size,
            "state_bytes": common.global_bytes(specs),
            "repeats": args.repeats,
            "machine": facts,
            "ops": {
                op: {
                    "seconds": common.summarize(times[op]),
                    "counts_rank0": counts[op][-1] if counts[op] else {},
                    "counts_stable": all(c == counts[op][0] for c in counts[op]),
                }
                for op in OPS
            },
        }
        common.publish("collectives", results, args.out, report)
        common.remove_tree(root)


def report(results: dict[str, Any]) -> None:
    rows = []
    for op, r in results["ops"].items():
        c = r["counts_rank0"]
        calls = ", ".join(f"{n} {name}" for name, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
        total = sum(n for name, n in c.items() if not name.startswith("new_group"))
        s = r["seconds"]
        rows.append([op, total, calls or "-", s.get("median", 0) * 1e3, common.spread(s, 1e3)])
    print(
        f"\n{results['world_size']} ranks, {results['state_bytes'] / common.MiB:.1f} MiB state, "
        f"{results['repeats']} repetitions (+1 warm-up dropped)\n"
    )
    print(common.format_table(["op", "collectives (rank 0)", "calls", "median ms", "min-max ms"], rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--size-mib", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "shardckpt-bench"))
    parser.add_argument("--wait-quiet", type=float, default=0, help="wait up to this many seconds for load < 0.8")
    parser.add_argument("--where", action="store_true", help="count by call site (rank 0's), to see who calls what")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="folder of the results JSON")
    common.run_benchmark(worker, parser.parse_args(argv))


if __name__ == "__main__":
    main()
