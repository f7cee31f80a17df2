"""The coordinator's global plan of a first save, before and after a change of the planner,
over the same simulated local plans (planning_scale.py's FSDP layout, whole model, AdamW);
with ``--assemble``, ``write_v3.assemble`` before and after a change of ``rule_table.py``
over the same simulated RankResults (the two manifests' tensors must be equal).

    git show ba7b84e:shardckpt/engine/planner.py > /tmp/planner_before.py
    OMP_NUM_THREADS=1 python benchmarks/global_plan_ab.py /tmp/planner_before.py --model 7b --ranks 256 1024
    git show e9b1938:shardckpt/engine/rule_table.py > /tmp/rule_table_before.py
    OMP_NUM_THREADS=1 python benchmarks/global_plan_ab.py /tmp/rule_table_before.py --assemble --ranks 4096

"before": the given planner module's functions in the order its ``_create_global_plan``
ran them (values, tensors agree, balanced dedup, DCP's metadata with index hints
rewritten, tiling); "after": this checkout's ``SavePlanner.create_global_plan``. CPU seconds
of this process (on a shared machine the wall time is mostly waiting for a core; one torch
thread, as idle OpenMP threads spin there), median of ``--repeats``, the collector paused
as in a save (engine/collector.py). Prints one line per rank count.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import os
import statistics
import sys
import time
from collections import ChainMap
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import planning_scale as ps


def load_module(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("module_before", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules["module_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def before_plan(old: Any, plans: list[Any]) -> None:
    """The old ``_create_global_plan``'s steps, with its own functions."""
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan

    old.check_values(plans)
    old._check_tensors_agree(plans)
    stripped = [dataclasses.replace(p, planner_data=p.planner_data.mappings) for p in plans]
    global_plan, metadata = create_default_global_save_plan(old.balance_replicated(stripped))
    merged = dict(ChainMap(*[p.planner_data for p in global_plan]))
    old._check_tiling(dataclasses.replace(metadata, planner_data=merged))


def cpu_median(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def measure(old: Any, model: str, ranks: int, repeats: int) -> str:
    """One line: both global plans' CPU seconds over every rank's local plan at ``ranks``."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorProperties

    params = ps.model_params(model, ps.MODELS[model][3])
    ours_cls, _ = ps.planner_classes()
    props = TensorProperties(dtype=torch.float32)
    items = [ps.rank_tensor_items(params, r, ranks, props) for r in range(ranks)]
    plans, planner = ps.local_plans(ours_cls, items, ps.json_values(params), ps.tensor_paths(params))
    del items
    gc.collect()
    gc.disable()
    try:
        t_before = cpu_median(lambda: before_plan(old, plans), repeats)
        t_after = cpu_median(lambda: planner.create_global_plan(plans), repeats)
    finally:
        gc.enable()
    n = sum(len(p.items) for p in plans)
    rss = common.peak_rss_bytes() / 2**30
    return (
        f"{model} {ranks} ranks, {n} items: global plan CPU s before {t_before:.2f}, after {t_after:.2f} "
        f"({t_before / t_after:.1f}x); peak RSS {rss:.2f} GiB"
    )


def measure_assemble(old: Any, model: str, ranks: int, repeats: int) -> str:
    """One line: ``write_v3.assemble``'s CPU seconds with the old and the new compress_table."""
    import rules_projection

    from shardckpt.engine import rule_table, write_v3

    params = ps.model_params(model, ps.MODELS[model][3])
    keys = [
        (k, p.shape)
        for p in params
        for k in (f"model.{p.fqn}", *(f"optim.state.{p.fqn}.{m}" for m in ("exp_avg", "exp_avg_sq")))
    ]
    steps = [f"optim.state.{p.fqn}.step" for p in params]
    tensors, files = rules_projection.synthetic_tensors(keys, steps, ranks, ps.IO_THREADS, "0123456789ab")
    results = rules_projection.rank_results(tensors, files, ranks, index_sizes=dict.fromkeys(range(ranks), 1000))
    meta = {k: ("F32", shape) for k, shape in sorted([*keys, *((s, ()) for s in steps)])}

    def assemble() -> Any:
        return write_v3.assemble(meta, {}, {}, results, save_id="0123456789ab", block_bytes=1 << 20, metadata={})

    seconds, built = {}, {}
    gc.collect()
    gc.disable()
    try:
        for name, compress in (("before", old.compress_table), ("after", rule_table.compress_table)):
            write_v3.compress_table = compress  # what assemble calls, by its module's name
            seconds[name] = cpu_median(assemble, repeats)
            built[name] = assemble()
    finally:
        write_v3.compress_table = rule_table.compress_table
        gc.enable()
    assert built["before"].manifest.tensors == built["after"].manifest.tensors
    rss = common.peak_rss_bytes() / 2**30
    return (
        f"{model} {ranks} ranks: assemble_v3 CPU s before {seconds['before']:.2f}, after {seconds['after']:.2f} "
        f"(the same manifest); peak RSS {rss:.2f} GiB"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", help="path of the planner (or with --assemble, rule_table) module to compare with")
    ap.add_argument("--assemble", action="store_true", help="compare write_v3.assemble, not the global plan")
    ap.add_argument("--model", choices=sorted(ps.MODELS), default="7b")
    ap.add_argument("--ranks", nargs="+", type=int, default=[256])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    old = load_module(args.before)
    for ranks in args.ranks:
        run = measure_assemble if args.assemble else measure
        print(run(old, args.model, ranks, args.repeats), flush=True)
        gc.collect()


if __name__ == "__main__":
    main()
