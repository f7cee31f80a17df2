"""save() and async_save(): one code path.

Both end in :func:`persist`, DCP's save over our writer and planner. ``save`` hands it
the caller's state on the caller's process group. ``async_save`` first stages the
state into reused host buffers (the only part the caller waits for), then runs
``persist`` on a background thread over a dedicated gloo group, so no collective of
the save ever runs on the training group from another thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from shardckpt import integrity
from shardckpt.collective import RankGroup, arrive, checkpoint_group, is_gloo, is_timeout, translated_failures
from shardckpt.errors import RankTimeoutError
from shardckpt.manifest import Manifest
from shardckpt.planner import SavePlanner
from shardckpt.staging import BoundedSource, Stager, tensor_bytes
from shardckpt.state import flatten_with_mappings, to_plain_state_dict
from shardckpt.storage import open_storage
from shardckpt.writer import Writer, WriterOptions

DEFAULT_SAVE_IO_THREADS = 4  # local disks: 4 streams per rank saved 1.4-1.6x faster than 2 (benchmarks.md)
DEFAULT_REMOTE_SAVE_IO_THREADS = 8  # object stores: latency-bound, more uploads in flight (storage.md)
DEFAULT_TIMEOUT_S = 1800.0
log = logging.getLogger("shardckpt")


def save(
    state_dict: dict[str, Any],
    path: str,
    *,
    process_group: Any = None,
    num_io_threads: int | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    hash_block_bytes: int = integrity.DEFAULT_BLOCK_BYTES,
    metadata: dict[str, Any] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Manifest | None:
    """Save ``state_dict`` to the checkpoint folder ``path`` (a local path or fsspec URL).

    Collective when torch.distributed is initialized (or ``process_group`` is given):
    every rank of the group must call it with its own shard of the state. Works with no
    process group too. Each rank writes the tensors it owns (replicated tensors once,
    spread over ranks) with ``num_io_threads`` threads (default 4 for local paths, 8 for
    object stores); rank 0 then writes
    ``manifest.json``, which commits the checkpoint. When this returns on any rank the
    checkpoint is committed and durable. On failure nothing is committed, an earlier
    checkpoint elsewhere is untouched, and every rank raises the same ShardckptError.

    ``state_dict`` holds nested dicts/lists of tensors and DTensors, Stateful objects
    (``state_dict()``/``load_state_dict()``), and JSON-representable values (int, float,
    str, bool, None, list, tuple, str-keyed dict). A committed checkpoint already at
    ``path`` is refused unless ``overwrite=True``. ``metadata`` (plain JSON, the
    coordinator's copy is kept) is stored in the manifest, e.g. a step and metrics.

    A pending ``async_save`` of this process is finished first. Every wait for other
    ranks is bounded by ``timeout_s``: a rank that never calls ``save`` or never finishes
    its writes makes the others raise RankTimeoutError naming it. The save's collectives
    run on a gloo group with the caller's ranks, created on the first call (by every
    rank). Returns the committed Manifest on the coordinator, None on other ranks.
    """
    path = checkpoint_path(path)
    options = _options(num_io_threads, hash_block_bytes, overwrite, metadata, path)
    wait_pending()
    group = RankGroup.current(process_group)
    ckpt_group = checkpoint_group(process_group, timeout_s) if group.is_distributed else None
    arrive(ckpt_group, f"save to {path}: waiting for every rank to call save", timeout_s)
    return persist(to_plain_state_dict(state_dict), path, ckpt_group, not group.is_distributed, options,
                   storage_options, mappings=None, timeout_s=timeout_s)


def persist(
    state: dict[str, Any],
    path: str,
    process_group: Any,
    no_dist: bool,
    options: WriterOptions,
    storage_options: dict[str, Any] | None,
    mappings: dict[str, Any] | None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    source: BoundedSource | None = None,
) -> Manifest | None:
    """Plan, write and commit ``state`` (collective over ``process_group``, a gloo group
    or None). Thread-safe as long as each concurrent call uses its own process group.
    ``source``: a bounded async save's tensor source, released when this returns."""

    timeouts: list[RankTimeoutError] = []

    def all_written() -> None:
        try:
            arrive(process_group, f"save to {path}: waiting for every rank to finish writing", timeout_s)
        except RankTimeoutError as e:
            timeouts.append(e)
            raise

    writer = Writer(open_storage(path, storage_options), options, after_write=all_written)
    try:
        rank = dist.get_rank(process_group) if process_group is not None else 0
        with translated_failures(f"save to {path}", rank=rank):
            dcp.save(state, storage_writer=writer, planner=SavePlanner(mappings=mappings, source=source),
                     process_group=process_group, no_dist=no_dist)
    except BaseException as e:
        writer.discard()
        if not isinstance(e, RuntimeError):
            raise
        # After a rank timed out, DCP's next collective fails with gloo's raw error;
        # the barrier's error says which ranks were missing.
        if timeouts:
            raise timeouts[0] from e
        if isinstance(e, RankTimeoutError) or not is_timeout(e):
            raise
        raise RankTimeoutError(f"save to {path}: a collective timed out after {timeout_s:g} s ({e})") from e
    finally:
        if source is not None:
            source.release()
    return writer.manifest


