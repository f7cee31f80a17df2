"""Micro-benchmark of the commit's per-chunk cost: ``manifest_to_json`` on the manifest of
a 4-rank save of the ``small`` mix (3,058 tensors x 4 chunks, about 12,000 chunk records,
format 1), median of 7 calls with the cyclic garbage collector off, as in a save
(issue #18).

    PYTHONPATH=$PWD python benchmarks/manifest_json.py [--tensors 3058] [--ranks 4] [--v2]

Prints one JSON line: the median and min-max seconds and the manifest's size. Compare two
builds by running it under each build's PYTHONPATH, alternating.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

from shardckpt.format import layout
from shardckpt.format.manifest import ChunkRecord, FileRecord, Manifest, TensorRecord, manifest_to_json


def small_mix_manifest(tensors: int, ranks: int, *, v2: bool) -> Manifest:
    """A manifest shaped like the ``small`` mix's: every tensor row-sharded over ``ranks``."""
    save_id = "0123456789ab"
    files = {
        layout.data_file_name(save_id, r, k): FileRecord(size=1 << 24, hash=f"{r:016x}", rank=r)
        for r in range(ranks)
        for k in range(2)
    }
    records = {}
    offset = [0] * ranks
    for i in range(tensors):
        rows, cols = 8 * ranks, 32 + (i % 7) * 32
        chunks = []
        for r in range(ranks):
            length = 8 * cols * 4
            chunks.append(
                ChunkRecord(
                    (8 * r, 0),
                    (8, cols),
                    layout.data_file_name(save_id, r, i % 2),
                    offset[r],
                    length,
                    (f"{i * ranks + r:016x}",),
                    f"{i * ranks + r:032x}" if v2 else None,
                )
            )
            offset[r] += length
        records[f"model.layers.{i // 10}.block.{i % 10}.weight"] = TensorRecord("F32", (rows, cols), tuple(chunks))
    return Manifest(
        world_size=ranks,
        process_layout=tuple({"rank": r, "host": "h", "local_rank": r} for r in range(ranks)),
        tensors=records,
        values={"step": 1},
        files=files,
        hash_block_bytes=1 << 22,
        created_at="2026-12-01T00:00:00+00:00",
        shardckpt_version="0",
        torch_version="2",
        format_version=2 if v2 else 1,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=3058)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--v2", action="store_true", help="with chunk digests (format 2)")
    args = ap.parse_args()
    m = small_mix_manifest(args.tensors, args.ranks, v2=args.v2)
    times = []
    gc.disable()  # as in a save: engine/collector.py pauses the cyclic collector while it runs
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        raw = manifest_to_json(m)
        times.append(time.perf_counter() - t0)
    chunks = sum(len(t.chunks) for t in m.tensors.values())
    print(
        json.dumps(
            {
                "chunks": chunks,
                "bytes": len(raw),
                "median_s": round(statistics.median(times), 4),
                "min_s": round(min(times), 4),
                "max_s": round(max(times), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
