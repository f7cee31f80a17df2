"""One process of tests/slow/test_crash_incremental.py: an incremental CheckpointManager
that dies by SIGKILL at a chosen event.

``main([ROOT, KILL, VARIANT, MODE, STEPS])``, run in a child forked by
tests/support/trial_server.py. The manager (:func:`manager_options` of VARIANT, ``MODE``
``sync`` or ``async`` saves) restores the newest step under ROOT, checks it bitwise, then
saves STEPS more steps of :func:`expected`, printing ``RESTORED n``, ``SAVED n`` when
``mgr.save(n)`` returned, and ``DONE events=N``. KILL is ``none`` or ``event:K``: SIGKILL at
the K-th event, counted by crash_job's :class:`~crash_job.Killer` (which prints ``EVENT n
name`` for each when KILL is ``none``).

Events: every storage call of crash_job's :func:`~crash_job.killing_storage_class`, plus
``tmp:<name>`` (an atomic write's temp file is durable, not yet renamed or linked) and
``digest`` (the digest pass hashes a chunk; nothing of the save but its marker is on
storage yet). The storage is injected through the Checkpointer's ``storage_factory``, so
the manager's root, every step folder and every sibling (a base's referenced marker) is
opened through it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from crash_job import Killer, killing_storage_class, say

import shardckpt
import shardckpt.engine.incremental
from shardckpt.storage.local import LocalStorage

VARIANTS: dict[str, dict[str, Any]] = {
    # full_every=3: full, incremental, incremental, full, ... so a step reads up to two
    # older folders, and retention retires folders that kept steps still read.
    "keep_last": {"keep_last": 2},
    # steps divisible by 3 are kept for ever; some of them are incremental, so the folders
    # they read stay (retired: no manifest) long after keep_last dropped their own steps.
    "keep_every": {"keep_last": 2, "keep_every_n_steps": 3},
}


def manager_options(variant: str) -> dict[str, Any]:
    """The CheckpointManager keywords of a variant (the trial and the parent's check share them)."""
    return {"incremental": True, "full_every": 3, **VARIANTS[variant]}


def expected(step: int) -> dict[str, Any]:
    """The state saved at ``step``: a frozen tensor (never rewritten after a full save), one
    that changes every other step (so a step reads from two older folders), and tensors
    that change every step."""
    return {
        "frozen": torch.arange(48 * 33, dtype=torch.float32).reshape(48, 33),
        "slow": torch.full((16, 33), float(step // 2)),
        "w": torch.arange(64 * 33, dtype=torch.float32).reshape(64, 33) + 1000.0 * step,
        "b": torch.arange(7.0) + step,
        "step": step,
    }


def zeros() -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1 for k, v in expected(0).items()}


def assert_state(got: dict[str, Any], step: int) -> None:
    for key, want in expected(step).items():
        same = torch.equal(got[key], want) if isinstance(want, torch.Tensor) else got[key] == want
        assert same, f"key {key!r} differs from step {step}'s state"


def incremental_storage_class(killer: Killer) -> type[LocalStorage]:
    """crash_job's killing storage, plus a kill point between an atomic write's durable temp
    file and its rename/link (the referenced marker, the manifest, the owner record)."""

    class IncrementalKillingStorage(killing_storage_class(killer)):  # type: ignore[misc]
        def _write_temp(self, path: str, data: bytes) -> str:
            tmp = super()._write_temp(path, data)
            killer.event(f"tmp:{os.path.basename(path)}")
            return tmp

    return IncrementalKillingStorage


def main(argv: list[str]) -> None:
    root, kill, variant, mode, steps = argv
    killer = Killer(kill, "self")
    storage_cls = incremental_storage_class(killer)
    digest = shardckpt.engine.incremental.digest_hex

    def counted_digest(data: memoryview) -> str:
        killer.event("digest")
        return digest(data)

    shardckpt.engine.incremental.digest_hex = counted_digest  # the digest pass looks it up per chunk
    ckpt = shardckpt.Checkpointer(storage_factory=lambda url, options=None, transfer=None: storage_cls(url))
    mgr = shardckpt.CheckpointManager(root, checkpointer=ckpt, async_save=mode == "async", **manager_options(variant))
    target = zeros()
    start = mgr.restore(target) or 0
    if start:
        assert_state(target, start)
    say(f"RESTORED {start}")
    for step in range(start + 1, start + int(steps) + 1):
        sd = expected(step)
        mgr.save(step, sd)
        sd["w"].add_(1e6)  # training mutates at once; an async save must not see it
        say(f"SAVED {step}")
    mgr.close()
    ckpt.close()
    say(f"DONE events={killer.events}")
