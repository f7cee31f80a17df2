"""Which step an incremental manager save builds on, and when it must write everything.

With ``CheckpointManager(incremental=True, full_every=N)`` each save's base is the newest
committed step, if that step was itself saved incrementally (its manifest is format 2, or
format 3 for a manager saving format 3, and its metadata carries ``incremental_chain``:
saves since the last full one, 0 for a full save). A step of the other family (a root whose
manager switched ``format_version``) is no base: the next save is full. Every N-th save is
full, so no step reads files from more than the N newest saves'
folders. Pure bookkeeping: manifests are read through the function the caller passes.
"""

from __future__ import annotations

from collections.abc import Callable

from shardckpt.format.manifest import Manifest
from shardckpt.format.manifest_v3 import ManifestV3

CHAIN_KEY = "incremental_chain"
"""The metadata key of a manager step: how many saves since the last full one it is."""


class IncrementalChain:
    """The chain length of the steps this manager saved or read. Not thread-safe; the
    coordinator decides the base, every rank records what it saved."""

    def __init__(self, full_every: int | None, *, format_version: int | None = None) -> None:
        if full_every is not None and (
            isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 1
        ):
            raise ValueError(f"full_every must be a positive int or None (never), got {full_every!r}")
        self.full_every = full_every
        self.format_version = format_version  # of this manager's saves: 3 builds on format 3 only
        self._length: dict[int, int] = {}  # step -> saves since the last full one (0: full); -1: not a base

    def base_for(
        self, step: int, latest: int | None, manifest: Callable[[int], Manifest | ManifestV3]
    ) -> tuple[int | None, int]:
        """The base of a save of ``step`` when ``latest`` is the newest committed step
        (None: a full save), and how many saves since the last full one this save makes.
        ``manifest(step)`` reads a committed step's manifest."""
        if latest is None or latest >= step:
            return None, 0
        length = self._length_of(latest, manifest)
        if length is None or (self.full_every is not None and length + 1 >= self.full_every):
            return None, 0
        return latest, length + 1

    def record(self, step: int, length: int) -> None:
        """``step`` is being saved ``length`` saves after the last full one."""
        self._length[step] = length

    def forget(self, step: int) -> None:
        """``step`` is deleted."""
        self._length.pop(step, None)

    def _length_of(self, step: int, manifest: Callable[[int], Manifest | ManifestV3]) -> int | None:
        """Saves since the last full one at committed ``step``; None if it cannot be a base
        (not saved incrementally: no digests to compare)."""
        if step not in self._length:
            m = manifest(step)
            length = m.metadata.get(CHAIN_KEY)
            # format 3 builds on format 3 (digests in its index records), formats 1/2 on format 2
            if isinstance(m, ManifestV3):
                same_family = self.format_version == 3
            else:
                same_family = self.format_version != 3 and m.format_version == 2
            ok = same_family and isinstance(length, int) and not isinstance(length, bool) and length >= 0
            self._length[step] = length if ok and isinstance(length, int) else -1
        return None if self._length[step] < 0 else self._length[step]
