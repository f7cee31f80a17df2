"""S3 faults, injected over HTTP: a proxy in front of a real S3 protocol server (moto).

Transient errors on a share of requests -> saves and loads still complete and verify.
Permanent errors (bad credentials, missing bucket, access denied) -> a StorageError at
once that names bucket and key, never a secret, and nothing committed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch
from s3server import SECRET_ACCESS_KEY, FaultProxy, S3Server, moto_available

import shardckpt
import shardckpt.storage.retry
from shardckpt.convert.audit import verify_checkpoint
from shardckpt.errors import StorageError
from shardckpt.storage.fsspec_storage import FsspecStorage, TransferOptions
from shardckpt.storage.retry import RetryPolicy, is_transient

PART = 5 * 2**20
NO_BOTOCORE_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(256, 512, generator=g), "b": torch.randn(512, generator=g)},
        "opt": {"m": torch.randn(300, 7, generator=g).to(torch.bfloat16)},
        "step": seed,
    }


def blank() -> dict:
    return {
        "model": {"w": torch.zeros(256, 512), "b": torch.zeros(512)},
        "opt": {"m": torch.zeros(300, 7, dtype=torch.bfloat16)},
        "step": -1,
    }


def assert_equal_state(got: dict, want: dict) -> None:
    for k in ("w", "b"):
        assert torch.equal(got["model"][k], want["model"][k])
    assert torch.equal(got["opt"]["m"], want["opt"]["m"])
    assert got["step"] == want["step"]


def all_text(e: BaseException) -> str:
    """The messages of ``e`` and of every error it was raised from."""
    parts, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        parts.append(f"{type(cur).__name__}: {cur!s} {cur!r}")
        cur = cur.__cause__ or cur.__context__
    return "\n".join(parts)


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[FaultProxy]:
    p = FaultProxy(s3.port)
    yield p
    p.stop()


# ------------------------------------------------------------------ transient


@pytest.fixture
def retried(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Every error our RetryPolicy took for transient, so retried (or gave up on). "Fails
    at once" is checked by this staying empty, not by a duration a loaded machine stretches."""
    seen: list[BaseException] = []

    def spy(error: BaseException) -> bool:
        transient = is_transient(error)
        if transient:
            seen.append(error)
        return transient

    monkeypatch.setattr(shardckpt.storage.retry, "is_transient", spy)
    return seen


def test_save_and_load_survive_503_slowdown_on_every_4th_request(s3: S3Server, proxy: FaultProxy) -> None:
    """Realistic defaults: botocore's own retries absorb throttling."""
    bucket = s3.create_bucket()
    proxy.fail = lambda n, method, path: n % 4 == 0
    options = s3.storage_options(endpoint_url=proxy.endpoint_url)
    url = f"s3://{bucket}/ckpt"
    want = state(1)
    shardckpt.save(want, url, storage_options=options)
    got = blank()
    shardckpt.load(got, url, storage_options=options)
    assert_equal_state(got, want)
    assert verify_checkpoint(url, storage_options=options).problems == []
    assert proxy.faults >= 3, proxy.log


def test_our_retry_layer_alone_absorbs_500s(s3: S3Server, proxy: FaultProxy) -> None:
    """botocore retries off, and s3fs does not retry InternalError: only RetryPolicy is left."""
    bucket = s3.create_bucket()
    proxy.status, proxy.code = 500, "InternalError"
    proxy.fail = lambda n, method, path: n % 3 == 0
    options = s3.storage_options(endpoint_url=proxy.endpoint_url, **NO_BOTOCORE_RETRIES)
    url = f"s3://{bucket}/ckpt"
    want = state(2)
    shardckpt.save(want, url, storage_options=options)
    got = blank()
    shardckpt.load(got, url, storage_options=options)
    assert_equal_state(got, want)
    assert proxy.faults >= 3


