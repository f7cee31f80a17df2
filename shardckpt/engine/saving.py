"""The save path: sync and async saves share one code path.

Both end in :func:`persist`, DCP's save over our writer and planner. ``save`` hands it
the caller's state on the caller's process group. ``async_save`` first stages the
state into reused host buffers (the only part the caller waits for), then runs
``persist`` on a background thread over a dedicated gloo group, so no collective of
the save ever runs on the training group from another thread.

The state kept between calls (staging buffers, the pending async save, the gloo
groups) belongs to a :class:`shardckpt.engine.Checkpointer`, which calls into this
module; ``shardckpt.save``/``async_save`` run on the default one (:mod:`shardckpt.engine.default`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardckpt.engine.collective import is_gloo, translated_failures
from shardckpt.engine.collector import collector_paused
from shardckpt.engine.exchange import Exchange
from shardckpt.engine.incremental import BaseIndex
from shardckpt.engine.local_items import ItemCache
from shardckpt.engine.options import (  # noqa: F401 - the thread defaults, also read from here (benchmarks)
    DEFAULT_REMOTE_SAVE_IO_THREADS,
    DEFAULT_SAVE_IO_THREADS,
    IOOptions,
    Timeouts,
    check_timeout,
    resolve_format_version,
)
from shardckpt.engine.planner import SavePlanner
from shardckpt.engine.protocol import Rounds, save_in_rounds
from shardckpt.engine.staging import BoundedSource, Stager, tensor_bytes
from shardckpt.engine.state import flatten_with_mappings, to_plain_state_dict
from shardckpt.engine.write_threads import WriteThreads
from shardckpt.engine.write_v3 import V3_HASH_BLOCK_BYTES
from shardckpt.engine.writer import Writer, WriterOptions
from shardckpt.errors import ShardckptError
from shardckpt.format import integrity
from shardckpt.format.manifest import Manifest
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.storage import Storage, as_url

log = logging.getLogger("shardckpt")
SLOW_IO = (
    " If those ranks were only slow (a large shard, a busy disk or object store), pass a larger "
    "timeout_s (default: 1800 s for this wait)."
)


@dataclass(frozen=True)
class SaveRequest:
    """Where and how :func:`persist` writes one checkpoint (everything but the state).

    ``path``: the checkpoint folder, as named in errors. ``writer``: the writer's options
    (threads, block size, overwrite, metadata). ``open_storage``: opens ``path``; called by
    ``persist`` on the thread that runs the save, so a failure to open is the save's
    failure. ``process_group``: the gloo group every rank of the save passes, or None for
    a save by this process alone. ``timeout_s``: bound on every wait for other ranks
    (None: the defaults, see :class:`~shardckpt.engine.options.Timeouts`).
    """

    path: str
    writer: WriterOptions
    open_storage: Callable[[], Storage]
    process_group: Any = None
    timeout_s: float | None = None
    # Called with the Writer on every rank once the save committed (the Checkpointer keeps
    # the rank's chunk locations, the next incremental save's base).
    committed: Callable[[Writer], None] | None = None
    # The round trips' numbering and the last plan, kept per group by the Checkpointer
    # (None: a fresh pair for this save alone, no plan to reuse).
    rounds: Rounds | None = None
    # This rank's DTensor write items of the last save, kept by the Checkpointer for the
    # next one (None: computed afresh).
    items: ItemCache | None = None
    # This rank's writer threads and their buffers, kept by the Checkpointer for the next
    # save (None: this save starts its own).
    threads: WriteThreads | None = None

    def __post_init__(self) -> None:
        check_timeout(self.timeout_s)

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts.of(self.timeout_s)


@collector_paused()  # no full collections over the objects a save/load keeps (#18)
def persist(
    state: dict[str, Any],
    request: SaveRequest,
    *,
    mappings: dict[str, Any] | None = None,
    source: BoundedSource | None = None,
) -> Manifest | ManifestV3 | None:
    """Plan, write and commit ``state`` as ``request`` says (collective over its process
    group, when it has one: two round trips, see :mod:`shardckpt.engine.protocol`).
    Thread-safe as long as each concurrent call uses its own process group. ``mappings``:
    the flattening of a staged state (see :func:`shardckpt.engine.state.flatten_with_mappings`).
    ``source``: a bounded async save's tensor source, released when this returns."""
    path, group = request.path, request.process_group
    exchange, plans = request.rounds.over(group) if request.rounds is not None else Rounds().over(group)
    try:
        writer = Writer(request.open_storage(), request.writer, threads=request.threads)
    except BaseException:
        if source is not None:
            source.release()
        raise
    try:
        with translated_failures(f"save to {path}", rank=exchange.rank, alone=group is None):
            save_in_rounds(
                state,
                writer,
                SavePlanner(
                    mappings=mappings,
                    source=source,
                    small_replicated_to=_small_replicated_to(request, exchange),
                    items=request.items,
                ),
                exchange,
                plans,
                path=path,
                timeouts=request.timeouts,
                slow_io_hint=SLOW_IO,
            )
    except BaseException:
        writer.discard()
        raise
    finally:
        if source is not None:
            source.release()
    if request.committed is not None:
        request.committed(writer)
    return writer.manifest


def _small_replicated_to(request: SaveRequest, exchange: Exchange) -> int | None:
    """The rank that stores a format-3 save's small replicated tensors: the coordinator,
    whose index record every loading rank then reads for all of them (docs/format.md 12.3);
    None (spread evenly) for formats 1 and 2, whose placement does not change."""
    return exchange.coordinator_rank if request.writer.format_version == 3 else None


