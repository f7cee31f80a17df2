"""TrainState: everything a training resume needs, saved and restored in one call.

    state = TrainState(model=model, optimizer=opt, lr_scheduler=sched, data=sampler, seed=0)
    state.restore(manager)            # collective; returns the step restored, or None
    for step in range(state.step + 1, steps + 1):
        ...train...
        state.step = step
        state.save(manager)           # collective; saves when the manager's interval says so

What it holds, under one top-level key (``"train"``) of the checkpoint:

* ``model``/``optim``: DCP's ``get_model_state_dict``/``get_optimizer_state_dict`` (FSDP2,
  DDP, DTensor TP and plain modules; frozen parameters included), loaded in place and
  resharded to the current layout, through ``engine.live`` as ``shardckpt.load`` does;
* ``lr_scheduler`` (ReduceLROnPlateau too), ``grad_scaler``, ``data`` and ``extras``
  (JSON values or Stateful objects): job-wide state, equal on every rank, saved once;
* ``progress``: step, epoch, seed, the saving world size and which parts were saved;
* ``per_rank.rank{r}``: what differs between ranks - the RNG streams (torch CPU, CUDA,
  numpy, Python ``random``) as uint8 tensors, and a per-rank data position.

The rule for per-rank state: restored exactly when the world size is unchanged. On a
different world size there is no "right" stream for a new rank, so the RNG streams are
re-derived from ``(seed, step, rank)`` - deterministic, and announced with a
:class:`RngStreamsRederivedWarning` - and a per-rank data position is refused (use
:class:`~shardckpt.training.sampler.ResumableDistributedSampler`, whose state is global).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions
from torch.distributed.checkpoint.stateful import Stateful

from shardckpt.engine.collective import RankGroup
from shardckpt.engine.live import ModuleState, OptimizerState
from shardckpt.engine.loading import check_target, skipped_keys_expected
from shardckpt.engine.state import flat_keys, nest
from shardckpt.errors import StateDictMismatchError
from shardckpt.format import datafile
from shardckpt.format.manifest import Manifest
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.format.values import decode_value
from shardckpt.training.rng import RngStreamsRederivedWarning, apply_rng, capture_rng, reseed_rng

TRAIN_STATE_KEY = "train"


# ------------------------------------------------------------------ loading context


@dataclass(frozen=True)
class _LoadContext:
    """What :meth:`TrainState.restore` learned from the manifest before building the target."""

    manifest: Manifest | ManifestV3
    progress: dict[str, Any]  # the saved "progress" values
    strict: bool
    allow_dtype_cast: bool

    @property
    def world_size(self) -> int:
        return int(self.progress.get("world_size", self.manifest.world_size))

    def saved(self, *path: str | int) -> dict[str, Any]:
        """The saved subtree under ``train/<path>`` with zero tensors and None values, ready to
        be filled by a load (its shape is the saved one, whatever the live object holds now)."""
        prefix = [TRAIN_STATE_KEY, *path]
        leaves = []
        for key, full in self.manifest.paths.items():
            if list(full[: len(prefix)]) != prefix or len(full) == len(prefix):
                continue
            rec = self.manifest.tensors.get(key)
            value = None if rec is None else torch.zeros(rec.shape, dtype=datafile.torch_dtype(rec.dtype, where=key))
            leaves.append((full[len(prefix) :], value))
        return nest(leaves)


def _saved_progress(manifest: Manifest | ManifestV3, source: str) -> dict[str, Any]:
    prefix = f"{TRAIN_STATE_KEY}.progress."
    progress = {k[len(prefix) :]: decode_value(v, where=k) for k, v in manifest.values.items() if k.startswith(prefix)}
    if "components" not in progress:
        raise StateDictMismatchError(
            f"{source}: no TrainState under key {TRAIN_STATE_KEY!r} (no '{prefix}components' in the manifest); "
            "it was not saved with TrainState.save - load it with CheckpointManager.restore / shardckpt.load instead"
        )
    return progress


def _fill_empty(current: Any, loaded: Any) -> Any:
    """``loaded`` plus the empty dicts/lists of ``current`` that a save cannot record."""
    if not isinstance(current, dict) or not isinstance(loaded, dict):
        return loaded
    merged = {k: _fill_empty(current.get(k), v) for k, v in loaded.items()}
    for k, v in current.items():
        if k not in merged and isinstance(v, (dict, list)) and not v:
            merged[k] = type(v)()
    return merged


# ------------------------------------------------------------------ TrainState


class TrainState:
    """The whole training state as one Stateful: give it to ``CheckpointManager`` through
    :meth:`save`/:meth:`restore` (or as ``{"train": state}`` to ``shardckpt.save``).

    ``data``: any Stateful data position. Its state is job-wide (saved once, must be
    equal on every rank) when ``data_scope="global"`` - the default for objects with
    ``state_is_global = True`` such as ResumableDistributedSampler - and per rank
    otherwise (e.g. torchdata's StatefulDataLoader over a DistributedSampler), which
    resumes only on the same world size. ``extras``: name -> JSON value or Stateful,
    job-wide. ``step``/``epoch`` are yours to advance; ``seed`` is the base of the RNG
    streams re-derived on a new world size. ``process_group`` must be the manager's.

    After :meth:`restore`, ``rng_restored`` is ``"exact"`` or ``"rederived"`` and
    ``restored_world_size`` is the world size that saved the step. Not thread-safe.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        lr_scheduler: Any = None,
        grad_scaler: Any = None,
        data: Any = None,
        data_scope: str | None = None,
        extras: dict[str, Any] | None = None,
        step: int = 0,
        epoch: int = 0,
        seed: int = 0,
        process_group: Any = None,
        state_dict_options: StateDictOptions | None = None,
    ) -> None:
        if data_scope is None and data is not None:
            data_scope = "global" if getattr(data, "state_is_global", False) else "per_rank"
        if data_scope not in ("global", "per_rank", None):
            raise ValueError(f"data_scope must be 'global' or 'per_rank', got {data_scope!r}")
        for name, obj in (("lr_scheduler", lr_scheduler), ("grad_scaler", grad_scaler), ("data", data)):
            if obj is not None and not isinstance(obj, Stateful):
                raise TypeError(f"{name} must have state_dict() and load_state_dict(), got {type(obj).__name__}")
        self.model = model
        self.optimizers = (
            []
            if optimizer is None
            else [optimizer]
            if isinstance(optimizer, torch.optim.Optimizer)
            else list(optimizer)
        )
        self.lr_scheduler = lr_scheduler
        self.grad_scaler = grad_scaler
        self.data = data
        self.data_scope = data_scope
        self.extras: dict[str, Any] = dict(extras or {})
        self.step = step
        self.epoch = epoch
        self.seed = seed
        self.process_group = process_group
        self.options = state_dict_options or StateDictOptions()
        self.rng_restored: str | None = None
        self.restored_world_size: int | None = None
        self._loading: _LoadContext | None = None

    # ------------------------------------------------------------ with a manager

    def save(self, manager: Any, *, metrics: dict[str, Any] | None = None, force: bool = False) -> bool:
        """Collective. ``manager.save(self.step, ...)``: saves when the manager's interval (or
        ``force``, or a preemption) says so. Returns whether a checkpoint was started."""
        return bool(manager.save(self.step, {TRAIN_STATE_KEY: self}, metrics=metrics, force=force))

    def restore(
        self, manager: Any, step: int | None = None, *, strict: bool = True, allow_dtype_cast: bool = False
    ) -> int | None:
        """Collective. Load ``step`` (default: the latest committed one) into this state.

        Returns the step restored, or None when the manager's root has no committed step
        (a fresh start: nothing is touched, not even the RNG). A latest step that fails
        verification is skipped with a warning for the next older one, as in
        ``CheckpointManager.restore``. ``strict``: the saved parts (model, optimizer,
        scheduler, ..., extras) and keys must match this state's, else
        StateDictMismatchError; with ``strict=False`` parts present on one side only are
        skipped with a warning. ``allow_dtype_cast``: floating tensors saved in another floating
        dtype (an fp32 run resumed in bf16) are converted as read, as in ``shardckpt.load``.
        """
        group = RankGroup.current(self.process_group)
        if step is None and getattr(manager, "restore_local", None) is not None:
            local: int | None = manager.restore_local({TRAIN_STATE_KEY: self})  # the fast tier (docs/recovery.md)
            if local is not None:
                return local
        restored: int | None = manager.restore_with(
            lambda s: self._restore_step(manager, s, group, strict=strict, allow_dtype_cast=allow_dtype_cast), step
        )
        return restored

    def _restore_step(self, manager: Any, step: int, group: RankGroup, *, strict: bool, allow_dtype_cast: bool) -> None:
        path = manager.path(step)

        def prepare() -> _LoadContext:
            manifest = manager.manifest(step)
            ctx = _LoadContext(manifest, _saved_progress(manifest, path), strict, allow_dtype_cast)
            self._loading = ctx
            self._check_against(ctx, path, group)
            return ctx

        try:
            self._loading = group.agree(f"restore of {path}", prepare)
            # Keys of other ranks' per-rank state are in the checkpoint but rightly not in this
            # rank's target, so the library's strict check is replaced by _check_against.
            with skipped_keys_expected():
                manager.restore({TRAIN_STATE_KEY: self}, step=step, strict=False, allow_dtype_cast=allow_dtype_cast)
        finally:
            self._loading = None

    def _check_against(self, ctx: _LoadContext, source: str, group: RankGroup) -> None:
        saved, mine = set(ctx.progress["components"]), set(self._components())
        if saved != mine:
            problem = (
                f"{source}: the checkpoint holds {sorted(saved - mine) or 'nothing more'} that this TrainState "
                f"lacks and lacks {sorted(mine - saved) or 'nothing'} that this TrainState has"
            )
            if ctx.strict:
                raise StateDictMismatchError(
                    problem + "; give TrainState the same parts, or restore(strict=False) to skip them"
                )
            warnings.warn(problem + "; those parts are skipped (strict=False)", stacklevel=4)
        scope = ctx.progress.get("data_scope")
        if "data" in saved & mine and scope != self.data_scope:
            raise StateDictMismatchError(
                f"{source}: the data position was saved with data_scope={scope!r}, "
                f"this TrainState has data_scope={self.data_scope!r}"
            )
        if "data" in saved & mine and scope == "per_rank" and ctx.world_size != group.world_size:
            raise StateDictMismatchError(
                f"{source}: the data position was saved per rank on {ctx.world_size} ranks and cannot be resumed "
                f"on {group.world_size}: per-rank positions do not say which samples the other ranks consumed. "
                "Use shardckpt.training.sampler.ResumableDistributedSampler (its position is global), or resume on "
                f"{ctx.world_size} ranks"
            )
        shared = f"{TRAIN_STATE_KEY}.per_rank."
        target = {k: v for k, v in flat_keys({TRAIN_STATE_KEY: self.state_dict()}).items() if not k.startswith(shared)}
        job_wide = dataclasses.replace(
            ctx.manifest,
            tensors={  # type: ignore[arg-type]  # each format's own tensor records, filtered
                k: v
                for k, v in ctx.manifest.tensors.items()
                if k.startswith(f"{TRAIN_STATE_KEY}.") and not k.startswith(shared)
            },
            values={
                k: v
                for k, v in ctx.manifest.values.items()
                if k.startswith(f"{TRAIN_STATE_KEY}.") and not k.startswith(shared)
            },
        )
        check_target(job_wide, target, strict=ctx.strict, source=source, allow_dtype_cast=ctx.allow_dtype_cast)

    # ------------------------------------------------------------ Stateful

    def _components(self) -> list[str]:
        parts = ["model"] + (["optim"] if self.optimizers else [])
        parts += [n for n in ("lr_scheduler", "grad_scaler", "data") if getattr(self, n) is not None]
        return parts + [f"extras.{name}" for name in sorted(self.extras)]

    def _rank(self) -> tuple[int, int]:
        g = RankGroup.current(self.process_group)
        return g.rank, g.world_size

    def state_dict(self) -> dict[str, Any]:
        """The state as a nested dict for shardckpt (called by save and by load, on every rank)."""
        ctx = self._loading
        rank, world = self._rank()
        sd: dict[str, Any] = {"model": ModuleState(self.model, self.options).state_dict()}
        if self.optimizers:
            sd["optim"] = OptimizerState(self.model, self.optimizers, self.options).state_dict()
        for name in ("lr_scheduler", "grad_scaler"):
            obj = getattr(self, name)
            if obj is not None and (ctx is None or name in ctx.progress["components"]):
                sd[name] = obj.state_dict() if ctx is None else ctx.saved(name)
        if (
            self.data is not None
            and self.data_scope == "global"
            and (ctx is None or "data" in ctx.progress["components"])
        ):
            sd["data"] = self.data.state_dict() if ctx is None else ctx.saved("data")
        sd["extras"] = self._extras_state(ctx)
        sd["progress"] = self._progress(world) if ctx is None else ctx.saved("progress")
        per_rank = self._per_rank_state(ctx, rank, world)
        if per_rank:
            sd["per_rank"] = {f"rank{rank}": per_rank}
        return sd

    def _extras_state(self, ctx: _LoadContext | None) -> dict[str, Any]:
        if ctx is not None:
            saved = ctx.saved("extras")
            return {k: v for k, v in saved.items() if f"extras.{k}" in self._components()}
        return {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in self.extras.items()}

    def _progress(self, world: int) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "seed": self.seed,
            "world_size": world,
            "components": self._components(),
            "data_scope": self.data_scope,
        }

    def _per_rank_state(self, ctx: _LoadContext | None, rank: int, world: int) -> dict[str, Any]:
        if ctx is not None:
            return ctx.saved("per_rank", f"rank{rank}") if ctx.world_size == world else {}
        per_rank: dict[str, Any] = {"rng": capture_rng()}
        if self.data is not None and self.data_scope == "per_rank":
            per_rank["data"] = self.data.state_dict()
        return per_rank

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Apply a loaded state (the model and optimizer are already filled in place)."""
        sd = state_dict
        progress = sd["progress"]
        rank, world = self._rank()
        ModuleState(self.model, self.options).load_state_dict(sd["model"])
        if self.optimizers:
            OptimizerState(self.model, self.optimizers, self.options).load_state_dict(sd["optim"])
        for name in ("lr_scheduler", "grad_scaler"):
            obj = getattr(self, name)
            if obj is not None and name in sd:
                obj.load_state_dict(_fill_empty(obj.state_dict(), sd[name]))
        if self.data is not None and "data" in sd:
            self.data.load_state_dict(_fill_empty(self.data.state_dict(), sd["data"]))
        self._load_extras(sd.get("extras", {}))
        self.step, self.epoch, self.seed = int(progress["step"]), int(progress["epoch"]), int(progress["seed"])
        self.restored_world_size = int(progress["world_size"])
        mine = sd.get("per_rank", {}).get(f"rank{rank}", {})
        same_world = self.restored_world_size == world
        if self.data is not None and self.data_scope == "per_rank" and same_world and "data" in mine:
            self.data.load_state_dict(_fill_empty(self.data.state_dict(), mine["data"]))
        self._load_rng(mine.get("rng", {}) if same_world else {}, same_world, rank, world)

    def _load_extras(self, saved: dict[str, Any]) -> None:
        for name, value in saved.items():
            current = self.extras.get(name)
            if isinstance(current, Stateful):
                current.load_state_dict(_fill_empty(current.state_dict(), value))
            else:
                self.extras[name] = value

    def _load_rng(self, streams: dict[str, torch.Tensor], same_world: bool, rank: int, world: int) -> None:
        live = capture_rng()
        missing = sorted(set(live) - set(streams))
        apply_rng({k: v for k, v in streams.items() if k in live})
        self.rng_restored = "exact" if not missing else "rederived"
        if not missing:
            return
        reseed_rng(self.seed, self.step, rank, missing)
        if same_world:
            why = f"the checkpoint holds no state for them on rank {rank} (it holds {sorted(streams) or 'none'})"
        else:
            why = f"the checkpoint was saved on {self.restored_world_size} ranks and is resumed on {world}"
        warnings.warn(
            f"rank {rank}: RNG streams {missing} re-derived from (seed={self.seed}, step={self.step}, rank={rank}) "
            f"instead of restored, because {why}. Training continues deterministically, but random draws "
            "(dropout, sampling) differ from an uninterrupted run.",
            RngStreamsRederivedWarning,
            stacklevel=2,
        )

    def reseed_rng(self, step: int | None = None) -> None:
        """Seed this rank's streams from ``(seed, step, rank)`` (default: the current step),
        e.g. at a fresh start so every run of the job draws the same numbers."""
        rank, _ = self._rank()
        reseed_rng(self.seed, self.step if step is None else step, rank)
