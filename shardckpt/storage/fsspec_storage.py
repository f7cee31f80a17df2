"""Any fsspec URL (``s3://``, ``memory://``, ``gs://`` ...). With redact, retry and multipart,
the only code that imports fsspec, s3fs or botocore. s3fs (and with it botocore and aiohttp)
is optional, the ``s3`` extra: an ``s3://`` URL without it fails at once saying so.

On S3 (s3fs) a data file is a multipart upload with parts in flight in parallel
(:mod:`~shardckpt.storage.multipart`), a read is ranged GETs of exactly the bytes
asked for (large ones split and fetched in parallel), the commit is the manifest
written in one PUT, listing is by prefix, and deletes are bulk ``DeleteObjects``. Nothing here renames (on S3 that is
copy + delete, no commit at all) and nothing creates a bucket. Every request runs
under a :class:`~shardckpt.storage.retry.RetryPolicy`; failures surface as
:class:`~shardckpt.errors.StorageError` naming bucket and key, with secrets masked.

s3fs caches listings; an object written by another process (another rank, another
job) is invisible to a cached listing, so every query here drops the cache for the
path first and asks the store.
"""

from __future__ import annotations

import errno
import importlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import fsspec

from shardckpt.errors import MissingDependencyError, StorageError
from shardckpt.storage.base import Storage
from shardckpt.storage.failures import HINTS, failure_cause, translate
from shardckpt.storage.file_stream import FileStream
from shardckpt.storage.multipart import MultipartUpload
from shardckpt.storage.redact import Redactor, secret_values
from shardckpt.storage.retry import STORAGE_FAILURES, RetriesExhausted, error_code
from shardckpt.storage.transfer import TransferOptions

__all__ = ["FsspecStorage", "TransferOptions", "require_backend"]  # TransferOptions: its old home

T = TypeVar("T")
_TRANSLATED: tuple[type[BaseException], ...] = (RetriesExhausted, FileNotFoundError, *STORAGE_FAILURES)
log = logging.getLogger("shardckpt")
_S3_PROTOCOLS = frozenset({"s3", "s3a"})
# Backends where a "folder" is only a key prefix: never makedirs there (on gcsfs and
# s3fs it would create a bucket, and a missing bucket must be an error, not a side effect).
_PREFIX_PROTOCOLS = _S3_PROTOCOLS | {"gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"}
_DELETE_BATCH = 1000  # S3's limit for one DeleteObjects request


