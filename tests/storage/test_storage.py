"""Storage conformance: one suite, every backend.

The same tests run against LocalStorage on a temporary folder, FsspecStorage on
``memory://``, and FsspecStorage on ``s3://`` against a real S3 protocol server
(moto in server mode on 127.0.0.1, reached over HTTP by s3fs; see tests/support/s3server.py).
S3 parts are 5 MiB here (S3's minimum) so a few MiB exercise multipart uploads.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator

import pytest

from shardckpt.storage import LocalStorage, Storage, open_storage
from shardckpt.storage.fsspec_storage import FsspecStorage, TransferOptions
from shardckpt.storage.retry import RetryPolicy

PART = 5 * 2**20
BACKENDS = ["local", "memory", "s3"]


@pytest.fixture(params=BACKENDS)
def storage(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[Storage]:
    if request.param == "local":
        yield LocalStorage(os.path.join(str(tmp_path), "root"))
    elif request.param == "memory":
        st = FsspecStorage(f"memory://conformance-{uuid.uuid4().hex[:8]}/root")
        yield st
        st.delete(st.list_files(""))
    else:
        server = request.getfixturevalue("s3")
        bucket = server.create_bucket()
        yield FsspecStorage(
            f"s3://{bucket}/root",
            server.storage_options(),
            TransferOptions(part_bytes=PART, single_put_bytes=PART, read_piece_bytes=PART),
        )


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def write(storage: Storage, name: str, data: bytes, piece: int = 1 << 20) -> None:
    stream = storage.open_write(name)
    for i in range(0, len(data), piece):
        stream.write(memoryview(data)[i : i + piece])
    stream.finish()


def pending_uploads(storage: Storage) -> list[str]:
    """Multipart uploads started and neither completed nor aborted (S3 only)."""
    if not (isinstance(storage, FsspecStorage) and storage._is_s3):
        return []
    bucket = storage.root.split("/", 1)[0]
    return [u["Key"] for u in storage.fs.list_multipart_uploads(bucket)]


# ------------------------------------------------------------------ round trips


def test_streamed_write_round_trip(storage: Storage) -> None:
    data = payload(2 * PART + 12345)  # three parts on S3, the last one short
    write(storage, "data/a.bin", data, piece=777_777)  # pieces that straddle part boundaries
    assert storage.read_bytes("data/a.bin") == data
    assert storage.size("data/a.bin") == len(data)
    assert storage.exists("data/a.bin")
    assert pending_uploads(storage) == []


def test_small_and_empty_files(storage: Storage) -> None:
    write(storage, "small.bin", b"hello")
    write(storage, "empty.bin", b"")
    assert storage.read_bytes("small.bin") == b"hello"
    assert storage.read_bytes("empty.bin") == b""
    assert storage.size("empty.bin") == 0


def test_multipart_object_on_s3_has_one_etag_per_upload(storage: Storage) -> None:
    if not (isinstance(storage, FsspecStorage) and storage._is_s3):
        pytest.skip("multipart uploads exist on S3 only")
    write(storage, "big.bin", payload(2 * PART + 1))
    etag = storage.fs.info(f"{storage.root}/big.bin", refresh=True)["ETag"].strip('"')
    assert etag.endswith("-3"), f"expected a 3-part multipart ETag, got {etag}"
    write(storage, "one.bin", payload(PART - 1))
    assert "-" not in storage.fs.info(f"{storage.root}/one.bin", refresh=True)["ETag"]


@pytest.mark.parametrize(
    "offset,length",  # on S3, reads above PART are split into parallel ranged GETs
    [(0, 1), (0, 100), (PART - 3, 10), (PART + 7, PART), (2 * PART, 12345), (17, 0), (3, 2 * PART + 12000)],
)
def test_read_into_reads_exactly_the_range(storage: Storage, offset: int, length: int) -> None:
    data = payload(2 * PART + 12345, seed=1)
    write(storage, "r.bin", data)
    out = bytearray(b"\xee" * (length + 2))
    storage.read_into("r.bin", offset, memoryview(out)[1 : 1 + length])
    assert out[1 : 1 + length] == data[offset : offset + length]
    assert out[0] == 0xEE and out[-1] == 0xEE  # nothing written outside the view


def test_read_past_the_end_raises_eof(storage: Storage) -> None:
    write(storage, "short.bin", b"0123456789")
    with pytest.raises(EOFError):
        storage.read_into("short.bin", 5, memoryview(bytearray(10)))
    write(storage, "long.bin", payload(PART + 10))
    with pytest.raises(EOFError):  # on S3 the second of two pieces comes back short
        storage.read_into("long.bin", 0, memoryview(bytearray(PART + 20)))
    with pytest.raises(EOFError):  # starts past the end (S3: 416 InvalidRange)
        storage.read_into("long.bin", PART + 100, memoryview(bytearray(10)))


def test_missing_file_is_file_not_found(storage: Storage) -> None:
    assert not storage.exists("nope.bin")
    with pytest.raises(FileNotFoundError):
        storage.size("nope.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("nope.bin")


# ------------------------------------------------------------------ commit primitive


def test_write_atomic_is_visible_whole_and_replaces(storage: Storage) -> None:
    assert not storage.exists("manifest.json")
    storage.write_atomic("manifest.json", b'{"v": 1}')
    assert storage.read_bytes("manifest.json") == b'{"v": 1}'
    storage.write_atomic("manifest.json", b'{"v": 2, "longer": true}')
    assert storage.read_bytes("manifest.json") == b'{"v": 2, "longer": true}'
    storage.write_atomic("step_1/manifest.json", b"x")
    assert storage.list_files("") == ["manifest.json", "step_1/manifest.json"]  # no temp files left


def test_state_written_by_another_client_is_seen_at_once(storage: Storage) -> None:
    """Another process (rank, job) writes: our cached listings must not hide it."""
    assert storage.list_dirs("") == [] and not storage.exists("step_2/manifest.json")
    other = _second_client(storage)
    other.write_atomic("step_2/manifest.json", b"m")
    assert storage.exists("step_2/manifest.json")
    assert storage.list_dirs("") == ["step_2"]
    assert storage.list_files("step_2") == ["step_2/manifest.json"]
    other.delete(["step_2/manifest.json"])
    other.remove_empty_dir("step_2")
    assert not storage.exists("step_2/manifest.json")
    assert storage.list_dirs("") == []


def _second_client(storage: Storage) -> Storage:
    if isinstance(storage, FsspecStorage) and storage._is_s3:
        # skip_instance_cache: a separate s3fs instance with its own listing cache.
        return FsspecStorage(storage.url, {**storage._options, "skip_instance_cache": True})
    return open_storage(storage.url)


# ------------------------------------------------------------------ listing


def test_list_files_and_dirs(storage: Storage) -> None:
    for name in ["step_1/manifest.json", "step_1/data/a", "step_1/data/b", "step_10/data/c", "data2/x", "top"]:
        storage.write_atomic(name, name.encode())
    assert storage.list_files("") == sorted(
        ["step_1/manifest.json", "step_1/data/a", "step_1/data/b", "step_10/data/c", "data2/x", "top"]
    )
    assert storage.list_files("step_1") == ["step_1/data/a", "step_1/data/b", "step_1/manifest.json"]
    assert storage.list_files("step_1/data") == ["step_1/data/a", "step_1/data/b"]
    assert storage.list_dirs("") == ["data2", "step_1", "step_10"]
    assert storage.list_dirs("step_1") == ["data"]
    assert storage.list_files("missing") == [] and storage.list_dirs("missing") == []


def test_exists_size_is_dir(storage: Storage) -> None:
    storage.write_atomic("d/f", b"abc")
    assert storage.exists("d/f") and storage.size("d/f") == 3
    assert storage.is_dir("d") and not storage.exists("d")
    assert not storage.is_dir("d/f") and not storage.is_dir("e")
    assert storage.is_dir("")


# ------------------------------------------------------------------ deletes


def test_delete_is_bulk_and_ignores_missing(storage: Storage) -> None:
    for i in range(5):
        storage.write_atomic(f"data/{i}", b"x")
    storage.delete(["data/0", "data/3", "data/missing"])
    assert storage.list_files("data") == ["data/1", "data/2", "data/4"]
    storage.delete([])
    assert storage.list_files("data") == ["data/1", "data/2", "data/4"]


def test_create_exclusive_creates_once_and_never_replaces(storage: Storage) -> None:
    storage.create_exclusive("step_1/manifest.json", b"first")
    with pytest.raises(FileExistsError, match="already exists"):
        storage.create_exclusive("step_1/manifest.json", b"second")
    assert storage.read_bytes("step_1/manifest.json") == b"first"
    assert storage.list_files("step_1") == ["step_1/manifest.json"]  # no temp file left


def test_list_names_is_one_level_and_marks_folders(storage: Storage) -> None:
    for name in ["step_1/manifest.json", "step_1/data/a", "step_1/.hidden", "step_10/data/c"]:
        storage.write_atomic(name, b"x")
    assert storage.list_names("step_1") == [".hidden", "data/", "manifest.json"]
    assert storage.list_names("") == ["step_1/", "step_10/"]
    assert storage.list_names("absent") == []


def test_remove_empty_dir_never_removes_content(storage: Storage) -> None:
    storage.write_atomic("step_1/data/a", b"x")
    assert storage.remove_empty_dir("step_1") is (not isinstance(storage, LocalStorage))
    assert storage.list_files("") == ["step_1/data/a"]
    storage.delete(["step_1/data/a"])
    assert storage.remove_empty_dir("step_1/data") and storage.remove_empty_dir("step_1")
    assert storage.remove_empty_dir("step_1")  # already gone: fine
    assert storage.list_names("") == []


def test_many_files_deleted_in_batches(storage: Storage) -> None:
    if not isinstance(storage, FsspecStorage):
        pytest.skip("batching is an object-store concern")
    import shardckpt.storage.fsspec_storage as mod

    names = [f"many/{i:04d}" for i in range(7)]
    for n in names:
        storage.write_atomic(n, b"")
    old, mod._DELETE_BATCH = mod._DELETE_BATCH, 3  # 3 requests for 7 keys
    try:
        storage.delete(names)
    finally:
        mod._DELETE_BATCH = old
    assert storage.list_files("many") == []


# ------------------------------------------------------------------ child and abort


def test_child_is_rooted_below(storage: Storage) -> None:
    sub = storage.child("step_5")
    sub.write_atomic("manifest.json", b"m")
    write(sub, "data/x", b"payload")
    assert storage.list_files("step_5") == ["step_5/data/x", "step_5/manifest.json"]
    assert sub.list_files("") == ["data/x", "manifest.json"]
    assert sub.url.rstrip("/").endswith("step_5")
    assert sub.read_bytes("data/x") == b"payload"


@pytest.mark.parametrize("size", [100, 2 * PART + 5])
def test_abort_leaves_nothing_behind(storage: Storage, size: int) -> None:
    stream = storage.open_write("data/partial.bin")
    stream.write(payload(size))
    stream.abort()
    assert not storage.exists("data/partial.bin")
    assert storage.list_files("") == []
    assert pending_uploads(storage) == []


def test_abort_after_an_earlier_file_keeps_the_earlier_file(storage: Storage) -> None:
    write(storage, "data/kept.bin", b"kept")
    stream = storage.open_write("data/dropped.bin")
    stream.write(payload(PART + 1))
    stream.abort()
    assert storage.list_files("") == ["data/kept.bin"]


# ------------------------------------------------------------------ options


def test_transfer_options_are_validated() -> None:
    with pytest.raises(ValueError, match="part_bytes"):
        TransferOptions(part_bytes=1 << 20)
    with pytest.raises(ValueError, match="single_put_bytes"):
        TransferOptions(single_put_bytes=6 * 2**30)
    with pytest.raises(ValueError, match="max_concurrency"):
        TransferOptions(max_concurrency=0)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="storage_options"):
        open_storage("/tmp/x", {"key": "k"})


# ------------------------------------------------------------------ multipart mechanics


class _RecordingS3:
    """Stands in for s3fs's ``call_s3``: records parts and how many upload at once."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.Lock()
        self.running = self.peak = 0
        self.objects: dict[str, bytes] = {}
        self.parts: dict[str, dict[int, bytes]] = {}

    def call_s3(self, method: str, **kw: object) -> dict:
        import time

        key = str(kw["Key"])
        if method == "create_multipart_upload":
            self.parts[key] = {}
            return {"UploadId": f"u-{key}"}
        if method == "upload_part":
            with self.lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
            time.sleep(0.01)
            with self.lock:
                self.running -= 1
                self.parts[key][int(kw["PartNumber"])] = bytes(kw["Body"])  # type: ignore[call-overload]
            return {"ETag": f"e{kw['PartNumber']}"}
        if method == "complete_multipart_upload":
            numbers = [p["PartNumber"] for p in kw["MultipartUpload"]["Parts"]]  # type: ignore[index]
            assert numbers == sorted(self.parts[key]) == list(range(1, len(numbers) + 1))
            self.objects[key] = b"".join(self.parts[key][n] for n in numbers)
            return {}
        raise AssertionError(method)


