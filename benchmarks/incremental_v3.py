"""Incremental format-3 saves (docs/format.md 12.7): bytes written and save time of a
``save(..., format_version=3, base=...)`` with a fraction of the tensors changed, against a
full format-3 save of the same state, in one process.

    python benchmarks/incremental_v3.py                       # 100 tensors of 1 MiB, 10% changed, 5 repetitions
    python benchmarks/incremental_v3.py --tensors 200 --mib 2 --changed 0.1 --repeats 7

Per repetition, in shuffled order: a plain full format-3 save of the state (``full``) and an
incremental one against the previous repetition's incremental checkpoint after
``--changed`` of the tensors changed (``incremental``; the first repetition writes the base
and is dropped). Both into fresh folders under ``--dir``, removed afterwards. Bytes: the
sizes of the files the save created in its folder (data files, index record, page,
manifest). Time: the wall time of the call. Prints medians (min-max) and the paired ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time

import torch

import shardckpt


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--mib", type=float, default=1.0, help="size of each tensor")
    ap.add_argument("--changed", type=float, default=0.1, help="fraction of the tensors changed per step")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="parent folder (default: a temporary one)")
    args = ap.parse_args()
    parent = tempfile.mkdtemp(prefix="incr-v3-", dir=args.dir)
    numel = int(args.mib * (1 << 20)) // 4
    g = torch.Generator().manual_seed(0)
    state = {f"layer{i:03d}.w": torch.randn(numel, generator=g) for i in range(args.tensors)}
    keys = sorted(state)
    changing = keys[: max(1, round(args.changed * len(keys)))]
    rows: dict[str, list[tuple[float, int]]] = {"full": [], "incremental": []}
    base = None
    try:
        for rep in range(args.repeats + 1):
            for k in changing:
                state[k].add_(1e-3)
            order = ["full", "incremental"]
            random.shuffle(order)
            for system in order:
                path = os.path.join(parent, f"{system}_{rep}")
                extra: dict[str, object] = {}
                if system == "incremental":
                    extra = {"base": base} if base else {"incremental": True}
                t0 = time.perf_counter()
                shardckpt.save(state, path, format_version=3, **extra)  # type: ignore[arg-type]
                took = time.perf_counter() - t0
                if rep:
                    rows[system].append((took, _folder_bytes(path)))
                if system == "incremental":
                    base = path  # kept: later saves read its files (and, flattened, the first one's)
                else:
                    shutil.rmtree(path)
        total = sum(t.nbytes for t in state.values())
        changed = sum(state[k].nbytes for k in changing)
        print(f"state {total / 2**20:.0f} MiB in {len(keys)} tensors, {changed / 2**20:.0f} MiB changed per step")
        for system, samples in rows.items():
            times = [t for t, _ in samples]
            sizes = [b for _, b in samples]
            print(
                f"{system:12s} save {statistics.median(times):.3f} s ({min(times):.3f}-{max(times):.3f}), "
                f"bytes written {statistics.median(sizes) / 2**20:.2f} MiB ({min(sizes)}-{max(sizes)})"
            )
        ratios = [i[0] / f[0] for i, f in zip(rows["incremental"], rows["full"], strict=True)]
        print(f"incremental/full time: median {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
    finally:
        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
