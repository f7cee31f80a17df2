"""Planning at scale, simulated in one process: what saving costs the coordinator (and
every rank) before and after the data is written, for 64..4096 ranks.

    python benchmarks/planning_scale.py                       # 7B-like, 2 layers, 64..4096 ranks
    python benchmarks/planning_scale.py --model 70b --layers 4 --ranks 64 256 1024
    python benchmarks/planning_scale.py --quick               # 4..16 ranks, 1 layer, seconds

No processes, no I/O. For N simulated ranks, a LLaMA-like model (embedding, per layer
q/k/v/o and gate/up/down weights and two norms, final norm, head) is sharded FSDP2-style
(Shard(0) over N ranks, torch.chunk sizes, empty shards left out), with AdamW's
exp_avg/exp_avg_sq sharded the same way and one replicated 0-dim ``step`` tensor per
parameter on every rank, plus JSON values (param_groups, the training step). Each rank's
tensor WriteItems are built directly from that metadata (as DCP derives them from
DTensors), then, timed per phase:

    write_items       building the WriteItems of every rank (the same input for both planners)
    local_plan        per rank: our SavePlanner.create_local_plan (values encoded as JSON,
                      dtypes checked) vs DCP's DefaultSavePlanner; mean seconds per rank
    global_plan       coordinator: our _create_global_plan (values agree, balanced dedup of
                      replicated items, DCP's global metadata and validation) vs DCP's
                      (dedup to the lowest rank)
    build_manifest    coordinator: a first save's manifest_builder.ManifestBuilder.build from synthetic WriteResults
                      (4 files per rank, one xxh3 per 8 MiB block)
    manifest_to_json  coordinator: the manifest's JSON (sealed) vs pickle.dumps of DCP's
                      .metadata (with FileSystemWriter's storage_data)
    parse             every rank on load: shardckpt.format.manifest.parse_manifest (hostile-input
                      checks) vs pickle.loads of .metadata
    compress_v3       projected, not yet written by saves: format 3 (docs/format.md section 12)
                      of the same manifest, rules.compress per tensor (rules_projection.py)
    parse_v3          ... and what a loading rank does with that manifest (parse_manifest_v3: seal,
                      JSON, every check of format.md 12.5)
    assemble_v3       (--projection) the coordinator of a real format-3 save: engine.write_v3.assemble
                      (pages, every tensor's rule at once, file table) fed every rank's simulated
                      RankResult of the same layout; v3_to_json: its manifest_v3_to_json

and the sizes of manifest.json, .metadata, the projected format-3 manifest and the largest
rank's index record (the metadata a rank reads at load under format 3 is the manifest, the
page of the rank table holding the ranks it reads from, and those ranks' index records).
Growth: the ratio per doubling of ranks and a power-law exponent fitted over the rank counts
(1 = linear).

    python benchmarks/planning_scale.py --projection --model 70b --ranks 64 256 1024 4096 16384

measures format 3 for the whole model (all layers by default): a synthetic layout of the
same FSDP state and the writer's file split (rules_projection.synthetic_tensors), the
version-1 manifest of the same chunks beside it, and every row of issue #16's target table
on the real format-3 code paths (v3_cycle.py), DCP beside them where it fits:

    manifest_v3_written           bytes of the manifest write_v3.assemble builds
    load_{own,reshard}_metadata   what one loading rank fetches (manifest, pages, index records)
                                  for its own shard and for N -> N-1; ..._sharded_only: without
                                  the replicated 0-d tensors
    load_{own,reshard}_parse_plan parse_any_manifest + chunks_for_box/locate per box it loads
    first_save_plan_ours          create_global_plan over every rank's local plan + assemble_v3
                                  (global_plan_dcp_s: DCP's), up to --plan-max-items
    first_save_plan_rules         the first save's plan from rules (engine/rule_plan.py) at every
                                  rank count + assemble_v3: rules_coordinator_s (and _cpu_s),
                                  plan_from_rules over every rank's summary and the answer's
                                  encoding; per rank rules_summary_per_rank_s (summarize) and
                                  rules_derive_per_rank_s (decode the answer, derive_plan)
    coordinator_s                 a repeated save's planning (PlanCache.fits, adopt_global_plan);
                                  fingerprint_per_rank_s: layout_fingerprint
    dcp_metadata_pickle, dcp_unpickle   DCP's .metadata of the same chunks, up to --dcp-max-chunks

Timed phases: medians of --repeats (3). Rank counts or phases that do not fit are listed
under each row's "not_run" with the reason, not run.

Writes benchmarks/results/planning_scale.json (or planning_scale_v3_<model>.json) and
docs/img/planning_scale.png (or planning_scale_v3_<model>.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import itertools
import math
import os
import pickle
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common
import plots
import rules_projection
import v3_cycle

MODELS = {  # hidden, ffn, kv (k/v rows: grouped-query attention), layers, vocab
    "7b": (4096, 11008, 4096, 32, 32000),
    "70b": (8192, 28672, 1024, 80, 32000),
}
IO_THREADS = 4  # data files per rank, as the local default
WRITER_REPEATS = 3  # write_v3.assemble timed this many times per rank count, the median kept
DEFAULT_IMG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "img")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4, 8, 16 ranks, 1 layer")
    ap.add_argument(
        "--projection",
        action="store_true",
        help="format 3 (projected) and v1 manifest sizes only, whole model by default, up to 16384 ranks",
    )
    ap.add_argument("--ranks", nargs="+", type=int, default=None, help="default 64 128 ... 4096")
    ap.add_argument("--model", choices=sorted(MODELS), default="7b")
    ap.add_argument(
        "--layers",
        type=int,
        default=None,
        help=(
            "transformer layers simulated (default 2: time and memory at 4096 ranks on this VM; "
            "costs grow linearly in layers)"
        ),
    )
    ap.add_argument("--repeats", type=int, default=3, help="--projection: timed repeats per phase, medians")
    ap.add_argument(
        "--dcp-max-chunks",
        type=int,
        default=1_000_000,
        help="--projection: build and unpickle DCP's .metadata only up to this many chunks (memory)",
    )
    ap.add_argument(
        "--plan-max-items",
        type=int,
        default=400_000,
        help="--projection: run the first save's global plans only up to this many WriteItems (memory, minutes)",
    )
    ap.add_argument("--out", default=common.RESULTS_DIR, help="folder of the results JSON")
    ap.add_argument("--name", default=None, help="results name (default planning_scale or planning_scale_quick)")
    ap.add_argument("--plots-dir", default=DEFAULT_IMG, help="folder of the PNG ('none': no plot)")
    args = ap.parse_args(argv)
    args.ranks = sorted(args.ranks or ([4, 8, 16] if args.quick else [64 * 2**i for i in range(7)]))
    args.layers = args.layers or (1 if args.quick else MODELS[args.model][3] if args.projection else 2)
    default_name = f"planning_scale_v3_{args.model}" if args.projection else "planning_scale"
    args.name = args.name or ("planning_scale_quick" if args.quick else default_name)
    return args


# ------------------------------------------------------------------ the simulated state


@dataclass(frozen=True)
class Param:
    fqn: str
    shape: tuple[int, ...]


def model_params(model: str, layers: int) -> list[Param]:
    h, ffn, kv, _, vocab = MODELS[model]
    params = [Param("embed.weight", (vocab, h))]
    for i in range(layers):
        p = f"layers.{i}."
        params += [
            Param(p + "attn.q.weight", (h, h)),
            Param(p + "attn.k.weight", (kv, h)),
            Param(p + "attn.v.weight", (kv, h)),
            Param(p + "attn.o.weight", (h, h)),
            Param(p + "mlp.gate.weight", (ffn, h)),
            Param(p + "mlp.up.weight", (ffn, h)),
            Param(p + "mlp.down.weight", (h, ffn)),
            Param(p + "norm1.weight", (h,)),
            Param(p + "norm2.weight", (h,)),
        ]
    return [*params, Param("norm.weight", (h,)), Param("head.weight", (vocab, h))]


def json_values(params: list[Param]) -> dict[str, Any]:
    """The non-tensor part of the state, as get_state_dict returns it for AdamW."""
    group = {
        "lr": 3e-4,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": 0.1,
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "params": [p.fqn for p in params],
    }
    return {"optim": {"param_groups": [group]}, "step": 1000}


def shard_box(shape: tuple[int, ...], rank: int, world: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(offsets, sizes) of ``rank``'s Shard(0) piece (torch.chunk sizes), None when empty."""
    per = -(-shape[0] // world)
    start = rank * per
    rows = min(per, shape[0] - start)
    if rows <= 0:
        return None
    return (start, *[0] * (len(shape) - 1)), (rows, *shape[1:])


def rank_tensor_items(params: list[Param], rank: int, world: int, props: Any, *, empty: bool = False) -> list[Any]:
    """Rank's WriteItems: model weight and AdamW moments (sharded), AdamW steps (replicated).
    ``empty``: a rank past a tensor's last row holds an empty box, as DCP plans a DTensor's
    (offset: the row count; the first-save planning's full path is measured without them)."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
    from torch.distributed.checkpoint.planner_helpers import _create_write_item_for_tensor

    items = []
    for p in params:
        box = shard_box(p.shape, rank, world)
        if box is None and empty:
            box = ((p.shape[0], *[0] * (len(p.shape) - 1)), (0, *p.shape[1:]))
        size = torch.Size(p.shape)
        for fqn in (f"model.{p.fqn}", f"optim.state.{p.fqn}.exp_avg", f"optim.state.{p.fqn}.exp_avg_sq"):
            if box is not None:
                offsets, sizes = torch.Size(box[0]), torch.Size(box[1])
                items.append(
                    WriteItem(
                        index=MetadataIndex(fqn, offsets),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(ChunkStorageMetadata(offsets, sizes), props, size),
                    )
                )
        items.append(_create_write_item_for_tensor(f"optim.state.{p.fqn}.step", torch.tensor(1000.0)))
    return items


def tensor_paths(params: list[Param]) -> dict[str, tuple[str, ...]]:
    """DCP's flatten mappings for the tensor keys: flat key -> path in the nested state."""
    out: dict[str, tuple[str, ...]] = {}
    for p in params:
        out[f"model.{p.fqn}"] = ("model", p.fqn)
        for leaf in ("exp_avg", "exp_avg_sq", "step"):
            out[f"optim.state.{p.fqn}.{leaf}"] = ("optim", "state", p.fqn, leaf)
    return out


# ------------------------------------------------------------------ planners over given items


def planner_classes() -> tuple[type, type]:
    """(ours, DCP's): each plans the JSON values from a real state_dict and takes the
    tensor WriteItems as given (``tensor_items``), as if derived from DTensors."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    from shardckpt.engine.plan_checks import _check_header_entry as check_header_entry
    from shardckpt.engine.planner import SavePlanner
    from shardckpt.format import datafile

    class GivenTensors(DefaultSavePlanner):
        tensor_items: list[Any]  # both set on each instance by local_plans before planning
        paths: dict[str, tuple[str, ...]]

        def create_local_plan(self) -> Any:
            plan = super().create_local_plan()
            self.mappings.update(self.paths)
            self.plan = dataclasses.replace(plan, items=plan.items + self.tensor_items, planner_data=self.mappings)
            return self.plan

    class Ours(SavePlanner):
        tensor_items: list[Any]  # as GivenTensors
        paths: dict[str, tuple[str, ...]]

        def create_local_plan(self) -> Any:
            # SavePlanner plans the state's values (it plans its DTensors' items itself, without
            # DCP's create_local_plan); the given items get the checks it makes per tensor item.
            plan = super().create_local_plan()
            for item in self.tensor_items:
                datafile.dtype_name(item.tensor_data.properties.dtype, key=item.index.fqn)
                check_header_entry(item)
            self.mappings.update(self.paths)  # the dict the plan's planner_data holds
            self.plan = dataclasses.replace(plan, items=plan.items + self.tensor_items)
            return self.plan

    return Ours, GivenTensors


def local_plans(
    cls: Callable[[], Any], items: list[list[Any]], values: dict[str, Any], paths: dict[str, Any]
) -> tuple[list[Any], Any]:
    """Every rank's planner and local plan; returns (plans, rank 0's planner)."""
    plans, first = [], None
    for rank, rank_items in enumerate(items):
        planner = cls()
        planner.tensor_items, planner.paths = rank_items, paths
        planner.set_up_planner(dict(values), None, rank == 0)
        plans.append(planner.create_local_plan())
        first = first or planner
    return plans, first


# ------------------------------------------------------------------ manifest and .metadata


def synthetic_results(global_plans: list[Any], planner: Any, block_bytes: int) -> list[list[Any]]:
    """WriteResults as Writer.write_data returns them: each rank's tensors split over
    IO_THREADS files, byte offsets, one hash per block; values inline."""
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult

    from shardckpt.engine import writer
    from shardckpt.format import layout
    from shardckpt.format.manifest import FileRecord

    out = []
    for rank, plan in enumerate(global_plans):
        res = [
            WriteResult(it.index, 0, writer._InlineValue(planner.resolve_data(it).getvalue()))
            for it in plan.items
            if it.type == WriteItemType.BYTE_IO
        ]
        tensors = [it for it in plan.items if it.type != WriteItemType.BYTE_IO]
        for k, bucket in enumerate(writer.split_by_bytes(tensors, IO_THREADS)):
            name = layout.data_file_name("0123456789ab", rank, k)
            lengths = [chunk_bytes(it) for it in bucket]
            record = FileRecord(size=sum(lengths) + 4096, hash="f" * 16, rank=rank)
            offset = 4096
            for it, n in zip(bucket, lengths, strict=True):
                hashes = tuple(f"{i:016x}" for i in range(max(1, -(-n // block_bytes))))
                res.append(WriteResult(it.index, n, writer.ChunkLocation(name, offset, n, hashes, record)))
                offset += n
        out.append(res)
    return out


def chunk_bytes(item: Any) -> int:
    """Bytes of the item's chunk (WriteItem.tensor_storage_size() is the whole tensor's)."""
    if item.tensor_data is None:
        return 0
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


def dcp_storage_data(global_plans: list[Any]) -> dict[Any, Any]:
    """FileSystemWriter's storage_data: one _StorageInfo per item, one file per rank."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    out = {}
    for rank, plan in enumerate(global_plans):
        offset = 0
        for it in plan.items:
            n = chunk_bytes(it) or 64
            out[it.index] = _StorageInfo(f"__{rank}_0.distcp", offset, n)
            offset += n
    return out


