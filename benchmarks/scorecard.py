"""Issue #18's table from one run: every target, every tensor-size mix, one command.

    python benchmarks/scorecard.py --dir /var/tmp/scorecard            # ~20-30 min on 2 cores
    python benchmarks/scorecard.py --quick --dir /tmp/sc                # ~3 min: tiny sizes, 2 repetitions
    python benchmarks/scorecard.py --table-only --name scorecard        # the table and plot again from the results

Runs, one after the other on the same machine (each its own interleaved, shuffled,
warmed-up benchmark with an A/A control; their docstrings say how they measure):

1. ``save_load.py`` for each mix at ``--world-size`` ranks: ``uniform`` and ``lognormal`` at
   ``--mib`` (1 GiB), ``small`` (tensors of 4-64 KiB) at ``--small-mib`` (256 MiB: ~12,000
   tensors, as many per rank as a 13B model's parameters and moments have at 64 ranks) - save
   and cold same-world load against per-rank safetensors, parallel dd, DCP;
2. ``suite.py --sections load --format3``: the cold resharded load 4 -> 3 against DCP, with
   the bytes each system read against the bytes needed (formats 1 and 3);
3. ``collectives.py``: the collective round trips and the time of a 1 MiB save on 4 ranks.

Then prints the table of issue #18's targets (markdown) with each row's command result,
writes ``benchmarks/results/<name>.json`` (the rows, with each repetition's ratio, and the
result files they come from) and draws the rows into ``<plots dir>/<name>.png``
(``plots.write_scorecard_plot``; matplotlib, the ``bench`` extra). A row's ratio is the
median of the per-repetition paired ratios; "A/A" is the median (min-max) of the control's
paired ratios in the same benchmark. ``--table-only`` redraws both from the results files
and keeps the run's own record (command, machine, seconds) in ``<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import plots

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = 0.9
RESHARD_TARGET = 1.5
BYTES_TARGET = 1.05
ROUND_TRIPS_TARGET = 3


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each part's command line, keyed by the name of its results file."""
    py, n = sys.executable, args.name
    reps = ["--repeats", str(args.repeats)]
    ws = ["--world-size", str(args.world_size)]
    parts: dict[str, list[str]] = {}
    for mix, mib in (("uniform", args.mib), ("lognormal", args.mib), ("small", args.small_mib)):
        out = f"{n}_{mix}"
        parts[out] = [py, f"{HERE}/save_load.py", "--mix", mix, "--mib", str(mib), *ws, *reps]
        parts[out] += ["--name", out, "--dir", os.path.join(args.dir, mix)]
    parts[f"{n}_reshard"] = [py, f"{HERE}/suite.py", "--sections", "load", "--world-sizes", str(args.world_size)]
    parts[f"{n}_reshard"] += ["--size-mib", str(args.mib), *reps, "--format3", "--plots-dir", "none"]
    parts[f"{n}_reshard"] += ["--name", f"{n}_reshard", "--dir", os.path.join(args.dir, "reshard")]
    parts[f"{n}_collectives"] = [py, f"{HERE}/collectives.py", "--world-size", str(args.world_size)]
    parts[f"{n}_collectives"] += ["--size-mib", "1", *reps, "--dir", os.path.join(args.dir, "collectives")]
    parts[f"{n}_collectives"] += ["--out", os.path.join(args.dir, "collectives_out")]
    return parts


