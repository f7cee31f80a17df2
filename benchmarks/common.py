"""Shared helpers for the benchmarks: launching ranks, the model-like state, interleaved
schedules, medians, the raw-disk baselines (dd), page-cache eviction, host memory from
/proc and machine facts.

Measurement rules (see docs/benchmarks.md for why): systems are measured in the same
run, interleaved, in a shuffled order per repetition; the first repetition is a dropped
warm-up; results are medians over the remaining repetitions with the min-max spread;
comparisons are paired per repetition and an A/A control (one system measured twice
under two names) shows the noise floor. Every timed call starts on pages just freed
(:func:`warm_memory`), not on memory this VM's balloon has handed back to the host.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

GB = 1e9
MiB = 2**20
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# ------------------------------------------------------------------ launching ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=600))
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # leave together: rank 0 hosts the store
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo/CPU processes.

    One intra-op thread per rank (OMP/MKL/OpenBLAS too): with 4 ranks on a 2-core VM,
    more threads only oversubscribe the cores and add noise.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    import torch.multiprocessing as mp

    mp.spawn(_rank_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


def max_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_to_all(value: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# ------------------------------------------------------------------ the state


@dataclass(frozen=True)
class TensorSpec:
    name: str
    rows: int
    cols: int
    sharded: bool  # True: rows split over ranks (FSDP-like Shard(0)); False: replicated
    itemsize: int = 4  # bytes per element: 4 float32, 2 bfloat16

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * self.itemsize


DTYPES = {"float32": 4, "bfloat16": 2}  # the dtypes a benchmark state can have, by element size


def model_layout(total_mib: int, world_size: int, itemsize: int = 4) -> list[TensorSpec]:
    """A transformer-like layout of at least ``total_mib`` MiB (parameters plus
    AdamW's two moments): an embedding and an output head (4h x h), two blocks of
    qkv (3h x h), out (h x h), up (4h x h), down (h x 4h), all sharded by rows over the
    ranks, plus replicated norm weights (h) and a replicated rotary table (h/4 x 64).
    That is 30 sharded tensors (~10-50 MiB each at 1 GiB total, ~100 MiB at 2 GiB) and
    16 small replicated ones. Rows are multiples of ``16 * world_size``, so any divisor of
    ``world_size`` shards them evenly too (pass 12 to load a 4-rank layout on 3 or 2).
    """
    units = 3 * (4 + 4 + 2 * (3 + 1 + 4 + 4))  # sizes in units of h*h elements
    step = 16 * world_size
    h = max(step, math.ceil(math.sqrt(total_mib * MiB / (units * itemsize)) / step) * step)
    weights = [("embed", 4 * h, h), ("head", 4 * h, h)]
    for b in range(2):
        weights += [
            (f"blocks.{b}.qkv", 3 * h, h),
            (f"blocks.{b}.out", h, h),
            (f"blocks.{b}.up", 4 * h, h),
            (f"blocks.{b}.down", h, 4 * h),
        ]
    small = [(f"blocks.{b}.{n}", 1, h) for b in range(2) for n in ("norm1", "norm2")] + [("final_norm", 1, h)]
    specs = []
    for group in ("param", "exp_avg", "exp_avg_sq"):
        specs += [TensorSpec(f"{group}.{n}", r, c, True, itemsize) for n, r, c in weights]
        specs += [TensorSpec(f"{group}.{n}", r, c, False, itemsize) for n, r, c in small]
    specs.append(TensorSpec("param.rope", h // 4, 64, False, itemsize))
    return specs


def local_rows(spec: TensorSpec, rank: int, world_size: int) -> tuple[int, int]:
    """(first row, row count) of ``rank``'s shard."""
    if not spec.sharded:
        return 0, spec.rows
    n = spec.rows // world_size  # rows are multiples of 16 * world_size
    return rank * n, n


FILL_BLOCK_ROWS = 256


def fill_local(spec: TensorSpec, rank: int, world_size: int, out: Any) -> None:
    """Deterministic, incompressible-ish values for ``rank``'s shard of ``spec``.

    Seeded per block of FILL_BLOCK_ROWS global rows, so a tensor's global values do not
    depend on the world size: a load on another world size can be checked bitwise.
    """
    import torch

    start, n = local_rows(spec, rank, world_size)
    first = start // FILL_BLOCK_ROWS * FILL_BLOCK_ROWS
    for b0 in range(first, start + n, FILL_BLOCK_ROWS):
        b1 = min(b0 + FILL_BLOCK_ROWS, spec.rows)
        g = torch.Generator().manual_seed(zlib.crc32(f"{spec.name}@{b0}".encode()))
        block = torch.rand((b1 - b0, spec.cols), generator=g)
        lo, hi = max(b0, start), min(b1, start + n)
        out[lo - start : hi - start].copy_(block[lo - b0 : hi - b0])


def make_state(specs: list[TensorSpec], rank: int, world_size: int, *, fill: bool) -> dict[str, Any]:
    """``{"model": {...}, "optim": {...}, "step": int}`` of DTensors (Shard(0) or Replicate)
    on a 1-D CPU mesh, each rank holding its own rows; values filled when ``fill``."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    state: dict[str, Any] = {"model": {}, "optim": {}, "step": 1000 if fill else 0}
    dtype = torch.float32 if specs[0].itemsize == 4 else torch.bfloat16
    for spec in specs:
        _, n = local_rows(spec, rank, world_size)
        local = torch.empty((n, spec.cols), dtype=dtype)
        if fill:
            fill_local(spec, rank, world_size, local)
        else:
            local.zero_()
        placement = Shard(0) if spec.sharded else Replicate()
        dt = DTensor.from_local(
            local, mesh, [placement], run_check=False, shape=torch.Size((spec.rows, spec.cols)), stride=(spec.cols, 1)
        )
        part = "model" if spec.name.startswith("param.") else "optim"
        state[part][spec.name] = dt
    return state


def local_tensors(state: dict[str, Any]) -> list[Any]:
    return [t.to_local() for part in ("model", "optim") for t in state[part].values()]


def state_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    xs, ys = local_tensors(a), local_tensors(b)
    same = len(xs) == len(ys) and all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True))
    return same and a["step"] == b["step"]


def zero_state(state: dict[str, Any]) -> None:
    for t in local_tensors(state):
        t.zero_()
    state["step"] = 0


def global_bytes(specs: list[TensorSpec]) -> int:
    return sum(s.nbytes for s in specs)


def local_bytes(specs: list[TensorSpec], rank: int, world_size: int) -> int:
    return sum(local_rows(s, rank, world_size)[1] * s.cols * s.itemsize for s in specs)


# ------------------------------------------------------------------ schedules and statistics


def interleaved(
    systems: Sequence[str], repeats: int, warmup: int = 1, seed: int = 0
) -> Iterator[tuple[int, bool, list[str]]]:
    """``(repetition, is_warmup, order)``: every system once per repetition, in an order
    shuffled per repetition (the same on every rank for a given seed)."""
    rng = random.Random(seed)
    for rep in range(warmup + repeats):
        order = list(systems)
        rng.shuffle(order)
        yield rep, rep < warmup, order


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": list(samples),
    }


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """Per-repetition ratios num[i]/den[i] (measured back to back in one repetition)."""
    return summarize([a / b for a, b in zip(num, den, strict=True) if b > 0])


# ------------------------------------------------------------------ the raw disk


def run_dd_write(path: str, nbytes: int, mode: str = "fdatasync", block_mib: int = 16) -> tuple[float, int]:
    """``dd if=/dev/zero of=path bs=16M count=N`` made durable (``conv=fdatasync``) or
    bypassing the page cache (``oflag=direct``); returns (seconds, bytes written)."""
    count = max(1, math.ceil(nbytes / (block_mib * MiB)))
    flag = "conv=fdatasync" if mode == "fdatasync" else "oflag=direct"
    cmd = ["dd", "if=/dev/zero", f"of={path}", f"bs={block_mib}M", f"count={count}", flag, "status=none"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0, count * block_mib * MiB


def run_dd_read(path: str, block_mib: int = 16) -> tuple[float, int]:
    """Cold read of ``path`` with dd (evicted first); returns (seconds, bytes read)."""
    evict_files([path])
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", f"bs={block_mib}M", "status=none"], check=True)
    return time.perf_counter() - t0, os.path.getsize(path)


def files_under(root: str) -> list[str]:
    out = []
    for folder, _dirs, files in os.walk(root):
        out += [os.path.join(folder, f) for f in files]
    return sorted(out)


def evict_files(paths: Sequence[str]) -> None:
    """Drop these files' pages from the page cache (fsync first: dirty pages stay)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def evict_tree(root: str) -> None:
    evict_files(files_under(root))


def warm_memory(nbytes: int) -> float:
    """Touch ``nbytes`` of fresh memory (one byte a page) and free it; seconds it took.

    On a VM whose balloon device reports free pages to the host (virtio's free page
    reporting, ``free_page_reporting()``; this project's Firecracker VMs do), memory free
    for about 2 s is handed back and the next touch of each page faults into the host:
    writing 1 GiB into the page cache or a buffer then cost 0.4-1.5 s of system time more
    than on pages freed a moment before (docs/benchmarks.md, "Free page reporting"). Which
    system of a repetition met such pages depended on what ran before it, not on its code.
    Called on every rank right before a timed save or load, so that each one's first
    ``nbytes`` of new pages (the page cache of what it writes or reads, its buffers) are
    pages just freed, as on a machine without reporting."""
    import numpy as np

    if nbytes <= 0:
        return 0.0
    t0 = time.perf_counter()
    block = np.empty(nbytes, dtype=np.uint8)
    block[:: os.sysconf("SC_PAGE_SIZE")] = 1
    del block
    return time.perf_counter() - t0


def warm_bytes(local_bytes: int, world_size: int) -> int:
    """What :func:`warm_memory` touches on each rank before a timed save or load of
    ``local_bytes`` a rank: twice that (the page cache of the bytes written or read, and a
    buffer of them) and 64 MiB, at most half of the memory available now split over the
    ranks."""
    with open("/proc/meminfo") as f:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M)
    available = int(m.group(1)) * 1024 if m else 0
    return min(2 * local_bytes + 64 * MiB, available // (2 * world_size))


def free_page_reporting(root: str = "/sys/bus/virtio/devices") -> bool | None:
    """Whether a virtio balloon with free page reporting (feature bit 5) is present; None
    where /sys says nothing (not Linux, no virtio)."""
    try:
        devices = sorted(os.listdir(root))
    except OSError:
        return None
    for d in devices:
        try:
            with open(os.path.join(root, d, "device")) as f:
                if int(f.read().strip(), 16) != 5:  # virtio device id 5: the memory balloon
                    continue
            with open(os.path.join(root, d, "features")) as f:
                bits = f.read().strip()
        except (OSError, ValueError):
            continue
        return len(bits) > 5 and bits[5] == "1"
    return False


def resident_bytes(paths: Sequence[str]) -> int | None:
    """Bytes of these files in the page cache (util-linux ``fincore``), None without it."""
    if not paths or shutil.which("fincore") is None:
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *paths],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return sum(int(x) for x in out.split())


