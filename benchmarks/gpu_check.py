"""Everything in shardckpt that needs CUDA, checked and timed in one command on one GPU.

    python benchmarks/gpu_check.py                       # one GPU, about 2-3 minutes
    python benchmarks/gpu_check.py --out /tmp/gpu.json   # results elsewhere
    python benchmarks/gpu_check.py --cpu --gib 0.25      # the same code paths on CPU (a dry run)

CPU CI never runs this (it has no GPU); ``--cpu`` swaps CUDA for CPU and NCCL for gloo so
the script itself is exercised by tests/slow/test_benchmarks.py. Sections, each reported
as a row of the final table (a failing section is reported and the others still run):

  nccl_fsdp2_train   1 rank, NCCL training group, FSDP2 (fully_shard) model + AdamW on the GPU;
                     shardckpt's checkpoint group is gloo, created beside it. An async_save of
                     model + optimizer at step 4 returns and training steps 5-8 run (mutating
                     every parameter and moment while the save is written); a fresh model
                     loads step 4 and reruns steps 5-8: losses and parameters must be bitwise
                     equal to the first run's (the save holds step 4, not a mix).
  nccl_manager       CheckpointManager(async_save=True) on the NCCL world (its save trigger
                     all-reduces on the training group: CUDA tensors under NCCL), 6 steps,
                     retention, then a second manager restores the newest step bitwise.
  reshard_1_to_2     the 1-rank FSDP2 checkpoint loaded by 2 ranks holding CUDA DTensors
                     (Shard(0) over a 2-rank mesh on the same GPU, gloo), bitwise vs the saved
                     full tensors; then those 2 ranks async_save and mutate every local shard
                     right after the call returns.
  reshard_2_to_1     that 2-rank checkpoint loaded into a fresh 1-rank CUDA FSDP2 model, bitwise
                     vs the values before the mutation.
  staging            one process, ``--gib`` of fp32 CUDA tensors (log-normal sizes): device-to-
                     host copy into shardckpt's reused pinned buffers (Stager) against a plain
                     ``copy_`` into pinned buffers allocated once (the floor); target >= 0.8x.
  async_blocking     the same state: how long ``shardckpt.async_save`` blocks (reused buffers)
                     against ``dcp.async_save`` (defaults) and ``dcp.async_save`` with a
                     ``DefaultStager`` kept across saves (pinned, cached); and the total time
                     until each save is durable. The tensors are mutated right after every
                     shardckpt call returns; the last checkpoint must hold the old values.

Timed systems are interleaved in a shuffled order per repetition, the first repetition is
a dropped warm-up, results are medians (min-max) of ``--repeats``; the staging floor is
measured in the same repetitions (benchmarks/common.py, docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

# cuBLAS needs this before CUDA starts for deterministic matmuls (the bitwise reruns).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

WIDTH, BLOCKS, BATCH = 512, 4, 64  # the model: BLOCKS x (Linear(WIDTH, 4 WIDTH), GELU, Linear back)


# ------------------------------------------------------------------ process groups


def _entry(rank: int, fn: Any, world: int, init_file: str, backend: str, cpu: bool, args: tuple[Any, ...]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.use_deterministic_algorithms(True, warn_only=True)  # an op without a deterministic kernel warns, not fails
    if not cpu:
        torch.cuda.set_device(0)  # one GPU: every rank of a multi-rank phase shares it
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    try:
        fn(rank, world, cpu, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_phase(fn: Any, world: int, backend: str, cpu: bool, *args: Any) -> None:
    import torch.multiprocessing as mp

    fd, init_file = tempfile.mkstemp(prefix="gpu_check_pg_")
    os.close(fd)
    os.unlink(init_file)  # the file store wants a path that does not exist yet
    try:
        mp.spawn(_entry, args=(fn, world, init_file, backend, cpu, args), nprocs=world, join=True)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)


def _device(cpu: bool) -> Any:
    import torch

    return torch.device("cpu") if cpu else torch.device("cuda", 0)


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


# ------------------------------------------------------------------ the model


def build_model(seed: int, device: Any, width: int) -> Any:
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device)


def shard_model(model: Any, world: int, cpu: bool) -> Any:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu" if cpu else "cuda", (world,))
    for i in range(0, len(model), 3):
        fully_shard(model[i], mesh=mesh)
        fully_shard(model[i + 2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def train_step(model: Any, opt: Any, step: int, device: Any, width: int) -> float:
    import torch

    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, width, generator=gen).to(device)
    y = torch.randn(BATCH, width, generator=gen).to(device)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.item())


def full_params(model: Any) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in model.state_dict().items():
        t = v.full_tensor() if isinstance(v, DTensor) else v
        out[k] = t.detach().cpu().clone()
    return out


def bitwise_equal(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose tensors differ (shape, dtype or any byte)."""
    import torch

    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            bad.append(k)
    return bad


