"""A format-3 save planned from rules (engine/rule_plan.py) over gloo ranks commits the same
manifest as the full path (every rank's local plan) for the same state, loads back bitwise,
and a rank whose layout rules cannot prove sends every rank down the full path together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import shardckpt
from shardckpt.engine import Checkpointer, protocol
from shardckpt.engine import rule_plan as rule_plan_module
from shardckpt.engine.exchange import Exchange


def _full(name: str) -> torch.Tensor:
    shapes = {"fsdp": (8, 6), "uneven": (5, 3), "empty": (2, 3), "hsdp": (6, 4), "tp": (4, 6), "bias": (4,)}
    if name == "step":
        return torch.tensor(7.0)
    n = 1
    for s in shapes[name]:
        n *= s
    t = torch.arange(n, dtype=torch.float32).reshape(shapes[name]) * 0.25 + len(name)
    return t.to(torch.bfloat16) if name == "empty" else t


def _state(world: int) -> dict[str, Any]:
    rank = dist.get_rank()
    flat = init_device_mesh("cpu", (world,))
    grid = init_device_mesh("cpu", (2, world // 2))
    return {
        "model": {
            "fsdp": distribute_tensor(_full("fsdp"), flat, [Shard(0)]),
            "uneven": distribute_tensor(_full("uneven"), flat, [Shard(0)]),  # torch.chunk rows 2, 2, 1, 0
            "empty": distribute_tensor(_full("empty"), flat, [Shard(0)]),  # two ranks hold an empty box
            "hsdp": distribute_tensor(_full("hsdp"), grid, [Replicate(), Shard(0)]),
            "tp": distribute_tensor(_full("tp"), grid, [Shard(0), Shard(1)]),
            "bias": _full("bias"),  # replicated small tensors
        },
        "optim": {"step": _full("step")},
        "epoch": 3,
        "per_rank": {f"rank{rank}": {"rng": _rng(rank), "pos": 10 + rank}},  # as TrainState saves them
    }


def _rng(rank: int) -> torch.Tensor:
    return torch.arange(rank + 3, dtype=torch.uint8)


def _save(state: dict[str, Any], path: str) -> None:
    """A first save (no plan to reuse): its own Checkpointer."""
    with Checkpointer() as ckpt:
        ckpt.save(state, path, format_version=3, timeout_s=60)


def _count_rules(made: list[int]) -> None:
    original = protocol.plan_from_rules

    def counted(*args: Any, **kwargs: Any) -> Any:
        ruled = original(*args, **kwargs)
        made.append(ruled is not None)
        return ruled

    protocol.plan_from_rules = counted  # type: ignore[assignment]


def _count_trips(trips: list[int]) -> None:
    original = Exchange.round_trip

    def counted(self: Exchange, *args: Any, **kwargs: Any) -> Any:
        trips[0] += 1
        return original(self, *args, **kwargs)

    Exchange.round_trip = counted  # type: ignore[method-assign]


def _same_save_id() -> None:
    """Both saves get one save id (the coordinator's), so their files can match byte for byte."""
    import types
    import uuid

    from shardckpt.engine import writer

    writer.uuid = types.SimpleNamespace(uuid4=lambda: uuid.UUID(int=7))  # type: ignore[assignment]


def _same_manifest_both_paths(rank: int, world: int, root: str) -> None:
    _same_save_id()
    made: list[int] = []
    _count_rules(made)
    state = _state(world)
    _save(state, f"{root}/rules")
    protocol.plan_from_rules = lambda *a, **k: None  # type: ignore[assignment]  # the full path
    _save(state, f"{root}/full")
    assert made == ([True] if rank == 0 else [])  # the first save was planned from rules
    target = {
        "model": {k: torch.zeros_like(_full(k)) for k in ("fsdp", "uneven", "empty", "hsdp", "tp", "bias")},
        "optim": {"step": torch.tensor(0.0)},
        "epoch": -1,
        "per_rank": {f"rank{rank}": {"rng": torch.zeros(rank + 3, dtype=torch.uint8), "pos": -1}},
    }
    # every rank reads whole tensors (another layout), and its own keys of the others' saved
    shardckpt.load(target, f"{root}/rules", strict=False, timeout_s=60)
    for k, t in target["model"].items():
        assert torch.equal(t, _full(k)), k
    assert torch.equal(target["optim"]["step"], _full("step")) and target["epoch"] == 3
    assert torch.equal(target["per_rank"][f"rank{rank}"]["rng"], _rng(rank))
    assert target["per_rank"][f"rank{rank}"]["pos"] == 10 + rank


def _normalized(folder: Path) -> tuple[bytes, dict[str, bytes]]:
    """The manifest's bytes without its time (and the hash over it), and every other file's
    bytes but the folder's claim (which holds when the save started)."""
    text = (folder / "manifest.json").read_bytes()
    created = json.loads(text)["created_at"]
    text = text.replace(created.encode(), b"TIME")
    text = text[: text.rindex(b'"manifest_hash"')]
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    del files["manifest.json"], files[".shardckpt-save.json"]
    return text, files


def test_four_ranks_the_plan_from_rules_commits_the_full_paths_manifest(tmp_path):
    """FSDP Shard(0), 2x2 HSDP, TP+FSDP 2x2, uneven and empty torch.chunk shards, replicated
    small tensors, a value, and a tensor and a value of each rank's own, in one save."""
    run_ranks(_same_manifest_both_paths, 4, str(tmp_path))
    rules, full = _normalized(tmp_path / "rules"), _normalized(tmp_path / "full")
    assert rules[0] == full[0]  # the manifest, byte for byte but its time
    assert rules[1] == full[1]  # pages, index records, data files
    manifest = json.loads((tmp_path / "rules" / "manifest.json").read_bytes())
    assert all(t["rule"] is not None for k, t in manifest["tensors"].items() if k != "model.uneven")


def _one_rank_irregular(rank: int, world: int, root: str) -> None:
    _same_save_id()
    made: list[int] = []
    _count_rules(made)
    trips = [0]
    _count_trips(trips)
    state = _state(world)
    with Checkpointer() as ckpt:
        ckpt.save(state, f"{root}/rules", format_version=3, timeout_s=60)
        assert trips == [2]
        ckpt.save(state, f"{root}/again", format_version=3, timeout_s=60)
        assert trips == [4]  # the plan from rules reused: fingerprints only
        if rank == 1:  # as if it missed the last answer: it summarizes, the coordinator holds the plan
            cache = ckpt._rounds.over(ckpt._groups[next(iter(ckpt._groups))])[1]
            cache.plan_id = "stale"
        ckpt.save(state, f"{root}/stale", format_version=3, timeout_s=60)
        assert trips == [7]  # a summary and a held plan: "resend", full plans; then the write
    if rank == 1:  # as for a staged shard or another placement: this rank's items prove nothing
        rule_plan_module_layouts = rule_plan_module.layouts_of
        protocol.layouts_of = lambda flat, plan: {}  # type: ignore[assignment]
    _save(state, f"{root}/full")
    assert trips == [10]  # summaries, "resend", full plans; then the write
    assert made == ([True, False] if rank == 0 else [])
    if rank == 1:
        protocol.layouts_of = rule_plan_module_layouts  # type: ignore[assignment]
    # a tensor whose shape differs across ranks: refused with the full path's words, on every rank
    bad = {"w": torch.zeros(2 + rank)}
    with pytest.raises(shardckpt.UnsupportedValueError, match=r"key 'w': the tensor differs in shape or dtype"):
        _save(bad, f"{root}/bad")


def test_a_rank_rules_cannot_prove_sends_every_rank_down_the_full_path(tmp_path):
    run_ranks(_one_rank_irregular, 2, str(tmp_path))
    rules = _normalized(tmp_path / "rules")
    assert rules == _normalized(tmp_path / "full") == _normalized(tmp_path / "again") == _normalized(tmp_path / "stale")
    assert not (tmp_path / "bad" / "manifest.json").exists()
