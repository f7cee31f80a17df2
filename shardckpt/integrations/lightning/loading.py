"""``LightningModule.load_from_checkpoint`` for shardckpt checkpoints.

Lightning's ``load_from_checkpoint`` opens the path with ``torch.load``; a shardckpt
checkpoint is a folder (manifest + safetensors data files), so that call fails with
``IsADirectoryError``. Put :class:`ShardckptLoadMixin` first in the bases of the module
class and the call a Lightning user types stays the same::

    from shardckpt.integrations.lightning import ShardckptLoadMixin

    class MyModel(ShardckptLoadMixin, LightningModule): ...

    model = MyModel.load_from_checkpoint("checkpoints/last.ckpt")  # saved on 8 ranks, loaded on 1

It reads checkpoints written by ``ShardckptCheckpointIO`` and by the sharded strategies
(any number of ranks) in one process, no process group needed, and builds the module as
Lightning does: ``hyper_parameters`` passed to ``__init__`` (keyword arguments override
them), ``configure_model`` and ``on_load_checkpoint`` called, weights loaded with
Lightning's ``strict`` semantics. Any other path (a ``torch.save`` file, a URL, a file
object) goes to Lightning's own ``load_from_checkpoint``. For a class you cannot edit,
:func:`load_module` does the same as a function. Nothing is patched in Lightning.
"""

from __future__ import annotations

import os
from typing import IO, TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import torch

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "shardckpt.integrations.lightning.loading needs Lightning: pip install 'shardckpt[lightning]'"
    ) from e

# Two private Lightning names, so that the module is built exactly as Lightning's own
# load_from_checkpoint builds it (hparams, instantiator allowlist, configure_model,
# on_load_checkpoint, strict) and the classmethod keeps its instance guard. Checked against
# lightning 2.6.6; tests/distributed/test_lightning.py fails if either changes behaviour.
from lightning.pytorch.core.saving import _load_state, load_hparams_from_tags_csv, load_hparams_from_yaml
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.migration.utils import migrate_checkpoint
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod

from shardckpt.integrations.lightning.checkpoint_io import move_to, open_checkpoint, read_checkpoint
from shardckpt.storage import local_path, open_storage

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ShardckptLoadMixin", "is_shardckpt_checkpoint", "load_module"]

M = TypeVar("M", bound="pl.LightningModule")
_NOT_FOR_INFERENCE = ("optimizer_states",)  # never read: inference does not need them


class ShardckptLoadMixin:
    """Makes ``load_from_checkpoint`` read shardckpt checkpoints; put it before
    ``LightningModule`` in the bases. Every other path goes to Lightning's own method.

    Class attributes: ``shardckpt_storage_options`` (fsspec options for ``s3://``
    checkpoints), ``shardckpt_verify`` (check checksums while reading, default True).
    """

    shardckpt_storage_options: ClassVar[dict[str, Any] | None] = None
    shardckpt_verify: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        order = cls.__mro__
        if pl.LightningModule in order and order.index(pl.LightningModule) < order.index(ShardckptLoadMixin):
            raise TypeError(
                f"class {cls.__name__}: ShardckptLoadMixin comes after LightningModule in its bases, so "
                "LightningModule.load_from_checkpoint hides it; put it first: "
                f"class {cls.__name__}(ShardckptLoadMixin, LightningModule)"
            )

    @_restricted_classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: str | os.PathLike[str] | IO[bytes],
        map_location: Any = None,
        hparams_file: str | os.PathLike[str] | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Self:
        """Lightning's ``load_from_checkpoint``, also for shardckpt checkpoint folders.

        For those: one process, not collective. Tensors are read to CPU, then moved as
        ``map_location`` says (a device, a str, or a ``{"cpu": device}`` dict; a callable
        is refused: it remaps ``torch.load`` storages). Nothing is unpickled, whatever
        ``weights_only`` says. The optimizer state is not read (not needed for inference),
        so ``on_load_checkpoint`` sees the checkpoint without ``optimizer_states``.
        """
        if not isinstance(checkpoint_path, (str, os.PathLike)) or not is_shardckpt_checkpoint(
            os.fspath(checkpoint_path), cls.shardckpt_storage_options
        ):
            parent: Any = super()
            return cast(
                "Self",
                parent.load_from_checkpoint(
                    checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs
                ),
            )
        module = load_module(
            cast("type[pl.LightningModule]", cls), checkpoint_path, map_location, hparams_file, strict, **kwargs
        )
        return cast("Self", module)


def is_shardckpt_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``url`` is for shardckpt to read: a local folder (or a missing local path, so
    the error is shardckpt's and says what is wrong), or a folder in an object store. A file
    and an ``http(s)://`` URL are not (Lightning's own loader reads those)."""
    local = local_path(url)
    if local is not None:
        return not os.path.isfile(local)
    if url.startswith(("http://", "https://")):
        return False
    return open_storage(url, storage_options).is_dir()


def load_module(
    cls: type[M],
    checkpoint_path: str | os.PathLike[str],
    map_location: Any = None,
    hparams_file: str | os.PathLike[str] | None = None,
    strict: bool | None = None,
    **kwargs: Any,
) -> M:
    """``cls`` built from the shardckpt checkpoint at ``checkpoint_path`` as Lightning's
    ``load_from_checkpoint`` builds it (see :meth:`ShardckptLoadMixin.load_from_checkpoint`).

    For a ``LightningModule`` class without the mixin: ``load_module(MyModel, path)``.
    Options come from the class attributes ``shardckpt_storage_options`` and
    ``shardckpt_verify`` when it has them. One process, not collective.
    """
    url = os.fspath(checkpoint_path)
    source = open_checkpoint(
        url, getattr(cls, "shardckpt_storage_options", None), verify=getattr(cls, "shardckpt_verify", True)
    )
    checkpoint = read_checkpoint(source, skip=_NOT_FOR_INFERENCE)
    if map_location is not None:
        checkpoint = move_to(checkpoint, map_location)
    if "pytorch-lightning_version" in checkpoint:  # what Lightning does to its own older checkpoints
        checkpoint, _ = migrate_checkpoint(checkpoint)
    if hparams_file is not None:
        checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY] = _read_hparams_file(os.fspath(hparams_file))
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {}).update(kwargs)
    module = cast(M, _load_state(cls, checkpoint, strict=strict, **kwargs))
    tensors = [t for t in checkpoint.get("state_dict", {}).values() if isinstance(t, torch.Tensor)]
    if not tensors:
        rank_zero_warn(f"The state dict in {url!r} contains no parameters.")
        return module
    return module.to(tensors[0].device)


def _read_hparams_file(path: str) -> Any:
    extension = path.rsplit(".", 1)[-1].lower()
    if extension == "csv":
        return load_hparams_from_tags_csv(path)
    if extension in ("yml", "yaml"):
        return load_hparams_from_yaml(path)
    raise ValueError(f"hparams_file={path!r}: expected a .csv, .yml or .yaml file, as Lightning does")
