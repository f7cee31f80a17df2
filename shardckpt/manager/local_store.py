"""The local steps one rank keeps in a node's ``local_dir``: commit, scan, read, retention.

Not collective; every method runs on the calling rank only. The files and their names are
specified in :mod:`shardckpt.format.local_step`. ``local_dir`` is a node-local path (a RAM
disk or local NVMe), never a URL: the tier commits with rename(2) and fsync, which an
object store does not have, so it talks to the file system directly instead of through
:mod:`shardckpt.storage`.

The store works only inside its durable root's folder, ``<local_dir>/root_<tier id>/``
(:func:`local_step.root_dir_name`): files of other roots (another job, or an older run of
the same ``local_dir``) are never read, replaced or deleted. Every name the store deletes
is one of the tier's own names (:func:`local_step.holder_of`) carrying its own holder rank,
inside that folder: two ranks of one node share ``local_dir`` and never touch each other's
files, and nothing else in ``local_dir`` is ever deleted.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

import torch

from shardckpt.errors import ManifestError, StorageError
from shardckpt.format import layout, local_step
from shardckpt.format.local_step import ShardIndex
from shardckpt.storage.local import fsync_dir, unlink_missing_ok

log = logging.getLogger("shardckpt")


@dataclass(frozen=True)
class HeldShard:
    """A committed shard found in ``local_dir`` (any holder's: the node's files are all readable)."""

    index: ShardIndex
    path: str  # the data file

    def key(self) -> tuple[int, int, int]:
        return (self.index.step, self.index.rank, self.index.holder)


class LocalStore:
    """One holder rank's view of ``local_dir``. Used from one thread at a time."""

    def __init__(self, local_dir: str, holder: int, tier: str) -> None:
        self.local_dir = local_dir
        self.holder = holder
        self.tier = tier
        self.folder = os.path.join(local_dir, local_step.root_dir_name(tier))
        self.written: dict[int, list[str]] = {}  # step -> paths this object committed, for close()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.folder, layout.step_dir_name(step))

    def foreign(self) -> list[str]:
        """Names in ``local_dir`` that look like the tier's but belong to another durable
        root (or to the layout of version 1): ignored, never deleted."""
        return [
            n
            for n in _list(self.local_dir)
            if (local_step.parse_root_dir_name(n) not in (None, self.tier)) or layout.parse_step_dir(n) is not None
        ]

    def commit(self, index: ShardIndex, image: memoryview) -> str:
        """Write ``image`` and then its index, each to a temp name, fsynced, then renamed;
        returns the data file's path. A crash leaves either the old committed shard, no
        shard, or the new one, never a half-written one under the final names."""
        if index.holder != self.holder or index.tier_id != self.tier:
            raise ValueError(
                f"holder {index.holder} of root {index.tier_id} committing through rank {self.holder}'s store "
                f"of root {self.tier}"
            )
        folder = self.step_dir(index.step)
        os.makedirs(folder, exist_ok=True)
        data = os.path.join(folder, local_step.data_name(index.rank, index.holder))
        idx = os.path.join(folder, local_step.index_name(index.rank, index.holder))
        try:
            unlink_missing_ok(idx)  # a shard of this step written before: uncommit it first
            _write_renamed(data, image)
            _write_renamed(idx, memoryview(index.to_json()))
            fsync_dir(folder)
        except OSError as e:
            raise StorageError(
                f"rank {self.holder}: writing the local step {index.step} (shard of rank {index.rank}) to "
                f"{folder}: {e}. Check that local_dir has room for 1 + replicas copies of the shard."
            ) from e
        self.written.setdefault(index.step, []).extend([data, idx])
        return data

    def scan(self) -> list[HeldShard]:
        """Every committed shard of this root under ``local_dir``; anything else (temp files, a data file
        without its index, an index that does not parse or whose data file has another
        size, other files) is skipped, with a warning for what looks like ours but is not."""
        found: list[HeldShard] = []
        for entry in _list(self.folder):
            step = layout.parse_step_dir(entry)
            if step is None:
                continue
            folder = os.path.join(self.folder, entry)
            for name in _list(folder):
                if local_step.parse_index_name(name) is None:
                    continue
                shard = _committed(folder, name, step, self.tier)
                if shard is not None:
                    found.append(shard)
        return found

    def retain(self, keep_last: int) -> list[int]:
        """Keep this holder's files of the newest ``keep_last`` steps where it has a
        committed shard (an index: a folder of temp files left by a cut-off write is no
        step) and remove its files of every other step of this root, temp files included;
        returns the steps removed. Other holders' files and other names stay."""
        mine: dict[int, list[str]] = {}
        committed: list[int] = []
        for entry in _list(self.folder):
            step = layout.parse_step_dir(entry)
            if step is None:
                continue
            folder = os.path.join(self.folder, entry)
            names = [n for n in _list(folder) if local_step.holder_of(n) == self.holder]
            if names:
                mine[step] = [os.path.join(folder, n) for n in names]
            if any((local_step.parse_index_name(n) or (-1, -1))[1] == self.holder for n in names):
                committed.append(step)
        keep = set(sorted(committed)[-keep_last:]) if keep_last > 0 else set()
        old = sorted(step for step in mine if step not in keep)
        for step in old:
            self._remove(step, mine[step])
        return old

    def remove_written(self) -> None:
        """Remove every file this object committed (a clean exit), then empty step folders
        and the root's folder if that left it empty."""
        for step, paths in sorted(self.written.items()):
            self._remove(step, paths)
        try:
            os.rmdir(self.folder)  # only when empty
        except OSError:
            pass

    def _remove(self, step: int, paths: list[str]) -> None:
        # Index first: a shard whose data file goes first would look half-written.
        for p in sorted(paths, key=lambda p: not p.endswith(".json")):
            unlink_missing_ok(p)
        self.written.pop(step, None)
        try:
            os.rmdir(self.step_dir(step))  # only when empty: other holders' files keep it
        except OSError:
            pass


def byte_view(image: torch.Tensor) -> memoryview:
    """The bytes of a contiguous uint8 CPU tensor, without a copy."""
    return memoryview(image.numpy())  # type: ignore[arg-type]  # ndarray implements the buffer protocol


def _committed(folder: str, name: str, step: int, tier: str) -> HeldShard | None:
    path = os.path.join(folder, name)
    rank, holder = local_step.parse_index_name(name) or (-1, -1)
    try:
        with open(path, "rb") as f:
            raw = f.read(local_step.MAX_INDEX_BYTES + 1)
        index = local_step.parse_index(raw, where=path)
        if (index.step, index.rank, index.holder, index.tier_id) != (step, rank, holder, tier):
            raise ManifestError(
                f"{path}: says step {index.step}, rank {index.rank}, holder {index.holder}, root {index.tier_id}"
            )
        data = os.path.join(folder, local_step.data_name(rank, holder))
        size = os.stat(data).st_size
        if size != index.data_bytes:
            raise ManifestError(f"{data}: {size} bytes, its index says {index.data_bytes}")
    except FileNotFoundError:
        return None  # removed while we looked (retention by the node's other rank)
    except (OSError, ManifestError) as e:
        log.warning("shardckpt: ignoring a local shard that is not intact: %s", e)
        return None
    return HeldShard(index, data)


def _list(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _write_renamed(path: str, data: memoryview) -> None:
    tmp = os.path.join(os.path.dirname(path), local_step.temp_name(os.path.basename(path), uuid.uuid4().hex[:12]))
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        unlink_missing_ok(tmp)
        raise
