"""Lightning strategies for sharded training whose checkpoints go through shardckpt.

Lightning's sharded strategies write their sharded state themselves (DCP plus a pickled
``meta.pt``) and never call ``CheckpointIO`` for it, so a plugin cannot reach them. These
subclasses replace only how checkpoints are saved, loaded and removed; training is the
stock strategy's::

    from shardckpt.integrations.lightning.strategy import ShardckptFSDPStrategy, ShardckptModelParallelStrategy

    Trainer(strategy=ShardckptFSDPStrategy(auto_wrap_policy={Block}), devices=8,
            callbacks=[ModelCheckpoint(save_top_k=3, save_last=True)])
    Trainer(strategy=ShardckptModelParallelStrategy(data_parallel_size=8, async_save=True), devices=8)

Who calls what (Lightning's conventions, kept):

- ``save_checkpoint``: every rank (``Trainer.save_checkpoint`` does). Collective: each
  rank writes its own shards of the model and optimizer (DTensor / ShardedTensor state
  dicts from ``torch.distributed.checkpoint.state_dict``); the rest of Lightning's dict
  (``loops``, ``callbacks``, ``lr_schedulers``, ``hyper_parameters``, ...) is taken from
  global rank 0, as Lightning's own ``meta.pt`` is, and kept as JSON and tensors in the
  same checkpoint. One manifest commits everything. ``async_save=True`` returns once the
  state is copied to host buffers.
- ``load_checkpoint``: every rank. Collective: each rank reads the part of every saved
  tensor its current shards cover, so a checkpoint saved on N processes resumes on M.
  Model and optimizer are loaded here (as Lightning's sharded strategies do); the rest
  is returned to Lightning, which restores loops, callbacks and schedulers from it.
- ``remove_checkpoint`` (``ModelCheckpoint`` retention): every rank; global rank 0
  deletes, every rank raises if that failed. Folders holding files a checkpoint never has
  are refused, never deleted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

try:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, ParallelStrategy
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "shardckpt.integrations.lightning.strategy needs Lightning: pip install 'shardckpt[lightning]'"
    ) from e

from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from shardckpt.convert.source import CheckpointSource
from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.engine.collective import RankGroup
from shardckpt.engine.loading import skipped_keys_expected
from shardckpt.engine.options import SaveKwargs, check_timeout
from shardckpt.engine.state import flat_keys
from shardckpt.errors import StateDictMismatchError
from shardckpt.integrations.lightning.checkpoint_io import (
    encode_checkpoint,
    open_checkpoint,
    read_checkpoint,
    remove_checkpoint_folder,
)

__all__ = ["ShardckptFSDPStrategy", "ShardckptModelParallelStrategy", "ShardckptOptions"]

_NOTES_KEY = "lightning"  # the same manifest metadata key as ShardckptCheckpointIO
_SHARDED_KEYS = ("state_dict", "optimizer_states")


@dataclass(frozen=True)
class ShardckptOptions:
    """How the strategies save and load. ``num_io_threads``: per rank (None: shardckpt's
    default, 4 local / 8 object store); ``verify``: check checksums on load;
    ``timeout_s``: bound on every wait for other ranks (None: 600 s for a rank to arrive,
    1800 s for the slowest rank's writes or reads; a number sets both)."""

    async_save: bool = False
    num_io_threads: int | None = None
    verify: bool = True
    storage_options: dict[str, Any] | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.num_io_threads is not None and not 1 <= self.num_io_threads <= 256:
            raise ValueError(f"num_io_threads must be in [1, 256] or None, got {self.num_io_threads}")
        check_timeout(self.timeout_s)


class _ShardckptCheckpoints(ParallelStrategy):
    """Save, load and remove for a sharded strategy, through shardckpt. A mixin: it comes
    first in the bases of a concrete Lightning strategy and overrides only checkpointing."""

    _shardckpt: ShardckptOptions
    # Owns the staging buffers, the pending async save and the checkpoint gloo groups;
    # created on first use, closed (collectively, every rank) by teardown.
    _checkpointer: Checkpointer | None = None

    def __init__(
        self,
        *args: Any,
        async_save: bool = False,
        num_io_threads: int | None = None,
        verify: bool = True,
        storage_options: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        """Takes the shardckpt options (:class:`ShardckptOptions`); every other argument
        goes to the stock Lightning strategy that follows this mixin in the bases."""
        super().__init__(*args, **kwargs)
        self._shardckpt = ShardckptOptions(async_save, num_io_threads, verify, storage_options, timeout_s)

    # ------------------------------------------------ what goes into Lightning's checkpoint dict

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """This rank's shards of the model (DTensor or ShardedTensor values). Every rank."""
        assert self.model is not None
        return get_model_state_dict(self.model)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """This rank's shards of ``optimizer``'s state, keyed by parameter name. Every rank."""
        assert self.model is not None
        return get_optimizer_state_dict(self.model, getattr(optimizer, "_optimizer", optimizer))

    # ------------------------------------------------ save / load / remove

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Write ``checkpoint`` as the shardckpt checkpoint folder ``filepath``, replacing one there.

        Collective: every rank calls it with its own shards (the path is rank 0's). With
        ``async_save`` it returns once the state is staged; the next save, load, removal
        of that path or ``teardown`` waits for it and raises its error on every rank.
        """
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes storage_options in its constructor, not per save")
        url = os.fspath(self.broadcast(filepath))
        wanted = _SHARDED_KEYS if not self.is_global_zero else tuple(checkpoint)
        tree, notes = encode_checkpoint({k: v for k, v in checkpoint.items() if k in wanted})
        metadata = {
            _NOTES_KEY: notes,
            "global_step": checkpoint.get("global_step"),
            "epoch": checkpoint.get("epoch"),
            "lightning_strategy": type(self).__name__,
        }
        o = self._shardckpt
        kwargs = SaveKwargs(
            overwrite=True,
            metadata=metadata,
            num_io_threads=o.num_io_threads,
            storage_options=o.storage_options,
            timeout_s=o.timeout_s,
        )
        engine = self._engine()
        if o.async_save:
            engine.async_save(tree, url, **kwargs)  # finishes the previous one first
        else:
            engine.save(tree, url, **kwargs)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load model and optimizer shards in place; return the rest of the checkpoint dict.

        Collective: every rank calls it after the model (and, when fitting, the optimizers)
        are set up. Reshards to the current layout. Nothing is unpickled whatever
        ``weights_only`` says. Raises StateDictMismatchError, before reading any tensor,
        when the model (with ``strict_loading``) or an optimizer has keys the checkpoint lacks.
        """
        self._finish_pending()
        url = os.fspath(self.broadcast(checkpoint_path))
        o = self._shardckpt
        source = RankGroup.current().agree(f"load of {url}", lambda: _open(url, o))
        module = self.lightning_module
        assert self.model is not None and module is not None
        strict = bool(module.strict_loading)
        target: dict[str, Any] = {"state_dict": get_model_state_dict(self.model)}
        fitting = module._trainer is not None and module.trainer.state.fn == TrainerFn.FITTING
        if fitting and self.optimizers:
            target["optimizer_states"] = [get_optimizer_state_dict(self.model, opt) for opt in self.optimizers]
        _check_covered(source, target, strict_model=strict)
        with skipped_keys_expected():  # the rest of the checkpoint is read by _read_rest
            self._engine().load(
                target, url, strict=False, verify=o.verify, storage_options=o.storage_options, timeout_s=o.timeout_s
            )
        set_model_state_dict(self.model, target["state_dict"], options=StateDictOptions(strict=strict))
        if "optimizer_states" in target:  # _check_covered made sure there is one per optimizer
            for opt, state in zip(self.optimizers, target["optimizer_states"], strict=True):
                set_optimizer_state_dict(self.model, opt, state)
        return _read_rest(source)

    def remove_checkpoint(self, filepath: Any) -> None:
        """Delete the checkpoint folder ``filepath`` (``ModelCheckpoint`` retention).

        Collective: every rank calls it (``ModelCheckpoint`` does); global rank 0 deletes,
        and if it refuses (the folder holds files a checkpoint never has) or fails, every
        rank raises. A pending async save to that path is finished first.
        """
        url = os.fspath(filepath)
        pending = self._checkpointer.pending if self._checkpointer is not None else None
        if pending is not None and pending.path == url:
            self._finish_pending()
        storage_options = self._shardckpt.storage_options
        RankGroup.current().decide(f"remove {url}", lambda: remove_checkpoint_folder(url, storage_options))

    def teardown(self) -> None:
        """Every rank, at the end of fit/validate/test: finish a background save (raising
        its error) and close the Checkpointer (freeing staging buffers and its gloo groups;
        the next save creates a new one), then the stock teardown."""
        engine, self._checkpointer = self._checkpointer, None
        try:
            if engine is not None:
                engine.close()
        finally:
            super().teardown()

    def _engine(self) -> Checkpointer:
        if self._checkpointer is None:
            self._checkpointer = Checkpointer()
        return self._checkpointer

    def _finish_pending(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.wait()


class ShardckptFSDPStrategy(_ShardckptCheckpoints, FSDPStrategy):
    """``FSDPStrategy`` (FSDP1) with sharded checkpoints written and read by shardckpt.

    Takes every ``FSDPStrategy`` argument, plus the shardckpt options below (see
    :class:`ShardckptOptions`). ``state_dict_type`` can only be ``"sharded"``: a shardckpt
    checkpoint is always sharded and loads on any number of processes; for one file
    for inference use ``shardckpt export``. The strategy writes checkpoints itself, so
    it takes no ``checkpoint_io``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.setdefault("state_dict_type", "sharded") != "sharded":
            raise ValueError(
                f"{type(self).__name__}(state_dict_type={kwargs['state_dict_type']!r}): shardckpt "
                "checkpoints are always sharded and reshard on load; drop the argument, and use "
                "`shardckpt export CKPT OUT --format torch|safetensors` for a single file"
            )
        _refuse_checkpoint_io(type(self).__name__, kwargs)
        super().__init__(*args, **kwargs)


class ShardckptModelParallelStrategy(_ShardckptCheckpoints, ModelParallelStrategy):
    """``ModelParallelStrategy`` (FSDP2 + tensor parallel, DTensor) with checkpoints
    written and read by shardckpt.

    Takes every ``ModelParallelStrategy`` argument, plus the shardckpt options (see
    :class:`ShardckptOptions`). ``save_distributed_checkpoint`` can only be True.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not kwargs.setdefault("save_distributed_checkpoint", True):
            raise ValueError(
                f"{type(self).__name__}(save_distributed_checkpoint=False): shardckpt checkpoints are "
                "always sharded and reshard on load; drop the argument, and use "
                "`shardckpt export CKPT OUT --format torch|safetensors` for a single file"
            )
        super().__init__(*args, **kwargs)


def _refuse_checkpoint_io(name: str, kwargs: dict[str, Any]) -> None:
    if kwargs.get("checkpoint_io") is not None:
        raise ValueError(
            f"{name} writes its checkpoints through shardckpt itself and takes no checkpoint_io; "
            "drop the argument (ShardckptCheckpointIO is for DDP and single-device strategies)"
        )


def _open(url: str, options: ShardckptOptions) -> CheckpointSource:
    return open_checkpoint(url, options.storage_options, verify=options.verify)


def _check_covered(source: CheckpointSource, target: dict[str, Any], *, strict_model: bool) -> None:
    saved = set(source.manifest.tensors) | set(source.manifest.values)
    if "optimizer_states" in target:
        counted = {p[1] for p in map(source.path_of, saved) if p[0] == "optimizer_states" and len(p) > 1}
        if len(counted) != len(target["optimizer_states"]):
            raise StateDictMismatchError(
                f"{source.path}: the checkpoint holds the state of {len(counted)} optimizer(s), but "
                f"{len(target['optimizer_states'])} are configured. Resume with the optimizers that saved it "
                "(configure_optimizers), or load only the weights (trainer.validate/test, or a new fit "
                "without ckpt_path)"
            )
    missing = [k for k in flat_keys(target) if k not in saved and (strict_model or not k.startswith("state_dict."))]
    if missing:
        shown = ", ".join(repr(k) for k in missing[:10]) + (
            f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        )
        raise StateDictMismatchError(
            f"{source.path}: the checkpoint lacks {shown}, which this model/optimizers need. Resume with the "
            "model and optimizers that saved it (same parameter names and optimizer types), or set "
            "`strict_loading = False` on the LightningModule to load a model that has extra keys"
        )


def _read_rest(source: CheckpointSource) -> dict[str, Any]:
    """Everything but model and optimizer state: whole tensors and values, nested as saved."""
    return read_checkpoint(source, skip=_SHARDED_KEYS)
