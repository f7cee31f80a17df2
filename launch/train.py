"""Train a small GPT on a synthetic token dataset with FSDP2, checkpointing through shardckpt.

    torchrun --standalone --nproc-per-node 4 launch/train.py --ckpt-dir runs/gpt --steps 30 --save-every 5

Resumes by itself from the latest committed checkpoint in --ckpt-dir, on any number of
ranks: model, AdamW, LR schedule, the per-rank RNG streams (dropout) and the global data
position all come back through one TrainState. gloo on CPU, NCCL when CUDA is present.
Rank 0 appends one JSON object per step to --log-json: the step, global loss, the ids of
the samples of the global batch, and a checksum of the full parameters, so two runs can
be compared bit for bit:

    python launch/train.py compare reference.jsonl resumed.jsonl [--loss-rtol 1e-5]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import signal
import sys
import time
import uuid
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import shardckpt
from shardckpt.training.sampler import ResumableDistributedSampler
from shardckpt.training.train_state import TrainState


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--ckpt-dir",
        required=True,
        help="checkpoint root (local path or fsspec URL); resumed from when it holds a committed step",
    )
    ap.add_argument("--steps", type=int, default=30, help="train until this global step")
    ap.add_argument("--save-every", type=int, default=5, help="checkpoint every K steps")
    ap.add_argument("--keep-last", type=int, default=3, help="committed checkpoints to keep")
    ap.add_argument("--log-json", default=None, help="rank 0 appends one JSON object per step here")
    ap.add_argument(
        "--global-batch",
        type=int,
        default=12,
        help="samples per step, all ranks together (a multiple of the world size)",
    )
    ap.add_argument("--seed", type=int, default=0, help="model init, data order and RNG streams")
    ap.add_argument(
        "--fail-at-step",
        type=int,
        default=None,
        help="simulate a crash: os._exit(1) right after this step's optimizer step",
    )
    ap.add_argument(
        "--fail-how",
        choices=["exit", "sigkill"],
        default="exit",
        help="how --fail-at-step dies: os._exit(1) or SIGKILL to itself",
    )
    ap.add_argument("--parallel", choices=["fsdp", "ddp"], default="fsdp", help="FSDP2 fully_shard (default) or DDP")
    ap.add_argument("--async-save", action="store_true", help="save in the background (stall = a copy to host memory)")
    ap.add_argument("--preemption-exit-code", type=int, default=0, help="exit status after the save forced by SIGTERM")
    ap.add_argument("--dataset-len", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=67)
    ap.add_argument("--d-model", type=int, default=48)
    ap.add_argument("--n-layers", type=int, default=2)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=5)
    return ap.parse_args(argv)


# ------------------------------------------------------------------ data


def sample_tokens(sample_id: int, seq_len: int, vocab: int) -> torch.Tensor:
    """Sample ``sample_id`` of the synthetic dataset: a noisy affine token recurrence (learnable)."""
    g = torch.Generator().manual_seed(1_000_003 * sample_id + 17)
    mult, add = (3, 5, 7, 11)[sample_id % 4], sample_id % 7 + 1
    tokens = [int(torch.randint(vocab, (1,), generator=g))]
    noise = torch.rand(seq_len, generator=g) < 0.1
    noisy = torch.randint(vocab, (seq_len,), generator=g)
    for k in range(seq_len):
        tokens.append(int(noisy[k]) if noise[k] else (mult * tokens[-1] + add) % vocab)
    return torch.tensor(tokens)


def make_batch(ids: list[int], args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = torch.stack([sample_tokens(i, args.seq_len, args.vocab) for i in ids]).to(device)
    return seqs[:, :-1], seqs[:, 1:]


# ------------------------------------------------------------------ model


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(c, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class GPT(nn.Module):
    """Token + (frozen) position embeddings, pre-LN blocks, untied head."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        d = args.d_model
        self.tok = nn.Embedding(args.vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(args.seq_len, d), requires_grad=False)  # frozen: saved all the same
        self.blocks = nn.ModuleList(Block(d, args.n_heads, args.dropout) for _ in range(args.n_layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, args.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def build_model(args: argparse.Namespace, device: torch.device, world: int) -> nn.Module:
    torch.manual_seed(args.seed)  # the same initial weights on every rank and at every world size
    model = GPT(args).to(device)
    if args.parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    mesh = init_device_mesh(device.type, (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def lr_lambda(args: argparse.Namespace) -> Any:
    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.1 + 0.9 * 0.5 * (
            1 + math.cos(math.pi * min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup)))
        )

    return factor


def param_checksum(model: nn.Module) -> tuple[float, str]:
    """Collective. (sum of all full parameters in float64, sha256 of their bytes)."""
    h, total = hashlib.sha256(), 0.0
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        full = p.full_tensor() if isinstance(p, DTensor) else p
        full = full.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(full.view(torch.uint8).numpy().tobytes())
        total += float(full.double().sum())
    return total, h.hexdigest()


# ------------------------------------------------------------------ main


def init_distributed() -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=300))
        return device
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    return torch.device("cpu")