def test_parts_in_flight_are_bounded_across_all_files_of_a_storage() -> None:
    import threading

    from shardckpt.storage.multipart import MultipartUpload

    fs = _RecordingS3()
    slots = threading.BoundedSemaphore(3)
    streams = [
        MultipartUpload(
            fs,
            "b",
            f"k{i}",
            part_bytes=PART,
            single_put_bytes=2 * PART,
            slots=slots,
            max_concurrency=3,
            call=lambda action, fn: fn(),
        )
        for i in range(2)
    ]
    data = [payload(6 * PART + 11, seed=i) for i in range(2)]
    workers = [
        threading.Thread(target=lambda s=s, d=d: (s.write(d), s.finish())) for s, d in zip(streams, data, strict=True)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert fs.objects == {"k0": data[0], "k1": data[1]}
    assert 2 <= fs.peak <= 3


def test_part_size_doubles_every_thousand_parts() -> None:
    from shardckpt.storage.multipart import MAX_PART_BYTES, part_size

    assert [part_size(n, PART) for n in (1, 1000, 1001, 2001)] == [PART, PART, 2 * PART, 4 * PART]
    assert [part_size(n, PART, 3 * PART) for n in (1, 2, 1001)] == [3 * PART, PART, 2 * PART]
    assert part_size(10_000, 2**30) == MAX_PART_BYTES
    total = sum(part_size(n, 16 * 2**20) for n in range(1, 10_001))
    assert total > 10 * 2**40  # 16 MiB first parts still reach objects above 10 TiB


class _LostCompleteS3(_RecordingS3):
    """Completes the upload, then answers NoSuchUpload (FileNotFoundError in s3fs), as a
    store does to the retry of a complete whose first answer was lost."""

    def __init__(self, size_seen: int | None = None) -> None:
        super().__init__()
        self.size_seen = size_seen

    def call_s3(self, method: str, **kw: object) -> dict:
        out = super().call_s3(method, **kw) if method != "head_object" else {}
        if method == "complete_multipart_upload":
            raise FileNotFoundError("NoSuchUpload")
        if method == "head_object":
            data = self.objects[str(kw["Key"])]
            parts = len(self.parts[str(kw["Key"])])
            return {"ContentLength": self.size_seen or len(data), "ETag": f'"abc-{parts}"'}
        return out


@pytest.mark.parametrize("size_seen,ok", [(None, True), (1, False)])
def test_complete_answered_no_such_upload_checks_the_object(size_seen: int | None, ok: bool) -> None:
    import threading

    from shardckpt.storage.multipart import MultipartUpload

    fs = _LostCompleteS3(size_seen)
    stream = MultipartUpload(
        fs,
        "b",
        "k",
        part_bytes=PART,
        single_put_bytes=PART,
        slots=threading.BoundedSemaphore(2),
        max_concurrency=2,
        call=lambda action, fn: fn(),
    )
    stream.write(payload(2 * PART + 1))
    if ok:
        stream.finish()
        assert fs.objects["k"] == payload(2 * PART + 1)
    else:
        with pytest.raises(FileNotFoundError):
            stream.finish()


class _HeadAnswers:
    """Stands in for s3fs: every HEAD is answered with the HTTP status given, translated
    to an exception exactly as s3fs translates botocore's ClientError."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.heads = 0

    def split_path(self, path: str) -> tuple[str, str, None]:
        bucket, _, key = path.partition("/")
        return bucket, key, None

    def invalidate_cache(self, path: str | None = None) -> None:
        pass

    def call_s3(self, method: str, **kw: object) -> dict:
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        assert method == "head_object"
        self.heads += 1
        if self.status == 200:
            return {"ContentLength": 3}
        # A HEAD answer has no body: botocore's code is the bare status.
        response = {
            "Error": {"Code": str(self.status), "Message": "x"},
            "ResponseMetadata": {"HTTPStatusCode": self.status},
        }
        raise translate_boto_error(ClientError(response, "HeadObject"))  # type: ignore[arg-type]


@pytest.mark.parametrize("status,absent,heads", [(200, False, 1), (404, True, 1), (403, None, 1), (500, None, 2)])
def test_s3_exists_is_false_only_on_a_404_head(status: int, absent: bool | None, heads: int) -> None:
    """403 is permanent (PermissionError in s3fs), 500 transient (retried, then given up):
    neither is "absent"; only the 404 is."""
    from shardckpt.errors import StorageError
    from shardckpt.storage.retry import RetryPolicy

    retry = RetryPolicy(max_attempts=2, initial_backoff_s=0.001, max_backoff_s=0.001, max_total_s=1.0)
    storage = FsspecStorage("s3://bucket/root", {"anon": True}, TransferOptions(retry=retry))
    fake = _HeadAnswers(status)
    storage.fs = fake  # type: ignore[assignment]
    if absent is None:
        with pytest.raises(StorageError) as info:
            storage.exists("manifest.json")
        assert not isinstance(info.value, FileNotFoundError) and str(status) in str(info.value)
    else:
        assert storage.exists("manifest.json") is (not absent)
    assert fake.heads == heads
