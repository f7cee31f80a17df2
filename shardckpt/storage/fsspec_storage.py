"""Any fsspec URL (``memory://``, ``s3://``, ``gs://`` ...). The only module that imports fsspec.

Commit is one ``pipe_file`` (a single PUT on object stores); nothing here renames,
because rename on S3 is copy+delete and no commit at all.
"""

from __future__ import annotations

from typing import Any

import fsspec

from shardckpt.storage.base import Storage


class _FsspecWriteStream:
    def __init__(self, fs: Any, path: str) -> None:
        self._fs = fs
        self._path = path
        self._f = fs.open(path, "wb")

    def write(self, data: memoryview | bytes) -> None:
        self._f.write(data)

    def finish(self) -> None:
        # Closing completes the (multipart) upload; object stores are durable on success.
        self._f.close()

    def abort(self) -> None:
        try:
            discard = getattr(self._f, "discard", None)
            if discard is not None:
                discard()  # drops a pending multipart upload without creating the object
            else:
                self._f.close()
        finally:
            if self._fs.exists(self._path):
                self._fs.rm_file(self._path)


class FsspecStorage(Storage):
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self._options = dict(storage_options or {})
        self.fs, self.root = fsspec.core.url_to_fs(url, **self._options)
        self.root = self.root.rstrip("/")

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def exists(self, name: str) -> bool:
        return bool(self.fs.isfile(self._path(name)))

    def is_dir(self, name: str = "") -> bool:
        return bool(self.fs.isdir(self._path(name)))

    def size(self, name: str) -> int:
        return int(self.fs.size(self._path(name)))

    def read_bytes(self, name: str) -> bytes:
        return bytes(self.fs.cat_file(self._path(name)))

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        data = self.fs.cat_file(self._path(name), start=offset, end=offset + len(out))
        if len(data) != len(out):
            raise EOFError(f"{self._path(name)}: expected {len(out)} bytes at {offset}, got {len(data)}")
        out[:] = data

    def open_write(self, name: str) -> _FsspecWriteStream:
        path = self._path(name)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        return _FsspecWriteStream(self.fs, path)

    def write_atomic(self, name: str, data: bytes) -> None:
        path = self._path(name)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data)

    def list_files(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if not self.fs.exists(base):
            return []
        cut = len(self.root.rstrip("/")) + 1
        return sorted(p[cut:] if p.startswith(self.root) else p for p in self.fs.find(base))

    def list_dirs(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def delete(self, names: list[str]) -> None:
        paths = [self._path(n) for n in names]
        existing = [p for p in paths if self.fs.exists(p)]
        if existing:
            self.fs.rm(existing)

    def delete_tree(self, name: str = "") -> None:
        path = self._path(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def child(self, name: str) -> FsspecStorage:
        protocol = self.url.split("://", 1)[0]
        return FsspecStorage(f"{protocol}://{self._path(name)}", self._options)
