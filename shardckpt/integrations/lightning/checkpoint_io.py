"""Lightning integration: a ``CheckpointIO`` plugin that saves and restores through shardckpt.

Use it like any Lightning checkpoint plugin; ``ModelCheckpoint``, ``trainer.save_checkpoint``
and ``trainer.fit(..., ckpt_path=...)`` (including ``ckpt_path="last"``) work unchanged::

    from shardckpt.integrations.lightning.checkpoint_io import ShardckptCheckpointIO

    trainer = Trainer(plugins=[ShardckptCheckpointIO()],
                      callbacks=[ModelCheckpoint(monitor="val_loss", save_top_k=3, save_last=True)])
    trainer.fit(model, ckpt_path="last")

Each ``.ckpt`` path becomes a checkpoint *folder* (manifest + safetensors data files).
Lightning hands the plugin one dict on global rank 0 (weights, ``optimizer_states``,
``lr_schedulers``, ``loops``, ``callbacks``, ``hyper_parameters``, ...). Tensors become
data files; everything else must be plain JSON. The plugin converts what converts
losslessly and restores it on load: int dict keys (optimizer ``state``), empty dicts (loop
``state_dict`` entries) and ``os.PathLike`` values (hparams). Anything else that is not
JSON (enums, dtypes, arbitrary objects in hparams) fails at save with the key's path.

Not collective: with DDP only global rank 0 saves (Lightning's convention), every rank
reads the whole checkpoint on resume. Sharded strategies (FSDP, ModelParallel) bypass
``CheckpointIO`` for their sharded state, so a plugin cannot reach it: use
:mod:`shardckpt.integrations.lightning.strategy` (``ShardckptFSDPStrategy``,
``ShardckptModelParallelStrategy``) there, which shares this module's dict encoding and
folder removal. ``load_checkpoint`` reads checkpoints written by either, whole, in one
process. See docs/interop.md.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import pathlib
from typing import Any

import torch
import torch.distributed as dist

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "shardckpt.integrations.lightning.checkpoint_io needs Lightning: pip install 'shardckpt[lightning]'"
    ) from e

from shardckpt.convert.export import read_state_dict
from shardckpt.convert.source import CheckpointSource, Selection
from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.engine.saving import SaveRequest, persist, writer_options
from shardckpt.engine.state import container_at, nest
from shardckpt.errors import CheckpointNotFoundError, ShardckptError, UnsupportedValueError
from shardckpt.format import layout
from shardckpt.storage import folder, local_path, open_storage

__all__ = [
    "ShardckptCheckpointIO",
    "decode_checkpoint",
    "encode_checkpoint",
    "move_to",
    "open_checkpoint",
    "read_checkpoint",
    "remove_checkpoint_folder",
]

log = logging.getLogger("shardckpt")
_NOTES_KEY = "lightning"
KeyPath = list[Any]  # a path into the checkpoint dict: str dict keys, int list/tuple indices


class ShardckptCheckpointIO(CheckpointIO):
    """Save Lightning checkpoints as shardckpt checkpoints; load them back without pickle.

    ``async_save``: ``save_checkpoint`` returns once tensors are copied to host buffers
    (reused from save to save) and writes in the background; the next save, a load, a
    removal of the same path and ``teardown`` wait for it and raise its error. Only in a
    single-process job; with several processes rank 0 saves synchronously (shardckpt's
    async save is collective). ``verify``: check checksums on load.

    Saves run on a :class:`~shardckpt.engine.Checkpointer` this object owns (its staging
    buffers and pending save); ``teardown`` closes it, freeing the buffers, and the next
    save creates a new one.
    """

    def __init__(
        self,
        *,
        async_save: bool = False,
        num_io_threads: int = 2,
        verify: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.async_save = async_save
        self.num_io_threads = num_io_threads
        self.verify = verify
        self.storage_options = storage_options
        self._checkpointer: Checkpointer | None = None  # created on the first save, closed by teardown
        self._warned_sync = False

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Called by Lightning on global rank 0 only. Replaces a checkpoint already at ``path``."""
        if storage_options is not None:
            raise TypeError("ShardckptCheckpointIO takes storage options in its constructor, not per save")
        tree, notes = encode_checkpoint(checkpoint)
        metadata = {_NOTES_KEY: notes, "global_step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch")}
        url = os.fspath(path)
        if _others_exist():
            self._save_from_this_rank_only(tree, url, metadata)
        else:
            engine = self._engine()
            write = engine.async_save if self.async_save else engine.save
            write(
                tree,
                url,
                overwrite=True,
                metadata=metadata,
                num_io_threads=self.num_io_threads,
                storage_options=self.storage_options,
            )

    def _engine(self) -> Checkpointer:
        if self._checkpointer is None:
            self._checkpointer = Checkpointer()
        return self._checkpointer

    def _save_from_this_rank_only(self, tree: dict[str, Any], url: str, metadata: dict[str, Any]) -> None:
        # save()/async_save() are collective whenever a process group exists, but Lightning
        # calls us on rank 0 alone: run the save's single-process path directly.
        if self.async_save and not self._warned_sync:
            log.warning("shardckpt: async_save applies to single-process jobs; rank 0 saves synchronously")
            self._warned_sync = True
        engine = self._engine()
        engine.wait()
        io = engine.io.with_shortcuts(num_io_threads=self.num_io_threads)
        request = SaveRequest(
            url,
            writer_options(io, url, overwrite=True, metadata=metadata),
            open_storage=functools.partial(engine.open_storage, url, self.storage_options, io=io),
        )
        persist(tree, request)  # no process group: this rank alone

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint dict at ``path``, tensors on CPU unless ``map_location`` says otherwise.

        Nothing is unpickled whatever ``weights_only`` says. Called on every rank; not collective.
        """
        if self._checkpointer is not None:
            self._checkpointer.wait()  # a pending save to this path must be complete before reading it
        source = open_checkpoint(os.fspath(path), self.storage_options, verify=self.verify)
        nested = read_state_dict(source, Selection())
        checkpoint = decode_checkpoint(nested, source.manifest.metadata.get(_NOTES_KEY, {}))
        return move_to(checkpoint, map_location) if map_location is not None else checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint folder at ``path`` (a symlink to one: the link only).

        Refuses, with an error, anything it cannot prove is a shardckpt checkpoint (a
        file, a symlink to anything else, a folder holding files a checkpoint never has),
        so a mistaken path cannot wipe unrelated data. A missing path is not an error.
        """
        url = os.fspath(path)
        pending = self._checkpointer.pending if self._checkpointer is not None else None
        if pending is not None and pending.path == url:
            self._checkpointer.wait()  # type: ignore[union-attr]
        remove_checkpoint_folder(url, self.storage_options)

    def teardown(self) -> None:
        """Wait for a background save, raise its error here if it failed, and free the
        staging buffers (closing this object's Checkpointer)."""
        engine, self._checkpointer = self._checkpointer, None
        if engine is not None:
            engine.close()


