"""The coordinator's plan from rules (engine/rule_plan.py) when every rank also holds tensors
and a value of its own, as ``TrainState`` saves its RNG streams under ``per_rank.rank{r}``:
the ranks' rows of plain tensors and values differ, so the coordinator reads them all
(engine/rule_rows.py). planning_scale.py's simulated FSDP state (the 7B with AdamW by
default), rank 0's real summary standing for every rank's with its own coordinate, bytes and
rows; 5 uint8 tensors of 5,056 bytes and one value per rank.

    python benchmarks/rules_per_rank.py --model 7b --ranks 4096

Prints wall and CPU seconds of ``plan_from_rules`` + ``encode_winners`` (median of --repeats).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time

import planning_scale as ps


def main() -> None:
    import torch
    from torch.distributed.checkpoint.metadata import TensorProperties

    from shardckpt.engine import rule_plan

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(ps.MODELS), default="7b")
    ap.add_argument("--ranks", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    world, params = args.ranks, ps.model_params(args.model, ps.MODELS[args.model][3])
    planner = functools.partial(ps.planner_classes()[0], small_replicated_to=0)
    first = ps.rank_tensor_items(params, 0, world, TensorProperties(dtype=torch.float32), empty=True)
    (plan0,), _ = ps.local_plans(planner, [first], ps.json_values(params), ps.tensor_paths(params))
    layout = rule_plan.TensorLayout("fsdp", (world,), (0,), (0,))
    summary0, table0 = rule_plan.summarize(
        plan0, {it.index.fqn: None if it.tensor_data.size == () else layout for it in first}
    )
    assert isinstance(summary0, rule_plan.RuleSummary)

    def own_rows(r: int) -> bytes:
        path = ["train", "per_rank", f"rank{r}"]
        rows = [[f"train.per_rank.rank{r}.rng.{k}", "torch.uint8", [5056], 1, [*path, "rng", k]] for k in "abcde"]
        rows.append([f"train.per_rank.rank{r}.data", None, None, 0, [*path, "data"]])
        return b"\n".join([summary0.replicated, *(json.dumps(x, separators=(",", ":")).encode() for x in rows)])

    summaries = [
        dataclasses.replace(
            summary0,
            coordinates=((r,),),
            single_bytes=ps.rules_single_bytes(params, r, world),
            replicated=own_rows(r),
            replicated_digest=str(r),
        )
        for r in range(world)
    ]
    walls, cpus = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        ruled = rule_plan.plan_from_rules(summaries, table0, small_to=0)
        assert ruled is not None
        answer = rule_plan.encode_winners(ruled.winners)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    print(
        f"{args.model}, {world} ranks, per-rank keys: {statistics.median(walls):.3f} s wall, "
        f"{statistics.median(cpus):.3f} s CPU; {len(ruled.winners)} shared items, answer {len(answer)} bytes, "
        f"{len(summaries[1].replicated)} bytes of rows per rank"
    )


if __name__ == "__main__":
    main()