# ------------------------------------------------------------------ one rank count


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(params: list[Param], ranks: int) -> dict[str, Any]:
    """Every phase for ``ranks`` simulated ranks; seconds, bytes and counts."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorProperties

    ours_cls, dcp_cls = planner_classes()
    props = TensorProperties(dtype=torch.float32)
    values, paths = json_values(params), tensor_paths(params)
    items, t_items = timed(lambda: [rank_tensor_items(params, r, ranks, props) for r in range(ranks)])
    ours = measure_ours(ours_cls, items, values, paths)
    gc.collect()
    dcp = measure_dcp(dcp_cls, items, values, paths)
    return {
        "ranks": ranks,
        "seconds": {"write_items": t_items, **ours["seconds"], **dcp["seconds"]},
        "bytes": {**ours["bytes"], **dcp["bytes"]},
        "counts": ours["counts"],
        "bytes_per_rank_max_over_mean": {"ours": ours["imbalance"], "dcp": dcp["imbalance"]},
        "peak_rss_gib": common.peak_rss_bytes() / 2**30,
    }


def measure_ours(cls: type, items: list[list[Any]], values: dict[str, Any], paths: dict[str, Any]) -> dict[str, Any]:
    """Our local plans, global plan, manifest (build, JSON, parse)."""
    from shardckpt.engine import manifest_builder
    from shardckpt.format import integrity, manifest

    ranks = len(items)
    sec: dict[str, float] = {}
    (plans, planner), t = timed(lambda: local_plans(cls, items, values, paths))
    sec["local_plan_per_rank_ours"] = t / ranks
    (gplans, md), sec["global_plan_ours"] = timed(lambda: planner._create_global_plan(plans))
    results = synthetic_results(gplans, planner, integrity.DEFAULT_BLOCK_BYTES)
    layout_ = [{"rank": r, "host": f"node{r // 8:04d}", "local_rank": r % 8} for r in range(ranks)]
    built, sec["build_manifest"] = timed(
        lambda: manifest_builder.ManifestBuilder(md).build(results, layout_, integrity.DEFAULT_BLOCK_BYTES, {})
    )
    m = built.manifest
    text, sec["manifest_to_json"] = timed(built.to_json)
    _, sec["parse_manifest"] = timed(lambda: manifest.parse_manifest(text, source="simulated"))
    v3 = project_manifest(m)
    sec.update(v3.seconds)
    summary = v3.summary()
    counts = {
        "items": sum(len(p.items) for p in plans),
        "chunks": sum(len(t.chunks) for t in m.tensors.values()),
        "tensors": len(m.tensors),
        "values": len(m.values),
        **{k: summary[k] for k in ("rules", "listed_tensors", "runs")},
    }
    return {
        "seconds": sec,
        "bytes": {
            "manifest_json": len(text),
            "manifest_v3_projected": summary["manifest_v3"],
            "index_max_rank_v3": summary["index_max_rank_v3"],
            "load_metadata_max_rank_v3": summary["load_metadata_max_rank_v3"],
        },
        "counts": counts,
        "imbalance": _imbalance([sum(chunk_bytes(it) for it in p.items) for p in gplans]),
    }


def project_manifest(m: Any) -> rules_projection.Projection:
    """Format 3 (projected) of the very chunks, files and offsets of manifest ``m``."""
    tensors = (
        (
            k,
            t.dtype,
            t.shape,
            [rules_projection.Stored(c.offsets, c.sizes, c.file, c.byte_offset, c.byte_length) for c in t.chunks],
        )
        for k, t in m.tensors.items()
    )
    files = {n: (f.size, f.rank) for n, f in m.files.items()}
    rest = {**m.provenance(), "process_layout": list(m.process_layout), "values": m.values, "paths": m.paths}
    return rules_projection.project(tensors, files, rest, m.hash_block_bytes)


def measure_projection(params: list[Param], ranks: int, args: argparse.Namespace) -> dict[str, Any]:
    """Format 3 of the whole state at ``ranks``, synthetically, on the real code paths: the
    sizes (projection), the coordinator's build (``write_v3.assemble``), what a loading rank
    reads and plans, the first and the repeated save's planning, and DCP beside them where
    it fits (v3_cycle.py)."""
    import torch

    from shardckpt.engine import write_v3
    from shardckpt.format import integrity

    keys = [
        (k, p.shape)
        for p in params
        for k in (f"model.{p.fqn}", *(f"optim.state.{p.fqn}.{m}" for m in ("exp_avg", "exp_avg_sq")))
    ]
    steps = [f"optim.state.{p.fqn}.step" for p in params]

    def layout() -> Any:
        return rules_projection.synthetic_tensors(keys, steps, ranks, IO_THREADS, "0123456789ab")

    (tensors, files), t_layout = timed(layout)
    values = json_values(params)
    paths: dict[str, list[str | int]] = {k: list(v) for k, v in tensor_paths(params).items()}
    paths.update({"optim.param_groups": ["optim", "param_groups"], "step": ["step"]})
    rest = {
        "shardckpt_version": "0.0.0",
        "torch_version": torch.__version__,
        "created_at": "2026-11-30T00:00:00+00:00",
        "world_size": ranks,
        "process_layout": [{"rank": r, "host": f"node{r // 8:04d}", "local_rank": r % 8} for r in range(ranks)],
        "values": {"optim.param_groups": values["optim"]["param_groups"], "step": values["step"]},
        "paths": dict(sorted(paths.items())),
    }
    v3 = rules_projection.project(
        tensors,
        files,
        rest,
        integrity.DEFAULT_BLOCK_BYTES,
        with_v1=True,
        index_block_bytes=write_v3.V3_HASH_BLOCK_BYTES,
        inline_file=rules_projection.coordinator_file(files) if steps else None,
    )
    summary = v3.summary()
    writer = measure_writer_v3(keys, steps, ranks, rest, v3.index_bytes)
    shapes = dict([*keys, *((s, ()) for s in steps)])
    load = v3_cycle.load_side(writer["raw"], writer["page_sizes"], v3.index_bytes, shapes, ranks, args.repeats)
    dcp_load = v3_cycle.dcp_load_side(layout()[0], lambda _: torch.float32, args.repeats, args.dcp_max_chunks)
    gc.collect()
    save = measure_save_planning(params, ranks, args)
    seconds = {"synthetic_layout": t_layout, **v3.seconds, **writer["seconds"]}
    seconds.update({f"load_{case}_parse_plan": load[case]["parse_plan_s"] for case in ("own", "reshard")})
    seconds["load_parse_v3"] = load["own"]["parse_s"]
    shared_items, answer_bytes = save.pop("rules_shared_items"), save.pop("rules_answer_bytes")
    seconds.update(save)
    seconds["first_save_plan_rules"] = save["rules_coordinator_s"] + writer["seconds"]["assemble_v3"]
    if "global_plan_ours_s" in save:
        seconds["first_save_plan_ours"] = save["global_plan_ours_s"] + writer["seconds"]["assemble_v3"]
    if dcp_load is not None:
        seconds["dcp_unpickle"] = dcp_load["unpickle_s"]
    return {
        "ranks": ranks,
        "seconds": seconds,
        "bytes": {
            "manifest_v1": v3.manifest_v1,
            "manifest_v3_projected": summary["manifest_v3"],
            "file_table_v3": summary["file_table_v3"],
            "index_total_v3": summary["index_total_v3"],
            "index_max_rank_v3": summary["index_max_rank_v3"],
            "pages_total_v3": summary["pages_total_v3"],
            "load_metadata_max_rank_v3": summary["load_metadata_max_rank_v3"],
            "manifest_v3_written": len(writer["raw"]),
            **{f"load_{case}_metadata": load[case]["metadata_bytes"] for case in ("own", "reshard")},
            **{
                f"load_{case}_metadata_sharded_only": load[case]["metadata_bytes_sharded_only"]
                for case in ("own", "reshard")
            },
            **({"dcp_metadata_pickle": dcp_load["metadata_bytes"]} if dcp_load else {}),
        },
        "counts": {
            "tensors": len(keys) + len(steps),
            "files": len(files),
            **{k: summary[k] for k in ("rules", "listed_tensors", "runs")},
            "rules_plan_shared_items": int(shared_items),
            "rules_plan_answer_bytes": int(answer_bytes),
            **{f"load_{case}_index_records_read": load[case]["index_records_read"] for case in ("own", "reshard")},
            **{f"load_{case}_chunks_planned": load[case]["chunks_planned"] for case in ("own", "reshard")},
        },
        "not_run": {
            **({} if dcp_load else {"dcp_metadata": f"over --dcp-max-chunks {args.dcp_max_chunks} chunks (memory)"}),
            **(
                {}
                if "global_plan_ours_s" in save
                else {"first_save_global_plan": f"over --plan-max-items {args.plan_max_items} WriteItems (memory)"}
            ),
        },
        "peak_rss_gib": common.peak_rss_bytes() / 2**30,
    }


def measure_save_planning(params: list[Param], ranks: int, args: argparse.Namespace) -> dict[str, float]:
    """The coordinator's planning of a first save (every rank's local plan into the global
    plan, ours and DCP's) where every rank's WriteItems fit (``--plan-max-items``), and of a
    repeated save with the same layout (rank 0's local plan standing for every rank's)."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorProperties

    ours_any, dcp_cls = planner_classes()
    ours_cls = functools.partial(ours_any, small_replicated_to=0)  # a format-3 save's placement
    props = TensorProperties(dtype=torch.float32)
    values, paths = json_values(params), tensor_paths(params)
    first = rank_tensor_items(params, 0, ranks, props)
    (plans, planner) = local_plans(ours_cls, [first], values, paths)
    out = v3_cycle.repeat_save_plan(planner, plans[0], ranks, args.repeats)
    if len(first) * ranks <= args.plan_max_items:
        items = [first, *(rank_tensor_items(params, r, ranks, props) for r in range(1, ranks))]
        ours = local_plans(ours_cls, items, values, paths)
        dcp = local_plans(dcp_cls, items, values, paths)
        out.update(v3_cycle.first_save_plan((ours[1], ours[0]), (dcp[1], dcp[0])))
        full_plans = ours[1].create_global_plan(ours[0])[0]
        del items, ours, dcp
        gc.collect()
    else:
        full_plans = None
    out.update(
        v3_cycle.rules_first_save(
            plans[0],
            lambda r: rank_tensor_items(params, r, ranks, props, empty=True),
            lambda r: rules_single_bytes(params, r, ranks),
            ranks,
            args.repeats,
            full_plans,
        )
    )
    return out


