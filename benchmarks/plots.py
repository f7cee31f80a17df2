"""PNG plots of the suite's, planning_scale's and incremental's results (matplotlib, optional: the
``bench`` extra). Every function returns the paths it wrote, or a ``skipped`` reason.

Bars are medians over repetitions; whiskers span the min-max of the repetitions.
"""

from __future__ import annotations

import os
from typing import Any

MATPLOTLIB_MISSING = "matplotlib is not installed (pip install -e '.[bench]'): plots skipped"


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _med(s: dict[str, Any]) -> float:
    return float(s["median"]) if s.get("n") else 0.0


def _err(s: dict[str, Any]) -> tuple[float, float]:
    return (_med(s) - s["min"], s["max"] - _med(s)) if s.get("n") else (0.0, 0.0)


def _bars(ax: Any, systems: dict[str, Any], title: str, ref: str | None = "dd") -> None:
    """Horizontal GB/s bars, min-max whiskers, the ``ref`` system's median as a line."""
    names = list(systems)
    meds = [_med(systems[n]["gbps"]) for n in names]
    errs = list(zip(*[_err(systems[n]["gbps"]) for n in names], strict=True)) or [[], []]
    colors = [
        "tab:blue" if n.startswith("shardckpt") else "tab:gray" if n.startswith(("dd", "raw", "hash")) else "tab:orange"
        for n in names
    ]
    ax.barh(names, meds, xerr=errs, color=colors, capsize=3)
    if ref in systems:
        ax.axvline(_med(systems[ref]["gbps"]), color="k", ls="--", lw=1, label=f"{ref} median")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("GB/s (1e9 B/s), median, min-max")
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis()


