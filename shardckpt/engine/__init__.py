"""The engine: everything between a state_dict and the storage, built on DCP's public
extension points (SavePlanner/LoadPlanner, StorageWriter/StorageReader).

- :mod:`~shardckpt.engine.checkpointer`: :class:`Checkpointer`, the object that owns staging
  buffers, the pending async save, the checkpoint process groups and the storage factory.
- :mod:`~shardckpt.engine.default`: the default Checkpointer behind ``shardckpt.save``/``load``.
- :mod:`~shardckpt.engine.options`: :class:`IOOptions` (threads, checksum block size, object-store
  transfer and retry settings) and :class:`SaveKwargs`, the keyword arguments of a save.
- :mod:`~shardckpt.engine.saving` / :mod:`~shardckpt.engine.loading`: one save path (sync and
  async share it) and one load path.
- :mod:`~shardckpt.engine.planner`, :mod:`~shardckpt.engine.writer`, :mod:`~shardckpt.engine.reader`:
  DCP's extension points.
- :mod:`~shardckpt.engine.staging`, :mod:`~shardckpt.engine.state`, :mod:`~shardckpt.engine.savable`,
  :mod:`~shardckpt.engine.collective`: host buffers, state_dict flattening, what a checkpoint can
  hold, gloo groups and the failure-gathering wrapper.
- :mod:`~shardckpt.engine._torch_private`: the only importer of torch's private names.
"""

from __future__ import annotations

from shardckpt.engine.checkpointer import Checkpointer, StorageFactory
from shardckpt.engine.default import async_save, default_checkpointer, load, save, staging_stats
from shardckpt.engine.options import IOOptions, SaveKwargs

__all__ = [
    "Checkpointer",
    "IOOptions",
    "SaveKwargs",
    "StorageFactory",
    "async_save",
    "default_checkpointer",
    "load",
    "save",
    "staging_stats",
]
