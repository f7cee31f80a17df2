"""Format 3 over a whole save/load cycle at N simulated ranks, on the real code paths:
what a loading rank reads and plans, what the coordinator plans on a first save and on a
repeated save with the same layout, and DCP's figures beside them where DCP fits.

Called by ``planning_scale.py --projection`` per rank count. Nothing here writes files.

- :func:`load_side`: every loading rank parses the manifest (``parse_any_manifest``, the
  dispatch a load runs) and plans from the rules what ``RulePlanner``/``RuleChunks`` do per
  box: ``Tensor.chunks_for_box`` for each box it loads, ``FileTable.locate`` for each chunk
  found (which rank's index record and which page verify it; none for the file whose index
  the manifest copies, ``inline_index``, format.md 12.8). Metadata bytes: the manifest,
  the distinct pages and the distinct ranks' index records that rank fetches. Sampled ranks
  (first, middle, last), for a rank loading its own FSDP shard and for an N -> N-1 reshard.
- :func:`dcp_load_side`: DCP's ``.metadata`` of the same chunks (one ``ChunkStorageMetadata``
  and one ``_StorageInfo`` per chunk), pickled; every DCP rank unpickles all of it.
- :func:`first_save_plan`: the real ``SavePlanner.create_global_plan`` (ours) and DCP's
  ``DefaultSavePlanner`` over every rank's local plan (built by planning_scale's planners).
- :func:`repeat_save_plan`: a save with the layout of the last one (engine/protocol.py):
  each rank's ``layout_fingerprint`` of its local plan, then on the coordinator
  ``PlanCache.fits`` over every rank's offer, ``adopt_global_plan`` (``check_values`` of
  every rank's values, the keys counted when the plan was made), and the fresh
  storage_data per rank.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import pickle
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from shardckpt.format import manifest_v3_parser


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """(last result, median wall seconds of ``repeats`` calls); the collector paused."""
    out, times = None, []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return out, statistics.median(times)


def fsdp_box(shape: tuple[int, ...], rank: int, world: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(offsets, sizes) of ``rank``'s Shard(0) piece (torch.chunk rows), None when empty."""
    if not shape:
        return (), ()
    per = -(-shape[0] // world)
    rows = min(per, shape[0] - rank * per)
    if rows <= 0:
        return None
    return (rank * per, *[0] * (len(shape) - 1)), (rows, *shape[1:])


def plan_rank(m: Any, boxes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> tuple[set[int], set[int], int]:
    """What a loading rank plans for ``boxes`` (key, offsets, sizes): the chunks each box
    overlaps, from the rule, and each chunk's file located. Returns (ranks whose index
    records it reads, pages, chunks)."""
    ranks: set[int] = set()
    pages: set[int] = set()
    chunks = 0
    table = m.file_table
    inline = m.inline_index.file if m.inline_index is not None else -1
    for key, offsets, sizes in boxes:
        for c in m.tensors[key].chunks_for_box(offsets, sizes):
            chunks += 1
            if c.file == inline:  # the manifest's copy of its index: no page, no record (12.8)
                continue
            ref = table.locate(c.file)
            ranks.add(ref.rank)
            pages.add(ref.page)
    return ranks, pages, chunks


def load_side(
    raw: bytes,
    page_sizes: Sequence[int],
    index_sizes: dict[int, int],
    shapes: dict[str, tuple[int, ...]],
    world: int,
    repeats: int,
) -> dict[str, Any]:
    """Per sampled rank, own shard and N -> N-1: seconds (parse + plan, median of
    ``repeats``) and metadata bytes read; the medians over the sampled ranks."""
    out: dict[str, Any] = {}
    _, parse_s = median_time(lambda: manifest_v3_parser.parse_any_manifest(raw, source="simulated"), repeats)
    m = manifest_v3_parser.parse_any_manifest(raw, source="simulated")
    for case, target in (("own", world), ("reshard", max(1, world - 1))):
        secs, read, read_sharded, peers, chunks = [], [], [], [], []
        for r in sorted({0, target // 2, target - 1}):
            boxes = [(k, *b) for k, s in shapes.items() if (b := fsdp_box(s, r, target)) is not None]
            (ranks, pages, n), plan_s = median_time(lambda boxes=boxes: plan_rank(m, boxes), repeats)
            sharded = plan_rank(m, [b for b in boxes if b[1]])[0]  # without the replicated 0-d tensors
            base = len(raw) + sum(page_sizes[p] for p in pages)
            secs.append(parse_s + plan_s)
            read.append(base + sum(index_sizes[x] for x in ranks))
            read_sharded.append(len(raw) + sum(index_sizes[x] for x in sharded))
            peers.append(len(ranks))
            chunks.append(n)
        out[case] = {
            "parse_plan_s": statistics.median(secs),
            "parse_s": parse_s,
            "metadata_bytes": statistics.median(read),
            "metadata_bytes_sharded_only": statistics.median(read_sharded),
            "index_records_read": statistics.median(peers),
            "chunks_planned": statistics.median(chunks),
            "sampled_ranks": len(secs),
        }
    return out


def dcp_load_side(tensors: Any, dtype_of: Callable[[str], Any], repeats: int, max_chunks: int) -> dict[str, Any] | None:
    """DCP's pickled ``.metadata`` of ``tensors`` (planning_scale's synthetic iterator) and
    the seconds to unpickle it (median); None when over ``max_chunks`` chunks (memory)."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    sd: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    count = 0
    for key, _, shape, chunks in tensors:
        count += len(chunks)
        if count > max_chunks:
            return None
        metas = []
        for c in chunks:
            metas.append(ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)))
            storage[MetadataIndex(key, torch.Size(c.offsets))] = _StorageInfo(c.file, c.byte_offset, c.byte_length)
        sd[key] = TensorStorageMetadata(TensorProperties(dtype=dtype_of(key)), torch.Size(shape), metas)
    blob = pickle.dumps(Metadata(sd, storage_data=storage), protocol=pickle.HIGHEST_PROTOCOL)
    del sd, storage
    _, unpickle_s = median_time(lambda: pickle.loads(blob), repeats)
    return {"metadata_bytes": len(blob), "unpickle_s": unpickle_s, "chunks": count}


def first_save_plan(ours: tuple[Any, list[Any]], dcp: tuple[Any, list[Any]]) -> dict[str, float]:
    """Seconds of the coordinator's global plan from every rank's local plan: ours
    (``create_global_plan``: values, tensors agree, balanced dedup, DCP's metadata, our
    tiling check) and DCP's (``DefaultSavePlanner``). Once each (minutes at scale)."""
    (planner, plans), (dcp_planner, dcp_plans) = ours, dcp
    _, t_ours = median_time(lambda: planner.create_global_plan(plans), 1)
    _, t_dcp = median_time(lambda: dcp_planner.create_global_plan(dcp_plans), 1)
    return {"global_plan_ours_s": t_ours, "global_plan_dcp_s": t_dcp}


def rules_first_save(
    local0: Any,
    items_of: Callable[[int], list[Any]],
    single_bytes_of: Callable[[int], int],
    world: int,
    repeats: int,
    full_plans: list[Any] | None,
) -> dict[str, float]:
    """A first save planned from rules (engine/rule_plan.py) at ``world`` simulated FSDP
    ranks: per rank, ``summarize`` of its local plan (``local0``'s values plus
    ``items_of(rank)``, empty boxes included, as DCP plans DTensors) and ``derive_plan``
    from the answer (the winners' JSON, decoded); on the coordinator, ``plan_from_rules`` over
    every rank's summary and the answer's encoding.
    Every rank's summary is the same table digest with its own coordinate and
    ``single_bytes_of(rank)``; checked against a real ``summarize`` at the first, middle and
    last rank. ``full_plans``: the full path's plans where it ran (no empty boxes in them):
    the sampled ranks must keep the same items. Wall and CPU seconds, medians of ``repeats``."""
    from torch.distributed.checkpoint.planner import WriteItemType

    from shardckpt.engine import rule_plan

    values = [it for it in local0.items if it.type == WriteItemType.BYTE_IO]

    def rank_plan(rank: int) -> tuple[Any, dict[str, Any]]:
        items = items_of(rank)
        layout = rule_plan.TensorLayout("fsdp", (world,), (0,), (rank,))
        layouts = {it.index.fqn: None if it.tensor_data.size == () else layout for it in items}
        return dataclasses.replace(local0, items=values + items), layouts

    plan0, layouts0 = rank_plan(0)
    (summary0, table0), per_rank_s = median_time(lambda: rule_plan.summarize(plan0, layouts0), repeats)
    assert isinstance(summary0, rule_plan.RuleSummary), summary0
    _, per_rank_cpu_s = median_cpu(lambda: rule_plan.summarize(plan0, layouts0), repeats)
    summaries = [
        dataclasses.replace(summary0, coordinates=((r,),), single_bytes=single_bytes_of(r)) if r else summary0
        for r in range(world)
    ]
    for r in sorted({0, world // 2, world - 1}):
        plan_r, layouts_r = rank_plan(r)
        assert rule_plan.summarize(plan_r, layouts_r)[0] == summaries[r], f"simulated summary of rank {r}"

    def coordinator() -> Any:
        ruled = rule_plan.plan_from_rules(summaries, table0, small_to=0)
        assert ruled is not None
        return ruled, rule_plan.encode_winners(ruled.winners)  # the answer every rank gets

    (ruled, answer), coordinator_s = median_time(coordinator, repeats)
    _, coordinator_cpu_s = median_cpu(coordinator, repeats)
    last = rank_plan(world - 1)[0]

    def derive() -> Any:
        return rule_plan.derive_plan(last, rule_plan.decode_winners(answer), world - 1, {})

    _, derive_s = median_time(derive, repeats)
    if full_plans is not None:
        for r in sorted({0, world // 2, world - 1}):
            mine = rule_plan.derive_plan(rank_plan(r)[0], ruled.winners, r, {})
            want = list(full_plans[r].items)
            got = [it for it in mine.items if it.tensor_data is None or math.prod(it.tensor_data.chunk.sizes) > 0]
            assert got == want, f"rank {r}: the plan from rules differs from the full path's"
    return {
        "rules_coordinator_s": coordinator_s,
        "rules_coordinator_cpu_s": coordinator_cpu_s,
        "rules_summary_per_rank_s": per_rank_s,
        "rules_summary_per_rank_cpu_s": per_rank_cpu_s,
        "rules_derive_per_rank_s": derive_s,
        "rules_shared_items": float(len(ruled.winners)),
        "rules_answer_bytes": float(len(answer)),
    }


def median_cpu(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """(last result, median CPU seconds of this process over ``repeats`` calls)."""
    out, times = None, []
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return out, statistics.median(times)


def repeat_save_plan(planner: Any, local: Any, world: int, repeats: int) -> dict[str, float]:
    """Seconds of a repeated save's planning (engine/protocol.py with a cached plan), with
    rank 0's real local plan standing for every rank's (the same items per rank; the work
    per rank does not depend on the offsets): per rank ``layout_fingerprint``; coordinator
    ``PlanCache.fits`` over ``world`` offers, ``adopt_global_plan`` with the plan's key count
    (``manifest_key_bytes``, counted once when the plan was made, not timed here)."""
    from shardckpt.engine import plan_checks, protocol
    from shardckpt.engine import planner as planner_mod

    fingerprint, per_rank_s = median_time(lambda: planner_mod.layout_fingerprint(local), repeats)
    summary = plan_checks.value_summary(local)
    offers = [protocol._Offer(fingerprint, "plan", {"rank": r}, summary, None) for r in range(world)]
    cache = protocol.PlanCache(
        fingerprint=fingerprint,
        plan_id="plan",
        central=local,
        fingerprints=[fingerprint] * world,
        global_plans=[local] * world,
        key_bytes=plan_checks.manifest_key_bytes([local]),
        global_id="plan",
    )

    def coordinator() -> None:
        assert cache.fits(offers)
        planner.adopt_global_plan([o.values for o in offers], cache.key_bytes)
        [dataclasses.replace(p, storage_data=o.storage_data) for p, o in zip(cache.global_plans, offers, strict=True)]

    _, coordinator_s = median_time(coordinator, repeats)
    return {"fingerprint_per_rank_s": per_rank_s, "coordinator_s": coordinator_s}


# ------------------------------------------------------------------ the plot

PANELS = (  # (title, y label, scale, [(key group, key, label)], targets: {model: value})
    (
        "manifest (every rank reads it)",
        "MiB",
        2**-20,
        [("bytes", "manifest_v3_written", "ours, format 3"), ("bytes", "dcp_metadata_pickle", "DCP .metadata")],
        {"7b": 4, "70b": 8},
    ),
    (
        "metadata one loading rank reads",
        "MiB",
        2**-20,
        [
            ("bytes", "load_own_metadata", "ours, own shard"),
            ("bytes", "load_reshard_metadata", "ours, N -> N-1"),
            ("bytes", "load_own_metadata_sharded_only", "ours, own shard, sharded tensors only"),
            ("bytes", "dcp_metadata_pickle", "DCP (all of .metadata)"),
        ],
        {},
    ),
    (
        "parse + plan per loading rank",
        "seconds",
        1.0,
        [
            ("seconds", "load_own_parse_plan", "ours, own shard"),
            ("seconds", "load_reshard_parse_plan", "ours, N -> N-1"),
            ("seconds", "dcp_unpickle", "DCP: unpickle .metadata alone"),
        ],
        {"7b": 0.5, "70b": 0.5},
    ),
    (
        "coordinator planning per save",
        "seconds",
        1.0,
        [
            ("seconds", "first_save_plan_ours", "ours, first save (global plan + assemble_v3)"),
            ("seconds", "first_save_plan_rules", "ours, first save from rules (+ assemble_v3)"),
            ("seconds", "rules_coordinator_s", "ours, first save's plan from rules alone"),
            ("seconds", "assemble_v3", "ours, assemble_v3 alone"),
            ("seconds", "global_plan_dcp_s", "DCP, global plan"),
            ("seconds", "coordinator_s", "ours, repeated save"),
        ],
        {"7b": 2.0, "70b": 2.0},
    ),
)


def write_plot(runs: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """Ours against DCP per target metric over the simulated ranks, one line style per
    run (model); dotted lines: the issue's targets. Log-log."""
    import plots

    plt = plots._pyplot()
    if plt is None:
        return {"skipped": plots.MATPLOTLIB_MISSING}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    styles = ["-o", "--s", ":^"]
    for ax, (title, unit, scale, lines, targets) in zip(axes.flat, PANELS, strict=True):
        shown: dict[float, list[str]] = {}
        for run, style in zip(runs, styles, strict=False):
            model = run["config"]["model"]
            for i, (group, key, label) in enumerate(lines):
                pts = [(r["ranks"], r[group][key] * scale) for r in run["rows"] if key in r[group]]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, style, color=f"C{i}", label=f"{model}: {label}")
            if model in targets:
                shown.setdefault(targets[model], []).append(model)
        for value, models in shown.items():
            ax.axhline(value, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"target ({', '.join(models)})", (1, value), xycoords=("axes fraction", "data"), ha="right")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("simulated ranks")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"written": [path]}


def merge_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per model, its rows from every given run of that model, by rank count."""
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        model = run["config"]["model"]
        if model in out:
            out[model]["rows"] = sorted([*out[model]["rows"], *run["rows"]], key=lambda r: r["ranks"])
        else:
            out[model] = dict(run, rows=list(run["rows"]))
    return list(out.values())


if __name__ == "__main__":  # python benchmarks/v3_cycle.py out.png results.json... (runs of one model merged)
    import json
    import sys

    print(write_plot(merge_runs([json.load(open(p)) for p in sys.argv[2:]]), sys.argv[1]))