def bytes_by_rank(paths: Sequence[str], rank_of: Callable[[str], int | None]) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for p in paths:
        r = rank_of(os.path.basename(p))
        if r is not None:
            sizes[r] = sizes.get(r, 0) + os.path.getsize(p)
    return dict(sorted(sizes.items()))


def shardckpt_file_rank(name: str) -> int | None:
    m = re.search(r"-r(\d+)-\d+\.safetensors$", name)
    return int(m.group(1)) if m else None


def dcp_file_rank(name: str) -> int | None:
    m = re.match(r"__(\d+)_\d+\.distcp$", name)
    return int(m.group(1)) if m else None


def balance(sizes: dict[int, int]) -> dict[str, Any]:
    vals = list(sizes.values())
    mean = sum(vals) / len(vals) if vals else 0
    return {
        "bytes_by_rank": {str(k): v for k, v in sizes.items()},
        "max_over_mean": (max(vals) / mean) if mean else None,
    }


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ host memory


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else -1


def rss_bytes() -> int:
    return proc_status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return proc_status_kib("VmHWM") * 1024


def proc_io() -> dict[str, int]:
    """This process's I/O counters (/proc/self/io, all threads): ``rchar`` = bytes
    returned by read()/pread() calls (page cache included; gloo's socket receives are
    not counted), ``read_bytes`` = bytes fetched from the block device."""
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            key, value = line.split(":")
            out[key] = int(value)
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ machine facts and output


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def machine_facts(bench_dir: str) -> dict[str, Any]:
    import torch

    mem_kib = 0
    with open("/proc/meminfo") as f:
        m = re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.M)
        mem_kib = int(m.group(1)) if m else 0
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu_model = m.group(1) if m else ""
    except OSError:
        pass
    os.makedirs(bench_dir, exist_ok=True)
    du = shutil.disk_usage(bench_dir)
    dev = subprocess.run(["df", "--output=source,fstype", bench_dir], capture_output=True, text=True).stdout.split()
    try:
        import shardckpt

        sc_version = shardckpt.__version__
    except ImportError:
        sc_version = None
    return {
        "hostname": socket.gethostname(),
        "cpu_cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "bench_dir": os.path.abspath(bench_dir),
        "bench_dir_device": " ".join(dev[2:]) if len(dev) >= 4 else None,
        "disk_free_gib": round(du.free / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "shardckpt": sc_version,
        "loadavg_start": loadavg(),
        "free_page_reporting": free_page_reporting(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(name: str, results: dict[str, Any], out_dir: str = RESULTS_DIR) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def publish(name: str, results: dict[str, Any], out_dir: str, report: Callable[[dict[str, Any]], None]) -> str:
    """Write ``results`` as ``out_dir/name.json``, print ``report(results)`` and the path."""
    path = write_results(name, results, out_dir)
    report(results)
    print(f"\nresults: {path}")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return "-" if x is None else str(x)


def spread(s: dict[str, Any], scale: float = 1.0) -> str:
    if not s.get("n"):
        return "-"
    return f"{s['min'] * scale:.3g}-{s['max'] * scale:.3g}"


def wait_for_quiet(threshold: float = 0.8, max_wait_s: float = 900, poll_s: float = 30) -> list[float]:
    """Poll /proc/loadavg until the 1-minute load is below ``threshold`` (or time is up)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        la = loadavg()
        if la[0] < threshold or time.monotonic() >= deadline:
            return la
        print(f"waiting for a quiet machine: loadavg {la}", flush=True)
        time.sleep(poll_s)


def add_wait_quiet(ap: Any) -> None:
    """The ``--wait-quiet SECONDS`` option every benchmark takes (see :func:`wait_for_quiet`)."""
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first poll /proc/loadavg up to this long until the 1-min load is < 0.8",
    )


def run_benchmark(worker: Callable[..., Any], args: Any) -> None:
    """Wait for a quiet machine if asked, record its facts, run ``worker`` on every rank."""
    if args.wait_quiet:
        wait_for_quiet(max_wait_s=args.wait_quiet)
    spawn_ranks(worker, args.world_size, args, machine_facts(args.dir))


# ------------------------------------------------------------------ A/B scripts (load_ab.py, save_ab.py)


def ab_parser(description: str | None, mixes: Sequence[str]) -> argparse.ArgumentParser:
    """The options every A/B script takes: one spawn of gloo ranks per call, builds
    alternated by the caller (``--label`` names the build)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mix", default="small", choices=list(mixes))
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--label", default="")
    add_cold_memory(ap)
    return ap


def add_cold_memory(ap: argparse.ArgumentParser) -> None:
    """``--cold-memory``: no :func:`warm_memory` before the timed calls (the method before 2026-12-03)."""
    ap.add_argument(
        "--cold-memory",
        action="store_true",
        help="do not touch fresh memory before each timed call (the method before 2026-12-03; common.warm_memory)",
    )


def ab_spawn(worker: Callable[..., Any], args: argparse.Namespace) -> None:
    """``worker(rank, world, args, port)`` on ``args.world_size`` processes (each joins
    the gloo group itself: :func:`ab_init`); torch's thread settings left as they are."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(args.world_size, args, free_port()), nprocs=args.world_size)


def ab_init(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def ab_report(args: argparse.Namespace, world: int, seconds: dict[str, list[float]], **extra: Any) -> None:
    """Print one JSON line: medians of both systems and of the per-repetition ratios."""
    ratios = [s / c for c, s in zip(seconds["shardckpt"], seconds["safetensors"], strict=True)]
    doc = {
        "label": args.label,
        "mix": args.mix,
        "mib": args.mib,
        "world_size": world,
        "format_version": args.format_version,
        "cold_memory": args.cold_memory,
        **extra,
        "shardckpt_s": statistics.median(seconds["shardckpt"]),
        "safetensors_s": statistics.median(seconds["safetensors"]),
        "x_safetensors": statistics.median(ratios),
        "x_safetensors_all": [round(r, 3) for r in ratios],
        "loadavg": loadavg(),
    }
    print(json.dumps(doc), flush=True)


def time_phases(
    phases: Sequence[tuple[str, str]], spent: dict[str, float], wall: dict[str, float] | None = None
) -> None:
    """Wrap each (module, attribute) of ``phases`` that this build has, so that its CPU
    seconds on the calling thread (``time.thread_time``) add up in ``spent[name]`` and, with
    ``wall``, its seconds in ``wall[name]``; a ``read_data`` also adds its ``process_time``
    (its reader threads) as ``read_data_process``. An attribute "Class.method" wraps the
    class's method. Wrapped by name, so an older build is measured by the same command; a
    name the build lacks is left out, and a function imported by name into another module
    must be listed under that module too."""
    import importlib

    for module_name, attr in phases:
        owner: Any = importlib.import_module(module_name)
        *outer, name = attr.split(".")
        for part in outer:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, name):
            continue
        setattr(owner, name, _timed(getattr(owner, name), name, spent, wall))


def _timed(f: Any, name: str, spent: dict[str, float], wall: dict[str, float] | None) -> Any:
    """``f``, adding its CPU seconds to ``spent[name]`` (and its seconds to ``wall[name]``)."""

    def timed(*a: Any, **k: Any) -> Any:
        t0, p0, w0 = time.thread_time(), time.process_time(), time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            spent[name] = spent.get(name, 0.0) + time.thread_time() - t0
            if wall is not None:
                wall[name] = wall.get(name, 0.0) + time.perf_counter() - w0
            if name == "read_data":
                spent["read_data_process"] = spent.get("read_data_process", 0.0) + time.process_time() - p0

    return timed
