"""Save and cold-load throughput: shardckpt vs DCP vs the raw disk, measured in one run.

    python benchmarks/save_load.py --quick            # ~150 MiB, 2 measured repetitions, < 1 min
    python benchmarks/save_load.py                    # ~1.1 GiB, 5 measured repetitions
    python benchmarks/save_load.py --world-size 4 --mib 2048 --repeats 7 --dir /work/bench-tmp/sl
    python benchmarks/save_load.py --mix small --mib 64       # ~3,000 tensors of 4-64 KiB (issue #18)
    python benchmarks/save_load.py --mix uniform --saves shardckpt,shardckpt_AA,dd_x4 --loads shardckpt \
        --loads-read-saves                                    # some systems; the loads read the saves' folders

Every rank (gloo on CPU, spawned here) holds its rows of a model-like fp32 state
(parameters and AdamW moments as Shard(0) DTensors, plus small replicated tensors).
``--mix`` picks other tensor-size mixes, every tensor a Shard(0) DTensor (see
:func:`mix_layout`): ``uniform`` (tensors of 64 MiB), ``lognormal`` (120 tensors per GiB,
log-normal sizes, as in issue #18) and ``small`` (thousands of tensors of 4-64 KiB).
Each repetition runs every system once in a shuffled order, first all saves, then all
loads; the first repetition is a dropped warm-up. A time is the wall time from a
barrier before to a barrier after the call, max over ranks. Loads are cold: the files
a load reads are fsynced and evicted from the page cache (posix_fadvise DONTNEED)
right before it. They read checkpoints each load's source system saved once before the
repetitions, in folders of their own: no timed save writes where a checkpoint that was
read back was just deleted (on this VM that slowed such a save up to 3x, see
``measure_interleaved``). Systems:

    shardckpt, shardckpt_AA   save/load, defaults; the same system twice (A/A control). Each
                              save system saves through its own Checkpointer (a training run's
                              repeated save of one plan); loads use shardckpt.load
    shardckpt_io4             save with num_io_threads=4 given explicitly (the local-disk default is
                              also 4 since 2026-11-30: this row is a second A/A control)
    shardckpt_io1             load with num_io_threads=1 (default 4)
    shardckpt_noverify        load with verify=False (no checksum verification)
    shardckpt_v3              save with format_version=3 / load that checkpoint (with --format3 here,
                              and benchmarks/suite.py --format3: the resharded loads of issue #16/#18)
    safetensors               each rank safetensors.torch.save_file()s its local tensors to one
                              file + fsync / load_file()s it back and copies into the state
    dcp                       dcp.save/dcp.load with FileSystemWriter/FileSystemReader defaults
    raw                       each rank os.write()s its local tensors to one file + fsync /
                              preadv()s them back: no format, no checksums (the floor of any
                              checkpointer doing the same parallel I/O)
    dd                        rank 0 alone: dd if=/dev/zero bs=16M conv=fdatasync (or oflag=direct)
                              of the state's size; load: cold dd read of that file
    dd_x4                     every rank runs dd on its share at the same time

Writes benchmarks/results/save_load.json (save_load_quick.json with --quick) and prints
tables of medians, spreads and paired ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

SAVE_SYSTEMS = ["shardckpt", "shardckpt_AA", "shardckpt_io4", "dcp", "safetensors", "raw", "dd", "dd_x4"]
LOAD_SYSTEMS = [
    "shardckpt",
    "shardckpt_AA",
    "shardckpt_io1",
    "shardckpt_noverify",
    "dcp",
    "safetensors",
    "raw",
    "dd",
    "dd_x4",
]
MIXES = ["model", "uniform", "lognormal", "small"]
# which save's files each load reads
LOAD_SOURCE = {
    "shardckpt": "shardckpt",
    "shardckpt_AA": "shardckpt_AA",
    "shardckpt_io1": "shardckpt",
    "shardckpt_v3": "shardckpt_v3",
    "shardckpt_noverify": "shardckpt",
    "dcp": "dcp",
    "safetensors": "safetensors",
    "raw": "raw",
    "dd": "dd",
    "dd_x4": "dd_x4",
}


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
    ap.add_argument(
        "--dir", default="/work/bench-tmp/save_load", help="scratch folder on the disk under test (deleted at the end)"
    )
    ap.add_argument(
        "--mix",
        choices=MIXES,
        default="model",
        help="tensor sizes: model (transformer-like, default), uniform (64 MiB each), lognormal, "
        "small (4-64 KiB each; use --mib 64 for ~3,000 tensors)",
    )
    ap.add_argument("--repeats", type=int, default=None, help="measured repetitions (default 5, quick 2)")
    ap.add_argument("--warmup", type=int, default=1, help="dropped warm-up repetitions")
    ap.add_argument("--dd-mode", choices=["fdatasync", "direct"], default="fdatasync")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled orders")
    ap.add_argument("--format3", action="store_true", help="add shardckpt_v3 (format_version=3) to saves and loads")
    ap.add_argument(
        "--saves", type=_systems_arg(SAVE_SYSTEMS), default=None, help="comma-separated save systems (default: all)"
    )
    ap.add_argument(
        "--loads",
        type=_systems_arg(LOAD_SYSTEMS),
        default=None,
        help="comma-separated load systems (default: all; empty: none)",
    )
    common.add_cold_memory(ap)
    ap.add_argument(
        "--loads-read-saves",
        action="store_true",
        help="loads read the timed saves' folders (the method before 2026-12-02) instead of sources saved once",
    )
    common.add_wait_quiet(ap)
    ap.add_argument("--name", default=None, help="results file name (default save_load or save_load_quick)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    args.mib = args.mib or (128 if args.quick else 1024)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.name = args.name or ("save_load_quick" if args.quick else "save_load") + (
        "" if args.mix == "model" else f"_{args.mix}"
    )
    return args


# ------------------------------------------------------------------ the systems (run on every rank)


class Bench:
    def __init__(self, rank: int, world: int, args: argparse.Namespace) -> None:
        import torch.distributed.checkpoint as dcp

        import shardckpt

        self.rank, self.world, self.args = rank, world, args
        self.dcp, self.shardckpt = dcp, shardckpt
        # layout_world: the world size the rows are laid out for (a multiple of this one,
        # so a load on another world size shards the same global tensors evenly)
        itemsize = common.DTYPES[getattr(args, "dtype", "float32")]
        self.specs = mix_layout(
            getattr(args, "mix", "model"), args.mib, getattr(args, "layout_world", None) or world, itemsize
        )
        self.src = common.make_state(self.specs, rank, world, fill=True)
        self.dst = common.make_state(self.specs, rank, world, fill=False)
        self.global_bytes = common.global_bytes(self.specs)
        self.local_bytes = common.local_bytes(self.specs, rank, world)
        # touched and freed before every timed call (common.warm_memory: this VM's free page reporting)
        self.warm_bytes = 0 if getattr(args, "cold_memory", False) else common.warm_bytes(self.local_bytes, world)
        # One Checkpointer per shardckpt save system, as a training run keeps one: each
        # saves again with its own plan (a plan is kept per Checkpointer; formats 1 and 3
        # lay the state out differently, so one Checkpointer alternating them would plan
        # every save anew, and so would measure neither's repeated save).
        self._checkpointers: dict[str, Any] = {}

    def checkpointer(self, system: str) -> Any:
        """The Checkpointer of save system ``system`` (made on its first save: collective)."""
        if system not in self._checkpointers:
            self._checkpointers[system] = self.shardckpt.Checkpointer()
        return self._checkpointers[system]

    def close(self) -> None:
        """Close the save systems' Checkpointers (collective: every rank, same order)."""
        for system in sorted(self._checkpointers):
            self._checkpointers.pop(system).close()

    def path(self, system: str, *, source: bool = False) -> str:
        """The folder of ``system``'s timed saves, or (``source``) of the checkpoint its
        loads read when they have their own (:func:`measure_interleaved`, ``sources``)."""
        return os.path.join(self.args.dir, "sources", system) if source else os.path.join(self.args.dir, system)

    # Each save returns the bytes it put on disk from this rank (for GB/s of dd and raw).
    def save(self, system: str, folder: str | None = None) -> int:
        """One save by ``system`` into ``folder`` (default its own, :meth:`path`)."""
        import torch.distributed.checkpoint as dcp

        d = folder or self.path(system)
        if system in ("shardckpt", "shardckpt_AA"):
            self.checkpointer(system).save(self.src, d)
        elif system == "shardckpt_io4":
            self.checkpointer(system).save(self.src, d, num_io_threads=4)
        elif system == "shardckpt_v3":
            self.checkpointer(system).save(self.src, d, format_version=3)
        elif system == "shardckpt_nohash":
            with hashing_disabled():
                self.checkpointer(system).save(self.src, d)
        elif system == "dcp":
            dcp.save(self.src, storage_writer=dcp.FileSystemWriter(d))
        elif system.startswith("dcp_t"):
            dcp.save(self.src, storage_writer=dcp.FileSystemWriter(d, thread_count=int(system[5:])))
        elif system in ("torch_save", "safetensors"):
            return per_rank_file_save(system, os.path.join(d, f"{system}-r{self.rank}.bin"), self.src)
        elif system == "hash_only":
            return hash_like_writer(common.local_tensors(self.src))
        elif system == "raw":
            return raw_write(os.path.join(d, f"raw-r{self.rank}.bin"), common.local_tensors(self.src))
        elif system == "dd":
            if self.rank == 0:
                return common.run_dd_write(_dd_file(d, 0), self.global_bytes, self.args.dd_mode)[1]
        elif system == "dd_x4":
            return common.run_dd_write(_dd_file(d, self.rank), self.global_bytes // self.world, self.args.dd_mode)[1]
        else:
            raise ValueError(system)
        return 0

    def load(self, system: str, folder: str | None = None) -> int:
        """One load by ``system`` from ``folder`` (default its source's save folder)."""
        import torch.distributed.checkpoint as dcp

        d = folder or self.path(LOAD_SOURCE[system])
        if system in ("shardckpt", "shardckpt_AA", "shardckpt_v3"):
            self.shardckpt.load(self.dst, d)
        elif system == "shardckpt_io1":
            self.shardckpt.load(self.dst, d, num_io_threads=1)
        elif system == "shardckpt_noverify":
            self.shardckpt.load(self.dst, d, verify=False)
        elif system == "dcp":
            dcp.load(self.dst, storage_reader=dcp.FileSystemReader(d))
        elif system == "safetensors":
            n = per_rank_file_load(os.path.join(d, f"{system}-r{self.rank}.bin"), self.dst)
            self.dst["step"] = self.src["step"]  # per-rank files carry no values here
            return n
        elif system == "raw":
            n = raw_read(os.path.join(d, f"raw-r{self.rank}.bin"), common.local_tensors(self.dst))
            self.dst["step"] = self.src["step"]  # raw carries no values; keep the check about tensors
            return n
        elif system == "dd":
            if self.rank == 0:
                return _dd_read_warm_evicted(_dd_file(d, 0))
        elif system == "dd_x4":
            return _dd_read_warm_evicted(_dd_file(d, self.rank))
        else:
            raise ValueError(system)
        return 0

    def timed(self, fn: Any, system: str) -> dict[str, Any]:
        """Barrier, call, barrier. ``s``: wall seconds max over ranks; ``bytes``: moved by
        all ranks; per rank: ``rank_s`` (its own call, without the closing barrier) and
        the /proc/self/io deltas ``rchar`` and ``read_bytes`` of the call."""
        import torch.distributed as dist

        common.warm_memory(self.warm_bytes)
        dist.barrier()
        io0 = common.proc_io()
        t0 = time.perf_counter()
        nbytes = fn(system)
        t_own = time.perf_counter() - t0
        io1 = common.proc_io()
        dist.barrier()
        dt = time.perf_counter() - t0
        per_rank = common.gather_to_all(
            (dt, t_own, nbytes, io1["rchar"] - io0["rchar"], io1["read_bytes"] - io0["read_bytes"])
        )
        return {
            "s": max(r[0] for r in per_rank),
            "bytes": sum(r[2] for r in per_rank),
            "rank_s": [r[1] for r in per_rank],
            "rchar": [r[3] for r in per_rank],
            "read_bytes": [r[4] for r in per_rank],
        }


class _NoHasher:
    def update(self, data: Any) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 16


@contextlib.contextmanager
def hashing_disabled() -> Iterator[None]:
    """Within: shardckpt's xxh3 calls return a constant (this process only). The writer
    cannot skip hashing; this measures a save without it. The checkpoint it writes has
    wrong checksums and is never loaded."""
    from shardckpt.format import integrity

    saved = integrity.hash_hex, integrity.new_file_hasher
    integrity.hash_hex = lambda data: "0" * 16  # type: ignore[assignment]
    integrity.new_file_hasher = _NoHasher  # type: ignore[assignment]
    try:
        yield
    finally:
        integrity.hash_hex, integrity.new_file_hasher = saved


def hash_like_writer(tensors: list[Any], threads: int | None = None) -> int:
    """xxh3 of the same bytes the writer hashes, as it hashes them: every 8 MiB block of
    every tensor, plus one running whole-file hash per file, the tensors split by bytes
    over ``threads`` (the save's default I/O thread count) threads. Returns bytes hashed."""
    from concurrent.futures import ThreadPoolExecutor

    from shardckpt.engine import saving
    from shardckpt.format import integrity

    threads = threads or saving.DEFAULT_SAVE_IO_THREADS
    buckets: list[list[memoryview]] = [[] for _ in range(threads)]
    sizes = [0] * threads
    for t in sorted(tensors, key=lambda t: -t.numel() * t.element_size()):
        k = sizes.index(min(sizes))
        buckets[k].append(_byte_view(t))
        sizes[k] += t.numel() * t.element_size()

    def hash_file(views: list[memoryview]) -> None:
        file_hasher = integrity.new_file_hasher()
        block = integrity.DEFAULT_BLOCK_BYTES
        for view in views:
            for i in range(0, len(view), block):
                integrity.hash_hex(view[i : i + block])
                file_hasher.update(view[i : i + block])
        file_hasher.hexdigest()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(hash_file, [b for b in buckets if b]))
    return sum(sizes)


