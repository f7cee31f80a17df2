"""shardckpt: distributed sharded checkpointing for PyTorch.

Every rank writes its shard in parallel as plain safetensors files; one JSON
manifest, written last, commits the checkpoint and checksums every byte; no pickle
anywhere; loading reshards to any world size.
"""

from __future__ import annotations

__version__ = "0.1.0"

from shardckpt.errors import (  # noqa: E402
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
    ManifestError,
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
from shardckpt.engine import Checkpointer  # noqa: E402
from shardckpt.loading import load, read_manifest  # noqa: E402
from shardckpt.manager import CheckpointManager, StepInfo, list_root  # noqa: E402
from shardckpt.manifest import Manifest  # noqa: E402
from shardckpt.retention import RetentionPolicy  # noqa: E402
from shardckpt.saving import AsyncSaveHandle, async_save, save, staging_stats  # noqa: E402
from shardckpt.sampler import GlobalBatch, ResumableDistributedSampler  # noqa: E402
from shardckpt.training import RngStreamsRederivedWarning, TrainState  # noqa: E402
from shardckpt.convert import diff_checkpoints, export_checkpoint, import_checkpoint, read_state_dict  # noqa: E402

__all__ = [
    "__version__",
    "save",
    "async_save",
    "AsyncSaveHandle",
    "Checkpointer",
    "staging_stats",
    "load",
    "read_manifest",
    "CheckpointManager",
    "RetentionPolicy",
    "StepInfo",
    "list_root",
    "TrainState",
    "ResumableDistributedSampler",
    "GlobalBatch",
    "RngStreamsRederivedWarning",
    "export_checkpoint",
    "import_checkpoint",
    "diff_checkpoints",
    "read_state_dict",
    "Manifest",
    "ShardckptError",
    "CheckpointNotFoundError",
    "NotCommittedError",
    "CheckpointExistsError",
    "ManifestError",
    "UnsupportedFormatVersionError",
    "IntegrityError",
    "StateDictMismatchError",
    "UnsupportedValueError",
    "StorageError",
    "RankFailureError",
    "RootInUseError",
    "RankTimeoutError",
]