# ------------------------------------------------------------------ phase 1: NCCL + FSDP2


def phase_train(rank: int, world: int, cpu: bool, work: str, out: str, width: int) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    import shardckpt

    device = _device(cpu)
    result: dict[str, Any] = {"backend": dist.get_backend()}

    model = shard_model(build_model(0, device, width), world, cpu)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = [train_step(model, opt, s, device, width) for s in range(1, 5)]
    t0 = time.perf_counter()
    handle = shardckpt.async_save({"model": model, "optim": opt, "step": 4}, os.path.join(work, "s4"))
    result["async_blocking_s"] = time.perf_counter() - t0
    losses += [train_step(model, opt, s, device, width) for s in range(5, 9)]  # mutate during the write
    handle.wait()
    result["async_total_s"] = time.perf_counter() - t0
    shardckpt.save({"model": model}, os.path.join(work, "s8"))
    reference = full_params(model)
    if rank == 0:
        save_file(reference, os.path.join(work, "ref8.safetensors"))

    model2 = shard_model(build_model(1, device, width), world, cpu)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    state: dict[str, Any] = {"model": model2, "optim": opt2, "step": 0}
    t0 = time.perf_counter()
    shardckpt.load(state, os.path.join(work, "s4"))
    result["load_s"] = time.perf_counter() - t0
    rerun = [train_step(model2, opt2, s, device, width) for s in range(5, 9)]
    result["step_loaded"] = state["step"]
    result["losses_equal"] = rerun == losses[4:]
    result["params_differ"] = bitwise_equal(reference, full_params(model2))
    result["losses"] = losses
    result["rerun"] = rerun
    result["ok"] = state["step"] == 4 and result["losses_equal"] and not result["params_differ"]

    # The manager on the NCCL world: its save trigger all-reduces on the training group.
    mgr_result: dict[str, Any] = {}
    root = os.path.join(work, "mgr")
    mgr = shardckpt.CheckpointManager(root, save_interval_steps=2, keep_last=2, async_save=True)
    try:
        for s in range(1, 7):
            train_step(model, opt, 100 + s, device, width)
            mgr.save(s, {"model": model, "optim": opt})
    finally:
        mgr.close()
    mgr_result["steps_kept"] = [i.step for i in shardckpt.list_root(root)] if rank == 0 else None
    expected = full_params(model)
    model3 = shard_model(build_model(2, device, width), world, cpu)
    opt3 = torch.optim.AdamW(model3.parameters(), lr=1e-3)
    mgr = shardckpt.CheckpointManager(root, async_save=True)
    try:
        mgr_result["restored_step"] = mgr.restore({"model": model3, "optim": opt3})
    finally:
        mgr.close()
    mgr_result["params_differ"] = bitwise_equal(expected, full_params(model3))
    mgr_result["ok"] = mgr_result["restored_step"] == 6 and not mgr_result["params_differ"]
    if rank == 0:
        _write_json(os.path.join(out, "train.json"), result)
        _write_json(os.path.join(out, "manager.json"), mgr_result)


# ------------------------------------------------------------------ phase 2: 2 ranks on one GPU


def _dtensors(reference: dict[str, Any], rank: int, world: int, mesh: Any, device: Any, fill: bool) -> dict[str, Any]:
    """Shard(0) DTensors over ``mesh`` whose local shards are torch.chunk's pieces."""
    import torch
    from torch.distributed.tensor import DTensor, Shard

    out = {}
    for k, full in reference.items():
        local = torch.chunk(full, world, dim=0)[rank].clone() if fill else None
        if local is None:
            local = torch.zeros_like(torch.chunk(full, world, dim=0)[rank])
        out[k] = DTensor.from_local(
            local.to(device), mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
        )
    return out