def test_multipart_parts_are_retried(s3: S3Server, proxy: FaultProxy) -> None:
    bucket = s3.create_bucket()
    parts_seen: list[str] = []

    def fail_each_part_once(n: int, method: str, path: str) -> bool:
        if "partNumber=" not in path:
            return False
        first_time = path not in parts_seen
        parts_seen.append(path)
        return first_time

    proxy.fail = fail_each_part_once
    storage = FsspecStorage(
        f"s3://{bucket}/x",
        s3.storage_options(endpoint_url=proxy.endpoint_url, **NO_BOTOCORE_RETRIES),
        TransferOptions(part_bytes=PART, single_put_bytes=PART, retry=RetryPolicy(initial_backoff_s=0.01)),
    )
    data = bytes(range(256)) * (3 * PART // 256 + 5)  # 4 parts
    stream = storage.open_write("big.bin")
    stream.write(data)
    stream.finish()
    assert storage.read_bytes("big.bin") == data
    assert proxy.faults == 4


def test_lost_answer_to_complete_upload_is_recognised(s3: S3Server, proxy: FaultProxy) -> None:
    """The server completed the upload but the answer was lost. moto, like S3 mostly, accepts
    the repeated complete; a store that answers NoSuchUpload instead is covered in
    test_storage.py::test_complete_answered_no_such_upload_checks_the_object."""
    bucket = s3.create_bucket()
    proxy.status, proxy.code, proxy.forward_failed = 500, "InternalError", True
    proxy.fail = lambda n, method, path: method == "POST" and "uploadId=" in path and proxy.faults == 0
    storage = FsspecStorage(
        f"s3://{bucket}/x",
        s3.storage_options(endpoint_url=proxy.endpoint_url, **NO_BOTOCORE_RETRIES),
        TransferOptions(part_bytes=PART, single_put_bytes=PART, retry=RetryPolicy(initial_backoff_s=0.01)),
    )
    data = bytes(range(256)) * (PART // 256 + 7)  # 2 parts
    stream = storage.open_write("big.bin")
    stream.write(data)
    stream.finish()
    assert proxy.faults == 1
    assert storage.read_bytes("big.bin") == data
    assert s3.admin().list_multipart_uploads(bucket) == []


def test_persistent_transient_errors_give_up_within_the_time_bound(s3: S3Server, proxy: FaultProxy) -> None:
    bucket = s3.create_bucket()
    proxy.fail = lambda n, method, path: True
    policy = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, max_total_s=1.0)
    storage = FsspecStorage(
        f"s3://{bucket}/ck",
        s3.storage_options(endpoint_url=proxy.endpoint_url, **NO_BOTOCORE_RETRIES),
        TransferOptions(retry=policy),
    )
    with pytest.raises(StorageError) as info:
        storage.write_atomic("manifest.json", b"{}")
    msg = str(info.value)
    assert f"bucket '{bucket}'" in msg and "key 'ck/manifest.json'" in msg
    assert "SlowDown" in msg and "transient error persisted" in msg
    # The time bound ended the retries, not the attempt count (s3fs retries SlowDown 5 times,
    # ~1.5 s of its backoff, inside each of our attempts: 1 or 2 fit in max_total_s=1.0).
    # Counted, not timed: a loaded machine stretches every attempt but adds none.
    attempts = int(re.search(r"through (\d+) attempts", msg).group(1))  # type: ignore[union-attr]
    assert attempts < policy.max_attempts, msg
    assert not s3.admin().exists(f"{bucket}/ck/manifest.json")


def test_transient_and_permanent_classification() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    def http_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
        )

    for code, status in [("SlowDown", 503), ("InternalError", 500), ("RequestTimeout", 400), ("502", 502), ("X", 504)]:
        wrapped = OSError(5, "translated by s3fs")
        wrapped.__cause__ = http_error(code, status)
        assert is_transient(wrapped), code
    for code, status in [
        ("AccessDenied", 403),
        ("NoSuchBucket", 404),
        ("InvalidAccessKeyId", 403),
        ("SignatureDoesNotMatch", 403),
        ("403", 403),
        ("InvalidArgument", 400),
    ]:
        assert not is_transient(http_error(code, status)), code
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://x"))
    assert not is_transient(NoCredentialsError()) and not is_transient(ValueError("bug"))


def test_backoff_is_full_jitter_and_bounded() -> None:
    import random

    policy = RetryPolicy(max_attempts=8, initial_backoff_s=0.5, max_backoff_s=3.0, max_total_s=5.0)
    delays = list(policy.backoffs(random.Random(0)))
    assert len(delays) == 7
    caps = [min(3.0, 0.5 * 2**n) for n in range(7)]
    assert all(0 <= d <= c for d, c in zip(delays, caps, strict=True))
    clock = [0.0]
    calls = []

    def always_throttled() -> None:
        calls.append(clock[0])
        raise ConnectionResetError("reset by peer")

    with pytest.raises(Exception) as info:
        policy.call(always_throttled, sleep=lambda s: clock.__setitem__(0, clock[0] + s), clock=lambda: clock[0])
    assert type(info.value).__name__ == "RetriesExhausted"
    assert clock[0] <= 5.0 and len(calls) >= 2


# ------------------------------------------------------------------ permanent


def test_missing_bucket_fails_at_once_and_creates_nothing(
    s3: S3Server, proxy: FaultProxy, retried: list[BaseException]
) -> None:
    options = s3.storage_options(endpoint_url=proxy.endpoint_url)
    with pytest.raises(StorageError) as info:
        shardckpt.save(state(3), "s3://no-such-bucket-3f2a/run/ckpt", storage_options=options)
    assert retried == []  # at once: not one retry
    msg = str(info.value)
    assert "NoSuchBucket" in msg and "bucket 'no-such-bucket-3f2a'" in msg and "key 'run/ckpt" in msg
    assert "create it or fix the URL" in msg
    assert SECRET_ACCESS_KEY not in all_text(info.value)
    assert "no-such-bucket-3f2a" not in [b.rstrip("/") for b in s3.admin().ls("", refresh=True)]
    assert all(status == 0 for _, _, status in proxy.log)  # nothing was retried or injected


