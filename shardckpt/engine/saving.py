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

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from shardckpt.engine.collective import arrive, is_timeout, translated_failures
from shardckpt.engine.planner import SavePlanner
from shardckpt.engine.staging import BoundedSource
from shardckpt.engine.writer import Writer, WriterOptions
from shardckpt.errors import RankTimeoutError
from shardckpt.format.manifest import Manifest
from shardckpt.storage import Storage, local_path, open_storage

DEFAULT_SAVE_IO_THREADS = 4  # local disks: 4 streams per rank saved 1.4-1.6x faster than 2 (benchmarks.md)
DEFAULT_REMOTE_SAVE_IO_THREADS = 8  # object stores: latency-bound, more uploads in flight (storage.md)
DEFAULT_TIMEOUT_S = 1800.0
log = logging.getLogger("shardckpt")


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
    storage_factory: Callable[[str, dict[str, Any] | None], Storage] | None = None,
) -> Manifest | None:
    """Plan, write and commit ``state`` (collective over ``process_group``, a gloo group
    or None). Thread-safe as long as each concurrent call uses its own process group.
    ``source``: a bounded async save's tensor source, released when this returns.
    ``storage_factory``: opens ``path`` (default :func:`open_storage`); called here, on
    the thread that runs the save, so a failure to open is the save's failure."""

    timeouts: list[RankTimeoutError] = []

    def all_written() -> None:
        try:
            arrive(process_group, f"save to {path}: waiting for every rank to finish writing", timeout_s)
        except RankTimeoutError as e:
            timeouts.append(e)
            raise

    storage = (storage_factory or open_storage)(path, storage_options)
    writer = Writer(storage, options, after_write=all_written)
    try:
        rank = dist.get_rank(process_group) if process_group is not None else 0
        with translated_failures(f"save to {path}", rank=rank):
            dcp.save(
                state,
                storage_writer=writer,
                planner=SavePlanner(mappings=mappings, source=source),
                process_group=process_group,
                no_dist=no_dist,
            )
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
        raise TypeError(
            f"checkpoint path must be a str or os.PathLike (a local path or fsspec URL), got {type(path).__name__}"
        )
    if not text.strip():
        raise ValueError("checkpoint path is empty; pass the folder to save into, e.g. 'runs/exp1/step_100'")
    return text


def save_options(
    num_io_threads: int | None, hash_block_bytes: int, overwrite: bool, metadata: dict[str, Any] | None, path: str
) -> WriterOptions:
    """The writer's options for a save to ``path`` (I/O threads defaulted by storage kind)."""
    if num_io_threads is None:
        num_io_threads = DEFAULT_SAVE_IO_THREADS if local_path(path) is not None else DEFAULT_REMOTE_SAVE_IO_THREADS
    return WriterOptions(
        num_io_threads=num_io_threads,
        hash_block_bytes=hash_block_bytes,
        overwrite=overwrite,
        metadata=dict(metadata or {}),
    )


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
