"""Storage backends. ``open_storage(url)`` picks one from the URL."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from shardckpt.storage.base import Storage, WriteStream
from shardckpt.storage.local import LocalStorage, local_path

if TYPE_CHECKING:
    from shardckpt.storage.retry import RetryPolicy
    from shardckpt.storage.transfer import TransferOptions

__all__ = [
    "LocalStorage",
    "RetryPolicy",
    "Storage",
    "TransferOptions",
    "WriteStream",
    "as_url",
    "local_path",
    "open_storage",
]


def __getattr__(name: str) -> Any:
    # Lazily: these import botocore (fsspec and s3fs come with FsspecStorage), which
    # local-only users never need.
    if name == "TransferOptions":
        from shardckpt.storage.transfer import TransferOptions

        return TransferOptions
    if name == "RetryPolicy":
        from shardckpt.storage.retry import RetryPolicy

        return RetryPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_url(path: str | os.PathLike[str], what: str = "checkpoint path") -> str:
    """The public boundary of every location: a ``str`` (a local path or fsspec URL) or an
    ``os.PathLike`` such as ``pathlib.Path``, as a non-empty ``str`` (``os.fspath``; URLs
    are never built or normalised with pathlib, which would turn ``s3://`` into ``s3:/``).
    ``what`` names the argument in the TypeError / ValueError."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str or os.PathLike (a local path or fsspec URL), got {type(path).__name__}")
    if not text.strip():
        raise ValueError(f"{what} is empty; pass a folder or URL, e.g. 'runs/exp1/step_100'")
    return text


def open_storage(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, transfer: TransferOptions | None = None
) -> Storage:
    """A Storage rooted at ``url``: a local path or ``file://`` URL gives LocalStorage
    (fsync + atomic rename), any other fsspec URL gives FsspecStorage (``transfer``: its
    part size, parts in flight per file and retry policy; the defaults when None)."""
    url = os.fspath(url) if isinstance(url, os.PathLike) else url
    if not isinstance(url, str):
        raise TypeError(
            f"checkpoint path must be a str or os.PathLike (a local path or fsspec URL), got {type(url).__name__}"
        )
    if local_path(url) is not None:
        if storage_options or transfer:
            raise ValueError("storage_options and transfer only apply to fsspec URLs such as s3://bucket/path")
        return LocalStorage(url)
    from shardckpt.storage.fsspec_storage import FsspecStorage

    return FsspecStorage(url, storage_options, transfer)