def remove_checkpoint_folder(url: str, storage_options: dict[str, Any] | None) -> None:
    """Delete the shardckpt checkpoint folder ``url``; a symlink to one: the link only.

    Deletes only what it can prove shardckpt wrote: a folder with a manifest or save
    marker (or an empty one), or a link to such a folder (``save_last="link"``). Raises
    ShardckptError, deleting nothing, for a file, a symlink to anything else, or a folder
    holding files a checkpoint never has. Never deletes through a symlink. A missing path
    is not an error. Not collective; call it from one process.
    """
    local = local_path(url)
    if local is not None and os.path.islink(local):
        _remove_link(url, local, storage_options)
        return
    storage = open_storage(url, storage_options)
    if storage.exists(""):
        raise ShardckptError(
            f"{url}: refusing to delete: it is a file, not a shardckpt checkpoint folder (a folder with "
            f"{layout.MANIFEST_NAME}); it may be a torch.save checkpoint or anything else. Remove it by hand "
            "if that is intended"
        )
    if not storage.is_dir():
        return
    found = folder.contents(storage)
    if found.foreign:
        raise ShardckptError(
            f"{url}: refusing to delete: this folder is not only a shardckpt checkpoint "
            f"(it also holds {list(found.foreign[:5])}); remove it by hand if that is intended"
        )
    if not found.is_ours and not found.is_empty:
        raise ShardckptError(
            f"{url}: refusing to delete: it holds data files but neither a manifest nor "
            "shardckpt's save marker, so nothing proves shardckpt wrote them; remove it by hand"
        )
    folder.remove_checkpoint(storage, why="Lightning remove_checkpoint")


def _remove_link(url: str, link: str, storage_options: dict[str, Any] | None) -> None:
    """Unlink ``link`` if it points at a shardckpt checkpoint folder; what it points at stays."""
    target = open_storage(url, storage_options)  # local: listing follows the link, deleting does not
    if not (target.is_dir() and folder.contents(target).is_ours):
        raise ShardckptError(
            f"{url}: refusing to delete: it is a symlink to {os.readlink(link)!r}, which is not a shardckpt "
            f"checkpoint folder (no {layout.MANIFEST_NAME} or save marker there), and shardckpt never deletes "
            "through a link. Remove the link by hand if that is intended"
        )
    os.unlink(link)


def open_checkpoint(url: str, storage_options: dict[str, Any] | None, *, verify: bool = True) -> CheckpointSource:
    """The committed shardckpt checkpoint at ``url``, for reading; a clear error, before
    anything is read, for Lightning's own formats (shardckpt never unpickles them)."""
    local = local_path(url)
    if local is not None:
        native = os.path.isfile(local) or os.path.isfile(os.path.join(local, "meta.pt"))
        if native and not folder.is_committed(open_storage(url)):
            raise CheckpointNotFoundError(
                f"{url} was written by Lightning's own strategy (a torch.save file or DCP folder with meta.pt), "
                "not by shardckpt, and shardckpt never unpickles. Resume it once with the stock strategy and "
                "save again with this one, or convert the DCP tensors with `shardckpt import --trust-pickle`"
            )
    return CheckpointSource(url, storage_options=storage_options, verify=verify)