class FsspecStorage(Storage):
    """A Storage rooted at an fsspec URL. ``storage_options`` go to fsspec unchanged
    (s3fs: ``endpoint_url``, ``key``, ``secret``, ``token``, ``client_kwargs``,
    ``config_kwargs``...); without them s3fs finds credentials and endpoint the standard
    AWS ways (environment, ``~/.aws`` files, ``AWS_ENDPOINT_URL``, instance roles)."""

    def __init__(
        self, url: str, storage_options: dict[str, Any] | None = None, transfer: TransferOptions | None = None
    ) -> None:
        self.url = url
        self.transfer = transfer or TransferOptions()
        self._options = dict(storage_options or {})
        self._redact = Redactor(secret_values(self._options))
        require_backend(url)
        self.fs, root = fsspec.core.url_to_fs(url, **self._options)
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self._protocol = str(protocols[0])
        self._is_s3 = bool(_S3_PROTOCOLS & set(protocols)) and hasattr(self.fs, "call_s3")
        self._has_dirs = not _PREFIX_PROTOCOLS & set(protocols)
        self.location = f"{self._protocol}://{self.root.lstrip('/')}"
        # Shared with child(): one rank's bound on parts in flight, and its pool for ranged reads.
        self._upload_slots = threading.BoundedSemaphore(self.transfer.max_concurrency)
        self._read_pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # ----------------------------------------------------------------- queries

    def exists(self, name: str) -> bool:
        return self._file_size(name) is not None

    def is_dir(self, name: str = "") -> bool:
        info = self._info(name)
        return info is not None and info["type"] == "directory"

    def size(self, name: str) -> int:
        size = self._file_size(name)
        if size is None:
            raise FileNotFoundError(errno.ENOENT, f"{self._where(name)}: no such file")
        return size

    def _file_size(self, name: str) -> int | None:
        """Size of file ``name``, or None when there is no such file. On S3 one HEAD
        request (fsspec's info() would also list the prefix to look for a folder)."""
        if not self._is_s3:
            info = self._info(name)
            return int(info["size"]) if info is not None and info["type"] == "file" else None
        bucket, key, _ = self.fs.split_path(self._path(name))

        def head() -> int | None:
            try:
                return int(self.fs.call_s3("head_object", Bucket=bucket, Key=key)["ContentLength"])
            except FileNotFoundError:
                return None  # a HEAD has no body: a missing bucket looks like a missing key here

        return self._run("look up", name, head)

    def _info(self, name: str) -> dict[str, Any] | None:
        """The entry ``name``, fresh from the store, or None when absent."""
        path = self._path(name)

        def probe() -> dict[str, Any] | None:
            self.fs.invalidate_cache(path)
            try:
                return dict(self.fs.info(path))
            except FileNotFoundError as e:
                if error_code(e)[0] == "NoSuchBucket":
                    raise
                return None

        return self._run("look up", name, probe)

    # ----------------------------------------------------------------- reads

    def read_bytes(self, name: str) -> bytes:
        path = self._path(name)

        def cat() -> bytes:
            self.fs.invalidate_cache(path)  # s3fs sizes the GET from cached info
            return bytes(self.fs.cat_file(path))

        return self._run("read", name, cat)

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        """Ranged GETs of exactly ``[offset, offset + len(out))``: one, or on S3 pieces of
        ``read_piece_bytes`` fetched in parallel (one connection streams ~100 MB/s on S3)."""
        piece = self.transfer.read_piece_bytes if self._is_s3 else len(out)
        starts = range(0, len(out), max(piece, 1))
        if len(starts) <= 1:
            self._read_range(name, offset, out)
            return
        if self._read_pool is None:
            with self._pool_lock:
                if self._read_pool is None:
                    self._read_pool = ThreadPoolExecutor(
                        self.transfer.max_concurrency, thread_name_prefix="shardckpt-get"
                    )
        futures = [self._read_pool.submit(self._read_range, name, offset + i, out[i : i + piece]) for i in starts]
        for f in futures:
            f.result()

    def _read_range(self, name: str, offset: int, out: memoryview) -> None:
        if len(out) == 0:
            return
        path = self._path(name)
        try:
            data = self._run("read", name, lambda: self.fs.cat_file(path, start=offset, end=offset + len(out)))
        except StorageError as e:
            if error_code(e)[0] != "InvalidRange":  # S3's answer to a range that starts past the end
                raise
            data = b""
        if len(data) != len(out):
            raise EOFError(f"{self._where(name)}: expected {len(out)} bytes at offset {offset}, got {len(data)}")
        out[:] = data

    # ----------------------------------------------------------------- writes

    def open_write(self, name: str) -> MultipartUpload | FileStream:
        path = self._path(name)
        if self._is_s3:
            bucket, key, _ = self.fs.split_path(path)
            self.fs.invalidate_cache(path)
            return MultipartUpload(
                self.fs,
                bucket,
                key,
                part_bytes=self.transfer.part_bytes,
                single_put_bytes=self.transfer.single_put_bytes,
                slots=self._upload_slots,
                max_concurrency=self.transfer.max_concurrency,
                call=lambda action, fn: self._run(action, name, fn),
            )
        self._make_parent(name, path)
        f = self._run("open", name, lambda: self.fs.open(path, "wb", block_size=self.transfer.part_bytes))
        return FileStream(f, lambda action, fn: self._run(action, name, fn, retry=False), lambda: self.delete([name]))

    def write_atomic(self, name: str, data: bytes) -> None:
        """One PUT of the whole object: S3 makes it visible whole or not at all."""
        path = self._path(name)
        if self._is_s3:
            bucket, key, _ = self.fs.split_path(path)
            self._run("write", name, lambda: self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data))
            self.fs.invalidate_cache(path)
            return
        self._make_parent(name, path)
        self._run("write", name, lambda: self.fs.pipe_file(path, data))

    def create_exclusive(self, name: str, data: bytes) -> None:
        """S3: one PUT with ``If-None-Match: *`` (412 if the key exists). A retry after a
        lost answer may meet its own earlier PUT: a 412 whose object holds exactly
        ``data`` is that, and counts as success (callers make ``data`` unique). Stores that do not implement
        conditional writes (HTTP 501) fall back to HEAD + PUT with a warning: there two
        racing creators are not detected. Other fsspec backends: ``mode="create"``."""
        path = self._path(name)
        try:
            if self._is_s3:
                self._create_s3(name, path, data)
            else:
                self._make_parent(name, path)
                self._run("create", name, lambda: self.fs.pipe_file(path, data, mode="create"), retry=False)
        except FileExistsError:
            raise FileExistsError(errno.EEXIST, self._redact(f"{self._where(name)}: already exists")) from None
        finally:
            self.fs.invalidate_cache(path)

    def _create_s3(self, name: str, path: str, data: bytes) -> None:
        bucket, key, _ = self.fs.split_path(path)

        def put() -> None:
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except FileExistsError:
                # Our own earlier attempt may have landed with its answer lost (retried by
                # us or inside botocore). What we create is unique to this call (a save id,
                # a token), so an object holding exactly ``data`` is ours.
                if self._holds(path, data):
                    return
                raise

        try:
            self._run("create", name, put)
        except StorageError as e:
            if error_code(e.__cause__ or e)[0] != "NotImplemented":
                raise
            log.warning(
                "shardckpt: %s does not support conditional writes (If-None-Match); the commit "
                "of %s is not exclusive there: two saves racing for one path are not detected",
                self.url,
                self._where(name),
            )
            if self.exists(name):
                raise FileExistsError(errno.EEXIST, self._where(name)) from e
            self.write_atomic(name, data)

    def _holds(self, path: str, data: bytes) -> bool:
        try:
            return bytes(self.fs.cat_file(path)) == data
        except FileNotFoundError:
            return False

    # ----------------------------------------------------------------- listing

    def list_files(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)

        def find() -> list[str]:
            self.fs.invalidate_cache(base)
            try:
                return list(self.fs.find(base, withdirs=False))
            except FileNotFoundError as e:
                if error_code(e)[0] == "NoSuchBucket":
                    raise
                return []

        cut = len(self.root) + 1
        found = (p.rstrip("/")[cut:] for p in self._run("list", prefix, find) if p.startswith(self.root + "/"))
        return sorted(n for n in found if n and not n.endswith("/"))

    def list_names(self, prefix: str = "") -> list[str]:
        """Immediate entries; on S3 one delimited listing (folders are its common prefixes)."""
        base = self._path(prefix)

        def ls() -> list[dict[str, Any]]:
            self.fs.invalidate_cache(base)
            try:
                return list(self.fs.ls(base, detail=True, refresh=True))
            except FileNotFoundError as e:
                if error_code(e)[0] == "NoSuchBucket":
                    raise
                return []

        names = set()
        for e in self._run("list", prefix, ls):
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            if name and e["name"].rstrip("/") != base.rstrip("/"):
                names.add(name + "/" if e.get("type") == "directory" else name)
        return sorted(names)

    # ----------------------------------------------------------------- deletes

    def delete(self, names: list[str]) -> None:
        if self._is_s3:
            self._bulk_delete(names)
            return
        for name in names:
            path = self._path(name)

            def rm(path: str = path) -> None:
                try:
                    self.fs.rm_file(path)
                except FileNotFoundError:
                    pass

            self._run("delete", name, rm)

    def _bulk_delete(self, names: list[str]) -> None:
        """DeleteObjects, 1000 keys a request. S3 reports per-key failures in the
        answer, not as an HTTP error, so they are checked here (s3fs ignores them)."""
        for i in range(0, len(names), _DELETE_BATCH):
            batch = names[i : i + _DELETE_BATCH]
            bucket = self.fs.split_path(self._path(batch[0]))[0]
            objects = [{"Key": self.fs.split_path(self._path(n))[1]} for n in batch]

            def delete_batch(bucket: str = bucket, objects: list[dict[str, str]] = objects) -> Any:
                return self.fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": objects, "Quiet": True})

            out = self._run("delete", batch[0], delete_batch)
            for n in batch:
                self.fs.invalidate_cache(self._path(n))
            failed = [e for e in out.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if failed:
                first = failed[0]
                raise StorageError(
                    self._redact(
                        f"cannot delete {len(failed)} object(s) in bucket {bucket!r}, e.g. key {first.get('Key')!r}: "
                        f"{first.get('Code')}: {first.get('Message')}. {HINTS.get(str(first.get('Code')), '')}"
                    ).rstrip(". ")
                    + "."
                )

    def child(self, name: str) -> FsspecStorage:
        return self._rooted(f"{self.url.rstrip('/')}/{name}" if name else self.url, self._path(name))

    def sibling(self, name: str) -> FsspecStorage:
        url, root = self.url.rstrip("/"), self.root.rstrip("/")
        if "/" not in root.lstrip("/"):
            raise ValueError(f"{self.url}: a bucket (or store root) has no sibling folders")
        return self._rooted(f"{url.rsplit('/', 1)[0]}/{name}", f"{root.rsplit('/', 1)[0]}/{name}")

    def _rooted(self, url: str, root: str) -> FsspecStorage:
        """The same store, connection pool and transfer settings, rooted elsewhere."""
        sub = object.__new__(FsspecStorage)
        sub.__dict__.update(self.__dict__)
        sub.url, sub.root = url, root
        sub.location = f"{self._protocol}://{root.lstrip('/')}"
        return sub

    # ----------------------------------------------------------------- internals

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    def _make_parent(self, name: str, path: str) -> None:
        """Create the folder ``path`` is written into, on backends that have folders."""
        if self._has_dirs:
            self._run("create the folder of", name, lambda: self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True))

    def _where(self, name: str) -> str:
        path = self._path(name)
        if self._is_s3:
            bucket, key, _ = self.fs.split_path(path)
            return f"s3://{bucket}/{key} (bucket {bucket!r}, key {key!r})"
        return f"{self._protocol}://{path.lstrip('/')}"

    def _run(self, action: str, name: str, fn: Callable[[], T], *, retry: bool = True) -> T:
        """``fn()`` under the retry policy (once if not ``retry``); storage failures
        become StorageError (or FileNotFoundError for an absent object), secrets masked
        (:func:`~shardckpt.storage.failures.translate`)."""
        try:
            return self.transfer.retry.call(fn) if retry else fn()
        except FileExistsError:
            raise  # an exclusive create lost the race: the caller's answer, not a storage fault
        except _TRANSLATED as e:
            raise translate(e, action, self._where(name), self._redact, self.transfer.retry) from failure_cause(e)


def require_backend(url: str) -> None:
    """Raise MissingDependencyError, naming the extra that installs it, when ``url`` (or a
    link of an fsspec chain such as ``simplecache::s3://...``) is an ``s3://`` URL and s3fs
    cannot be imported. fsspec's own error ("Install s3fs to access S3") does not say that
    shardckpt has an extra for it."""
    for link in url.split("::"):
        protocol, _ = fsspec.core.split_protocol(link)
        if protocol in _S3_PROTOCOLS:
            try:
                importlib.import_module("s3fs")
            except ImportError as e:
                raise MissingDependencyError(
                    f"{protocol}:// needs s3fs: pip install 'shardckpt[s3]' (importing s3fs failed: {e}; path {link!r})"
                ) from e