def checkpoint_path(path: Any) -> str:
    """The public boundary: a str or os.PathLike, never empty (``save(state, "")`` would
    mean the current directory)."""
    return as_url(path)


def writer_options(
    io: IOOptions,
    path: str,
    *,
    overwrite: bool,
    metadata: dict[str, Any] | None,
    digests: bool = False,
    base: Callable[[Storage], BaseIndex | None] | None = None,
    format_version: int | None = None,
) -> WriterOptions:
    """The writer's options for a save to ``path`` under ``io`` (threads defaulted by storage
    kind; ``format_version`` None: ``DEFAULT_FORMAT_VERSION``; format 3 checksums in 256 KiB
    blocks while ``io`` keeps the default block size)."""
    format_version = resolve_format_version(format_version)
    block_bytes = io.hash_block_bytes
    if format_version == 3 and block_bytes == integrity.DEFAULT_BLOCK_BYTES:
        block_bytes = V3_HASH_BLOCK_BYTES
    return WriterOptions(
        num_io_threads=io.save_threads(path),
        hash_block_bytes=block_bytes,
        direct_writes=io.direct_writes,
        overwrite=overwrite,
        metadata=dict(metadata or {}),
        digests=digests,
        base=base,
        format_version=format_version,
    )


# ------------------------------------------------------------------ async


def start_async_save(
    state_dict: dict[str, Any],
    request: SaveRequest,
    stager: Stager,
    exchange: Exchange,
    max_staging_bytes: int | None,
) -> tuple[AsyncSaveHandle, BoundedSource | None, threading.Thread]:
    """``async_save``'s foreground, every rank: stage ``state_dict`` into ``stager``'s
    buffers (above ``max_staging_bytes``, a :class:`BoundedSource` over the live tensors)
    inside one round trip on ``exchange``, then build the handle and the (not yet started)
    thread that runs :func:`persist` over the staged state. Collective."""
    if request.process_group is not None and not is_gloo(request.process_group):
        raise ValueError(
            "async_save over a subgroup needs a gloo group, so the background thread never runs "
            "collectives on a training group: pass process_group=dist.new_group(ranks, backend='gloo') "
            "(created on every rank)"
        )
    staged: dict[str, Any] = {}

    def stage() -> None:  # the staged state stays here; only the outcome travels
        flat, mappings = flatten_with_mappings(to_plain_state_dict(state_dict))
        if max_staging_bytes is None or tensor_bytes(flat) <= max_staging_bytes:
            staged.update(state=stager.stage(flat), mappings=mappings, source=None)
            return
        source = BoundedSource(max_staging_bytes, stager.arena)
        staged.update(state=stager.stage_live(flat), mappings=mappings, source=source)

    # One round trip on the checkpoint group (no save of it runs yet): every rank
    # arrived, within the arrival bound, and staged, or every rank raises.
    exchange.round_trip(
        f"async save to {request.path}",
        stage,
        lambda everyone: everyone,
        wait_s=request.timeouts.arrive_s,
        reply_s=2 * request.timeouts.arrive_s,
        waiting=f"async save to {request.path}: waiting for every rank to call async_save",
    )
    handle = AsyncSaveHandle(request.path)
    source: BoundedSource | None = staged["source"]
    run = functools.partial(persist, staged["state"], request, mappings=staged["mappings"], source=source)
    # Not a daemon: the interpreter joins it at exit, so a pending save finishes (or
    # fails uncommitted) instead of being cut off mid-write. No atexit hook needed.
    thread = threading.Thread(target=handle._run, args=(run,), name="shardckpt-async-save", daemon=False)
    return handle, source, thread


def forked_child_problem(
    action: str,
    what: str,
    pid: int,
    holds: str = "its writer threads, pending async save and process groups",
    remedy: str = "create a Checkpointer in this process (shardckpt.save and shardckpt.load use one of its own)",
) -> str:
    """The refusal of ``action`` on an object (``what``) of process ``pid`` used in a fork of it."""
    return (
        f"{action}: this {what} was created in process {pid}, and this is process {os.getpid()}, a fork of it: "
        f"{holds} exist only in process {pid}. {remedy}"
    )


class AsyncSaveHandle:
    """A save running in the background. ``wait()`` on every rank to learn how it ended.

    ``wait`` returns the Manifest (coordinator) or None, or raises the save's error -
    the same error on every rank. ``done()`` tells without blocking.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._pid = os.getpid()  # its thread runs in this process only (not in a fork of it)
        self._finished = threading.Event()
        self._manifest: Manifest | ManifestV3 | None = None
        self._error: BaseException | None = None
        self.error_reported = False

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout_s: float | None = None) -> Manifest | ManifestV3 | None:
        if self._pid != os.getpid() and not self._finished.is_set():
            action = f"wait for the async save to {self.path}"
            raise ShardckptError(forked_child_problem(action, "async save", self._pid))
        if not self._finished.wait(timeout_s):
            raise TimeoutError(f"async save to {self.path} still running after {timeout_s} s")
        if self._error is not None:
            self.error_reported = True
            raise self._error
        return self._manifest

    def _run(self, fn: Any, *args: Any) -> None:
        try:
            self._manifest = fn(*args)
        except BaseException as e:  # noqa: BLE001 - stored, raised by wait() on this rank
            self._error = e
        finally:
            self._finished.set()
