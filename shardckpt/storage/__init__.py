"""Storage backends. ``open_storage(url)`` picks one from the URL."""

from __future__ import annotations

from typing import Any

from shardckpt.storage.base import Storage, WriteStream
from shardckpt.storage.local import LocalStorage

__all__ = ["Storage", "WriteStream", "LocalStorage", "open_storage"]


def open_storage(url: str, storage_options: dict[str, Any] | None = None) -> Storage:
    """A Storage rooted at ``url``: a local path or ``file://`` URL gives LocalStorage
    (fsync + atomic rename), any other fsspec URL gives FsspecStorage."""
    if not isinstance(url, str):
        raise TypeError(f"checkpoint path must be a str (a local path or fsspec URL), got {type(url).__name__}")
    if "://" not in url or url.startswith("file://"):
        if storage_options:
            raise ValueError("storage_options only apply to fsspec URLs such as s3://bucket/path")
        return LocalStorage(url)
    from shardckpt.storage.fsspec_storage import FsspecStorage

    return FsspecStorage(url, storage_options)
