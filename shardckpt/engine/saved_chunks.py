"""What a Checkpointer remembers of its last save for the next incremental one.

:class:`SavedChunks` keeps (location, chunks) of this rank's last save that recorded
digests, so an incremental save against it needs no manifest read, and finds the
:class:`~shardckpt.engine.incremental.BaseIndex` of any other base from its manifest.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from shardckpt.engine.incremental import BaseIndex, folder_name
from shardckpt.engine.loading import read_any_manifest
from shardckpt.engine.writer import Writer
from shardckpt.errors import UnsupportedFormatVersionError
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.storage import Storage


class SavedChunks:
    """The chunks of this rank's last save with digests, owned by one Checkpointer.

    Set by the thread that ran the save (:meth:`remember`), read while a save plans
    (:meth:`base_index`), cleared by :meth:`forget`: every method may be called from any
    thread. Not collective."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (location, chunks) of this rank's last save with digests: the next incremental
        # save against it needs no manifest read. Set by the thread that ran the save.
        self._last_saved: tuple[str, BaseIndex] | None = None

    def forget(self) -> None:
        """Forget the chunk locations of the last save."""
        with self._lock:
            self._last_saved = None

    def remember(self, writer: Writer) -> None:
        """After every committed save: keep its chunks if it recorded digests; forget the
        remembered ones if a plain save replaced them (overwrite=True removed their files)."""
        location = writer.storage.location
        if not writer.options.digests:
            with self._lock:
                if self._last_saved is not None and self._last_saved[0] == location:
                    self._last_saved = None
            return
        index = BaseIndex.from_results(folder_name(location), writer.options.hash_block_bytes, writer.saved)
        with self._lock:
            self._last_saved = (location, index)

    def base_index(self, base: str, open_base: Callable[[], Storage], storage: Storage) -> BaseIndex:
        """The chunks of checkpoint ``base`` (opened by ``open_base``) an incremental save
        to ``storage`` may reuse: this rank's own from the save that wrote ``base`` when
        this object remembered it, else read from its manifest. Runs on every rank while
        the save plans."""
        wanted = open_base()
        name = folder_name(wanted.location)
        if storage.location == wanted.location or storage.sibling(name).location != wanted.location:
            raise ValueError(
                f"save to {storage.url} with base={base!r}: the base must be another checkpoint in the same "
                f"parent folder as the new one (e.g. base='runs/exp1/step_100' for 'runs/exp1/step_200'); "
                "incremental checkpoints point at their base's files by folder name"
            )
        with self._lock:
            last = self._last_saved
        if last is not None and last[0] == wanted.location:
            return last[1]
        found = read_any_manifest(wanted)
        if isinstance(found, ManifestV3):
            raise UnsupportedFormatVersionError(
                f"save to {storage.url} with base={base!r}: the base is a format-3 checkpoint, and incremental "
                "saves build on formats 1 and 2 only (docs/format.md 12.7). Save without base=, or make a "
                f"format-1 copy beside it and use that as the base: `python -m shardckpt materialize "
                f"{wanted.url} {storage.sibling(name + '-v1').url} --format-version 1`."
            )
        return BaseIndex.from_manifest(found, name)
