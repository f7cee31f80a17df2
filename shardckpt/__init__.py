"""shardckpt: distributed sharded checkpointing for PyTorch.

Every rank writes its shard in parallel as plain safetensors files; one JSON
manifest, written last, commits the checkpoint and checksums every byte; no pickle
anywhere; loading reshards to any world size.
"""

from __future__ import annotations

import importlib
from typing import Any

from shardckpt._version import __version__
from shardckpt.engine import Checkpointer, IOOptions, SaveKwargs, async_save, load, save, staging_stats
from shardckpt.engine.loading import LoadResult, read_any_manifest, read_manifest
from shardckpt.engine.saving import AsyncSaveHandle
from shardckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    DestinationNotEmptyError,
    InconsistentRanksError,
    IntegrityError,
    ManifestError,
    MissingDependencyError,
    NotCommittedError,
    RankFailureError,
    RankTimeoutError,
    RootInUseError,
    ShardckptError,
    StateDictMismatchError,
    StorageError,
    UnsupportedFormatVersionError,
    UnsupportedValueError,
)
from shardckpt.format.manifest import Manifest
from shardckpt.manager import CheckpointManager, RetentionPolicy, SaveSchedule, StepInfo, list_root
from shardckpt.training import GlobalBatch, ResumableDistributedSampler, RngStreamsRederivedWarning, TrainState

# The converters pull in tqdm and the import/export machinery, the object-store settings
# fsspec and botocore; load them on first use.
_LAZY = {
    **{
        name: "shardckpt.convert"
        for name in (
            "diff_checkpoints",
            "export_checkpoint",
            "import_checkpoint",
            "materialize_checkpoint",
            "read_state_dict",
        )
    },
    "RetryPolicy": "shardckpt.storage",
    "TransferOptions": "shardckpt.storage",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'shardckpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AsyncSaveHandle",
    "CheckpointExistsError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "Checkpointer",
    "DestinationNotEmptyError",
    "GlobalBatch",
    "IOOptions",
    "InconsistentRanksError",
    "IntegrityError",
    "LoadResult",
    "Manifest",
    "ManifestError",
    "MissingDependencyError",
    "NotCommittedError",
    "RankFailureError",
    "RankTimeoutError",
    "ResumableDistributedSampler",
    "RetentionPolicy",
    "RetryPolicy",
    "RngStreamsRederivedWarning",
    "RootInUseError",
    "SaveKwargs",
    "SaveSchedule",
    "ShardckptError",
    "StateDictMismatchError",
    "StepInfo",
    "StorageError",
    "TrainState",
    "TransferOptions",
    "UnsupportedFormatVersionError",
    "UnsupportedValueError",
    "__version__",
    "async_save",
    "diff_checkpoints",
    "export_checkpoint",
    "import_checkpoint",
    "list_root",
    "load",
    "materialize_checkpoint",
    "read_any_manifest",
    "read_manifest",
    "read_state_dict",
    "save",
    "staging_stats",
]