def read_checkpoint(source: CheckpointSource, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The checkpoint dict in ``source``, whole tensors on CPU, without the top-level
    entries named in ``skip`` (never read). Not collective."""
    leaves = []
    for key in sorted({*source.manifest.tensors, *source.manifest.values}):
        path = source.path_of(key)
        if path[0] in skip:
            continue
        leaves.append((path, source.read_tensor(key) if key in source.manifest.tensors else source.value(key)))
    notes = source.manifest.metadata.get(_NOTES_KEY, {})
    kept_notes = {kind: [at for at in paths if not at or at[0] not in skip] for kind, paths in notes.items()}
    return decode_checkpoint(nest(leaves), kept_notes)


def _others_exist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---------------------------------------------------------------- the checkpoint dict <-> savable tree


def encode_checkpoint(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[KeyPath]]]:
    """A tree ``shardckpt.save`` accepts, and the notes :func:`decode_checkpoint` needs
    to give back int dict keys, empty dicts and path objects."""
    notes: dict[str, list[KeyPath]] = {"int_keys": [], "empty_dicts": [], "paths": []}
    tree = _encode(checkpoint, [], notes)
    return tree, notes


def _encode(obj: Any, at: KeyPath, notes: dict[str, list[KeyPath]]) -> Any:
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return _encode_dict(obj, at, notes)
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, [*at, i], notes) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, os.PathLike):
        notes["paths"].append(at)
        return os.fspath(obj)
    hint = (
        "store its .value instead"
        if isinstance(obj, enum.Enum)
        else "convert it to int, float, str, bool, None, list, tuple or dict"
    )
    raise UnsupportedValueError(
        f"checkpoint{_where(at)}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be saved: shardckpt keeps "
        f"non-tensor state as JSON, never pickle; {hint} (for hyper-parameters: save_hyperparameters(ignore=[...]))"
    )


def _encode_dict(obj: dict[Any, Any], at: KeyPath, notes: dict[str, list[KeyPath]]) -> dict[str, Any]:
    if not obj:
        notes["empty_dicts"].append(at)
        return {}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(k, bool) or not isinstance(k, (str, int)) or (isinstance(k, int) and str(k) in obj):
            raise UnsupportedValueError(
                f"checkpoint{_where(at)}: dict key {k!r} ({type(k).__name__}) cannot be saved; "
                "only str keys, or int keys with no str twin, are kept"
            )
        out[str(k)] = _encode(v, [*at, str(k)], notes)
    if any(isinstance(k, int) for k in obj):
        if not all(isinstance(k, int) for k in obj):
            raise UnsupportedValueError(f"checkpoint{_where(at)}: a dict mixes int and str keys; use one kind")
        notes["int_keys"].append(at)
    return out


def decode_checkpoint(tree: dict[str, Any], notes: dict[str, Any]) -> dict[str, Any]:
    """Undo :func:`encode_checkpoint` on the tree read back from a checkpoint."""
    for at in notes.get("empty_dicts", []):
        _ensure_empty_dict(tree, at)
    for at in notes.get("paths", []):
        tree = _replace(tree, at, pathlib.Path)
    for at in sorted(notes.get("int_keys", []), key=len, reverse=True):  # inner dicts first: outer keys still str
        tree = _replace(tree, at, lambda d: {int(k): v for k, v in d.items()})
    return tree


def _ensure_empty_dict(tree: dict[str, Any], at: KeyPath) -> None:
    if not at:
        return
    holder, part = container_at(tree, at), at[-1]
    missing = holder[part] is None if isinstance(holder, list) else part not in holder
    if missing:
        holder[part] = {}


def _replace(node: Any, at: KeyPath, fn: Any) -> Any:
    if not at:
        return fn(node)
    head, rest = at[0], at[1:]
    if isinstance(node, tuple):
        items = list(node)
        items[head] = _replace(items[head], rest, fn)
        return tuple(items)
    node[head] = _replace(node[head], rest, fn)
    return node


def move_to(obj: Any, map_location: Any) -> Any:
    """``obj`` with its tensors moved as ``map_location`` (a device, a str, or torch.load's
    dict, whose ``"cpu"`` entry applies: shardckpt reads to CPU) says."""
    if isinstance(map_location, dict):
        map_location = map_location.get("cpu", "cpu")
    if callable(map_location):
        raise TypeError(
            "a callable map_location remaps torch.load's storages, and shardckpt reads tensors without torch.load "
            "(to CPU): pass the device instead (map_location='cuda:0' or torch.device(...))"
        )
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location must be a device, a str or a dict, got {type(map_location).__name__}")
    if isinstance(obj, torch.Tensor):
        return obj.to(map_location)
    if isinstance(obj, dict):
        return {k: move_to(v, map_location) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, map_location) for v in obj)
    return obj


def _where(at: KeyPath) -> str:
    return "".join(f"[{p!r}]" for p in at)
