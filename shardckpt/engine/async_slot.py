"""A Checkpointer's async side: its staging buffers, its one pending async save, and
the last bounded save's source statistics (:class:`AsyncSlot`)."""

from __future__ import annotations

import threading
from typing import Any

from shardckpt.engine.exchange import Exchange
from shardckpt.engine.saving import AsyncSaveHandle, SaveRequest, start_async_save
from shardckpt.engine.staging import BoundedSource, Stager
from shardckpt.format.manifest import Manifest
from shardckpt.format.manifest_v3 import ManifestV3

__all__ = ["AsyncSlot"]


class AsyncSlot:
    """Holds at most one pending async save and the host buffers it was staged into.

    Owned by one :class:`~shardckpt.engine.checkpointer.Checkpointer`, which calls
    :meth:`start` from its driving thread; :meth:`wait`, :meth:`stats` and :attr:`pending`
    may be called from any thread. :meth:`close` frees the buffers (its owner calls it).
    """

    def __init__(self) -> None:
        self._stager = Stager()
        self._lock = threading.Lock()  # guards _pending against wait() from another thread
        self._pending: AsyncSaveHandle | None = None
        self._last_source: BoundedSource | None = None

    @property
    def pending(self) -> AsyncSaveHandle | None:
        """The async save started last and not yet waited for, if any."""
        return self._pending

    def start(
        self, state_dict: dict[str, Any], request: SaveRequest, exchange: Exchange, max_staging_bytes: int | None
    ) -> AsyncSaveHandle:
        """Stage ``state_dict`` and start the background save (collective, like
        ``async_save``); returns once the caller's tensors are no longer read. The
        caller has finished the previous pending save first (:meth:`wait`)."""
        handle, source, thread = start_async_save(state_dict, request, self._stager, exchange, max_staging_bytes)
        with self._lock:
            self._pending = handle
            self._last_source = source
        thread.start()
        if source is not None:
            source.released.wait()  # the caller's tensors are read until then
        return handle

    def wait(self) -> Manifest | ManifestV3 | None:
        """Finish the pending async save, if any, and forget it; see ``Checkpointer.wait``."""
        with self._lock:
            handle, self._pending = self._pending, None
        if handle is None:
            return None
        already_seen = handle.error_reported
        try:
            return handle.wait()
        except BaseException:
            if not already_seen:
                raise
            return None

    def stats(self) -> dict[str, int]:
        """Host memory held by the staging buffers, how often they were allocated, and
        for the last bounded save how many bytes were written from live tensors vs staged."""
        stats = {"staged_bytes": self._stager.staged_bytes, "allocations": self._stager.allocations}
        source = self._last_source
        if source is not None:
            stats.update(bounded_live_bytes=source.live_bytes, bounded_staged_bytes=source.staged_bytes)
        return stats

    def close(self) -> None:
        """Wait for the pending save, then drop the staging buffers (raising the pending
        save's error, after freeing, if nobody saw it). Idempotent."""
        try:
            self.wait()
        finally:
            # Dropping the Stager drops its buffers (and a bounded save's arena with it).
            self._stager = Stager()
            self._last_source = None
