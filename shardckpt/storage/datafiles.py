"""Where the data files of one checkpoint live: its own folder, or a base checkpoint beside it.

A format-2 checkpoint written by an incremental save lists some data files with a
``checkpoint`` field: the file is ``<parent>/<checkpoint>/<name>``, in a sibling folder
(an earlier step), because its bytes did not change. :class:`DataFiles` is the one place
that turns a manifest's file name into the storage holding it; every reader of tensor bytes
(loads, verify, export) goes through it, so references are followed everywhere alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from shardckpt.format.manifest import FileRecord
from shardckpt.storage.base import Storage, WriteBuffer


class DataFiles:
    """The data files a manifest lists, each resolved to the storage that holds it.
    Read-only and thread-safe once built (the sibling storages are made up front)."""

    def __init__(self, storage: Storage, files: Mapping[str, FileRecord], bases: Iterable[str] = ()) -> None:
        """``files`` may grow after this (a format-3 load adds each file as it resolves a
        chunk in it); ``bases``: every base folder such files may name."""
        self.storage = storage
        self.files = files
        bases = sorted({*bases, *(f.checkpoint for f in files.values() if f.checkpoint is not None)})
        self._bases: dict[str, Storage] = {b: storage.sibling(b) for b in bases}

    def storage_of(self, name: str) -> Storage:
        """The storage whose root holds data file ``name`` (a key of the manifest's files)."""
        folder = self.files[name].checkpoint
        return self.storage if folder is None else self._bases[folder]

    def size(self, name: str) -> int:
        return self.storage_of(name).size(name)

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        self.storage_of(name).read_into(name, offset, out)

    def read_into_many(self, name: str, offset: int, outs: Sequence[WriteBuffer]) -> None:
        self.storage_of(name).read_into_many(name, offset, outs)

    def describe(self, name: str) -> str:
        """``'data/x.safetensors'``, or with its base: ``'data/x.safetensors' of base checkpoint step_..``."""
        folder = self.files[name].checkpoint
        return repr(name) if folder is None else f"{name!r} of base checkpoint {folder!r}"

    def missing_hint(self, name: str) -> str:
        """What to do about a missing data file ``name``: restore it, or (in a base) the base."""
        folder = self.files[name].checkpoint
        if folder is None:
            return "the checkpoint is damaged, restore the file or load an earlier checkpoint"
        return (
            f"this checkpoint is incremental and reads that file from {self.storage_of(name).url}, "
            f"the earlier checkpoint {folder!r} it shares unchanged tensors with; was {folder!r} deleted or "
            "moved by hand? Restore it, or load a checkpoint that does not depend on it ("
            "`python -m shardckpt inspect` lists a checkpoint's bases; CheckpointManager retention keeps "
            "every file a kept step needs)"
        )
