"""torchtitan: :class:`ShardckptCheckpointManager`, a checkpoint backend for torchtitan's Trainer.

torchtitan (tested with 0.3.0) builds its checkpointer from ``Trainer.Config.checkpoint``:
any ``BaseCheckpointManager.Config`` subclass, whose owner class is what gets built. Put
``ShardckptCheckpointManager.Config(...)`` there (docs/interop.md, "torchtitan") and the
trainer's model parts, optimizers, LR schedulers, dataloader and train state are saved
through a :class:`shardckpt.CheckpointManager`: atomic commits (a step exists once its
manifest does, so a job killed mid-save resumes from the last committed step),
``keep_latest_k`` as retention, ``async_mode="async"`` as an async save, and resharding
on load (the DTensor layout of the resuming job decides what each rank reads).

What goes into a step is what torchtitan's own DCP manager saves: the model's state dict
flattened to the top level (through torchtitan's ``ModelWrapper``), and ``optimizer``,
``lr_scheduler``, ``dataloader`` and ``train_state`` (plus any other ``states`` the
trainer hands over). One difference: torchtitan's dataloaders pickle their state for
DCP; this manager stores the ``StatefulDataLoader`` state itself as tagged JSON, so
nothing saved or loaded here goes through pickle.

Needs torchtitan (``pip install torchtitan==0.3.0``; Python >= 3.11). ``import shardckpt``
never imports this module.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import torch

from shardckpt.errors import MissingDependencyError

try:
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchtitan.components.checkpointer import (
        DATALOADER,
        LR_SCHEDULER,
        OPTIMIZER,
        BaseCheckpointManager,
        ModelWrapper,
    )
    from torchtitan.components.dataloader import ParallelAwareDataloader
    from torchtitan.config import TORCH_DTYPE_MAP
    from torchtitan.tools import filesystem
except ImportError as e:  # pragma: no cover - exercised only without torchtitan
    raise MissingDependencyError(
        "shardckpt.integrations.torchtitan needs torchtitan (tested with 0.3.0, Python >= 3.11): "
        f"pip install torchtitan==0.3.0 ({e})"
    ) from e

from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.engine.collective import RankGroup
from shardckpt.engine.loading import listing
from shardckpt.errors import ShardckptError, StateDictMismatchError
from shardckpt.format.values import decode_value, encode_value
from shardckpt.manager.checkpoint_manager import CheckpointManager

__all__ = ["ShardckptCheckpointManager"]

log = logging.getLogger("shardckpt")

# Saved with every step (the manifest's metrics): whether it holds the model only (a
# last-step export or a seed checkpoint), so a load knows what to ask for.
MODEL_ONLY_METRIC = "torchtitan_model_only"
# With it, the dtype its floating tensors were cast to (export_dtype), which a load asks for.
EXPORT_DTYPE_METRIC = "torchtitan_export_dtype"

# Base Config fields this manager refuses when set, with what to do instead.
_UNSUPPORTED = {
    "last_save_in_hf": "save in shardckpt's format and export the step with "
    "`shardckpt export <step folder> <out> --format hf`",
    "initial_load_in_hf": "import the Hugging Face weights first with `shardckpt import` and point "
    "initial_load_path at the result",
    "initial_load_in_hf_quantized": "import the weights with `shardckpt import` first",
}


class _Delegate:
    """A torchtitan Stateful seen as a plain one. OptimizersContainer subclasses
    torch.optim.Optimizer, which shardckpt would otherwise pair with a module of the
    state_dict; torchtitan's own state_dict (flattened by FQN) is what must be saved."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def state_dict(self) -> dict[str, Any]:
        return dict(self.target.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.target.load_state_dict(state_dict)


class _DataLoaderState:
    """A ParallelAwareDataloader's position, one entry per data-parallel rank (as
    torchtitan keys it), held as tagged JSON text instead of torchtitan's pickle: the
    ``StatefulDataLoader`` state is plain values, and one string per rank keeps its
    shape out of the checkpoint's keys (a fresh loader's state is shaped differently)."""

    def __init__(self, loader: ParallelAwareDataloader) -> None:
        self.loader = loader
        self.key = f"dp_rank_{loader.dp_rank}"

    def state_dict(self) -> dict[str, Any]:
        plain = StatefulDataLoader.state_dict(self.loader)
        text = json.dumps(encode_value(plain, key=f"{DATALOADER}.{self.key}"), allow_nan=False)
        return {self.key: text, "world_size": self.loader.dp_world_size}

    def load_target(self) -> dict[str, Any]:
        """What a load asks for: every data-parallel rank's entry (a rank keeps its own),
        so a load in the saving job's layout reads each key the checkpoint has."""
        ranks = {f"dp_rank_{r}": "" for r in range(self.loader.dp_world_size)}
        return {**ranks, "world_size": self.loader.dp_world_size}

    def check(self, state_dict: dict[str, Any]) -> None:
        """Raise unless ``state_dict`` (as loaded) is a position this loader can take."""
        saved_world = state_dict.get("world_size")
        if saved_world != self.loader.dp_world_size:
            raise ShardckptError(
                f"dataloader: the checkpoint was saved with {saved_world} data-parallel ranks, this job has "
                f"{self.loader.dp_world_size}; torchtitan's dataloader cannot reshard its position. Resume "
                f"with the same data-parallel degree, or add 'dataloader' to checkpoint.exclude_from_loading"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check(state_dict)
        plain = decode_value(json.loads(state_dict[self.key]), where=f"{DATALOADER}.{self.key}")
        StatefulDataLoader.load_state_dict(self.loader, plain)


def _load_target(state: Any) -> dict[str, Any]:
    return state.load_target() if isinstance(state, _DataLoaderState) else dict(state.state_dict())


class ShardckptCheckpointManager(BaseCheckpointManager):  # type: ignore[misc]
    """torchtitan's checkpoint manager contract, saved and restored by shardckpt.

    Built by torchtitan's Trainer on every rank (``config.checkpoint.build(...)``), so
    every method is collective: the trainer calls ``load``, ``save`` and ``close`` on all
    ranks in one order. Checkpoints live under ``<dump_folder>/<folder>/step_<N>``
    (shardckpt's layout; ``folder`` may be an absolute path or an fsspec URL).

    Honoured from the base Config: ``enable``, ``folder``, ``interval``,
    ``keep_latest_k`` (0: keep all), ``load_step``, ``exclude_from_loading``,
    ``initial_load_path`` (a shardckpt checkpoint folder, used when ``folder`` holds no
    committed step) with ``initial_load_model_only``, ``last_save_model_only`` with
    ``export_dtype``, ``enable_first_step_checkpoint``, ``create_seed_checkpoint`` and
    ``load_only``. Refused: the Hugging Face options (see ``Config``); so ``sd_adapter``,
    which only they use, is accepted and ignored.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseCheckpointManager.Config):  # type: ignore[misc]
        async_mode: Literal["disabled", "async"] = "disabled"
        """"async": save returns once the state is staged in host memory; the commit
        finishes in the background and is confirmed by the next save, load or close."""

        max_staging_bytes: int | None = None
        """Bound on the host memory of an async save's staged copy, per rank (None: no bound)."""

        timeout_s: float | None = None
        """Bound on every wait for other ranks in saves and loads (None: shardckpt's defaults)."""

        num_io_threads: int | None = None
        """Files (and threads) per rank and save (None: shardckpt's default)."""

        def __post_init__(self) -> None:
            BaseCheckpointManager.Config.__post_init__(self)
            for name, instead in _UNSUPPORTED.items():
                if getattr(self, name):
                    raise ValueError(
                        f"checkpoint.{name}=True is not supported by ShardckptCheckpointManager; {instead}, "
                        f"or use torchtitan's CheckpointManager.Config for this run"
                    )
            if self.async_mode not in ("disabled", "async"):
                raise ValueError(
                    f"checkpoint.async_mode must be 'disabled' or 'async' for ShardckptCheckpointManager, got "
                    f"{self.async_mode!r} (shardckpt stages into host memory itself: use 'async')"
                )

    def __init__(
        self,
        config: Config,
        *,
        dataloader: Any,
        model_parts: list[torch.nn.Module],
        optimizers: Any,
        lr_schedulers: Any,
        states: dict[str, Any],
        sd_adapter: Any = None,
        base_folder: str = "",
    ) -> None:
        self.enable = config.enable
        self.save_future: Future[None] | None = None
        if not self.enable:
            return
        self.config = config
        self.folder = filesystem.join(base_folder, config.folder) if base_folder else config.folder
        self.model = ModelWrapper(model_parts)
        self.states: dict[str, Any] = {k: _Delegate(v) for k, v in states.items()}
        self.states[OPTIMIZER] = _Delegate(optimizers)
        self.states[LR_SCHEDULER] = _Delegate(lr_schedulers)
        if dataloader is not None:
            is_ours = isinstance(dataloader, ParallelAwareDataloader)
            self.states[DATALOADER] = _DataLoaderState(dataloader) if is_ours else _Delegate(dataloader)
        for key in config.exclude_from_loading:
            if key not in self.states:
                raise ValueError(
                    f"checkpoint.exclude_from_loading names {key!r}, which this trainer does not checkpoint; "
                    f"the states are {sorted(self.states)}"
                )
        self.checkpointer = Checkpointer()
        try:
            self.manager = CheckpointManager(
                self.folder,
                keep_last=config.keep_latest_k or None,
                async_save=config.async_mode == "async",
                max_staging_bytes=config.max_staging_bytes,
                timeout_s=config.timeout_s,
                num_io_threads=config.num_io_threads,
                checkpointer=self.checkpointer,
                read_only=config.load_only,
            )
        except BaseException:
            self.checkpointer.close()  # a manager given a Checkpointer leaves it to its creator
            raise
        log.info("shardckpt: torchtitan checkpoints are saved to and loaded from %s", self.manager.root)

    # ------------------------------------------------------------ save

    def _should_save(self, step: int, last_step: bool) -> bool:
        if self.config.load_only:
            return False
        if step == 1 and self.config.enable_first_step_checkpoint:
            return True
        return last_step or step % self.config.interval == 0

    @torch.no_grad()
    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._should_save(curr_step, last_step):
            return False
        self.maybe_wait_for_saving()  # the previous async save's commit, and its future
        model_only = last_step and self.config.last_save_model_only
        state = self._model_only_state() if model_only else self._full_state(self.states)
        metrics: dict[str, Any] = {MODEL_ONLY_METRIC: model_only}
        if model_only:
            metrics[EXPORT_DTYPE_METRIC] = self.config.export_dtype
        self.manager.save(curr_step, state, metrics=metrics, force=True)
        if self.manager.async_save and not model_only:
            self.save_future = Future()
        else:
            self.manager.wait()  # a model-only last save is synchronous, as torchtitan's is
        return True

    def _full_state(self, states: dict[str, Any]) -> dict[str, Any]:
        # torchtitan's layout: the model's FQNs at the top level beside the other states.
        return {**states, **self.model.state_dict()}

    def _model_only_state(self, dtype_name: str | None = None) -> dict[str, Any]:
        """The model's entries, floating tensors cast to ``dtype_name`` (default: export_dtype)."""
        dtype = TORCH_DTYPE_MAP[dtype_name or self.config.export_dtype]
        return {
            k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype else v
            for k, v in self.model.state_dict().items()
        }

    def _maybe_wait_for_staging(self) -> None:
        """Nothing to wait for: an async save returns once its staging copy is made."""

    def _wait_for_saving(self) -> None:
        future, self.save_future = self.save_future, None
        self.manager.wait()
        if future is not None:
            future.set_result(None)

    # ------------------------------------------------------------ load

    @torch.no_grad()
    def _load(self, step: int = -1) -> bool:
        wanted = None if step == -1 else step
        loaded = self.manager.restore_with(self._load_step, wanted)
        if loaded is not None:
            log.info("shardckpt: torchtitan resumed from step %d under %s", loaded, self.manager.root)
            return True
        if self.config.initial_load_path:
            self._load_from(self.config.initial_load_path, model_only=self.config.initial_load_model_only)
            log.info("shardckpt: torchtitan started from %s", self.config.initial_load_path)
            return True
        return False

    def _load_step(self, step: int) -> None:
        metrics = self.manager.metrics(step)
        model_only = step == 0 or metrics.get(MODEL_ONLY_METRIC) is True
        dtype = metrics.get(EXPORT_DTYPE_METRIC)
        self._load_from(self.manager.path(step), model_only=model_only, model_dtype=dtype if model_only else None)

    def _load_from(self, path: str, *, model_only: bool, model_dtype: str | None = None) -> None:
        """Collective. Fill the states from the checkpoint at ``path``, then hand them over.

        The load is not strict about the checkpoint's extra keys (as DCP's is not): the
        states excluded from loading, everything but the model for a model-only load. An
        entry this job has that the checkpoint lacks fails on every rank, before any
        object is touched."""
        skipped = set(self.config.exclude_from_loading)
        states = {} if model_only else {k: v for k, v in self.states.items() if k not in skipped}
        target = {k: _load_target(states[k]) for k in sorted(states)}
        # A model-only step holds export_dtype copies: read them as such, and let the
        # modules' load_state_dict cast them back into the parameters.
        target.update(
            self._model_only_state(model_dtype) if model_dtype in TORCH_DTYPE_MAP else self.model.state_dict()
        )
        result = self.checkpointer.load(
            target, path, strict=False, timeout_s=self.config.timeout_s, num_io_threads=self.config.num_io_threads
        )

        def check() -> None:
            loader = states.get(DATALOADER)
            if isinstance(loader, _DataLoaderState):
                loader.check(target[DATALOADER])
            if result.missing_keys:
                raise StateDictMismatchError(
                    f"{path}: this torchtitan job has {len(result.missing_keys)} entries the checkpoint lacks: "
                    f"{listing(result.missing_keys)}. Resume with the model and parallelism that saved it, or "
                    f"list the states to leave as they are in checkpoint.exclude_from_loading"
                )

        RankGroup.current().agree(f"restoring torchtitan's states from {path}", check)
        for key in sorted(states):
            states[key].load_state_dict(target[key])
        # As torchtitan's DCP manager does: the flattened model entries go back through
        # the wrapper, which hands them to every model part.
        self.model.load_state_dict(target)

    # ------------------------------------------------------------ close

    def _close(self) -> None:
        try:
            self.manager.close()
        finally:
            self.checkpointer.close()
            if self.save_future is not None:
                self.save_future.set_result(None)
                self.save_future = None
