"""Does this machine hand free memory back to its host? What touching it then costs.

On a VM whose virtio balloon reports free pages (feature bit 5; Firecracker and other
hypervisors enable it), memory that stays free for about 2 s is handed to the host, and
the next touch of each such page faults into the host. A save writes its bytes into the
page cache and a load reads them into it, so either can pay that cost inside its timed
window, depending on how long the memory it gets had been free: on this project's VM it
decided which system of a benchmark repetition ran slower (docs/benchmarks.md, "Free page
reporting"). The other benchmarks therefore touch fresh memory right before every timed
call (``common.warm_memory``).

Per repetition (one warm-up first, dropped), in a shuffled order, each case frees and
then touches ``--mib`` MiB (one byte a page) after a pause:

- ``just_freed``: touched again at once (pages freed a moment before);
- ``idle_1s``, ``idle_3s``, ``idle_6s``: after that many seconds free;
- ``dd_just_freed``, ``dd_idle_6s``: ``dd conv=fdatasync`` of ``--mib`` MiB into ``--dir``,
  the page cache of the write taking the place of the touched buffer.

Prints a table of medians (seconds, and the process's system CPU seconds where it is
ours) and one JSON line::

    python benchmarks/free_pages.py --mib 1024 --repeats 5 --dir /var/tmp/free_pages
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common

CASES = {"just_freed": 0.0, "idle_1s": 1.0, "idle_3s": 3.0, "idle_6s": 6.0, "dd_just_freed": 0.0, "dd_idle_6s": 6.0}


def one(case: str, nbytes: int, folder: str) -> tuple[float, float]:
    """Free what was touched, wait, then time the case: (seconds, system CPU seconds of
    this process; for dd, of its child)."""
    common.warm_memory(nbytes)  # pages just freed: what the pause then lets age
    time.sleep(CASES[case])
    if case.startswith("dd"):
        path = os.path.join(folder, "dd.bin")
        c0 = os.times()
        t0 = time.perf_counter()
        cmd = ["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={max(1, nbytes // (16 * 2**20))}"]
        subprocess.run([*cmd, "conv=fdatasync", "status=none"], check=True)
        dt = time.perf_counter() - t0
        os.remove(path)
        return dt, os.times().children_system - c0.children_system
    c0 = os.times()
    dt = common.warm_memory(nbytes)
    return dt, os.times().system - c0.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="/var/tmp/free_pages", help="folder of the dd cases (on the disk under test)")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    nbytes = args.mib * 2**20
    seconds: dict[str, list[float]] = {c: [] for c in CASES}
    system: dict[str, list[float]] = {c: [] for c in CASES}
    for rep in range(args.repeats + 1):
        order = list(CASES)
        random.Random(rep).shuffle(order)
        for case in order:
            dt, sys_s = one(case, nbytes, args.dir)
            if rep:
                seconds[case].append(dt)
                system[case].append(sys_s)
    rows = [
        (c, statistics.median(seconds[c]), f"{min(seconds[c]):.3g}-{max(seconds[c]):.3g}", statistics.median(system[c]))
        for c in CASES
    ]
    print(f"{args.mib} MiB, {args.repeats} repetitions; free page reporting: {common.free_page_reporting()}")
    print(common.format_table(["case", "s median", "s min-max", "system CPU s median"], rows))
    doc = {
        "mib": args.mib,
        "repeats": args.repeats,
        "free_page_reporting": common.free_page_reporting(),
        "seconds": {c: [round(x, 3) for x in v] for c, v in seconds.items()},
        "system_s": {c: [round(x, 3) for x in v] for c, v in system.items()},
    }
    print(json.dumps(doc), flush=True)


if __name__ == "__main__":
    main()