def rules_single_bytes(params: list[Param], rank: int, world: int) -> int:
    """What ``rule_plan.summarize`` counts for a simulated rank: the bytes of its non-empty
    Shard(0) boxes (weight and both AdamW moments, float32)."""
    total = 0
    for p in params:
        box = shard_box(p.shape, rank, world)
        if box is not None:
            total += 3 * 4 * math.prod(box[1])
    return total


def measure_writer_v3(
    keys: list[tuple[str, tuple[int, ...]]],
    steps: list[str],
    ranks: int,
    rest: dict[str, Any],
    index_sizes: dict[int, int],
) -> dict[str, Any]:
    """The coordinator's side of a format-3 save, on the writer's own code path: every rank's
    simulated ``RankResult`` (the same layout as the projection) into ``write_v3.assemble``
    (the pages, every tensor's rule, the file table; best of WRITER_REPEATS, collector paused
    as in a save) and ``manifest_v3_to_json``."""
    from shardckpt.engine import write_v3
    from shardckpt.format import manifest_v3

    tensors, files = rules_projection.synthetic_tensors(keys, steps, ranks, IO_THREADS, "0123456789ab")
    inline = rules_projection.coordinator_file(files) if steps else None  # its index in the manifest (12.8)
    results = rules_projection.rank_results(tensors, files, ranks, index_sizes=index_sizes, inline_file=inline)
    meta = {k: ("F32", shape) for k, shape in sorted([*keys, *((s, ()) for s in steps)])}
    gc.collect()
    gc.disable()  # as in a real save: persist() pauses the collector (engine/collector.py)
    try:
        runs = []
        for _ in range(WRITER_REPEATS):
            cpu0 = time.process_time()
            built, wall = timed(
                lambda: write_v3.with_inline_index(
                    write_v3.assemble(
                        meta,
                        rest["values"],
                        rest["paths"],
                        results,
                        save_id="0123456789ab",
                        block_bytes=write_v3.V3_HASH_BLOCK_BYTES,
                        metadata={},
                    ),
                    results,
                )
            )
            runs.append((wall, time.process_time() - cpu0))
    finally:
        gc.enable()
    # the median of the repeats, wall and CPU seconds of this process: on the shared machine
    # the wall time is mostly waiting for a core
    t_assemble = statistics.median(w for w, _ in runs)
    cpu_assemble = statistics.median(c for _, c in runs)
    raw, t_json = timed(lambda: manifest_v3.manifest_v3_to_json(built.manifest))
    seconds = {"assemble_v3": t_assemble, "assemble_v3_cpu": cpu_assemble, "v3_to_json": t_json}
    return {"seconds": seconds, "raw": raw, "page_sizes": [len(p) for p in built.pages]}


