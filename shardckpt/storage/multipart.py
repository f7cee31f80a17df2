"""One S3 object written as a stream: a multipart upload with parts in flight in parallel.

Bytes are appended to a part buffer (grown, never zero-filled first: zeroing fresh
64 MiB buffers cost more than the copy); a full buffer is handed to a thread that
uploads it (``UploadPart``) while the caller fills the next one. The parts in flight of all
files of one storage (one rank) share ``slots``, so a rank holds at most
``(max_concurrency + files being written) x part size`` bytes of buffers.

The first buffer holds ``single_put_bytes``: an object that fits never starts a
multipart upload, ``finish`` sends it in one PUT (fewer requests, and no server-side
assembly). A larger object uploads that buffer as part 1, then parts of ``part_bytes``,
doubling every 1,000 parts (S3 allows 10,000 parts per object), so a 16 MiB part size
still reaches objects of many TiB. ``finish`` completes the upload (the object appears
whole, at once); ``abort`` aborts it, so S3 drops every part and no object appears.
Both then abort any other unfinished upload of the same key: a CreateMultipartUpload
whose answer was lost and that botocore retried started an upload whose id we never
learnt, and its parts would be billed until a lifecycle rule removed them (seen in the
S3 soak test). Data-file keys are unique per save, so no other writer owns one.

Each request goes through ``call`` (the storage's retry policy and error translation;
see :mod:`shardckpt.storage.retry` for what botocore and s3fs retry underneath).
Retrying a part re-sends the same bytes under the same part number, which replaces it.
Not thread-safe: one writer thread per stream.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger("shardckpt")

MIN_PART_BYTES = 5 * 2**20  # S3's minimum for every part but the last
MAX_PART_BYTES = 5 * 2**30
MAX_PARTS = 10_000
PARTS_PER_SIZE = 1_000  # part size doubles after this many parts


def part_size(part_number: int, part_bytes: int, single_put_bytes: int | None = None) -> int:
    """Size of part ``part_number`` (1-based): part 1 is the single-PUT buffer, later
    parts ``part_bytes`` doubled every 1,000 parts."""
    if part_number == 1 and single_put_bytes is not None:
        return single_put_bytes
    return int(min(MAX_PART_BYTES, part_bytes * 2 ** ((part_number - 1) // PARTS_PER_SIZE)))


class MultipartUpload:
    """``write`` any number of times, then exactly one of ``finish`` or ``abort``.

    ``call(action, fn)`` runs one S3 request (``fn`` takes no arguments) under the
    storage's retry policy and error translation; ``fs`` is an ``s3fs.S3FileSystem``;
    ``slots`` bounds the parts in flight, shared by every stream of the storage.
    """

    def __init__(
        self,
        fs: Any,
        bucket: str,
        key: str,
        *,
        part_bytes: int,
        single_put_bytes: int,
        slots: threading.BoundedSemaphore,
        max_concurrency: int,
        call: Callable[[str, Callable[[], Any]], Any],
    ) -> None:
        self._fs = fs
        self._bucket = bucket
        self._key = key
        self._part_bytes = part_bytes
        self._single_put_bytes = single_put_bytes
        self._slots = slots
        self._max_concurrency = max_concurrency
        self._call = call
        self._buf = bytearray()
        self._bytes = 0
        self._upload_id: str | None = None
        self._inflight: deque[Future[dict[str, Any]]] = deque()
        self._parts: list[dict[str, Any]] = []
        self._pool: ThreadPoolExecutor | None = None

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            size = part_size(len(self._parts) + len(self._inflight) + 1, self._part_bytes, self._single_put_bytes)
            n = min(len(view), size - len(self._buf))
            self._buf += view[:n]
            self._bytes += n
            view = view[n:]
            if len(self._buf) == size:
                self._send_full_part()

    def finish(self) -> None:
        body, self._buf = self._buf, bytearray()
        if self._upload_id is None:
            self._s3("write", "put_object", Key=self._key, Body=body)
            self._release()
            return
        try:
            if body:
                self._submit(body)
            while self._inflight:
                self._collect_oldest()
            parts, upload_id = {"Parts": self._parts}, self._upload_id
            try:
                self._s3(
                    "complete the upload of",
                    "complete_multipart_upload",
                    Key=self._key,
                    UploadId=upload_id,
                    MultipartUpload=parts,
                )
            except FileNotFoundError:
                # NoSuchUpload on a retry: the first attempt completed it and its answer was lost.
                if not self._is_complete():
                    raise
            self._upload_id = None
            self._abort_strays(upload_id)
        finally:
            if self._upload_id is not None:
                self.abort()
            self._release()

    def abort(self) -> None:
        """Drop everything written so far; no object appears. Never raises: a failure
        to abort is logged (a bucket lifecycle rule "AbortIncompleteMultipartUpload"
        reclaims such parts), so it cannot hide the error that caused the abort."""
        for future in self._inflight:
            future.cancel()
        for future in self._inflight:
            if not future.cancelled():
                future.exception()  # wait for it; its error is not the one to report
        self._inflight.clear()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            try:
                self._s3("abort the upload of", "abort_multipart_upload", Key=self._key, UploadId=upload_id)
            except Exception as e:  # noqa: BLE001 - logged: the caller is already raising the real error
                log.warning(
                    "shardckpt: could not abort the multipart upload of s3://%s/%s: %s", self._bucket, self._key, e
                )
            self._abort_strays(upload_id)
        self._release()

    def _abort_strays(self, ours: str) -> None:
        """Abort every unfinished upload of this key but ``ours`` (see the module doc).
        Never raises: a stray left behind costs storage, not correctness, so a failure
        here is logged rather than failing a save whose object is complete."""
        try:
            listing = self._s3("list the unfinished uploads of", "list_multipart_uploads", Prefix=self._key)
            strays = [
                str(u.get("UploadId"))
                for u in listing.get("Uploads", [])
                if u.get("Key") == self._key and str(u.get("UploadId")) != ours
            ]
            for stray in strays:
                log.info("shardckpt: aborting stray multipart upload %s of s3://%s/%s", stray, self._bucket, self._key)
                self._abort_one(stray)
        except Exception as e:  # noqa: BLE001 - logged, see above
            log.warning(
                "shardckpt: could not clean up stray multipart uploads of s3://%s/%s: %s", self._bucket, self._key, e
            )

    # ----------------------------------------------------------------- internals

    def _s3(self, what: str, operation: str, **params: Any) -> Any:
        """The S3 ``operation`` on this object's bucket, through the retrying ``call``
        (``what``: the words its error message uses, "... s3://bucket/key")."""
        return self._call(what, lambda: self._fs.call_s3(operation, Bucket=self._bucket, **params))

    def _abort_one(self, upload_id: str) -> None:
        self._s3("abort a stray upload of", "abort_multipart_upload", Key=self._key, UploadId=upload_id)

    def _send_full_part(self) -> None:
        if self._upload_id is None:
            out = self._s3("start the upload of", "create_multipart_upload", Key=self._key)
            self._upload_id = str(out["UploadId"])
            self._pool = ThreadPoolExecutor(self._max_concurrency, thread_name_prefix="shardckpt-part")
        full, self._buf = self._buf, bytearray()
        self._submit(full)

    def _submit(self, body: bytearray) -> None:
        number = len(self._parts) + len(self._inflight) + 1
        if number > MAX_PARTS:
            raise ValueError(f"s3://{self._bucket}/{self._key}: more than {MAX_PARTS} parts; use a larger part_bytes")
        assert self._pool is not None and self._upload_id is not None
        upload_id = self._upload_id

        def upload() -> dict[str, Any]:
            out = self._s3(
                f"upload part {number} of",
                "upload_part",
                Key=self._key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
            )
            return {"PartNumber": number, "ETag": out["ETag"]}

        # Wait for a slot, collecting finished parts meanwhile (an error surfaces early).
        while not self._slots.acquire(timeout=0.05):
            while self._inflight and self._inflight[0].done():
                self._collect_oldest()
        future = self._pool.submit(upload)
        future.add_done_callback(lambda _: self._slots.release())
        self._inflight.append(future)

    def _is_complete(self) -> bool:
        head = self._s3("look up", "head_object", Key=self._key)
        return bool(
            int(head["ContentLength"]) == self._bytes and str(head.get("ETag", "")).endswith(f'-{len(self._parts)}"')
        )

    def _collect_oldest(self) -> None:
        self._parts.append(self._inflight.popleft().result())

    def _release(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._buf = bytearray()
