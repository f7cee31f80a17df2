"""Format 1 against format 3 for the common small case: one process, no process group.

    python benchmarks/default_format.py                      # 1 MiB, a GPT-like 160 MiB, the 64 MiB small mix
    python benchmarks/default_format.py --repeats 9 --dir /work/bench-tmp/df
    python benchmarks/default_format.py --states small64 --profile 3   # where format 3's time goes

The question it answers (docs/format.md 12.7, "When written"): does making format 3 the
default make a small single-node save bigger or slower in a way a user would notice?
States (plain CPU tensors, fp32):

- ``1mib``: a tiny model: 8 tensors, 1 MiB in all, plus a step counter;
- ``gpt150``: a small GPT-like model, 12 layers of width 512 (weights, biases, norms: 145
  tensors, 160 MiB; AdamW would triple it);
- ``small64``: the 64 MiB ``small`` mix of save_load.py (tensors of 4-64 KiB, log-uniform,
  seeded: about 3,000 of them), the worst case for per-tensor metadata.

Each repetition saves the state once in each format in a shuffled order, then loads each
checkpoint back (warm page cache: what a user sees right after saving; the files were
just written and fsynced). The first repetition is a dropped warm-up. Reported per state
and format: bytes on disk (every file of the folder), number of files, manifest bytes,
and the median save and load wall time with the paired ratio v3/v1 (median of the
per-repetition ratios, which cancels most of the machine's noise).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

import shardckpt

FORMATS = (1, 3)


def state(name: str) -> dict[str, Any]:
    """The named state (seeded, so every repetition saves the same bytes)."""
    g = torch.Generator().manual_seed(16)
    if name == "1mib":
        tensors = {f"layer{i}.weight": torch.randn(128, 256, generator=g) for i in range(8)}
        return {"model": tensors, "step": 100}
    if name == "gpt150":
        d, layers = 512, 12
        model: dict[str, Any] = {"embed": torch.randn(8192, d, generator=g)}
        for i in range(layers):
            for w, shape in (("qkv", (3 * d, d)), ("proj", (d, d)), ("fc1", (4 * d, d)), ("fc2", (d, 4 * d))):
                model[f"h{i}.{w}.weight"] = torch.randn(*shape, generator=g)
                model[f"h{i}.{w}.bias"] = torch.randn(shape[0], generator=g)
            for n in ("ln1", "ln2"):
                model[f"h{i}.{n}.weight"] = torch.randn(d, generator=g)
                model[f"h{i}.{n}.bias"] = torch.randn(d, generator=g)
        return {"model": model, "step": 100}
    rng = random.Random(18)
    out: dict[str, Any] = {}
    filled = 0
    while filled < 64 * 2**20:
        elems = int(4096 * 16 ** rng.random()) // 4  # 4 KiB .. 64 KiB of fp32
        out[f"t{len(out)}"] = torch.randn(elems, generator=g)
        filled += elems * 4
    return {"model": out}


def folder_stats(path: str) -> tuple[int, int, int]:
    """(bytes of every file under ``path``, number of files, manifest bytes)."""
    total, files = 0, 0
    for root, _, names in os.walk(path):
        for n in names:
            total += os.path.getsize(os.path.join(root, n))
            files += 1
    return total, files, os.path.getsize(os.path.join(path, "manifest.json"))


def timed(fn: Any) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of ``fn()``."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def run(name: str, repeats: int, root: str) -> dict[str, Any]:
    sd, target = state(name), state(name)  # target is reused: a load's time, not building tensors
    saves: dict[int, list[float]] = {f: [] for f in FORMATS}
    loads: dict[int, list[float]] = {f: [] for f in FORMATS}
    stats: dict[int, tuple[int, int, int]] = {}
    order = list(FORMATS)
    # one Checkpointer per format, as a training run keeps one: each saves again with its
    # own plan (one Checkpointer alternating the formats would plan every save anew)
    ckpts = {f: shardckpt.Checkpointer() for f in FORMATS}
    for rep in range(repeats + 1):
        random.Random(rep).shuffle(order)
        paths = {f: os.path.join(root, f"{name}-v{f}-{rep}") for f in FORMATS}
        took = {f: timed(lambda f=f, p=paths[f]: ckpts[f].save(sd, p, format_version=f)) for f in order}
        back = {f: timed(lambda p=paths[f]: shardckpt.load(target, p)) for f in order}
        if rep == 0:
            for f in FORMATS:
                stats[f] = folder_stats(paths[f])
        else:
            for f in FORMATS:
                saves[f].append(took[f])
                loads[f].append(back[f])
        for f in FORMATS:
            shutil.rmtree(paths[f])
    for ckpt in ckpts.values():
        ckpt.close()
    return {"stats": stats, "saves": saves, "loads": loads}


def _ratio(new: list[tuple[float, float]], old: list[tuple[float, float]], k: int) -> float:
    return statistics.median(a[k] / b[k] for a, b in zip(new, old, strict=True))


def report(name: str, r: dict[str, Any]) -> None:
    s, sv, ld = r["stats"], r["saves"], r["loads"]
    print(f"\n{name}: {len(sv[1])} measured repetitions (medians; wall s / CPU s of the process)")
    head = ["format:6", "bytes:11", "files:5", "manifest:9", "save wall:9", "cpu:7", "load wall:9", "cpu:7"]
    print(" ".join(f"{h.split(':')[0]:>{int(h.split(':')[1])}}" for h in head))
    for f in FORMATS:
        b, n, m = s[f]
        med = [statistics.median(x[k] for x in xs) for xs in (sv[f], ld[f]) for k in (0, 1)]
        print(f"{f:>6} {b:>11,} {n:>5} {m:>9,} {med[0]:>9.4f} {med[1]:>7.4f} {med[2]:>9.4f} {med[3]:>7.4f}")
    save, load = (f"wall {_ratio(x[3], x[1], 0):.3f}x cpu {_ratio(x[3], x[1], 1):.3f}x" for x in (sv, ld))
    print(f"v3/v1 (paired medians): bytes {s[3][0] / s[1][0]:.4f}  save {save}  load {load}")


def profile(name: str, fmt: int, root: str, top: int = 25) -> None:
    """Print the ``top`` functions by own time of one save and one load of ``name`` in
    ``fmt``, after one unprofiled save and load (imports and first-call caches not counted)."""
    sd, target = state(name), state(name)
    for rep in range(2):
        path = os.path.join(root, f"{name}-profile-{rep}")
        steps = (
            ("save", shardckpt.save, (sd, path), {"format_version": fmt}),
            ("load", shardckpt.load, (target, path), {}),
        )
        for what, fn, args, kwargs in steps:
            prof = cProfile.Profile()
            prof.runcall(fn, *args, **kwargs) if rep else fn(*args, **kwargs)
            if rep:
                print(f"\n{name}, format {fmt}: {what}")
                pstats.Stats(prof).sort_stats("tottime").print_stats(top)
        shutil.rmtree(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dir", default=None, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--states", nargs="+", default=["1mib", "small64"], choices=["1mib", "gpt150", "small64"])
    p.add_argument(
        "--profile", type=int, choices=FORMATS, default=None, help="profile one save and load in this format"
    )
    args = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="default_format-", dir=args.dir)
    try:
        for name in args.states:
            if args.profile is not None:
                profile(name, args.profile, root)
                continue
            report(name, run(name, args.repeats, root))
    finally:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