def phase_two_ranks(rank: int, world: int, cpu: bool, work: str, out: str) -> None:
    import torch
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh

    import shardckpt

    device = _device(cpu)
    result: dict[str, Any] = {}
    reference = load_file(os.path.join(work, "ref8.safetensors"))
    try:
        mesh = init_device_mesh("cpu" if cpu else "cuda", (world,))
        result["mesh"] = mesh.device_type
    except Exception as e:  # noqa: BLE001 - reported; the CPU mesh still checks the load
        result["mesh_error"] = f"{type(e).__name__}: {e}"
        mesh = init_device_mesh("cpu", (world,))
        device = torch.device("cpu")
        result["mesh"] = "cpu (fallback)"
    target = {"model": _dtensors(reference, rank, world, mesh, device, fill=False)}
    shardckpt.load(target, os.path.join(work, "s8"))
    wanted = {k: torch.chunk(v, world, dim=0)[rank] for k, v in reference.items()}
    got = {k: v.to_local().cpu() for k, v in target["model"].items()}
    result["load_differ"] = bitwise_equal(wanted, got)
    result["device"] = str(next(iter(target["model"].values())).to_local().device)

    handle = shardckpt.async_save(target, os.path.join(work, "s8_2ranks"))
    with torch.no_grad():
        for v in target["model"].values():
            v.to_local().add_(1.0)  # right after the call returns: must not reach the checkpoint
    handle.wait()
    result["ok"] = not result["load_differ"]
    if rank == 0:
        _write_json(os.path.join(out, "two_ranks.json"), result)


def phase_reshard_back(rank: int, world: int, cpu: bool, work: str, out: str, width: int) -> None:
    from safetensors.torch import load_file

    import shardckpt

    device = _device(cpu)
    reference = load_file(os.path.join(work, "ref8.safetensors"))
    model = shard_model(build_model(3, device, width), world, cpu)
    shardckpt.load({"model": model}, os.path.join(work, "s8_2ranks"))
    differ = bitwise_equal(reference, full_params(model))
    if rank == 0:
        _write_json(os.path.join(out, "reshard_back.json"), {"params_differ": differ, "ok": not differ})


# ------------------------------------------------------------------ phase 3: staging and blocking


