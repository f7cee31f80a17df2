"""What a person watching a long read or write sees: a byte progress bar on stderr, and
byte counts in B / KiB / MiB / GiB / TiB. Used by verify, export, import and diff, and by
the command line's tables."""

from __future__ import annotations

from tqdm import tqdm

from shardckpt.format.units import human_bytes

__all__ = ["byte_bar", "human_bytes"]


def byte_bar(total: int, desc: str, *, enabled: bool = True) -> tqdm:
    """A tqdm bar of ``total`` bytes (shown in KiB, MiB, ... steps of 1024) labelled
    ``desc``; a silent one when not ``enabled``. Close it, or use it as a context manager."""
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled)
