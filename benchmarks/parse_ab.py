"""CPU seconds of parsing one version 1-2 manifest (issue #18: every loading rank parses
all of it), for the shardckpt found on PYTHONPATH, in a process that has imported torch
as a loading rank has.

Prints one JSON line: the median, min and max ``process_time`` of ``--repeats`` calls of
``parse_any_manifest`` after one warm-up, each on a fresh copy of the bytes, with the cyclic
collector paused as it is inside a load (``engine/collector.py``; repeated parses in one
process would otherwise trigger a full collection almost every time, which one parse inside
a load does not): the parse's own work. Interleave
two builds by calling it alternately, e.g. for the manifest ``load_ab.py`` leaves::

    git archive OLD shardckpt | tar -x -C /tmp/old
    for b in old new new old old new old new; do
      PYTHONPATH=$([ $b = old ] && echo /tmp/old || pwd) \\
        python benchmarks/parse_ab.py /tmp/ab_small/shardckpt/manifest.json --label $b
    done

``--share K/N`` parses as rank K of an N-rank load does: checking the chunk records of its
share of the tensors only (``format.manifest.Share``; builds before it have no shares).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--label", default="")
    parser.add_argument("--share", default="", help="K/N: parse as rank K of N does in a load")
    args = parser.parse_args()
    import torch  # noqa: F401  (a loading rank's imports and heap)

    import shardckpt
    from shardckpt.format.manifest_v3_parser import parse_any_manifest

    with open(args.manifest, "rb") as f:
        raw = f.read()
    options = {}
    if args.share:
        from shardckpt.format.manifest import Share

        part, parts = map(int, args.share.split("/"))
        options["share"] = Share(part, parts)
    cpu = []
    for _ in range(args.repeats + 1):
        copy = bytes(bytearray(raw))
        gc.disable()  # as load_from does (engine/collector.py)
        t0 = time.process_time()
        m = parse_any_manifest(copy, source=args.manifest, **options)
        cpu.append(time.process_time() - t0)
        del m
        gc.enable()
        gc.collect()
    cpu = cpu[1:]
    result = {
        "label": args.label,
        "share": args.share or None,
        "build": os.path.dirname(os.path.dirname(os.path.abspath(shardckpt.__file__))),
        "bytes": len(raw),
        "cpu_s_median": round(statistics.median(cpu), 4),
        "cpu_s_min": round(min(cpu), 4),
        "cpu_s_max": round(max(cpu), 4),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
