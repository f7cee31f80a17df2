"""ResumableDistributedSampler: a data position that survives a change of world size.

Every epoch has one global order of sample ids (a permutation seeded by
``seed + epoch``, the same on every rank and for every world size). Training
consumes that order front to back, ``global_batch`` samples per step, and each rank
takes its strided share of them (``ids[rank::num_replicas]``). The state is the
number of samples consumed *globally* in the current epoch (plus epoch and seed), so
it is equal on every rank, is saved once as JSON, and means the same thing at any
world size: a resume on M ranks continues the global order exactly where N ranks
left it, with no sample repeated and none skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class GlobalBatch:
    """One step's samples: ``global_ids`` for the whole job, ``local_ids`` for this rank."""

    epoch: int
    global_ids: list[int]
    local_ids: list[int]


class ResumableDistributedSampler(Sampler[int]):
    """A distributed sampler whose state is the global position in a fixed per-epoch order.

    Use it step by step with :meth:`next_batch` (it advances the position itself), or
    as a ``Sampler`` for a ``DataLoader(batch_size=b)`` and call ``advance(b *
    num_replicas)`` after each optimizer step (a DataLoader reads ahead, so the
    sampler cannot know by itself what was consumed). ``__iter__`` starts at the
    current position, so build the DataLoader iterator after a restore.

    ``drop_last=True`` ends an epoch when fewer samples remain than a step needs (the
    dropped tail is the same at every world size); ``drop_last=False`` gives a short
    last step, split unevenly over ranks. The state (``state_dict``) is JSON ints,
    equal on every rank. Not thread-safe.
    """

    state_is_global = True  # TrainState: save once for the job, valid at any world size

    def __init__(
        self,
        dataset_len: int,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be >= 1, got {dataset_len}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got rank {rank} of {num_replicas}")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed = 0  # samples of the current epoch's global order already trained on, all ranks together
        self._order: tuple[int, int, torch.Tensor, str] | None = None  # (seed, epoch, order, digest) cache

    # ------------------------------------------------------------ order

    def global_order(self, epoch: int | None = None) -> list[int]:
        """The order in which epoch ``epoch`` (default: the current one) visits sample ids."""
        order: list[int] = self._order_tensor(epoch).tolist()
        return order

    def _order_tensor(self, epoch: int | None = None) -> torch.Tensor:
        return self._cached_order(epoch)[2]

    def order_digest(self, epoch: int | None = None) -> str:
        """A fingerprint of epoch ``epoch``'s order, saved with the position: a resume whose torch
        would permute differently is refused instead of silently repeating samples."""
        return self._cached_order(epoch)[3]

    def _cached_order(self, epoch: int | None) -> tuple[int, int, torch.Tensor, str]:
        epoch = self.epoch if epoch is None else epoch
        if self._order is None or self._order[:2] != (self.seed, epoch):
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                order = torch.randperm(self.dataset_len, generator=g)
            else:
                order = torch.arange(self.dataset_len)
            digest = hashlib.sha256(order.to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()[:16]
            self._order = (self.seed, epoch, order, digest)
        return self._order

    def set_epoch(self, epoch: int) -> None:
        """Enter ``epoch``. A new epoch starts at its beginning; the current one keeps its position
        (so ``set_epoch(state.epoch)`` after a restore does not rewind)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    # ------------------------------------------------------------ step by step

    def next_batch(self, global_batch: int) -> GlobalBatch:
        """Take the next ``global_batch`` samples of the global order and advance past them.

        Starts the next epoch first when the current one has fewer than
        ``global_batch`` samples left (``drop_last=True``) or none left. Collective in
        meaning only: every rank must call it with the same ``global_batch``; no
        communication happens.
        """
        if global_batch < 1 or global_batch % self.num_replicas:
            raise ValueError(
                f"global_batch must be a positive multiple of num_replicas ({self.num_replicas}) so every "
                f"rank gets the same number of samples, got {global_batch}"
            )
        remaining = self.dataset_len - self.consumed
        if remaining == 0 or (self.drop_last and remaining < global_batch):
            self.set_epoch(self.epoch + 1)
        ids: list[int] = self._order_tensor()[self.consumed : self.consumed + global_batch].tolist()
        self.consumed += len(ids)
        return GlobalBatch(self.epoch, ids, ids[self.rank :: self.num_replicas])

    def advance(self, num_samples: int) -> None:
        """Record that ``num_samples`` more samples (all ranks together) were trained on."""
        if num_samples < 0 or self.consumed + num_samples > self.dataset_len:
            raise ValueError(
                f"cannot advance by {num_samples}: {self.consumed} of {self.dataset_len} samples of epoch "
                f"{self.epoch} are consumed already; call set_epoch(epoch + 1) to start the next epoch"
            )
        self.consumed += num_samples

    # ------------------------------------------------------------ Sampler

    def _local_end(self) -> int:
        remaining = self.dataset_len - self.consumed
        if self.drop_last:
            remaining -= remaining % self.num_replicas
        return self.consumed + remaining

    def __iter__(self) -> Iterator[int]:
        mine: list[int] = self._order_tensor()[
            self.consumed + self.rank : self._local_end() : self.num_replicas
        ].tolist()
        return iter(mine)

    def __len__(self) -> int:
        return len(range(self.consumed + self.rank, self._local_end(), self.num_replicas))

    # ------------------------------------------------------------ Stateful

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "dataset_len": self.dataset_len,
            "shuffle": self.shuffle,
            "order_digest": self.order_digest(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (saved at any world size). The dataset must be the same length
        and the shuffle setting the same, or the saved position would point into another order."""
        if state["dataset_len"] != self.dataset_len or bool(state["shuffle"]) != self.shuffle:
            raise ValueError(
                f"the saved data position is for a dataset of {state['dataset_len']} samples with "
                f"shuffle={state['shuffle']}, this sampler has {self.dataset_len} samples and "
                f"shuffle={self.shuffle}; resume with the same dataset, or start the data position afresh "
                "by not restoring the sampler"
            )
        if not 0 <= int(state["consumed"]) <= self.dataset_len:
            raise ValueError(f"saved position {state['consumed']} is outside the dataset of {self.dataset_len} samples")
        epoch, seed = int(state["epoch"]), int(state["seed"])
        self.seed = seed
        if "order_digest" in state and state["order_digest"] != self.order_digest(epoch):
            raise ValueError(
                f"epoch {epoch}'s sample order (seed {seed}) computes differently here than where it was saved "
                f"(digest {self.order_digest(epoch)} != {state['order_digest']}), e.g. another torch version's "
                "randperm; resuming would repeat and skip samples. Resume with the torch version that saved it, "
                "or start the next epoch (set_epoch) on purpose"
            )
        self.epoch = epoch
        self.consumed = int(state["consumed"])