def per_rank_file_save(system: str, path: str, state: dict[str, Any]) -> int:
    """Each rank writes its local tensors to one file with ``torch.save`` or
    ``safetensors.torch.save_file``, then fsyncs it. Returns the file's size."""
    import torch

    tensors = {k: t.to_local() for part in ("model", "optim") for k, t in state[part].items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if system == "torch_save":
        torch.save(tensors, path)
    else:
        from safetensors.torch import save_file

        save_file(tensors, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return os.path.getsize(path)


def per_rank_file_load(path: str, state: dict[str, Any]) -> int:
    """Load one rank's safetensors file (``per_rank_file_save``'s) and copy each tensor
    into the state's local shard, as a user of per-rank files would. Returns the file size."""
    from safetensors.torch import load_file

    loaded = load_file(path)
    for part in ("model", "optim"):
        for k, t in state[part].items():
            t.to_local().copy_(loaded[k])
    return os.path.getsize(path)


def mix_layout(mix: str, total_mib: int, world_size: int, itemsize: int = 4) -> list[common.TensorSpec]:
    """The tensors of a ``--mix``: ``model`` is :func:`common.model_layout`; the others are
    Shard(0) tensors (half parameters, half optimizer state) of about ``total_mib`` MiB in
    all, their rows multiples of ``16 * world_size`` (so divisors of it reshard evenly):

    - ``uniform``: tensors of 64 MiB (at least 4), all the same shape;
    - ``lognormal``: 120 tensors per GiB (at least 16) with log-normal sizes (sigma 1.5,
      seeded), at least 4 KiB each, scaled to the total (issue #18's mix);
    - ``small``: tensors of 4-64 KiB, log-uniform (seeded), as many as fill the total:
      about 3,000 for 64 MiB, each rank holding a quarter of every tensor on 4 ranks.
    """
    if mix == "model":
        return common.model_layout(total_mib, world_size, itemsize)
    step, total = 16 * world_size, total_mib * common.MiB
    rng = random.Random(18)
    sizes: list[float]
    if mix == "uniform":
        n = max(4, round(total_mib / 64))
        sizes = [total / n] * n
    elif mix == "lognormal":
        raw = [rng.lognormvariate(0.0, 1.5) for _ in range(max(16, round(120 * total_mib / 1024)))]
        sizes = [max(4096.0, x * total / sum(raw)) for x in raw]
    elif mix == "small":
        sizes, filled = [], 0.0
        while filled < total:
            sizes.append(4096 * 16 ** rng.random())  # 4 KiB .. 64 KiB
            filled += sizes[-1]
    else:
        raise ValueError(f"unknown mix {mix!r}; expected one of {MIXES}")
    specs = []
    for i, size in enumerate(sizes):
        elems = size / itemsize
        # Wide rows for big tensors, the fewest rows (one step) for small ones.
        cols = 1024 if elems >= 4 * step * 1024 else max(1, int(elems // step))
        rows = max(step, round(elems / cols / step) * step)
        group = "param" if i % 2 == 0 else "exp_avg"
        specs.append(common.TensorSpec(f"{group}.{mix}{i}", rows, cols, True, itemsize))
    return specs


def _byte_view(t: Any) -> memoryview:
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def raw_write(path: str, tensors: list[Any]) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    total = 0
    try:
        for t in tensors:
            view = _byte_view(t)
            while view:
                n = os.write(fd, view)
                view = view[n:]
                total += n
        os.fsync(fd)
    finally:
        os.close(fd)
    return total


def raw_read(path: str, tensors: list[Any]) -> int:
    fd = os.open(path, os.O_RDONLY)
    off = 0
    try:
        for t in tensors:
            view = _byte_view(t)
            while view:
                n = os.preadv(fd, [view], off)
                if n == 0:
                    raise EOFError(path)
                view, off = view[n:], off + n
    finally:
        os.close(fd)
    return off


def _dd_file(folder: str, rank: int) -> str:
    return os.path.join(folder, f"dd-r{rank}.bin")


def _dd_read_warm_evicted(path: str) -> int:
    # Already evicted before the timed region; read it.
    import subprocess

    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M", "status=none"], check=True)
    return os.path.getsize(path)


# ------------------------------------------------------------------ the run


def measure_interleaved(
    b: Bench,
    save_systems: list[str],
    load_systems: list[str],
    repeats: int,
    warmup: int,
    seed: int,
    *,
    sources: bool = False,
) -> dict[str, Any]:
    """Every repetition: each save system once (shuffled), then each load system once
    (shuffled, cold: rank 0 evicts the files it reads first). Collective. Returns
    ``samples[phase][system]`` (Bench.timed dicts, warm-up dropped), the ``orders``, and
    from the warm-up: ``verified`` (loaded values equal the saved ones) and
    ``residency`` (bytes still cached after eviction, by fincore).

    ``sources``: the loads read checkpoints saved once before the repetitions, each in
    its own folder (``Bench.path(system, source=True)``), not the timed saves' output, so
    that no timed save writes where a checkpoint that was read back has just been
    deleted. On this VM's disk that made the next save into the folder up to 3x slower
    (the same code saving into a folder never read back kept its speed; docs/benchmarks.md,
    "Saves into a folder that was read back"), and a save system whose folder more loads
    read (``shardckpt``: three) was penalised more than the others. False: the loads read
    the saves' folders (``suite.py``'s resharded loads read what its main job saved)."""
    import torch.distributed as dist

    samples: dict[str, dict[str, list[dict[str, Any]]]] = {"save": {}, "load": {}}
    orders: list[dict[str, Any]] = []
    verified: dict[str, bool] = {}
    residency: dict[str, Any] = {}
    if sources:
        for system in sorted({LOAD_SOURCE[s] for s in load_systems}):
            if b.rank == 0:
                common.remove_tree(b.path(system, source=True))
                os.makedirs(b.path(system, source=True), exist_ok=True)
            dist.barrier()
            b.save(system, b.path(system, source=True))
        dist.barrier()
    t_start = time.perf_counter()
    for rep, warm, order in common.interleaved(save_systems, repeats, warmup, seed):
        load_order = list(load_systems)
        random.Random(seed * 1000 + rep).shuffle(load_order)
        orders.append({"rep": rep, "warmup": warm, "save": order, "load": load_order, "loadavg": common.loadavg()})
        for system in order:
            if b.rank == 0:
                common.remove_tree(b.path(system))
                os.makedirs(b.path(system), exist_ok=True)
            dist.barrier()
            sample = b.timed(b.save, system)
            if not warm:
                samples["save"].setdefault(system, []).append(sample)
        for system in load_order:
            common.zero_state(b.dst)
            folder = b.path(LOAD_SOURCE[system], source=sources)
            if b.rank == 0:
                files = common.files_under(folder)
                common.evict_files(files)
                if warm:
                    residency[system] = {
                        "folder": os.path.relpath(folder, b.args.dir),
                        "files": len(files),
                        "bytes": sum(os.path.getsize(f) for f in files),
                        "resident_after_evict": common.resident_bytes(files),
                    }
            sample = b.timed(functools.partial(b.load, folder=folder), system)
            if warm and not system.startswith("dd"):
                verified[system] = all(common.gather_to_all(common.state_equal(b.dst, b.src)))
                if not verified[system]:
                    raise AssertionError(f"{system}: loaded values differ from the saved ones")
            if not warm:
                samples["load"].setdefault(system, []).append(sample)
        if b.rank == 0:
            print(
                f"repetition {rep}{' (warm-up)' if warm else ''} done at {time.perf_counter() - t_start:.0f} s",
                flush=True,
            )
    return {
        "samples": samples,
        "orders": orders,
        "verified": verified,
        "residency": residency,
        "elapsed_s": time.perf_counter() - t_start,
    }


def worker(rank: int, world: int, args: argparse.Namespace, facts: dict[str, Any]) -> None:
    import torch.distributed as dist

    b = Bench(rank, world, args)
    if rank == 0:
        common.remove_tree(args.dir)
        os.makedirs(args.dir, exist_ok=True)
        print(
            f"state: {len(b.specs)} tensors, {b.global_bytes / 2**20:.0f} MiB total, "
            f"{b.local_bytes / 2**20:.0f} MiB per rank; {args.repeats} repetitions + {args.warmup} warm-up",
            flush=True,
        )
    dist.barrier()
    m = measure_interleaved(
        b, *systems(args), args.repeats, args.warmup, args.seed, sources=not getattr(args, "loads_read_saves", False)
    )
    b.close()
    if rank == 0:
        results = build_results(
            args, facts, b, m["samples"], m["orders"], m["verified"], m["residency"], write_balance(b), m["elapsed_s"]
        )
        path = common.write_results(args.name, results)
        print_report(results)
        print(f"\nresults: {path}")
        if not args.keep:
            common.remove_tree(args.dir)


def systems(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The save and load systems of this run: ``--saves`` and ``--loads`` where given, else
    :data:`SAVE_SYSTEMS`, :data:`LOAD_SYSTEMS`; ``shardckpt_v3`` added to both with ``--format3``."""
    extra = ["shardckpt_v3"] if getattr(args, "format3", False) else []
    saves = SAVE_SYSTEMS if getattr(args, "saves", None) is None else args.saves
    loads = LOAD_SYSTEMS if getattr(args, "loads", None) is None else args.loads
    return saves + extra, loads + extra


def _systems_arg(known: list[str]) -> Any:
    """An argparse type: a comma-separated list of ``known`` names (empty: none)."""

    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown systems {unknown}; known: {', '.join(known)}")
        return names

    return parse


def write_balance(b: Bench) -> dict[str, Any]:
    """Bytes each rank wrote in the last shardckpt and dcp saves (rank 0, after them)."""
    out = {}
    for system, rank_of in (("shardckpt", common.shardckpt_file_rank), ("dcp", common.dcp_file_rank)):
        files = common.files_under(b.path(system))
        if not files:  # not among this run's saves (--saves)
            continue
        out[system] = common.balance(common.bytes_by_rank(files, rank_of))
        out[system]["checkpoint_bytes"] = sum(os.path.getsize(f) for f in files)
    return out


def phase_summary(name: str, samples: list[dict[str, Any]], state_bytes: int) -> dict[str, Any]:
    """Seconds and GB/s (median, min-max) of one system; shardckpt, dcp, torch_save etc.
    count the state's logical bytes, raw and dd the bytes they moved."""
    secs = [x["s"] for x in samples]
    nbytes = [x["bytes"] if name.startswith(("dd", "raw")) else state_bytes for x in samples]
    return {
        "seconds": common.summarize(secs),
        "gbps": common.summarize([n / s / common.GB for n, s in zip(nbytes, secs, strict=True)]),
        "bytes": nbytes[0],
    }


def build_results(
    args: argparse.Namespace,
    facts: dict[str, Any],
    b: Bench,
    samples: dict[str, Any],
    orders: list[Any],
    verified: dict[str, bool],
    residency: dict[str, Any],
    balance: dict[str, Any],
    elapsed_s: float,
) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    for phase, by_system in samples.items():
        systems = {name: phase_summary(name, runs, b.global_bytes) for name, runs in by_system.items()}
        gb = {k: v["gbps"]["samples"] for k, v in systems.items()}
        ratios = {}
        for name in systems:
            for ref in ("dd", "dd_x4", "dcp", "safetensors", "raw", "shardckpt"):
                if ref != name and ref in gb:
                    ratios[f"{name}/{ref}"] = common.paired_ratios(gb[name], gb[ref])
        phases[phase] = {"systems": systems, "paired_ratios_of_gbps": ratios}
    facts = dict(facts, loadavg_end=common.loadavg())

    def med(phase: str, key: str) -> float | None:
        return phases[phase]["paired_ratios_of_gbps"].get(key, {}).get("median")

    targets = {
        "save_vs_dd_at_least_0.9": {
            "ratio": med("save", "shardckpt/dd"),
            "met": _at_least(med("save", "shardckpt/dd"), 0.9),
        },
        "save_vs_dd_x4_at_least_0.9": {
            "ratio": med("save", "shardckpt/dd_x4"),
            "met": _at_least(med("save", "shardckpt/dd_x4"), 0.9),
        },
        "save_vs_safetensors_at_least_0.9": {
            "ratio": med("save", "shardckpt/safetensors"),
            "met": _at_least(med("save", "shardckpt/safetensors"), 0.9),
        },
        "load_vs_safetensors_at_least_0.9": {
            "ratio": med("load", "shardckpt/safetensors"),
            "met": _at_least(med("load", "shardckpt/safetensors"), 0.9),
        },
        "save_not_slower_than_dcp": {
            "ratio": med("save", "shardckpt/dcp"),
            "met": _at_least(med("save", "shardckpt/dcp"), 1.0),
        },
        "load_not_slower_than_dcp": {
            "ratio": med("load", "shardckpt/dcp"),
            "met": _at_least(med("load", "shardckpt/dcp"), 1.0),
        },
        "aa_control": {ph: phases[ph]["paired_ratios_of_gbps"].get("shardckpt_AA/shardckpt") for ph in phases},
    }
    return {
        "benchmark": "save_load",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": facts,
        "config": {
            "world_size": b.world,
            "mib_requested": args.mib,
            "state_bytes": b.global_bytes,
            "bytes_per_rank": b.local_bytes,
            "mix": getattr(args, "mix", "model"),
            "tensors": len(b.specs),
            "largest_tensor_bytes": max(s.nbytes for s in b.specs),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "dd_mode": args.dd_mode,
            "seed": args.seed,
            "quick": args.quick,
            # loads read checkpoints saved once ("separate", since 2026-12-02) or the timed saves' folders
            "load_sources": "saves" if getattr(args, "loads_read_saves", False) else "separate",
            # fresh memory touched on each rank before each timed call (0: --cold-memory, the method before 2026-12-03)
            "warm_memory_bytes_per_rank": b.warm_bytes,
        },
        "elapsed_s": elapsed_s,
        "phases": phases,
        "targets": targets,
        "load_values_verified": verified,
        "eviction_check": residency,
        "balance": balance,
        "orders": orders,
    }


def _at_least(x: float | None, bound: float) -> bool | None:
    return None if x is None else x >= bound


def print_report(r: dict[str, Any]) -> None:
    cfg = r["config"]
    print(
        f"\n{cfg['state_bytes'] / 2**30:.2f} GiB state, mix {cfg.get('mix', 'model')}, {cfg['tensors']} tensors, "
        f"{cfg['world_size']} ranks, "
        f"{cfg['repeats']} measured repetitions; loadavg start {r['machine']['loadavg_start']} "
        f"end {r['machine']['loadavg_end']}"
    )
    for phase in ("save", "load"):
        p = r["phases"][phase]
        rows = []
        for name in [*(SAVE_SYSTEMS if phase == "save" else LOAD_SYSTEMS), "shardckpt_v3"]:
            s = p["systems"].get(name)
            if s is None:
                continue
            rat = p["paired_ratios_of_gbps"]
            rows.append(
                [
                    name,
                    s["gbps"]["median"],
                    common.spread(s["gbps"]),
                    s["seconds"]["median"],
                    rat.get(f"{name}/dd", {}).get("median"),
                    rat.get(f"{name}/dd_x4", {}).get("median"),
                    rat.get(f"{name}/safetensors", {}).get("median"),
                    rat.get(f"{name}/dcp", {}).get("median"),
                    rat.get(f"{name}/raw", {}).get("median"),
                    rat.get(f"{name}/shardckpt", {}).get("median"),
                ]
            )
        print(f"\n{phase} (GB/s = 1e9 bytes/s; ratios are medians of per-repetition ratios)")
        print(
            common.format_table(
                [
                    "system",
                    "GB/s median",
                    "GB/s min-max",
                    "s median",
                    "x dd",
                    "x dd_x4",
                    "x safet.",
                    "x dcp",
                    "x raw",
                    "x shardckpt",
                ],
                rows,
            )
        )
    aa = {ph: r["phases"][ph]["paired_ratios_of_gbps"].get("shardckpt_AA/shardckpt") for ph in ("save", "load")}
    for ph, s in aa.items():
        if s and s.get("n"):
            print(f"A/A control ({ph}): shardckpt_AA/shardckpt median {s['median']:.3f}, range {common.spread(s)}")
    for k, v in r["balance"].items():
        print(f"bytes per rank, {k}: {v['bytes_by_rank']} (max/mean {v['max_over_mean']:.3f})")
    print(f"load values verified: {r['load_values_verified']}")
    for k, v in r["targets"].items():
        if k != "aa_control" and v["ratio"] is not None:  # None: a system it compares was not run
            print(f"target {k}: ratio {v['ratio']:.3f} -> {'met' if v['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> None:
    common.run_benchmark(worker, parse_args(argv))


if __name__ == "__main__":
    main()
