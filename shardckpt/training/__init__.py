"""The rest of the training state: :class:`TrainState` (model, optimizer, scheduler,
progress, RNG streams as one Stateful), per-rank RNG capture, a resumable sampler."""

from __future__ import annotations

from shardckpt.training.rng import RngStreamsRederivedWarning
from shardckpt.training.sampler import GlobalBatch, ResumableDistributedSampler
from shardckpt.training.train_state import TrainState

__all__ = ["GlobalBatch", "ResumableDistributedSampler", "RngStreamsRederivedWarning", "TrainState"]