class JsonLog:
    """Rank 0's append-only log, flushed per line so a crash keeps every finished step."""

    def __init__(self, path: str | None, enabled: bool) -> None:
        self.file = open(path, "a") if path and enabled else None
        self.run_id = uuid.uuid4().hex[:8]

    def write(self, **record: Any) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"run": self.run_id, **record}) + "\n")
            self.file.flush()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(args, device, world)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    sampler = ResumableDistributedSampler(args.dataset_len, seed=args.seed)
    state = TrainState(model=model, optimizer=optimizer, lr_scheduler=scheduler, data=sampler, seed=args.seed)
    manager = shardckpt.CheckpointManager(
        args.ckpt_dir,
        keep_last=args.keep_last,
        save_interval_steps=args.save_every,
        save_on_preemption=True,
        preemption_exit_code=args.preemption_exit_code,
        async_save=args.async_save,
    )
    log = JsonLog(args.log_json, rank == 0)
    t0 = time.perf_counter()
    resumed = state.restore(manager)
    restore_s = time.perf_counter() - t0
    if resumed is None:
        state.reseed_rng(step=0)
    start = {
        "event": "start",
        "world_size": world,
        "resumed_from": resumed,
        "saved_world_size": state.restored_world_size,
        "rng": state.rng_restored,
        "restore_s": round(restore_s, 4),
        "parallel": args.parallel,
    }
    log.write(**start)
    if rank == 0:
        where = (
            f"resumed from step {resumed} (saved on {state.restored_world_size} ranks, RNG {state.rng_restored})"
            if resumed
            else "fresh start"
        )
        print(f"[train] {where}; training steps {state.step + 1}..{args.steps} on {world} ranks", flush=True)
    train(args, state, manager, log, device)
    manager.close()
    log.write(event="end", step=state.step)
    dist.barrier()  # leave together: a rank tearing down gloo after rank 0 (the store) exited can abort
    dist.destroy_process_group()


def train(
    args: argparse.Namespace,
    state: TrainState,
    manager: shardckpt.CheckpointManager,
    log: JsonLog,
    device: torch.device,
) -> None:
    model, optimizer, scheduler, sampler = state.model, state.optimizers[0], state.lr_scheduler, state.data
    world = dist.get_world_size()
    for step in range(state.step + 1, args.steps + 1):
        batch = sampler.next_batch(args.global_batch)
        x, y = make_batch(batch.local_ids, args, device)
        model.train()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step, state.epoch = step, batch.epoch
        if step == args.fail_at_step:
            crash(args.fail_how, step)
        global_loss = loss.detach().double()
        dist.all_reduce(global_loss)
        psum, phash = param_checksum(model)
        log.write(
            event="step",
            step=step,
            epoch=batch.epoch,
            loss=float(global_loss) / world,
            lr=scheduler.get_last_lr()[0],
            sample_ids=batch.global_ids,
            param_sum=psum,
            param_hash=phash,
            world_size=world,
        )
        t0 = time.perf_counter()
        # the last step is always saved, so "latest committed step == --steps" means the run is complete
        if state.save(manager, metrics={"loss": float(global_loss) / world}, force=step == args.steps):
            log.write(event="save", step=step, stall_s=round(time.perf_counter() - t0, 4), asynchronous=args.async_save)


def crash(how: str, step: int) -> None:
    """Die the way a real failure does: no cleanup, no atexit, nothing flushed."""
    print(f"[train] rank {dist.get_rank()}: simulated crash ({how}) after step {step}", flush=True)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)


# ------------------------------------------------------------------ comparing logs


