"""Local POSIX storage: plain files, fsync for durability, rename for atomic commit."""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Sequence

from shardckpt.errors import StorageError
from shardckpt.storage.base import Storage, WriteBuffer, WriteStream, byte_view
from shardckpt.storage.direct import DirectWriteStream

_READ_PIECE_BYTES = 64 * 1024 * 1024
_IOV_MAX = 1024
"""Buffers one ``preadv`` takes at most (IOV_MAX on Linux and macOS)."""


def local_path(url: str) -> str | None:
    """The OS path ``url`` names when it is local (a plain path or a ``file://`` URL);
    None for any other fsspec URL (``s3://...``). The one test of "is this local":
    :func:`shardckpt.storage.open_storage` picks :class:`LocalStorage` by it."""
    if "://" not in url:
        return url
    return url.removeprefix("file://") if url.startswith("file://") else None


def _name_file(e: BaseException, path: str) -> None:
    """Add the file an OSError is about before it is re-raised: a write() or fsync() error
    carries no name, and "[Errno 28] No space left on device" alone does not say where."""
    if isinstance(e, OSError) and e.filename is None:
        e.filename = path


def _storage_error(e: OSError, path: str, action: str) -> StorageError:
    err = StorageError(f"cannot {action} {path}: {e.strerror or e}")
    err.errno = e.errno
    return err


def _not_regular(path: str, st: os.stat_result) -> StorageError:
    kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
    return StorageError(
        f"{path}: is {kind}; a checkpoint's files are regular files. Something other than "
        "shardckpt put it there: remove it, or load a checkpoint that was not tampered with."
    )


class _LocalWriteStream:
    def __init__(self, path: str) -> None:
        self._path = path
        # "x": never truncate a file someone else wrote. Unbuffered: our writes are
        # already large, a buffer would only add a copy.
        self._f = open(path, "xb", buffering=0)

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = self._f.write(view)
                view = view[n:]
        except OSError as e:
            _name_file(e, self._path)
            raise

    def finish(self) -> None:
        try:
            os.fsync(self._f.fileno())
        except OSError as e:
            _name_file(e, self._path)
            raise
        finally:
            self._f.close()

    def abort(self) -> None:
        self._f.close()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass


class LocalStorage(Storage):
    def __init__(self, root: str) -> None:
        self.url = root
        self.root = os.path.abspath(root.removeprefix("file://"))
        self.location = f"file://{self.root}"

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name) if name else self.root

    def _stat(self, name: str) -> os.stat_result | None:
        """The entry ``name`` (symlinks followed), or None when it does not exist.
        Only ENOENT/ENOTDIR mean "absent": EIO, ESTALE, EACCES... raise StorageError."""
        path = self._path(name)
        try:
            return os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise _storage_error(e, path, "look up") from e

    def exists(self, name: str) -> bool:
        st = self._stat(name)
        return st is not None and not stat.S_ISDIR(st.st_mode)

    def is_dir(self, name: str = "") -> bool:
        st = self._stat(name)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def size(self, name: str) -> int:
        path = self._checked(name)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise
        except OSError as e:
            raise _storage_error(e, path, "look up") from e
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st)
        return st.st_size

    def read_bytes(self, name: str) -> bytes:
        fd = self._open_regular(name)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        fd = self._open_regular(name)
        try:
            done = 0
            while done < len(out):
                piece = out[done : done + _READ_PIECE_BYTES]
                n = os.preadv(fd, [piece], offset + done)
                if n == 0:
                    raise EOFError(
                        f"{self._path(name)}: file ends at byte {offset + done}, expected {len(out) - done} more bytes"
                    )
                done += n
        finally:
            os.close(fd)

    def read_into_many(self, name: str, offset: int, outs: Sequence[WriteBuffer]) -> None:
        """``preadv`` straight into ``outs`` (no joined buffer, no copy), going on after short
        reads. A subclass that overrides :meth:`read_into` only (to count reads or inject
        faults) gets the joined default instead, so its ``read_into`` still sees every byte."""
        if type(self).read_into is not LocalStorage.read_into:
            super().read_into_many(name, offset, outs)
            return
        fd = self._open_regular(name)
        try:
            _preadv_all(fd, outs, offset, self._path(name))
        finally:
            os.close(fd)

    def _checked(self, name: str) -> str:
        """The path of ``name``, refused if a symlink takes it outside the root: a
        checkpoint's files must not read (or be made to read) files elsewhere on the host."""
        path = self._path(name)
        real, real_root = os.path.realpath(path), os.path.realpath(self.root)
        if name and os.path.commonpath([real, real_root]) != real_root:
            raise StorageError(
                f"{path}: is a symlink to {real}, outside the checkpoint folder {self.root}; "
                "shardckpt reads only files inside the folder. Replace the link with the file itself."
            )
        return path

    def _open_regular(self, name: str) -> int:
        """Open ``name`` for reading if it is a regular file inside the root. O_NONBLOCK
        so a FIFO put in a data file's place cannot block the open; checked with fstat
        on the opened descriptor, so a swap between check and open does not help."""
        path = self._checked(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise
        except OSError as e:
            raise _storage_error(e, path, "open") from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _not_regular(path, st)
        return fd

    def open_write(self, name: str) -> _LocalWriteStream:
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return _LocalWriteStream(path)

    def open_write_direct(self, name: str) -> WriteStream:
        """:meth:`open_write` with ``O_DIRECT`` (:class:`~shardckpt.storage.direct.DirectWriteStream`),
        unless a subclass overrides :meth:`open_write` (to count or fail writes): then its
        ``open_write``, so that it still sees every file."""
        if type(self).open_write is not LocalStorage.open_write:
            return self.open_write(name)
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return DirectWriteStream(path)

    def write_atomic(self, name: str, data: bytes) -> None:
        path = self._path(name)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException as e:
            unlink_missing_ok(tmp)
            _name_file(e, path)
            raise
        self._fsync_dir(os.path.dirname(path))

    def create_exclusive(self, name: str, data: bytes) -> None:
        """Durably write a temp file, then link(2) it to ``name``: link never replaces
        an existing name, so of two racing creators exactly one wins."""
        path = self._path(name)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, f"{path}: already exists", path) from None
        except OSError as e:
            _name_file(e, path)
            raise
        finally:
            unlink_missing_ok(tmp)
        self._fsync_dir(os.path.dirname(path))

    def _write_temp(self, path: str, data: bytes) -> str:
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            unlink_missing_ok(tmp)
            _name_file(e, path)
            raise
        return tmp

    def list_files(self, prefix: str = "") -> list[str]:
        """Regular files under ``prefix``, recursively; symlinked folders are not entered."""
        base = self._path(prefix)
        found = []
        for folder, _dirs, files in os.walk(base, onerror=_raise_walk_error):
            rel = os.path.relpath(folder, self.root)
            for f in files:
                found.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
        return sorted(found)

    def list_names(self, prefix: str = "") -> list[str]:
        path = self._path(prefix)
        try:
            with os.scandir(path) as it:
                return sorted(e.name + "/" if e.is_dir(follow_symlinks=False) else e.name for e in it)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise _storage_error(e, path, "list") from e

    def delete(self, names: list[str]) -> None:
        for name in names:
            try:
                os.unlink(self._path(name))
            except FileNotFoundError:
                pass

    def remove_empty_dir(self, name: str = "") -> bool:
        path = self._path(name)
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            _name_file(e, path)
            raise
        return True

    def sync_dir(self, name: str = "") -> None:
        self._fsync_dir(self._path(name))

    def child(self, name: str) -> LocalStorage:
        return LocalStorage(self._path(name))

    def sibling(self, name: str) -> LocalStorage:
        parent = os.path.dirname(self.root)
        if parent == self.root:
            raise ValueError(f"{self.url}: the file system root has no sibling folders")
        return LocalStorage(os.path.join(parent, name))

    @staticmethod
    def _fsync_dir(folder: str) -> None:
        fsync_dir(folder)


def fsync_dir(folder: str) -> None:
    """Make ``folder``'s entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_missing_ok(path: str) -> None:
    """Remove a file this process created; it may already be gone (only ENOENT counts as gone)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _preadv_all(fd: int, outs: Sequence[WriteBuffer], offset: int, path: str) -> None:
    """Fill ``outs`` in turn from ``offset`` on: one ``preadv`` when it fills them all (thousands
    of small targets, #18), else per :data:`_IOV_MAX` of them, going on after short reads;
    EOFError where the file ends first."""
    want = sum(o.nbytes for o in outs)
    if len(outs) <= _IOV_MAX and want and os.preadv(fd, outs, offset) == want:  # type: ignore[arg-type]
        return
    views = [v for v in map(byte_view, outs) if len(v)]
    i, at = 0, offset
    while i < len(views):
        n = os.preadv(fd, views[i : i + _IOV_MAX], at)
        if n == 0:
            missing = sum(len(v) for v in views[i:])
            raise EOFError(f"{path}: file ends at byte {at}, expected {missing} more bytes")
        at += n
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


def _raise_walk_error(e: OSError) -> None:
    if not isinstance(e, (FileNotFoundError, NotADirectoryError)):
        raise _storage_error(e, e.filename or "?", "list") from e
