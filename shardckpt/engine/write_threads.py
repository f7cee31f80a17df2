"""The writer threads of a rank's saves and their batch buffers, kept from one save to the next.

A save writes each of its data files on a thread of its own (:meth:`Writer._write_buckets
<shardckpt.engine.writer.Writer._write_buckets>`). Started anew for every save, each
thread cost a scheduler round trip before the next could be asked for (tens of ms of a
plan-reused save of thousands of small tensors with 4 ranks on 2 cores, issue #18), and
each file's batch buffer (:data:`~shardckpt.engine.datawrite.BATCH_BYTES`) was fresh
memory, slow on first touch. A :class:`WriteThreads` keeps both: owned by one
:class:`~shardckpt.engine.Checkpointer`, which closes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from operator import is_
from typing import TypeVar

from torch.distributed.checkpoint.planner import WriteItem

from shardckpt.engine.datawrite import BATCH_BYTES, split_by_bytes

__all__ = ["WriteThreads"]

T = TypeVar("T")


class WriteThreads:
    """Threads that run one save's file writes, one file per thread at a time, each with
    a batch buffer of :data:`~shardckpt.engine.datawrite.BATCH_BYTES` kept for the next save.

    Used by one save at a time (a Checkpointer runs one save at a time); ``close()`` stops
    the threads once they are idle and frees the buffers. Whoever creates one closes it."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0
        self._buffers: list[bytearray] = []
        self._closed = False
        self._split: tuple[list[WriteItem], int, list[list[WriteItem]]] | None = None  # the last split_items

    def split_items(self, items: list[WriteItem], n: int) -> list[list[WriteItem]]:
        """:func:`~shardckpt.engine.datawrite.split_by_bytes` of ``items`` over ``n`` threads,
        kept for the next save that writes the same item objects in the same order: a save
        with a reused plan writes the cached plan's items again (frozen, never changed), and
        spreading 12,183 items anew took 24 ms a rank of a save of small tensors (issue #18);
        comparing them object by object takes a C loop. The buckets are the caller's to change."""
        last = self._split
        if last is not None and last[1] == n and len(last[0]) == len(items) and all(map(is_, last[0], items)):
            return [list(b) for b in last[2]]
        buckets = split_by_bytes(items, n)
        self._split = (list(items), n, [list(b) for b in buckets])
        return buckets

    def run(self, tasks: list[Callable[..., T]], cancel: threading.Event) -> list[T]:
        """Each task called as ``task(buffer=...)`` on a thread of its own, with a buffer of
        its own for the call only; their results in order. When one raises (or the caller is interrupted),
        ``cancel`` is set so the others stop at their next block, the tasks not started
        are dropped, and this waits for the running ones before raising the error."""
        if self._closed:
            raise RuntimeError("WriteThreads is closed")
        if not tasks:
            return []
        pool = self._pool_of(len(tasks))
        buffers = [self._buffers[k] if k < len(self._buffers) else bytearray(BATCH_BYTES) for k in range(len(tasks))]
        futures: list[Future[T]] = []
        try:
            futures = [pool.submit(task, buffer=buffer) for task, buffer in zip(tasks, buffers, strict=True)]
            done = wait(futures, return_when=FIRST_EXCEPTION).done  # all, or a first failure
            for f in futures:
                if f in done and f.exception() is not None:
                    f.result()  # raises it: the others are cancelled whichever file failed
            return [f.result() for f in futures]
        except BaseException:
            # Ctrl-C, or one file failed: the other threads stop at their next block
            # (and remove their partial files) instead of writing on for seconds.
            cancel.set()
            raise
        finally:
            for f in futures:
                f.cancel()
            wait(futures)  # no thread still uses a buffer (or the storage) once this returns
            self._buffers[: len(buffers)] = buffers

    def _pool_of(self, n: int) -> ThreadPoolExecutor:
        """A pool of at least ``n`` threads (a bigger one replaces a smaller one; threads
        start on first use, then wait idle for the next save)."""
        if self._pool is None or self._size < n:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._pool, self._size = ThreadPoolExecutor(n, thread_name_prefix="shardckpt-write"), n
        return self._pool

    def close(self) -> None:
        """Stop the threads (they are idle between saves) and free the buffers. Idempotent."""
        self._closed = True
        pool, self._pool, self._buffers, self._split = self._pool, None, [], None
        if pool is not None:
            pool.shutdown(wait=True)
