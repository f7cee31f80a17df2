"""Reference-aware deletion under a manager root: never delete bytes a kept step reads.

An incremental step (format 2) reads some data files from earlier step folders. Deleting a
step therefore means two things that must not be confused:

- the *step* goes away at once: its ``manifest.json`` is deleted first, so it is no longer
  listed, restored or used as a base (the user's view: any step is deletable on its own);
- its *bytes* go away only when no committed step reads them any more: a folder that
  incremental steps read (it holds ``.shardckpt-referenced.json``, written by the first
  step that pointed at it, before that step committed) loses only the data files that
  no committed manifest lists, and disappears once it holds none.

A format-3 step (docs/format.md section 12) names its files by rule: each group of its file
table is one save's data files (rank by rank, numbered), index records and pages, in the
step's own folder or a base beside it. Its mark is every name of every group, the records
included (a reader needs the whole checksum chain of a group to verify any byte of it).

This is mark-and-sweep over the committed manifests of the root, run by the coordinator
after retention and at start-up. It is crash-safe at every point: the mark is recomputed
from what is committed on storage each time, a crash between deleting a manifest and
sweeping leaves an uncommitted folder that the next sweep finishes, and files of a save
that never committed are in no manifest. If any committed manifest cannot be read, nothing
that an unknown step might read is deleted (:class:`UnknownReferences`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from shardckpt.engine.loading import read_any_manifest
from shardckpt.errors import ManifestError, ShardckptError
from shardckpt.format import layout
from shardckpt.format.file_table import FileGroup
from shardckpt.format.manifest import Manifest
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.storage import Storage, folder

log = logging.getLogger("shardckpt")


class UnknownReferences(ShardckptError):
    """A committed step's manifest could not be read, so what it references is unknown."""


@dataclass
class LiveFiles:
    """Which data files of which folder the committed steps of a root read."""

    by_folder: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, root: Storage, committed: Iterable[str], cache: MarkCache | None = None) -> LiveFiles:
        """Mark: what every committed folder in ``committed`` (names under ``root``) reads,
        from its manifest (through ``cache`` when given). Raises UnknownReferences if one
        cannot be parsed; storage errors raise."""
        cache = cache if cache is not None else MarkCache()
        live = cls()
        names = list(committed)
        for name in names:
            for where, files in cache.reads(root, name).items():
                live.by_folder.setdefault(where, set()).update(files)
        cache.keep_only(names)
        return live

    def of_folder(self, name: str) -> set[str]:
        return self.by_folder.get(name, set())


class MarkCache:
    """What each committed folder reads, remembered between sweeps (a retention pass runs
    after every save and marks over every committed manifest under the root).

    An entry is used only while the manifest's size and last 64 bytes (which hold its
    ``manifest_hash``, the checksum of all the rest) are unchanged: one size lookup and
    one small ranged read instead of reading and parsing the whole manifest again. A
    replaced manifest (a folder saved again with ``overwrite=True``) is read afresh.
    Owned by one RootCleaner; not thread-safe."""

    TAIL_BYTES = 64

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[int, bytes], dict[str, set[str]]]] = {}

    def reads(self, root: Storage, name: str) -> dict[str, set[str]]:
        """{folder: data file names} that the committed checkpoint ``name`` reads."""
        storage = root.child(name)
        key = self._identity(storage)
        hit = self._entries.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        try:
            m = read_any_manifest(storage)
        except ManifestError as e:
            raise UnknownReferences(
                f"the manifest of {root.url}/{name} cannot be read ({e}), so the files it reads are unknown"
            ) from e
        reads = manifest_reads(m, name)
        self._entries[name] = (key, reads)
        return reads

    def keep_only(self, names: list[str]) -> None:
        """Forget folders no longer committed (deleted steps)."""
        for gone in set(self._entries) - set(names):
            del self._entries[gone]

    def _identity(self, storage: Storage) -> tuple[int, bytes]:
        size = storage.size(layout.MANIFEST_NAME)
        tail = bytearray(min(size, self.TAIL_BYTES))
        storage.read_into(layout.MANIFEST_NAME, size - len(tail), memoryview(tail))
        return size, bytes(tail)


def manifest_reads(m: Manifest | ManifestV3, name: str) -> dict[str, set[str]]:
    """{folder: names in it} that the committed checkpoint ``name`` with manifest ``m``
    reads: a listed file's folder is its ``checkpoint`` (a base), else ``name``. O(files)."""
    reads: dict[str, set[str]] = {}
    if isinstance(m, ManifestV3):
        for group in m.file_table.groups:
            reads.setdefault(group.checkpoint or name, set()).update(group_names(group))
        return reads
    for file, record in m.files.items():
        reads.setdefault(record.checkpoint or name, set()).add(file)
    return reads


def group_names(group: FileGroup) -> list[str]:
    """Every name of one format-3 save: each rank's data files and index record (also a rank
    that wrote no data file has one) and the pages of its rank table. O(ranks + files)."""
    names = [layout.rank_page_name(group.save_id, p) for p in range(len(group.pages))]
    rank = 0
    for count, each in group.files:
        for r in range(rank, rank + count):
            names.append(layout.rank_index_name(group.save_id, r))
            names.extend(layout.data_file_name(group.save_id, r, k) for k in range(each))
        rank += count
    return names


def sweep(root: Storage, names: Iterable[str], live: LiveFiles) -> list[str]:
    """Sweep: in each uncommitted folder of ``names`` that steps may read, delete the data
    files no committed step reads; remove the folder once empty. Returns the folders gone."""
    gone = []
    for name in names:
        sub = root.child(name)
        removed, kept = folder.remove_unreferenced(sub, live.of_folder(name), why="no kept step reads it")
        if removed:
            gone.append(name)
        elif kept:
            log.info("shardckpt: kept %d data files of %s/%s that kept incremental steps read", kept, root.url, name)
    return gone


def retired_folders(root: Storage) -> list[str]:
    """Step folders without a manifest that incremental steps may read (the marker says so)."""
    found = []
    for name in root.list_dirs(""):
        if layout.parse_step_dir(name) is None or folder.is_committed(root, name):
            continue
        if root.exists(f"{name}/{layout.REFERENCED_NAME}"):
            found.append(name)
    return sorted(found)