def lognormal_sizes(total_bytes: int, count: int, seed: int = 0) -> list[int]:
    """``count`` element counts of fp32 tensors with log-normal sizes summing to ~total_bytes."""
    import random

    rng = random.Random(seed)
    raw = [rng.lognormvariate(0.0, 1.5) for _ in range(count)]
    scale = total_bytes / 4 / sum(raw)
    return [max(1024, int(r * scale) // 256 * 256) for r in raw]


def phase_staging(cpu: bool, gib: float, repeats: int, bench_dir: str) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    import shardckpt
    from shardckpt.engine.staging import Stager

    device = _device(cpu)
    pin = not cpu
    sizes = lognormal_sizes(int(gib * 2**30), 120)
    gen = torch.Generator().manual_seed(7)
    state = {f"t{i:03d}": torch.randn(n, generator=gen).to(device) for i, n in enumerate(sizes)}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    floor_bufs = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for k, t in state.items()}
    stager = Stager(pin_memory=pin)
    ck = shardckpt.Checkpointer()
    dcp_stager = DefaultStager(StagingOptions(pin, False, False, pin))  # non-blocking copies need a GPU

    def sync() -> None:
        if not cpu:
            torch.cuda.synchronize()

    samples: dict[str, list[float]] = {}
    totals: dict[str, list[float]] = {}
    counter = [0]

    def fresh_dir() -> str:
        counter[0] += 1
        return os.path.join(bench_dir, f"save{counter[0]:04d}")

    last_ours: tuple[str, dict[str, Any]] | None = None

    def run(system: str) -> tuple[float, float | None]:
        nonlocal last_ours
        sync()
        if system == "copy_floor":
            t0 = time.perf_counter()
            for k, t in state.items():
                floor_bufs[k].copy_(t, non_blocking=pin)
            sync()
            return time.perf_counter() - t0, None
        if system == "stager":
            t0 = time.perf_counter()
            stager.stage(state)
            return time.perf_counter() - t0, None
        path = fresh_dir()
        if system == "shardckpt_async":
            before = {k: t.detach().cpu().clone() for k, t in list(state.items())[:8]}
            t0 = time.perf_counter()
            handle = ck.async_save(state, path)
            blocking = time.perf_counter() - t0
            with torch.no_grad():
                for t in list(state.values())[:8]:
                    t.add_(1.0)  # the caller may mutate at once
            handle.wait()
            total = time.perf_counter() - t0
            if last_ours is not None:
                common.remove_tree(last_ours[0])
            last_ours = (path, before)
            return blocking, total
        t0 = time.perf_counter()
        if system == "dcp_async":
            fut = dcp.async_save(state, checkpoint_id=path, no_dist=True)
            blocking = time.perf_counter() - t0
        else:  # dcp_async_stager: pinned, cached buffers, kept across saves
            resp = dcp.async_save(state, checkpoint_id=path, async_stager=dcp_stager, no_dist=True)
            fut = getattr(resp, "upload_completion", resp)
            staged = getattr(resp, "staging_completion", None)
            if staged is not None:
                staged.result()
            blocking = time.perf_counter() - t0
        fut.result()
        total = time.perf_counter() - t0
        common.remove_tree(path)
        return blocking, total

    systems = ["copy_floor", "stager", "shardckpt_async", "dcp_async", "dcp_async_stager"]
    errors: dict[str, str] = {}
    for _rep, warm, order in common.interleaved(systems, repeats, warmup=1, seed=1):
        for system in order:
            if system in errors:
                continue
            try:
                blocking, total = run(system)
            except Exception as e:  # noqa: BLE001 - reported, the other systems go on
                errors[system] = f"{type(e).__name__}: {e}"
                continue
            if not warm:
                samples.setdefault(system, []).append(blocking)
                if total is not None:
                    totals.setdefault(system, []).append(total)

    # The last shardckpt save must hold the values from before the mutation.
    mutation_ok = None
    if last_ours is not None:
        path, before = last_ours
        loaded = {k: torch.empty_like(v) for k, v in before.items()}
        shardckpt.load(loaded, path, strict=False)
        mutation_ok = not bitwise_equal(before, loaded)
        common.remove_tree(path)
    ck.close()
    dcp_stager.close()

    res: dict[str, Any] = {
        "bytes": nbytes,
        "tensors": len(state),
        "blocking_s": {k: common.summarize(v) for k, v in samples.items()},
        "total_s": {k: common.summarize(v) for k, v in totals.items()},
        "errors": errors,
        "mutation_after_return_not_saved": mutation_ok,
    }
    if "stager" in samples and "copy_floor" in samples:
        res["stager_vs_floor"] = common.paired_ratios(samples["copy_floor"], samples["stager"])
        res["stager_gbps"] = nbytes / common.GB / res["blocking_s"]["stager"]["median"]
        res["floor_gbps"] = nbytes / common.GB / res["blocking_s"]["copy_floor"]["median"]
    for other in ("dcp_async", "dcp_async_stager"):
        if other in samples and "shardckpt_async" in samples:
            res[f"blocking_{other}_over_ours"] = common.paired_ratios(samples[other], samples["shardckpt_async"])
    return res


# ------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="dry run: CPU tensors and gloo instead of CUDA and NCCL")
    ap.add_argument("--gib", type=float, default=2.0, help="size of the staging/async state (default 2 GiB)")
    ap.add_argument("--repeats", type=int, default=5, help="measured repetitions (default 5)")
    ap.add_argument(
        "--width",
        type=int,
        default=WIDTH,
        help=f"the trained model's width (default {WIDTH}: {BLOCKS} blocks of Linear(w, 4w) + Linear(4w, w), "
        "8.4M parameters); smaller for a quick dry run (tests use 64)",
    )
    ap.add_argument("--dir", default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--out", default=os.path.join(common.RESULTS_DIR, "gpu_check.json"), help="results JSON")
    args = ap.parse_args(argv)

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu for a dry run on CPU", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="gpu_check_", dir=args.dir)
    out = os.path.join(work, "results")
    os.makedirs(out)
    backend = "gloo" if args.cpu else "nccl"
    facts: dict[str, Any] = common.machine_facts(work)
    if not args.cpu:
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
        facts["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    results: dict[str, Any] = {"machine": facts, "mode": "cpu dry run" if args.cpu else "cuda", "sections": {}}
    sections = results["sections"]

    def section(name: str, fn: Any) -> None:
        t0 = time.perf_counter()
        try:
            fn()
            status = "ran"
        except Exception as e:  # noqa: BLE001 - reported; the next section still runs
            traceback.print_exc()
            status = f"error: {type(e).__name__}: {str(e)[:300]}"
        sections.setdefault(name, {})["status"] = status
        sections[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[gpu_check] {name}: {status} ({sections[name]['seconds']} s)", flush=True)

    def load_json(name: str) -> dict[str, Any]:
        path = os.path.join(out, name)
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            return json.load(f)  # type: ignore[no-any-return]

    def train() -> None:
        run_phase(phase_train, 1, backend, args.cpu, work, out, args.width)
        sections["nccl_fsdp2_train"] = load_json("train.json")
        sections["nccl_manager"] = load_json("manager.json")

    def two() -> None:
        run_phase(phase_two_ranks, 2, "gloo", args.cpu, work, out)
        sections["reshard_1_to_2"] = load_json("two_ranks.json")

    def back() -> None:
        run_phase(phase_reshard_back, 1, backend, args.cpu, work, out, args.width)
        sections["reshard_2_to_1"] = load_json("reshard_back.json")

    def staging() -> None:
        scratch = os.path.join(work, "staging")
        os.makedirs(scratch)
        sections["staging"] = phase_staging(args.cpu, args.gib, args.repeats, scratch)

    section("nccl_fsdp2_train", train)
    if "error" in sections["nccl_fsdp2_train"]["status"]:
        sections.setdefault("nccl_manager", {})["status"] = "not run: the training phase failed"
    section("reshard_1_to_2", two)
    section("reshard_2_to_1", back)
    section("staging", staging)
    # async_blocking shares the staging section's run (same state, same repetitions)
    results["summary"] = summary_rows(sections, cpu=args.cpu)
    print()
    print(common.format_table(["check", "result", "numbers"], results["summary"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nresults: {args.out}")
    shutil.rmtree(work, ignore_errors=True)  # a folder this run created (mkdtemp)
    failed = [row[0] for row in results["summary"] if row[1] not in ("PASS", "measured")]
    return 1 if failed else 0


def _ok(section: dict[str, Any]) -> str:
    if "ok" not in section:
        return "FAIL (" + str(section.get("status", "not run")) + ")"
    return "PASS" if section["ok"] else "FAIL"


def _med(d: dict[str, Any], key: str) -> float:
    return float(d.get(key, {}).get("median", math.nan))


def summary_rows(s: dict[str, Any], cpu: bool = False) -> list[list[Any]]:
    """The printed table. With ``cpu`` (a dry run) the staging ratio is only "measured": a
    host-to-host copy says nothing about the device-to-host target."""
    rows: list[list[Any]] = []
    t = s.get("nccl_fsdp2_train", {})
    rows.append(
        [
            "NCCL + FSDP2 train, async_save, reload, rerun bitwise",
            _ok(t),
            f"backend {t.get('backend')}; async blocked {t.get('async_blocking_s', math.nan):.3f} s, "
            f"done {t.get('async_total_s', math.nan):.2f} s; load {t.get('load_s', math.nan):.2f} s; "
            f"losses equal {t.get('losses_equal')}; params differing {len(t.get('params_differ', []))}",
        ]
    )
    m = s.get("nccl_manager", {})
    rows.append(
        [
            "CheckpointManager(async) on NCCL, restore bitwise",
            _ok(m),
            f"kept {m.get('steps_kept')}, restored step {m.get('restored_step')}",
        ]
    )
    a = s.get("reshard_1_to_2", {})
    rows.append(
        [
            "FSDP2 1 rank -> 2 ranks (CUDA DTensors), bitwise",
            _ok(a),
            f"mesh {a.get('mesh')}, tensors on {a.get('device')}"
            + (f"; {a['mesh_error']}" if a.get("mesh_error") else ""),
        ]
    )
    b = s.get("reshard_2_to_1", {})
    rows.append(["2 ranks -> FSDP2 1 rank (async save, mutated after return), bitwise", _ok(b), ""])
    g = s.get("staging", {})
    if "stager_vs_floor" in g:
        ratio = g["stager_vs_floor"]
        rows.append(
            [
                "staging D2H: reused pinned buffers vs plain pinned copy_ (>= 0.8x)",
                "measured" if cpu else ("PASS" if ratio["median"] >= 0.8 else "FAIL"),
                f"{g['stager_gbps']:.1f} vs {g['floor_gbps']:.1f} GB/s, ratio {ratio['median']:.2f} "
                f"({ratio['min']:.2f}-{ratio['max']:.2f}), {g['bytes'] / 2**30:.2f} GiB in {g['tensors']} tensors",
            ]
        )
    else:
        rows.append(["staging D2H vs plain pinned copy_", "FAIL", str(g.get("status", g.get("errors")))])
    if g:
        bs = g.get("blocking_s", {})
        ts = g.get("total_s", {})
        rows.append(
            [
                "async_save blocking: shardckpt vs dcp.async_save (default, cached DefaultStager)",
                "measured",
                f"shardckpt {_med(bs, 'shardckpt_async'):.3f} s (durable {_med(ts, 'shardckpt_async'):.2f} s); "
                f"dcp {_med(bs, 'dcp_async'):.3f} s ({_med(ts, 'dcp_async'):.2f}); "
                f"dcp+stager {_med(bs, 'dcp_async_stager'):.3f} s ({_med(ts, 'dcp_async_stager'):.2f})"
                + (f"; errors {g['errors']}" if g.get("errors") else ""),
            ]
        )
        mut = g.get("mutation_after_return_not_saved")
        rows.append(["async_save of CUDA tensors: mutation after return not saved", "PASS" if mut else "FAIL", ""])
    return rows


if __name__ == "__main__":
    sys.exit(main())
