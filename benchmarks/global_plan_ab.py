"""The coordinator's global plan of a first save, before and after a change of the planner,
over the same simulated local plans (planning_scale.py's FSDP layout, whole model, AdamW).

    git show ba7b84e:shardckpt/engine/planner.py > /tmp/planner_before.py
    OMP_NUM_THREADS=1 python benchmarks/global_plan_ab.py /tmp/planner_before.py --model 7b --ranks 256 1024

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
    spec = importlib.util.spec_from_file_location("planner_before", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules["planner_before"] = module  # dataclasses look their module up
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", help="path of the planner module to compare with")
    ap.add_argument("--model", choices=sorted(ps.MODELS), default="7b")
    ap.add_argument("--ranks", nargs="+", type=int, default=[256])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    old = load_module(args.before)
    for ranks in args.ranks:
        print(measure(old, args.model, ranks, args.repeats), flush=True)
        gc.collect()


if __name__ == "__main__":
    main()
