"""The storage seam: every byte that leaves or enters the process goes through a Storage.

A ``Storage`` is bound to one root URL (a checkpoint folder, or a manager's root).
Every method takes a name relative to that root, ``/``-separated. Implementations:
:class:`~shardckpt.storage.local.LocalStorage` for POSIX paths (fsync, atomic
rename) and :class:`~shardckpt.storage.fsspec_storage.FsspecStorage` for any fsspec URL
(object stores commit with one PUT, never a rename).

Thread-safety: all methods may be called from several threads at once.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Protocol


class WriteBuffer(Protocol):
    """What :meth:`Storage.read_into_many` fills: a writable, C-contiguous buffer of
    ``nbytes`` bytes (a byte memoryview, or a CPU tensor's ``numpy()`` so a reader can fill
    the tensor itself)."""

    @property
    def nbytes(self) -> int: ...


def byte_view(out: WriteBuffer) -> memoryview:
    """``out`` as a flat memoryview of its bytes (``len`` = ``nbytes``)."""
    if not out.nbytes:  # memoryview cannot cast a view with a 0 in its shape
        return memoryview(bytearray())
    return memoryview(out).cast("B")  # type: ignore[arg-type]


class WriteStream(Protocol):
    """A file being written. Call ``write`` any number of times, then exactly one of
    ``finish`` (make the bytes durable and visible) or ``abort`` (drop them).

    ``write`` must not keep a reference to ``data`` after it returns (copy it into a
    buffer, or hand it to the OS): a bounded async save lets training change the
    tensor behind ``data`` as soon as ``write`` returns."""

    def write(self, data: memoryview | bytes) -> None: ...

    def finish(self) -> None: ...

    def abort(self) -> None: ...


class Storage(abc.ABC):
    """Contract shared by every method: "does not exist" is decided only by the
    backend's not-found answer (ENOENT/ENOTDIR, HTTP 404); any other failure (EIO,
    ESTALE, EACCES, throttling past the retries) raises, so nothing is ever deleted or
    skipped on the strength of an error."""

    url: str
    """The root URL, as the user gave it."""
    location: str
    """The root in a canonical form (absolute path, protocol + bucket/key): ranks that
    mean the same place have equal locations."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool:
        """Whether the file ``name`` exists (False only on a not-found answer)."""

    @abc.abstractmethod
    def is_dir(self, name: str = "") -> bool:
        """Whether ``name`` (or the root itself) exists as a folder or a non-empty prefix."""

    @abc.abstractmethod
    def size(self, name: str) -> int:
        """Size of file ``name`` in bytes; raises FileNotFoundError if absent."""

    @abc.abstractmethod
    def read_bytes(self, name: str) -> bytes:
        """The whole content of a (small) file."""

    @abc.abstractmethod
    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        """Fill ``out`` with ``len(out)`` bytes of ``name`` starting at ``offset``;
        EOFError if the file ends first."""

    def read_into_many(self, name: str, offset: int, outs: Sequence[WriteBuffer]) -> None:
        """Fill each of ``outs`` (:data:`WriteBuffer`, ``nbytes`` each) in turn with the bytes
        of ``name`` from ``offset`` on, back to back, as one read; EOFError if the file ends
        first (what ``outs`` then hold is undefined). Lets a reader fill many small targets
        with one request (issue #18). This default makes one :meth:`read_into` of the joined
        range and copies it out (one ranged request on an object store); a backend that can
        read into many buffers at once (``preadv``) overrides it."""
        views = [byte_view(o) for o in outs]
        if len(views) == 1:
            self.read_into(name, offset, views[0])
            return
        joined = memoryview(bytearray(sum(len(v) for v in views)))
        self.read_into(name, offset, joined)
        at = 0
        for v in views:
            v[:] = joined[at : at + len(v)]
            at += len(v)

    @abc.abstractmethod
    def open_write(self, name: str) -> WriteStream:
        """Start writing ``name`` (parents are created). Streams data; no full copy in memory."""

    def open_write_direct(self, name: str) -> WriteStream:
        """Like :meth:`open_write`, for a data file whose bytes need not stay in memory
        (``IOOptions(direct_writes=True)``): :class:`~shardckpt.storage.local.LocalStorage`
        writes it around the page cache (``O_DIRECT``, :mod:`shardckpt.storage.direct`); a
        storage without such a path writes as :meth:`open_write` does."""
        return self.open_write(name)

    @abc.abstractmethod
    def write_atomic(self, name: str, data: bytes) -> None:
        """Commit primitive: afterwards ``name`` holds ``data`` durably, and no reader
        ever sees a partial ``name``. POSIX: tmp + fsync + rename + fsync(dir);
        object stores: one PUT."""

    @abc.abstractmethod
    def create_exclusive(self, name: str, data: bytes) -> None:
        """Like :meth:`write_atomic`, but only if ``name`` does not exist yet: of two
        racing creators exactly one succeeds, the other gets FileExistsError. POSIX:
        tmp + fsync + link(2); S3: a PUT with ``If-None-Match: *``. Callers make ``data``
        unique to the call (a save id, a token), so a backend may treat finding exactly
        ``data`` there after a lost answer as its own success."""

    @abc.abstractmethod
    def list_files(self, prefix: str = "") -> list[str]:
        """Names (relative to the root) of all files under folder ``prefix``, recursively."""

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the immediate sub-folders of folder ``prefix`` (not recursive)."""
        return [n[:-1] for n in self.list_names(prefix) if n.endswith("/")]

    @abc.abstractmethod
    def list_names(self, prefix: str = "") -> list[str]:
        """Immediate entries of folder ``prefix`` (not recursive): files by name,
        folders with a trailing ``/`` (a symlink to a folder is not a folder here)."""

    @abc.abstractmethod
    def delete(self, names: list[str]) -> None:
        """Delete files; names that do not exist are ignored."""

    def remove_empty_dir(self, name: str = "") -> bool:
        """Remove folder ``name`` if it is empty; False if it still holds something.
        Object stores have no folders, only prefixes: nothing to do there."""
        return True

    def sync_dir(self, name: str = "") -> None:  # noqa: B027 - deliberately not abstract: a no-op by default
        """Make the folder entry of files created under ``name`` durable (POSIX only).
        Object stores have no folder entries: nothing to do there."""

    def child(self, name: str) -> Storage:
        """A Storage rooted at ``name`` below this root."""
        raise NotImplementedError

    def sibling(self, name: str) -> Storage:
        """A Storage rooted at ``name`` beside this root (in the same parent folder): where
        an incremental checkpoint finds the data files it shares with a base checkpoint.
        ``name`` is one plain path component (the caller checked it)."""
        raise NotImplementedError