def checkpoint_path(path: Any) -> str:
    """The public boundary: a str or os.PathLike, never empty (``save(state, "")`` would
    mean the current directory)."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    if not isinstance(text, str):
        raise TypeError(f"checkpoint path must be a str or os.PathLike (a local path or fsspec URL), got {type(path).__name__}")
    if not text.strip():
        raise ValueError("checkpoint path is empty; pass the folder to save into, e.g. 'runs/exp1/step_100'")
    return text


def _options(
    num_io_threads: int | None, hash_block_bytes: int, overwrite: bool, metadata: dict[str, Any] | None, path: str
) -> WriterOptions:
    if num_io_threads is None:
        local = "://" not in path or path.startswith("file://")
        num_io_threads = DEFAULT_SAVE_IO_THREADS if local else DEFAULT_REMOTE_SAVE_IO_THREADS
    return WriterOptions(num_io_threads=num_io_threads, hash_block_bytes=hash_block_bytes, overwrite=overwrite,
                         metadata=dict(metadata or {}))


# ------------------------------------------------------------------ async


class AsyncSaveHandle:
    """A save running in the background. ``wait()`` on every rank to learn how it ended.

    ``wait`` returns the Manifest (coordinator) or None, or raises the save's error -
    the same error on every rank. ``done()`` tells without blocking.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._finished = threading.Event()
        self._manifest: Manifest | None = None
        self._error: BaseException | None = None
        self.error_reported = False

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout_s: float | None = None) -> Manifest | None:
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


_lock = threading.Lock()
_pending: AsyncSaveHandle | None = None
_stager = Stager()
_last_source: BoundedSource | None = None


def wait_pending() -> None:
    """Finish this process's pending async save; raise its error if nobody has seen it yet."""
    global _pending
    with _lock:
        handle, _pending = _pending, None
    if handle is None:
        return
    already_seen = handle.error_reported
    try:
        handle.wait()
    except BaseException:
        if not already_seen:
            raise


def async_save(
    state_dict: dict[str, Any],
    path: str,
    *,
    process_group: Any = None,
    num_io_threads: int | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    hash_block_bytes: int = integrity.DEFAULT_BLOCK_BYTES,
    metadata: dict[str, Any] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_staging_bytes: int | None = None,
) -> AsyncSaveHandle:
    """Like :func:`save`, but returns once the state is copied to host memory.

    Collective, like ``save``. First finishes the previous async save of this process
    (raising its error if it failed and nobody called ``wait`` on it). Then copies every
    tensor into host buffers kept from the previous save (pinned on GPU hosts), so the
    caller may mutate its tensors as soon as this returns. Writing, checksumming and the
    commit run on a background thread whose collectives use a dedicated gloo group
    (created on the first call, by every rank); ``timeout_s`` bounds every wait for
    other ranks (RankTimeoutError names the ranks that did not arrive).

    ``max_staging_bytes`` bounds the host memory used for staging on this rank (default:
    none, one copy of the rank's shard). When the rank's tensors exceed it, the writer
    streams them from the caller's tensors while this call waits, and copies only the
    last ``max_staging_bytes`` into a reused buffer before returning: the call blocks
    for about the time it takes to write the rest. 0 makes the save synchronous.
    """
    if max_staging_bytes is not None and max_staging_bytes < 0:
        raise ValueError(f"max_staging_bytes must be >= 0 or None (no bound), got {max_staging_bytes}")
    path = checkpoint_path(path)
    options = _options(num_io_threads, hash_block_bytes, overwrite, metadata, path)
    wait_pending()
    group = RankGroup.current(process_group)

    def stage() -> dict[str, Any]:
        flat, mappings = flatten_with_mappings(to_plain_state_dict(state_dict))
        if max_staging_bytes is None or tensor_bytes(flat) <= max_staging_bytes:
            return {"state": _stager.stage(flat), "mappings": mappings, "source": None}
        source = BoundedSource(max_staging_bytes, _stager.arena)
        return {"state": _stager.stage_live(flat), "mappings": mappings, "source": source}

    staged = group.agree(f"async save to {path}", stage)
    bg_group = checkpoint_group(process_group, timeout_s) if group.is_distributed else None
    if bg_group is not None and not is_gloo(bg_group):
        raise ValueError(
            "async_save over a subgroup needs a gloo group, so the background thread never runs "
            "collectives on a training group: pass process_group=dist.new_group(ranks, backend='gloo') "
            "(created on every rank)"
        )
    handle = AsyncSaveHandle(path)
    thread = threading.Thread(
        target=handle._run,
        args=(persist, staged["state"], path, bg_group, not group.is_distributed, options, storage_options,
              staged["mappings"], timeout_s, staged["source"]),
        name="shardckpt-async-save",
        daemon=True,
    )
    global _pending, _last_source
    with _lock:
        _pending = handle
    _last_source = staged["source"]
    thread.start()
    if _last_source is not None:
        _last_source.released.wait()  # the caller's tensors are read until then
    return handle


def staging_stats() -> dict[str, int]:
    """Host memory held by staging buffers, how often they were allocated, and for the
    last bounded save how many bytes were written from live tensors vs staged."""
    stats = {"staged_bytes": _stager.staged_bytes, "allocations": _stager.allocations}
    if _last_source is not None:
        stats.update(bounded_live_bytes=_last_source.live_bytes, bounded_staged_bytes=_last_source.staged_bytes)
    return stats


@atexit.register
def _finish_at_exit() -> None:
    """At interpreter exit, let a pending save finish (or fail cleanly, uncommitted)."""
    handle = _pending
    if handle is not None and not handle.done():
        log.warning("shardckpt: waiting for the pending async save to %s before exit", handle.path)
        handle._finished.wait()
