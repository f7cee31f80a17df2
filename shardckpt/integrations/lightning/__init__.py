"""Lightning: :class:`ShardckptCheckpointIO` (a CheckpointIO plugin for any strategy) and
:class:`ShardckptFSDPStrategy` / :class:`ShardckptModelParallelStrategy` (every rank writes
its own shard). Needs ``pip install 'shardckpt[lightning]'``; see docs/interop.md."""

from __future__ import annotations

from shardckpt.integrations.lightning.checkpoint_io import ShardckptCheckpointIO, decode_checkpoint, encode_checkpoint
from shardckpt.integrations.lightning.strategy import (
    ShardckptFSDPStrategy,
    ShardckptModelParallelStrategy,
    ShardckptOptions,
)

__all__ = [
    "ShardckptCheckpointIO",
    "ShardckptFSDPStrategy",
    "ShardckptModelParallelStrategy",
    "ShardckptOptions",
    "decode_checkpoint",
    "encode_checkpoint",
]
