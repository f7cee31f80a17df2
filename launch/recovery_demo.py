"""One rank of the fast-recovery demo (launch/recovery_demo.sh runs it under torchrun).

A small MLP trained data-parallel on gloo (gradients all-reduced, SGD with momentum), each
step's data a function of (step, rank) only, so a run resumed from any step continues the
same loss curve bit for bit. A CheckpointManager saves a local step every --local-every steps
into this node's --local-dir (one copy on the other node) and a durable step every
--durable-every steps. On start it restores the newest step of either tier and prints which
tier, the step and the time, then times a durable restore of the newest durable step into a
copy of the model for comparison. Rank 0 appends {"step", "loss" (float.hex)} per step to
--log-json. With --die-at K, every rank finishes its pending saves at step K and the ranks
of node $SHARDCKPT_NODE_ID == --die-node SIGKILL themselves. With --expect TIER:STEP, every
rank exits with status 3 and a message unless the restore came from that tier at that step.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import signal
import time

import torch
import torch.distributed as dist
from torch import nn

import shardckpt


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--durable", required=True, help="durable root (shared by the nodes)")
    ap.add_argument("--local-dir", required=True, help="this node's local_dir")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--local-every", type=int, default=2)
    ap.add_argument("--durable-every", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=512, help="width of the MLP (its size sets the restore times)")
    ap.add_argument("--log-json", required=True)
    ap.add_argument("--die-at", type=int, default=0, help="the step after which --die-node's ranks SIGKILL themselves")
    ap.add_argument("--die-node", default="node0")
    ap.add_argument("--expect", default="", help="TIER:STEP the restore must come from (local or durable)")
    return ap.parse_args()


def build(hidden: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
    )
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def timed_restore(mgr: shardckpt.CheckpointManager, state: dict, step: int | None = None) -> tuple[int | None, float]:
    dist.barrier()
    t0 = time.perf_counter()
    got = mgr.restore(state, step=step)
    dist.barrier()
    return got, time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    lines = Lines()
    logging.getLogger("shardckpt").addHandler(lines)
    logging.getLogger("shardckpt").setLevel(logging.INFO)
    model, optim = build(args.hidden)
    state = {"model": model, "optim": optim}
    mgr = shardckpt.CheckpointManager(
        args.durable,
        local_dir=args.local_dir,
        local_interval_steps=args.local_every,
        save_interval_steps=args.durable_every,
        replicas=1,
        takeover=True,  # the previous job was killed: its owner record is stale
    )
    start, restore_s = timed_restore(mgr, state)
    if start is not None:
        tier = "local" if any("from the local tier" in m for m in lines.messages) else "durable"
        durable = mgr.latest_step()
        note = ""
        if tier == "local" and durable is not None:
            other_model = copy.deepcopy(model)
            other = {"model": other_model, "optim": torch.optim.SGD(other_model.parameters(), lr=0.01, momentum=0.9)}
            _, durable_s = timed_restore(mgr, other, step=durable)
            note = f"; a durable restore of step {durable} into the same state took {durable_s:.3f} s"
        if rank == 0:
            print(f"[recovery] restored step {start} from the {tier} tier in {restore_s:.3f} s{note}", flush=True)
            for m in lines.messages:
                print(f"[recovery] log: {m}", flush=True)
        got = f"{tier}:{start}"
    else:
        got = "nothing:0"
    if args.expect and got != args.expect:
        print(f"[recovery] FAILED on rank {rank}: restored {got}, expected {args.expect}", flush=True)
        raise SystemExit(3)
    node = os.environ.get("SHARDCKPT_NODE_ID", "")
    for step in range((start or 0) + 1, args.steps + 1):
        g = torch.Generator().manual_seed(step * 1000 + rank)
        x = torch.randn(16, args.hidden, generator=g)
        loss = ((model(x) - x.mean(1, keepdim=True).tanh()) ** 2).mean()
        optim.zero_grad()
        loss.backward()
        for p in model.parameters():
            assert p.grad is not None
            dist.all_reduce(p.grad)
            p.grad /= world
        optim.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            with open(args.log_json, "a") as f:
                f.write(json.dumps({"step": step, "loss": (total.item() / world).hex()}) + "\n")
        mgr.save(step, state)
        if step == args.die_at:
            mgr.wait()
            if node == args.die_node:
                print(f"[recovery] rank {rank} on {node}: SIGKILL after step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
    mgr.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