def test_permanent_error_mid_save_commits_nothing_and_aborts_uploads(s3: S3Server, proxy: FaultProxy) -> None:
    """AccessDenied on the data uploads (as with a policy that allows listing only)."""
    bucket = s3.create_bucket()
    proxy.status, proxy.code = 403, "AccessDenied"
    proxy.fail = lambda n, method, path: method == "PUT" and "/data/" in path
    url = f"s3://{bucket}/ckpt"
    with pytest.raises(StorageError) as info:
        shardckpt.save(
            state(4), url, num_io_threads=2, storage_options=s3.storage_options(endpoint_url=proxy.endpoint_url)
        )
    msg = str(info.value)
    assert "AccessDenied" in msg and f"bucket '{bucket}'" in msg and "key 'ckpt/data/" in msg
    assert sum(1 for _, _, status in proxy.log if status) <= 2  # one failed PUT per writer thread, no retries
    admin = s3.admin()
    assert admin.find(f"{bucket}/ckpt", refresh=True) == []
    assert admin.list_multipart_uploads(bucket) == []
    with pytest.raises(shardckpt.CheckpointNotFoundError):
        shardckpt.load(blank(), url, storage_options=s3.storage_options())


@pytest.fixture(scope="module")
def auth_server() -> Iterator[S3Server]:
    """A second moto server that checks signatures and IAM policies.

    moto 5.2 miscomputes the signature of requests whose query holds a "/" (a listing
    with a prefix), so these tests stay on requests without one: HEAD, PUT, GET.
    """
    if not moto_available():
        pytest.skip("moto is not installed: `pip install -e '.[test]'` installs moto[server] for the S3 tests")
    server = S3Server(extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    server.root_user = server.create_user(ALLOW_ALL)  # type: ignore[attr-defined]
    yield server
    server.stop()


ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def test_bad_credentials_fail_at_once_without_leaking_the_secret(
    auth_server: S3Server, retried: list[BaseException]
) -> None:
    key, secret = auth_server.root_user  # type: ignore[attr-defined]
    good = FsspecStorage("s3://auth-bucket/ok", auth_server.storage_options(key=key, secret=secret))
    good.fs.call_s3("create_bucket", Bucket="auth-bucket")
    good.write_atomic("manifest.json", b"{}")
    wrong_secret = "wrong-secret-Hj3kL9pQ2xZ"
    cases = [
        (auth_server.storage_options(key=key, secret=wrong_secret), "SignatureDoesNotMatch"),
        (auth_server.storage_options(key="AKIAUNKNOWN0000000000", secret=wrong_secret), "InvalidAccessKeyId"),
    ]
    for options, code in cases:
        for action in ("save", "load"):
            with pytest.raises(StorageError) as info:
                if action == "save":
                    shardckpt.save(state(5), "s3://auth-bucket/bad", storage_options=options)
                else:
                    shardckpt.load(blank(), "s3://auth-bucket/ok", storage_options=options)
            assert retried == [], (code, action, retried)  # at once: not one retry
            msg = str(info.value)
            # save's first request lists the folder (is it new or shardckpt's?), load's is a HEAD
            named = "key 'bad'" if action == "save" else "manifest.json'"
            assert "bucket 'auth-bucket'" in msg and named in msg, msg
            # A HEAD answer has no body, so S3 can only say 403 there, not which credential was wrong.
            assert "403" in msg and ("check the credentials" in msg.lower() or "IAM" in msg), msg
            assert wrong_secret not in all_text(info.value) and secret not in all_text(info.value)
        st = FsspecStorage("s3://auth-bucket/bad", options)
        with pytest.raises(StorageError) as info:
            st.write_atomic("manifest.json", b"{}")
        assert code in str(info.value) and "check the credentials" in str(info.value).lower()
        assert wrong_secret not in all_text(info.value)
    assert not FsspecStorage("s3://auth-bucket/bad", good._options).exists("manifest.json")


def test_access_denied_by_policy_names_the_key(auth_server: S3Server, retried: list[BaseException]) -> None:
    admin_key, admin_secret = auth_server.root_user  # type: ignore[attr-defined]
    FsspecStorage("s3://ro-bucket", auth_server.storage_options(key=admin_key, secret=admin_secret)).fs.call_s3(
        "create_bucket", Bucket="ro-bucket"
    )
    key, secret = auth_server.create_user(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}],
        },
        as_user=(admin_key, admin_secret),
    )
    # A save lists the folder first, which moto 5.2 cannot sign-check (see auth_server):
    # the data upload a save makes is driven through the storage directly.
    storage = FsspecStorage("s3://ro-bucket/ckpt", auth_server.storage_options(key=key, secret=secret))
    with pytest.raises(StorageError) as info:
        stream = storage.open_write("data/0123456789ab-r00000-00.safetensors")
        stream.write(b"x" * 1024)
        stream.finish()
    assert retried == []  # at once: not one retry
    msg = str(info.value)
    assert "AccessDenied" in msg and "bucket 'ro-bucket'" in msg and "key 'ckpt/data/" in msg and "IAM" in msg
    assert secret not in all_text(info.value)