def read_attempts(path: str) -> list[dict[str, Any]]:
    """The runs logged in ``path``, in order: {"start", "steps", "saves", "ended"} each."""
    attempts: list[dict[str, Any]] = []
    by_run: dict[str, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r["event"] == "start":
                by_run[r["run"]] = {"start": r, "steps": [], "saves": [], "ended": False}
                attempts.append(by_run[r["run"]])
            elif r["event"] == "step":
                by_run[r["run"]]["steps"].append(r)
            elif r["event"] == "save":
                by_run[r["run"]]["saves"].append(r)
            elif r["event"] == "end":
                by_run[r["run"]]["ended"] = True
    return attempts


def compare_logs(reference: str, run: str, loss_rtol: float | None) -> tuple[bool, list[str]]:
    """Check an interrupted-and-resumed run's log against an uninterrupted reference's.

    Every step logged by an attempt whose whole history ran on the reference's world size
    must equal the reference bitwise (loss and parameter hash), re-done steps included.
    After a resume on another world size, every step's global batch must still hold the
    same sample ids, and losses must be within ``loss_rtol`` (relative) when given. Over
    the final trajectory no sample may repeat within an epoch and no step may be missing.
    """
    ref = read_attempts(reference)[-1]
    want = {r["step"]: r for r in ref["steps"]}
    ref_world, problems, lines = ref["start"]["world_size"], [], []
    exact, final, n_bitwise, max_rel = True, {}, 0, 0.0
    for i, a in enumerate(read_attempts(run)):
        st, steps = a["start"], [r["step"] for r in a["steps"]]
        # bitwise only while every attempt so far ran like the reference (reduction order)
        exact = exact and (st["world_size"], st["parallel"]) == (ref_world, ref["start"]["parallel"])
        first = (st["resumed_from"] or 0) + 1
        if steps and steps != list(range(first, first + len(steps))):
            problems.append(f"attempt {i + 1} logged steps {steps}, expected consecutive steps from {first}")
        origin = "fresh start"
        if st["resumed_from"]:
            origin = (
                f"resumed from step {st['resumed_from']} saved on {st['saved_world_size']} ranks "
                f"in {st['restore_s']:.2f} s (RNG {st['rng']})"
            )
        span = f"steps {steps[0]}..{steps[-1]}" if steps else "no steps"
        lines.append(
            f"attempt {i + 1}: {st['world_size']} ranks, {origin}, {span}, {'finished' if a['ended'] else 'killed'}"
        )
        for r in a["steps"]:
            w = want.get(r["step"])
            if w is None or r["sample_ids"] != w["sample_ids"]:
                problems.append(f"step {r['step']} (attempt {i + 1}): sample ids differ from the reference")
                continue
            final[r["step"]] = r
            if exact:
                n_bitwise += 1
                if (r["loss"], r["param_hash"]) != (w["loss"], w["param_hash"]):
                    problems.append(
                        f"step {r['step']} (attempt {i + 1}): loss {r['loss']!r} / params differ "
                        f"from the reference {w['loss']!r}"
                    )
            else:
                max_rel = max(max_rel, abs(r["loss"] - w["loss"]) / abs(w["loss"]))
    problems += [f"step {s} is missing from the resumed run" for s in sorted(set(want) - set(final))]
    consumption = _consumption_problems([final[s] for s in sorted(final)])
    problems += consumption
    if loss_rtol is not None and max_rel > loss_rtol:
        problems.append(
            f"after the resharded resume the largest relative loss difference is {max_rel:.3g} > {loss_rtol:g}"
        )
    stalls = sorted(s["stall_s"] for a in read_attempts(run) for s in a["saves"])
    n_differ = sum("params differ" in p for p in problems)
    lines.append(
        f"{n_bitwise - n_differ}/{n_bitwise} step records trained like the reference ({ref_world} ranks, "
        f"{ref['start']['parallel']}) equal it bit for bit (loss and parameter sha256)"
    )
    if not exact:
        lines.append(
            f"after the resharded resume: same sample ids at every step; largest relative loss difference {max_rel:.2e}"
        )
    n_samples = sum(len(r["sample_ids"]) for r in final.values())
    lines.append(
        f"{len(final)}/{len(want)} steps, {n_samples} samples, "
        + ("none repeated within an epoch" if not consumption else "SOME REPEATED")
    )
    if stalls:
        lines.append(
            f"{len(stalls)} saves, stall median {stalls[len(stalls) // 2] * 1e3:.0f} ms, max {stalls[-1] * 1e3:.0f} ms"
        )
    return not problems, lines + [f"PROBLEM: {p}" for p in problems]


def _consumption_problems(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[int, set[int]] = {}
    problems = []
    for r in records:
        epoch = seen.setdefault(r["epoch"], set())
        repeated = epoch.intersection(r["sample_ids"])
        if repeated:
            problems.append(f"step {r['step']}: samples {sorted(repeated)} already consumed in epoch {r['epoch']}")
        epoch.update(r["sample_ids"])
    return problems


def compare_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="train.py compare", description=compare_logs.__doc__)
    ap.add_argument("reference", help="--log-json of an uninterrupted run")
    ap.add_argument("run", help="--log-json of the interrupted and resumed run (all attempts)")
    ap.add_argument("--loss-rtol", type=float, default=None, help="relative loss tolerance after a resharded resume")
    args = ap.parse_args(argv)
    ok, lines = compare_logs(args.reference, args.run, args.loss_rtol)
    print("\n".join(lines))
    print("RESULT:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["compare"]:
        sys.exit(compare_main(sys.argv[2:]))
    main()
