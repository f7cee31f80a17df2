"""Typed I/O configuration of saves and loads: :class:`IOOptions`, :class:`SaveKwargs`,
the keyword arguments ``save`` and ``async_save`` share, and :class:`Timeouts`, what
``timeout_s`` bounds.

An :class:`IOOptions` is given once (``Checkpointer(io=...)``, ``CheckpointManager(io=...)``)
and overridden per call (``save(..., io=...)``); the keyword shortcuts ``num_io_threads=``
and ``hash_block_bytes=`` override one field of whichever options are in effect.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

from shardckpt.format import integrity
from shardckpt.storage import local_path

if TYPE_CHECKING:
    from shardckpt.storage.fsspec_storage import TransferOptions

__all__ = ["DEFAULT_ARRIVE_TIMEOUT_S", "DEFAULT_IO_TIMEOUT_S", "IOOptions", "SaveKwargs", "Timeouts"]

DEFAULT_SAVE_IO_THREADS = 4  # local disks: 4 streams per rank saved 1.4-1.6x faster than 2 (benchmarks.md)
DEFAULT_REMOTE_SAVE_IO_THREADS = 8  # object stores: latency-bound, more uploads in flight (storage.md)
DEFAULT_LOAD_IO_THREADS = 4
MAX_IO_THREADS = 256
MIN_HASH_BLOCK_BYTES = 4096
MAX_HASH_BLOCK_BYTES = 2**30  # the manifest's schema allows no more

DEFAULT_ARRIVE_TIMEOUT_S = 600.0
"""How long the ranks of a save, load or manager call wait for a rank that has not made
the call yet (forgot it, crashed before it, is stuck elsewhere) before all raise
RankTimeoutError naming it. 10 minutes: torch's own default for NCCL process groups, so
rank skew that a training job survives at any collective is survived here too."""

DEFAULT_IO_TIMEOUT_S = 1800.0
"""How long ranks that finished writing (or reading) their shard wait for the slowest
rank's writes (reads) to finish. Longer than the arrival bound on purpose: it waits for
a healthy rank doing real work (a big shard, a shared disk or object store at its limit,
retries), which a too-short bound would turn into a failed save."""


@dataclass(frozen=True)
class IOOptions:
    """How a save or load moves bytes, per rank. Immutable; checked when created.

    ``num_io_threads``: threads per rank. A save writes that many data files in parallel,
    a load reads with that many threads. In [1, 256]; None picks by operation and
    storage: 4 for saves to local paths, 8 for saves to object stores, 4 for loads.

    ``hash_block_bytes``: saves checksum every tensor chunk in blocks of this size
    (default 8 MiB), so a load that reads part of a chunk verifies only the blocks it
    reads. A multiple of 64 in [4096, 2**30]. Loads use the size recorded in the
    checkpoint's manifest, whatever this says.

    ``direct_writes`` (False): a save to a local path writes its data files around the page
    cache (``O_DIRECT`` through an aligned buffer, :mod:`shardckpt.storage.direct`): no copy
    into the cache and no dirty pages for the save's fsync to flush, which on a busy host
    was several times faster (docs/benchmarks.md, "Direct writes"); a load right after
    reads from the disk rather than from memory. A filesystem that refuses ``O_DIRECT``
    gets plain writes; fsspec URLs ignore it.

    ``transfer``: a :class:`shardckpt.storage.TransferOptions` for fsspec URLs (``s3://``,
    ``gs://``, ``memory://``...): multipart part sizes, parts and ranged reads in flight,
    and, as ``transfer.retry``, the :class:`shardckpt.storage.RetryPolicy` of every
    request. None: ``TransferOptions()``'s defaults. Local paths have no transfer
    settings and ignore it, so one IOOptions serves local and remote paths alike.

    Example::

        from shardckpt import IOOptions, RetryPolicy, TransferOptions

        io = IOOptions(
            num_io_threads=16,
            transfer=TransferOptions(part_bytes=32 * 2**20, retry=RetryPolicy(max_total_s=300)),
        )
        shardckpt.Checkpointer(io=io)  # every save and load of this Checkpointer
    """

    num_io_threads: int | None = None
    hash_block_bytes: int = integrity.DEFAULT_BLOCK_BYTES
    transfer: TransferOptions | None = None
    direct_writes: bool = False

    def __post_init__(self) -> None:
        if type(self.direct_writes) is not bool:
            raise TypeError(f"direct_writes must be True or False, got {self.direct_writes!r}")
        if self.num_io_threads is not None:
            check_io_threads(self.num_io_threads)
        check_hash_block_bytes(self.hash_block_bytes)
        if self.transfer is not None:
            # Imported here: it pulls in fsspec and botocore, which local-only users never load.
            from shardckpt.storage.fsspec_storage import TransferOptions

            if not isinstance(self.transfer, TransferOptions):
                raise TypeError(
                    f"transfer must be a shardckpt.TransferOptions or None, got {type(self.transfer).__name__}"
                )

    def save_threads(self, path: str) -> int:
        """The threads a save to ``path`` writes with."""
        if self.num_io_threads is not None:
            return self.num_io_threads
        return DEFAULT_SAVE_IO_THREADS if local_path(path) is not None else DEFAULT_REMOTE_SAVE_IO_THREADS

    def load_threads(self) -> int:
        """The threads a load reads with."""
        return DEFAULT_LOAD_IO_THREADS if self.num_io_threads is None else self.num_io_threads

    def transfer_for(self, url: str) -> TransferOptions | None:
        """``transfer`` where it applies (an fsspec URL), None for a local path."""
        return None if local_path(url) is not None else self.transfer

    def with_shortcuts(self, *, num_io_threads: int | None = None, hash_block_bytes: int | None = None) -> IOOptions:
        """These options with the keyword shortcuts of a call applied: each one given
        (not None) replaces its field. Validated like a new IOOptions."""
        given: dict[str, Any] = {"num_io_threads": num_io_threads, "hash_block_bytes": hash_block_bytes}
        changes = {name: value for name, value in given.items() if value is not None}
        return dataclasses.replace(self, **changes) if changes else self


class SaveKwargs(TypedDict, total=False):
    """The keyword arguments of ``save`` and ``async_save`` (all optional), in one place.

    - ``process_group``: the ranks taking part (default: the whole job when
      torch.distributed is initialized, else this process alone).
    - ``overwrite`` (False): replace a committed checkpoint already at the path.
    - ``metadata`` (None): plain JSON stored in the manifest (the coordinator's copy).
    - ``storage_options`` (None): handed to fsspec for fsspec URLs (credentials, endpoint).
    - ``timeout_s`` (None): bound on every wait for other ranks, in seconds; None: 600 for
      a rank to arrive, 1800 for the slowest rank's writes or reads (:class:`Timeouts`).
    - ``io`` (None: the Checkpointer's :class:`IOOptions`): threads, checksum block size,
      object-store transfer and retry settings for this call.
    - ``num_io_threads``, ``hash_block_bytes`` (None): shortcuts that replace that field of
      the ``io`` in effect.
    - ``incremental`` (False): record a digest of every chunk (format 2), so that this
      checkpoint can be the ``base`` of a later one.
    - ``base`` (None): an incremental save against the committed checkpoint ``base``, a
      folder beside ``path`` (same parent) saved with ``incremental=True`` (or a ``base``):
      chunks whose bytes are unchanged since it are not written again; the new manifest
      points at the base's files. Implies ``incremental``. See docs/manager.md.
    - ``format_version`` (None: :data:`DEFAULT_FORMAT_VERSION`, 1): 1 writes version 1 (2 for
      incremental saves, whose ``base`` must then be format 2); pass it to keep that format
      should the default change. 3 writes format 3 (docs/format.md section 12: sharding rules,
      per-rank index records; 256 KiB checksum blocks unless ``hash_block_bytes`` says
      otherwise), also incremental: its ``base`` must then be a format-3 checkpoint.

    Every rank passes the same path, ``overwrite``, ``incremental``, ``format_version`` and
    checksum block size (they shape the one checkpoint the ranks write): a save whose ranks
    differ raises ``InconsistentRanksError`` on every rank before anything is written.
    Also the type of a dict of these to pass on: ``ckpt.save(sd, path, **kwargs)``.
    """

    process_group: Any
    overwrite: bool
    metadata: dict[str, Any] | None
    storage_options: dict[str, Any] | None
    timeout_s: float | None
    io: IOOptions | None
    num_io_threads: int | None
    hash_block_bytes: int | None
    incremental: bool
    base: str | os.PathLike[str] | None
    format_version: int | None


DEFAULT_FORMAT_VERSION = 1
"""The format a save writes when it names none: version 1 (2 for incremental saves). Format 3
stays opt-in for now; docs/format.md 12.7, "When written", gives the measured reasons and
what must change before this becomes 3 (the one place to change, with the tests it names)."""


def check_format_version(version: Any) -> None:
    """None (the default, :data:`DEFAULT_FORMAT_VERSION`), 1 (version 1, or 2 for an
    incremental save) or 3 (also incremental: its index records carry the digests,
    docs/format.md 12.7)."""
    if version is None or (type(version) is int and version in (1, 3)):
        return
    hint = (
        " (format 2 is format 1's incremental form: format_version=1 with incremental=True)"
        if type(version) is int and version == 2
        else ""
    )
    raise ValueError(
        f"format_version must be None (the default: version {DEFAULT_FORMAT_VERSION}), 1 (version 1, 2 for "
        f"incremental saves) or 3, got {version!r}{hint}"
    )


def resolve_format_version(version: int | None) -> int:
    """The format a save asking for ``version`` writes: 1 (2 with digests) or 3."""
    check_format_version(version)
    return DEFAULT_FORMAT_VERSION if version is None else version


def check_io_threads(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IO_THREADS:
        raise ValueError(f"num_io_threads must be an int in [1, {MAX_IO_THREADS}], got {n!r}")


def check_hash_block_bytes(n: Any) -> None:
    valid = isinstance(n, int) and not isinstance(n, bool) and MIN_HASH_BLOCK_BYTES <= n <= MAX_HASH_BLOCK_BYTES
    if not valid or n % 64:
        raise ValueError(f"hash_block_bytes must be a multiple of 64 in [4096, 2**30], got {n!r}")


@dataclass(frozen=True)
class Timeouts:
    """What one ``timeout_s`` bounds, in seconds.

    ``io_s``: the two waits for other ranks' I/O, the barrier after every rank's writes
    (save) and the one after every rank's reads (load). ``arrive_s``: every other wait for
    other ranks: for every rank to make the call (the barrier at the start of a save or
    load, the creation of its gloo group on the first call), the exchanges of plans and
    results, the coordinator's commit, and the manager's own agreements (opening,
    listing, retention, the per-step flags); it is the timeout of those gloo groups.

    ``timeout_s=None`` (the default everywhere) gives :data:`DEFAULT_ARRIVE_TIMEOUT_S`
    and :data:`DEFAULT_IO_TIMEOUT_S`; a number sets both.
    """

    arrive_s: float
    io_s: float

    @classmethod
    def of(cls, timeout_s: float | None) -> Timeouts:
        check_timeout(timeout_s)
        if timeout_s is None:
            return cls(DEFAULT_ARRIVE_TIMEOUT_S, DEFAULT_IO_TIMEOUT_S)
        return cls(float(timeout_s), float(timeout_s))


def check_timeout(timeout_s: Any) -> None:
    """None (the defaults) or a number of seconds > 0."""
    if timeout_s is None:
        return
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(
            f"timeout_s must be a number of seconds > 0, got {timeout_s!r}; None gives the defaults (see Timeouts)"
        )