def _save_plot(plt: Any, sec: dict[str, Any], path: str) -> None:
    parts = [(k, sec[k]) for k in ("save", "checksum") if k in sec]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
    for ax, (key, p) in zip(axes[0], parts, strict=True):
        mib = p["state_bytes"] / 2**20
        _bars(ax, p["systems"], f"{key}: {p['world']} ranks, {mib:.0f} MiB state")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_plot(plt: Any, load: dict[str, Any], path: str) -> None:
    worlds = list(load["by_load_world"])
    systems = ["shardckpt", "shardckpt_AA", "shardckpt_noverify", "dcp", "dd"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(systems)
    for i, name in enumerate(systems):
        xs, meds, errs, ratios = [], [], [], []
        for j, w in enumerate(worlds):
            s = load["by_load_world"][w]["systems"].get(name)
            if s is None:
                continue
            xs.append(j + i * width)
            meds.append(_med(s["gbps"]))
            errs.append(_err(s["gbps"]))
            ratios.append(_med(s["read_over_needed"]) if "read_over_needed" in s else None)
        ax1.bar(xs, meds, width, yerr=list(zip(*errs, strict=True)) or None, capsize=3, label=name)
        if any(r is not None for r in ratios):
            ax2.bar(xs, [r or 0 for r in ratios], width, label=name)
    labels = [f"{load['save_world']} -> {w}" for w in worlds]
    for ax in (ax1, ax2):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(worlds))], labels)
        ax.set_xlabel("ranks saved -> ranks loading")
        ax.legend(fontsize=8)
    ax1.set_ylabel("cold load GB/s, median, min-max")
    ax2.axhline(1.0, color="k", ls="--", lw=1)
    ax2.set_ylabel("bytes read / bytes needed (all ranks)")
    fig.suptitle(f"cold load, {load['state_bytes'] / 2**20:.0f} MiB state", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scaling_plot(plt: Any, cells: list[dict[str, Any]], path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = sorted({c["mib"] for c in cells})
    for ax, phase, systems in ((axes[0], "save", ["shardckpt", "dcp", "dd"]), (axes[1], "load", ["shardckpt", "dcp"])):
        for mib in sizes:
            row = sorted((c for c in cells if c["mib"] == mib), key=lambda c: c["world"])
            for name, style in zip(systems, ("-o", "--s", ":^"), strict=False):  # more styles than systems
                ys = [_med(c[phase]["systems"][name]["gbps"]) for c in row]
                ax.plot([c["world"] for c in row], ys, style, label=f"{name} {mib} MiB")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks (world size)")
        ax.set_ylabel(f"{phase} GB/s (aggregate), median")
        ax.set_title(f"{phase} scaling", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_suite_plots(results: dict[str, Any], plots_dir: str, name: str) -> dict[str, Any]:
    """``{name}_save.png``, ``{name}_load.png``, ``{name}_scaling.png`` for the sections present."""
    if plots_dir == "none":
        return {"skipped": "--plots-dir none"}
    plt = _pyplot()
    if plt is None:
        return {"skipped": MATPLOTLIB_MISSING}
    os.makedirs(plots_dir, exist_ok=True)
    sec, written = results["sections"], []
    jobs = [
        ("save", "save" in sec or "checksum" in sec, lambda p: _save_plot(plt, sec, p)),
        ("load", "load" in sec, lambda p: _load_plot(plt, sec["load"], p)),
        ("scaling", "scaling" in sec, lambda p: _scaling_plot(plt, sec["scaling"]["cells"], p)),
    ]
    for suffix, present, draw in jobs:
        if present:
            path = os.path.join(plots_dir, f"{name}_{suffix}.png")
            draw(path)
            written.append(path)
    return {"written": written}


def write_planning_plot(results: dict[str, Any], path: str) -> dict[str, Any]:
    """Time per planning phase and manifest/.metadata size against simulated ranks (log-log)."""
    plt = _pyplot()
    if plt is None:
        return {"skipped": MATPLOTLIB_MISSING}
    rows = results["rows"]
    ranks = [r["ranks"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in rows[0]["seconds"]:
        ax1.plot(ranks, [r["seconds"][key] for r in rows], "-o", label=key)
    ax1.set_ylabel("seconds (one process)")
    ax1.set_title("planning cost", fontsize=10)
    for key in rows[0]["bytes"]:
        ax2.plot(ranks, [r["bytes"][key] / 2**20 for r in rows], "-o", label=key)
    ax2.set_ylabel("MiB")
    ax2.set_title("metadata size", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("simulated ranks")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"written": [path]}


def write_incremental_plot(results: dict[str, Any], path: str) -> dict[str, Any]:
    """incremental.py's trace: bytes written (data files + manifest) and save seconds per
    step, incremental (with its ``full_every`` rewrites) against full saves; log bytes axis."""
    plt = _pyplot()
    if plt is None:
        return {"skipped": MATPLOTLIB_MISSING}
    trace = results["trace"]
    layout = results["cases"]["adapter"]["layout"]
    steps = [row["step"] for row in trace["steps"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.4
    for i, (name, color) in enumerate((("full", "tab:orange"), ("incremental", "tab:blue"))):
        xs = [s + (i - 0.5) * width for s in steps]
        rows = [row[name] for row in trace["steps"]]
        ax1.bar(xs, [(r["data_bytes"] + r["manifest_bytes"]) / 2**20 for r in rows], width, color=color, label=name)
        ax2.bar(xs, [r["s"] for r in rows], width, color=color, label=name)
    changed = layout["changed_bytes_per_step"] / 2**20
    ax1.axhline(changed, color="k", ls="--", lw=1, label=f"changed per step ({changed:.1f} MiB)")
    ax1.set_yscale("log")
    ax1.set_ylim(bottom=changed / 10)  # incremental bars visible, not cut at the axis
    ax1.set_ylabel("MiB written (data files + manifest)")
    ax2.set_ylabel("save seconds (max over ranks)")
    for ax in (ax1, ax2):
        ax.set_xticks(steps)
        ax.set_xlabel(f"step (incremental: full_every={trace['full_every']})")
        ax.legend(fontsize=8, loc="center right", framealpha=0.9)
    cfg = results["config"]
    fig.suptitle(
        f"adapter fine-tuning layout: {layout['state_bytes'] / 2**30:.2f} GiB fp32, "
        f"{layout['trainable_fraction']:.1%} trainable + AdamW moments, {cfg['world_size']} ranks",
        fontsize=10,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"written": [path]}


def write_scorecard_plot(rows: list[dict[str, Any]], path: str, *, title: str) -> dict[str, Any]:
    """scorecard.py's rows of one run: each ratio row's per-repetition paired ratios (dots),
    their median (a bar: green where the target is met, red where not), its target (a red
    tick) and the A/A control's min-max in the same benchmark (a grey line under the row),
    on a log axis; beside them the bytes read over the bytes needed and the round trips,
    each against its target."""
    plt = _pyplot()
    if plt is None:
        return {"skipped": MATPLOTLIB_MISSING}
    ratio_rows = [r for r in rows if " x " in r["metric"]]
    bytes_rows = [r for r in rows if r["metric"].startswith("bytes read")]
    trip_rows = [r for r in rows if "round trips" in r["metric"]]
    fig = plt.figure(figsize=(13, 0.42 * len(ratio_rows) + 2.2))
    grid = fig.add_gridspec(2, 2, width_ratios=(3, 1.2))
    ax = fig.add_subplot(grid[:, 0])
    for y, r in enumerate(ratio_rows):
        samples = r.get("samples") or [r["value"]]
        ax.scatter(samples, [y] * len(samples), s=14, color="tab:blue", alpha=0.6, zorder=3)
        met = r.get("met")
        color = "tab:green" if met else "tab:red" if met is False else "k"
        ax.plot([r["value"]] * 2, [y - 0.3, y + 0.3], color=color, lw=2.5, zorder=4)
        if r.get("target") is not None:
            ax.plot([r["target"]] * 2, [y - 0.4, y + 0.4], color="tab:red", lw=1, ls=":", zorder=2)
        aa = r.get("aa_samples") or []
        if aa:
            ax.plot([min(aa), max(aa)], [y + 0.32] * 2, color="0.6", lw=2, solid_capstyle="butt", zorder=1)
    ax.axvline(1.0, color="0.3", lw=0.8, ls="--")
    ax.set_xscale("log")
    low, high = ax.get_xlim()
    ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1, 1.5, 2, 5, 10, 20, 50) if low <= t <= high]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_yticks(range(len(ratio_rows)))
    ax.set_yticklabels([f"{r['metric'].strip()}  [{r['case'].split(',')[0]}]" for r in ratio_rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(
        "shardckpt's speed / the other's (paired per repetition; > 1: shardckpt faster). dots: repetitions; "
        "bar: median; dotted: target; grey: A/A min-max",
        fontsize=8,
    )
    for sub, chosen, label in (
        (fig.add_subplot(grid[0, 1]), bytes_rows, "bytes read / needed"),
        (fig.add_subplot(grid[1, 1]), trip_rows, "round trips"),
    ):
        names = [
            r["metric"].replace("bytes read / needed, ", "").replace("collective round trips of ", "") for r in chosen
        ]
        colors = ["tab:green" if r.get("met") else "tab:red" if r.get("met") is False else "0.6" for r in chosen]
        sub.barh(names, [r["value"] for r in chosen], color=colors)
        targets = {r["target"] for r in chosen if r.get("target") is not None}
        for t in targets:
            sub.axvline(t, color="tab:red", lw=1, ls=":")
        sub.invert_yaxis()
        sub.tick_params(labelsize=8)
        sub.set_title(label + (f", target <= {min(targets):g}" if targets else ""), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"written": [path]}