def run(args: argparse.Namespace) -> dict[str, float]:
    """Run every part; seconds each took. The collectives benchmark names its own file: it is moved."""
    took = {}
    for name, cmd in commands(args).items():
        print(f"[scorecard] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        took[name] = round(time.perf_counter() - t0, 1)
        if name.endswith("_collectives"):
            os.replace(os.path.join(args.dir, "collectives_out", "collectives.json"), _path(name))
    return took


def _path(name: str) -> str:
    return os.path.join(common.RESULTS_DIR, f"{name}.json")


def _load(name: str) -> dict[str, Any]:
    with open(_path(name)) as f:
        result: dict[str, Any] = json.load(f)
    return result


def _spread(s: dict[str, Any]) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def _samples(stats: dict[str, Any] | None) -> list[float]:
    """The per-repetition values of a statistic of the results (none in older results)."""
    return [float(x) for x in (stats or {}).get("samples", [])]


def _mix_rows(name: str, mix: str) -> list[dict[str, Any]]:
    d = _load(f"{name}_{mix}")
    t, cfg = d["targets"], d["config"]
    what = f"{mix}: {cfg['tensors']} tensors, {cfg['state_bytes'] / 2**20:.0f} MiB, {cfg['world_size']} ranks"
    aa = t["aa_control"]
    ratios = {ph: d.get("phases", {}).get(ph, {}).get("paired_ratios_of_gbps", {}) for ph in ("save", "load")}
    rows = [
        (
            "save x per-rank safetensors save_file+fsync",
            t["save_vs_safetensors_at_least_0.9"]["ratio"],
            aa["save"],
            ratios["save"].get("shardckpt/safetensors"),
        ),
        (
            "save x parallel dd conv=fdatasync",
            t["save_vs_dd_x4_at_least_0.9"]["ratio"],
            aa["save"],
            ratios["save"].get("shardckpt/dd_x4"),
        ),
        (
            "cold load x per-rank safetensors load_file",
            t["load_vs_safetensors_at_least_0.9"]["ratio"],
            aa["load"],
            ratios["load"].get("shardckpt/safetensors"),
        ),
    ]
    return [
        {
            "metric": m,
            "case": what,
            "value": v,
            "target": TARGET,
            "met": v >= TARGET,
            "aa": _spread(a),
            "samples": _samples(each),
            "aa_samples": _samples(a),
        }
        for m, v, a, each in rows
    ]


def _reshard_rows(name: str) -> list[dict[str, Any]]:
    d = _load(f"{name}_reshard")["sections"]["load"]
    by = d["by_load_world"]
    world = next(w for w, v in by.items() if v["resharded"] and int(w) == int(d["save_world"]) - 1)
    sec = by[world]
    ratios, systems = sec["paired_ratios_of_gbps"], sec["systems"]
    case = f"{d['save_world']} -> {world} ranks, {d['state_bytes'] / 2**20:.0f} MiB"
    aa = _spread(ratios["shardckpt_AA/shardckpt"])
    rows = [
        {"metric": "cold resharded load x DCP", "case": case, "value": ratios["shardckpt/dcp"]["median"]},
        {"metric": "  the same, dd's cold read x DCP (the disk's limit)", "case": case},
        {"metric": "bytes read / needed, format 1", "case": case},
        {"metric": "bytes read / needed, format 3", "case": case},
    ]
    rows[0].update(target=RESHARD_TARGET, met=rows[0]["value"] >= RESHARD_TARGET, aa=aa)
    rows[0].update(samples=_samples(ratios["shardckpt/dcp"]), aa_samples=_samples(ratios["shardckpt_AA/shardckpt"]))
    rows[1].update(value=ratios["dd/dcp"]["median"], target=None, met=None, aa="", samples=_samples(ratios["dd/dcp"]))
    for row, system in ((rows[2], "shardckpt"), (rows[3], "shardckpt_v3")):
        v = systems[system]["read_over_needed"]["median"]
        worst = systems[system]["read_over_needed_worst_rank"]
        row.update(value=v, target=BYTES_TARGET, met=v <= BYTES_TARGET, aa=f"worst rank {worst:.3f}")
    dcp = systems["dcp"]["read_over_needed"]["median"]
    rows.append({"metric": "bytes read / needed, DCP", "case": case, "value": dcp, "target": None, "met": None})
    return rows


def _collective_rows(name: str) -> list[dict[str, Any]]:
    d = _load(f"{name}_collectives")
    rows = []
    for op in ("shardckpt.save", "shardckpt.save_new_layout", "shardckpt.load"):
        o = d["ops"].get(op)
        if o is None:
            continue
        trips = sum(o["counts_rank0"].values())
        ms = o["seconds"]["median"] * 1e3
        rows.append(
            {
                "metric": f"collective round trips of {op.removeprefix('shardckpt.')} (1 MiB)",
                "case": f"{d['world_size']} ranks, {ms:.0f} ms",
                "value": trips,
                "target": ROUND_TRIPS_TARGET,
                "met": trips <= ROUND_TRIPS_TARGET,
            }
        )
    return rows


def table(name: str) -> tuple[str, list[dict[str, Any]]]:
    rows = []
    for mix in ("uniform", "lognormal", "small"):
        rows += _mix_rows(name, mix)
    rows += _reshard_rows(name) + _collective_rows(name)
    lines = ["| metric | case | measured | target | met | A/A (median, min-max) |", "|---|---|---|---|---|---|"]
    for r in rows:
        at_most = "bytes" in r["metric"] or "round trips" in r["metric"]
        target = "" if r.get("target") is None else f"{'<=' if at_most else '>='} {r['target']}"
        met = {True: "yes", False: "**no**", None: ""}[r.get("met")]
        value = r["value"] if isinstance(r["value"], int) else f"{r['value']:.3f}"
        lines.append(f"| {r['metric']} | {r['case']} | {value} | {target} | {met} | {r.get('aa', '')} |")
    return "\n".join(lines), rows


def _plot(args: argparse.Namespace, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows as a PNG (:func:`plots.write_scorecard_plot`), where ``--plots-dir`` says."""
    where = args.plots_dir
    if where == "none":
        return {"skipped": "--plots-dir none"}
    if where is None:
        where = tempfile.mkdtemp(prefix="scorecard_plots_") if args.quick else os.path.join(HERE, "..", "docs", "img")
    title = f"issue #18's targets, one run ({args.name}): paired ratios per repetition"
    return plots.write_scorecard_plot(rows, os.path.join(os.path.normpath(where), f"{args.name}.png"), title=title)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp/scorecard", help="scratch folder of the benchmarks")
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--mib", type=int, default=1024, help="state size of the uniform and lognormal mixes")
    ap.add_argument("--small-mib", type=int, default=256, help="state size of the small-tensor mix")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="64/16 MiB, 2 repetitions: checks the command, not the disk")
    ap.add_argument("--table-only", action="store_true", help="print the table from the results of an earlier run")
    ap.add_argument("--name", default=None, help="results files' prefix (default scorecard; --quick: scorecard_quick)")
    ap.add_argument(
        "--plots-dir",
        default=None,
        help="where <name>.png goes (default docs/img; --quick: a temp folder, printed); none: no plot",
    )
    args = ap.parse_args()
    if args.quick:
        args.mib, args.small_mib, args.repeats = 64, 16, 2
    args.name = args.name or ("scorecard_quick" if args.quick else "scorecard")
    took = {} if args.table_only else run(args)
    text, rows = table(args.name)
    print(text)
    plot = _plot(args, rows)
    print(f"[scorecard] plot: {plot.get('written') or plot.get('skipped')}")
    doc = {
        "benchmark": "scorecard",
        "command": "python " + " ".join(sys.argv),
        "machine": common.machine_facts(args.dir),
        "parts": {k: " ".join(v[1:]) for k, v in commands(args).items()},
        "seconds": took,
    }
    if args.table_only and os.path.exists(_path(args.name)):
        doc = {k: v for k, v in _load(args.name).items() if k in doc}  # the run's own record, not this command's
    doc.update(rows=rows, table=text, plot=plot)
    with open(_path(args.name), "w") as f:
        json.dump(doc, f, indent=1)
    print(f"[scorecard] wrote {_path(args.name)}")


if __name__ == "__main__":
    main()
