"""Runs of checkpoints: :class:`CheckpointManager` (one step folder per save under a
root), its retention policy and save schedule, and the ownership record that keeps two
jobs off one root."""

from __future__ import annotations

from shardckpt.manager.checkpoint_manager import CheckpointManager
from shardckpt.manager.retention import RetentionPolicy
from shardckpt.manager.schedule import SaveSchedule
from shardckpt.manager.steps import OtherCheckpoint, StepInfo, list_other_checkpoints, list_root

__all__ = [
    "CheckpointManager",
    "OtherCheckpoint",
    "RetentionPolicy",
    "SaveSchedule",
    "StepInfo",
    "list_other_checkpoints",
    "list_root",
]
