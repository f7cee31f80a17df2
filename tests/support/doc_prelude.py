"""What the documentation's snippets assume exists, for tests/distributed/test_docs.py.

``doc_runner.py`` runs this file in the namespace a snippet then runs in, so every name
defined here is a name a snippet may use without defining it: ``model``, ``optim``,
``step``, ``state``, ``total_steps``, ``v``... Under torchrun (``WORLD_SIZE`` set) the
default gloo group is initialized first and the model is sharded with FSDP2
(``fully_shard``), so model and optimizer state hold DTensors, as in a real job; on one
process they are plain tensors.

The state is that of a job two steps in: the optimizer has moments to save. ``state`` is a
dict of state_dicts, as README's "Use" example loads into; ``model`` and ``optim`` are the
live objects themselves, for snippets that pass those.

Names that hold a resource (``mgr``, a CheckpointManager that takes ownership of a root)
are made only when the snippet uses them without defining them (``DOC_FREE_NAMES``, set
by the runner), so they never collide with the snippet's own.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import shardckpt

if "WORLD_SIZE" in os.environ and not dist.is_initialized():  # under torchrun: every snippet sees the job's group
    dist.init_process_group("gloo")
torch.manual_seed(0)


def build_model() -> nn.Module:
    """A tiny MLP, wrapped the way docs/training.md says: shard first, then the optimizer."""
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        fully_shard(net)
    return net


def warmup_cosine(step: int) -> float:
    """An LR multiplier for LambdaLR."""
    return min(1.0, (step + 1) / 10)


model = build_model()
optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
optimizer = optim
sched = torch.optim.lr_scheduler.LambdaLR(optim, warmup_cosine)
scheduler = sched
dataset = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 4))
global_batch = 8  # samples per step over all ranks


def train_step(ids: Any = None) -> float:
    """One optimizer step on the samples ``ids`` (default: the first 4); the loss."""
    index = torch.as_tensor(list(range(4)) if ids is None else list(ids), dtype=torch.long)
    x, y = dataset[index]
    loss = nn.functional.mse_loss(model(x), y)
    optim.zero_grad()
    loss.backward()
    optim.step()
    sched.step()
    return float(loss.item())


for _ in range(2):
    train_step()
step = 2
# Long enough for a manager saving every 100 steps to save twice (the loops' bodies are
# `...`: a step costs only the manager's bookkeeping).
total_steps = 200
total = total_steps
v = 0.25  # a metric value (val_loss)
loss = v
state = {"model": model.state_dict(), "optim": optim.state_dict(), "step": step}

doc_opened: list[Any] = []  # what the prelude opened, closed after the snippet
if "mgr" in globals().get("DOC_FREE_NAMES", ()):
    mgr = shardckpt.CheckpointManager("runs/doc-prelude", keep_last=3)
    doc_opened.append(mgr)


def doc_test_finish() -> None:
    """After the snippet: close what the prelude opened; every rank finished it before
    any goes on (doc_runner.py runs the next block, and ends the group after the last)."""
    for resource in doc_opened:
        resource.close()
    if dist.is_initialized():
        dist.barrier()
