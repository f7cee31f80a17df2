"""What a Checkpointer remembers of its last save for the next incremental one.

:class:`SavedChunks` keeps (location, chunks) of this rank's last format-2 save that
recorded digests, so an incremental save against it needs no manifest read, and finds the
:class:`~shardckpt.engine.incremental.BaseIndex` of any other base from its manifest. A
format-3 base is always read from storage (its manifest, then only the pages and index
records of the ranks whose chunks this rank may reuse: :class:`BaseIndexV3`); the rank does
not know its own save's pages, which the coordinator built.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from shardckpt.engine.base_v3 import BaseIndexV3
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
        if not writer.options.digests or writer.options.format_version == 3:
            with self._lock:
                if self._last_saved is not None and self._last_saved[0] == location:
                    self._last_saved = None
            return
        index = BaseIndex.from_results(folder_name(location), writer.options.hash_block_bytes, writer.saved)
        with self._lock:
            self._last_saved = (location, index)

    def base_index(
        self, base: str, open_base: Callable[[], Storage], storage: Storage, *, format_version: int | None = None
    ) -> BaseIndex:
        """The chunks of checkpoint ``base`` (opened by ``open_base``) an incremental save
        to ``storage`` in ``format_version`` may reuse: this rank's own from the format-2 save
        that wrote ``base`` when this object remembered it, else read from its manifest (a
        format-3 base: :class:`BaseIndexV3`, which reads its index records when the digest
        pass asks). A format-3 save builds on a format-3 base only, a format-1/2 save on a
        format-1/2 one (a version-1 base gives a full save). Runs on every rank while the
        save plans."""
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
        if last is not None and last[0] == wanted.location and format_version != 3:
            return last[1]
        found = read_any_manifest(wanted)
        if isinstance(found, ManifestV3) and format_version != 3:
            raise UnsupportedFormatVersionError(
                f"save to {storage.url} with base={base!r}: the base is a format-3 checkpoint, which only a "
                "format-3 save builds on (docs/format.md 12.7). Save with format_version=3, or without base=; "
                "or make a format-1 copy beside it and use that as the base: `python -m shardckpt materialize "
                f"{wanted.url} {storage.sibling(name + '-v1').url} --format-version 1`."
            )
        if isinstance(found, ManifestV3):
            return BaseIndexV3(wanted, found, name)
        if format_version == 3 and found.format_version == 2:
            raise UnsupportedFormatVersionError(
                f"save to {storage.url} with base={base!r} and format_version=3: the base is a format-2 "
                "checkpoint, and a format-3 save reuses chunks of a format-3 base only (its file table names "
                "files by their save's pages and index records, which a format-2 checkpoint lacks; "
                "docs/format.md 12.7). Save this one with format_version=1 to build on it, or save in "
                "format 3 without base= (a full save; later ones can build on it)."
            )
        return BaseIndex.from_manifest(found, name)
