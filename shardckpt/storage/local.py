"""Local POSIX storage: plain files, fsync for durability, rename for atomic commit."""

from __future__ import annotations

import os
import shutil
import uuid

from shardckpt.storage.base import Storage

_READ_PIECE_BYTES = 64 * 1024 * 1024


def _named(e: OSError, path: str) -> OSError:
    """``e`` with the file it is about: a write() or fsync() error carries no name, and
    "[Errno 28] No space left on device" alone does not say where."""
    if e.filename is None:
        e.filename = path
    return e


class _LocalWriteStream:
    def __init__(self, path: str) -> None:
        self._path = path
        # Unbuffered: our writes are already large, a buffer would only add a copy.
        self._f = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in finish/abort

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = self._f.write(view)
                view = view[n:]
        except OSError as e:
            raise _named(e, self._path)

    def finish(self) -> None:
        try:
            os.fsync(self._f.fileno())
        except OSError as e:
            raise _named(e, self._path)
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

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name) if name else self.root

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def is_dir(self, name: str = "") -> bool:
        return os.path.isdir(self._path(name))

    def size(self, name: str) -> int:
        return os.stat(self._path(name)).st_size

    def read_bytes(self, name: str) -> bytes:
        with open(self._path(name), "rb") as f:
            return f.read()

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        fd = os.open(self._path(name), os.O_RDONLY)
        try:
            done = 0
            while done < len(out):
                piece = out[done : done + _READ_PIECE_BYTES]
                n = os.preadv(fd, [piece], offset + done)
                if n == 0:
                    raise EOFError(
                        f"{self._path(name)}: file ends at byte {offset + done}, "
                        f"expected {len(out) - done} more bytes"
                    )
                done += n
        finally:
            os.close(fd)

    def open_write(self, name: str) -> _LocalWriteStream:
        path = self._path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return _LocalWriteStream(path)

    def write_atomic(self, name: str, data: bytes) -> None:
        path = self._path(name)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise _named(e, path)
            raise
        self._fsync_dir(folder)

    def list_files(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        found = []
        for folder, _dirs, files in os.walk(base):
            rel = os.path.relpath(folder, self.root)
            for f in files:
                found.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
        return sorted(found)

    def list_dirs(self, prefix: str = "") -> list[str]:
        try:
            with os.scandir(self._path(prefix)) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def delete(self, names: list[str]) -> None:
        for name in names:
            try:
                os.unlink(self._path(name))
            except FileNotFoundError:
                pass

    def delete_tree(self, name: str = "") -> None:
        """Delete folder ``name`` and everything in it; an absent folder is not an error."""
        try:
            shutil.rmtree(self._path(name))
        except FileNotFoundError:
            pass

    def sync_dir(self, name: str = "") -> None:
        self._fsync_dir(self._path(name))

    def child(self, name: str) -> LocalStorage:
        return LocalStorage(self._path(name))

    @staticmethod
    def _fsync_dir(folder: str) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
