"""Lightning: :class:`ShardckptCheckpointIO` (a CheckpointIO plugin for any strategy) and
:class:`ShardckptFSDPStrategy` / :class:`ShardckptModelParallelStrategy` (every rank writes
its own shard); :class:`ShardckptLoadMixin` makes ``MyModel.load_from_checkpoint(path)``
read their checkpoints in one process. Needs ``pip install 'shardckpt[lightning]'``; see docs/interop.md."""

from __future__ import annotations

from shardckpt.integrations.lightning.checkpoint_io import ShardckptCheckpointIO, decode_checkpoint, encode_checkpoint
from shardckpt.integrations.lightning.loading import ShardckptLoadMixin, load_module
from shardckpt.integrations.lightning.strategy import (
    ShardckptFSDPStrategy,
    ShardckptModelParallelStrategy,
    ShardckptOptions,
)

__all__ = [
    "ShardckptCheckpointIO",
    "ShardckptFSDPStrategy",
    "ShardckptLoadMixin",
    "ShardckptModelParallelStrategy",
    "ShardckptOptions",
    "decode_checkpoint",
    "encode_checkpoint",
    "load_module",
]
