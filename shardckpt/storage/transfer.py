"""How :class:`~shardckpt.storage.fsspec_storage.FsspecStorage` moves bytes: part sizes,
parts in flight, read pieces and the retry policy, checked at construction. Importing it
loads no fsspec."""

from __future__ import annotations

from dataclasses import dataclass, field

from shardckpt.storage.multipart import MAX_PART_BYTES, MIN_PART_BYTES
from shardckpt.storage.retry import RetryPolicy


@dataclass(frozen=True)
class TransferOptions:
    """How FsspecStorage moves bytes.

    ``single_put_bytes``: a file up to this size is written with one PUT; a larger one
    is a multipart upload whose first part has this size. ``part_bytes``: the size of
    the later parts (doubled every 1,000 parts). Both within S3's part limits, 5 MiB to
    5 GiB. ``max_concurrency``: parts uploading at once, over all files of one storage
    (one rank's save); buffers are bounded by ``(max_concurrency + files being written)
    * max(single_put_bytes, part_bytes)``. ``read_piece_bytes``: a larger read is split
    into ranged GETs of this size, up to ``max_concurrency`` at once. ``retry``: the
    policy for every request.
    """

    part_bytes: int = 16 * 2**20
    single_put_bytes: int = 64 * 2**20
    read_piece_bytes: int = 64 * 2**20
    max_concurrency: int = 8
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        for name in ("part_bytes", "single_put_bytes"):
            value = getattr(self, name)
            if not MIN_PART_BYTES <= value <= MAX_PART_BYTES:
                raise ValueError(f"{name} must be in [5 MiB, 5 GiB] (S3's part limits), got {value}")
        if self.read_piece_bytes < 2**20:
            raise ValueError(f"read_piece_bytes must be at least 1 MiB, got {self.read_piece_bytes}")
        if not 1 <= self.max_concurrency <= 256:
            raise ValueError(f"max_concurrency must be in [1, 256], got {self.max_concurrency}")
