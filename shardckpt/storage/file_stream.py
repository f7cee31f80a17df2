"""A file written as a stream on an fsspec backend other than S3 (where
:mod:`~shardckpt.storage.multipart` streams): the backend's own buffering, committed on
close."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class FileStream:
    """A streamed write on a non-S3 fsspec backend (its own buffering and commit on close).
    Writes cannot be retried mid-stream; failures still become StorageError."""

    def __init__(self, f: Any, call: Callable[[str, Callable[[], Any]], Any], remove: Callable[[], None]) -> None:
        self._f = f
        self._call = call  # the storage's error translation, without retries
        self._remove = remove  # deletes the file

    def write(self, data: memoryview | bytes) -> None:
        self._call("write", lambda: self._f.write(data))

    def finish(self) -> None:
        self._call("write", self._f.close)

    def abort(self) -> None:
        discard = getattr(self._f, "discard", None)
        if discard is not None:
            discard()  # drops buffered data without committing (s3fs, gcsfs)
        else:
            self._f.close()
        # Some backends create the file at open (memory://) or on close: remove it.
        self._remove()