def measure_dcp(cls: type, items: list[list[Any]], values: dict[str, Any], paths: dict[str, Any]) -> dict[str, Any]:
    """DCP's local plans, global plan, and its pickled .metadata (dump and load)."""
    sec: dict[str, float] = {}
    (plans, planner), t = timed(lambda: local_plans(cls, items, values, paths))
    sec["local_plan_per_rank_dcp"] = t / len(items)
    (gplans, md), sec["global_plan_dcp"] = timed(lambda: planner._create_global_plan(plans))
    md.storage_data = dcp_storage_data(gplans)
    blob, sec["metadata_pickle_dcp"] = timed(lambda: pickle.dumps(md, protocol=pickle.HIGHEST_PROTOCOL))
    _, sec["metadata_unpickle_dcp"] = timed(lambda: pickle.loads(blob))
    return {
        "seconds": sec,
        "bytes": {"dcp_metadata_pickle": len(blob)},
        "imbalance": _imbalance([sum(chunk_bytes(it) for it in p.items) for p in gplans]),
    }


def _imbalance(per_rank: list[int]) -> float:
    mean = sum(per_rank) / len(per_rank)
    return max(per_rank) / mean if mean else 0.0


# ------------------------------------------------------------------ growth and report


def growth(rows: list[dict[str, Any]], group: str) -> dict[str, Any]:
    """Per quantity: ratios between consecutive rank counts, and the exponent b of a
    least-squares fit value ~ a * ranks**b over all rows (log-log)."""
    out: dict[str, Any] = {}
    for key in [k for k in rows[0][group] if all(k in r[group] for r in rows)]:
        xs = [math.log(r["ranks"]) for r in rows]
        ys = [math.log(max(r[group][key], 1e-9)) for r in rows]
        ratios = [b[group][key] / a[group][key] if a[group][key] else None for a, b in itertools.pairwise(rows)]
        out[key] = {"ratio_per_step": ratios, "fitted_exponent": _slope(xs, ys) if len(rows) > 1 else None}
    return out


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def print_report(r: dict[str, Any]) -> None:
    rows = r["rows"]
    keys = list(dict.fromkeys(k for x in rows for k in x["seconds"]))
    print(f"\n{r['config']['model']}-like, {r['config']['layers']} layers; seconds (one process)")
    print(
        common.format_table(["ranks", *keys], [[x["ranks"], *[x["seconds"].get(k, "-") for k in keys]] for x in rows])
    )
    sizes = list(dict.fromkeys(k for x in rows for k in x["bytes"]))
    counts = [k for k in ("chunks", "files", "rules", "listed_tensors", "runs") if k in rows[0]["counts"]]
    print(
        common.format_table(
            ["ranks", *(f"{k} MiB" for k in sizes), *counts, "peak RSS GiB"],
            [
                [
                    x["ranks"],
                    *(x["bytes"][k] / 2**20 if k in x["bytes"] else "-" for k in sizes),
                    *(x["counts"][k] for k in counts),
                    x["peak_rss_gib"],
                ]
                for x in rows
            ],
        )
    )
    exps = {k: v["fitted_exponent"] for k, v in {**r["growth"]["seconds"], **r["growth"]["bytes"]}.items()}
    print("fitted exponents (cost ~ ranks**b): " + ", ".join(f"{k} {v:.2f}" for k, v in exps.items() if v is not None))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    params = model_params(args.model, args.layers)
    facts = common.machine_facts(common.RESULTS_DIR)
    t0 = time.perf_counter()
    rows = []
    for n in args.ranks:
        rows.append(measure_projection(params, n, args) if args.projection else measure(params, n))
        gc.collect()
        print(
            f"{n} ranks done at {time.perf_counter() - t0:.0f} s, peak RSS {rows[-1]['peak_rss_gib']:.2f} GiB",
            flush=True,
        )
    h, ffn, kv, full_layers, vocab = MODELS[args.model]
    results = {
        "benchmark": "planning_scale",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": dict(facts, loadavg_end=common.loadavg()),
        "config": {
            "model": args.model,
            "layers": args.layers,
            "model_layers": full_layers,
            "hidden": h,
            "ffn": ffn,
            "kv_rows": kv,
            "vocab": vocab,
            "params_simulated": len(params),
            "ranks": args.ranks,
            "dtype": "float32",
            "io_threads_per_rank": IO_THREADS,
            "projection_only": args.projection,
        },
        "elapsed_s": time.perf_counter() - t0,
        "rows": rows,
        "growth": {"seconds": growth(rows, "seconds"), "bytes": growth(rows, "bytes")},
    }
    if args.plots_dir != "none":
        plot = v3_cycle.write_plot if args.projection else plots.write_planning_plot
        results["plots"] = plot(
            [results] if args.projection else results,  # type: ignore[operator]
            os.path.join(args.plots_dir, f"{args.name}.png"),
        )
    common.publish(args.name, results, args.out, print_report)
    return results


if __name__ == "__main__":
    main()
