"""Retries for object-store operations: which errors are transient, and how long to keep trying.

Three layers retry an S3 request through s3fs, innermost first:

1. **botocore** retries each HTTP request (its ``retries`` config; default "legacy"
   mode, 5 attempts): HTTP 500/502/503/504, throttling codes (``SlowDown``,
   ``Throttling``...), ``RequestTimeout`` and connection errors. The body of a PUT or
   UploadPart is in memory, so a retried part is re-sent whole. Configure it with
   ``storage_options={"config_kwargs": {"retries": {"mode": "standard", "max_attempts": 8}}}``.
2. **s3fs** (``S3FileSystem.retries``, 5) retries a call whose error botocore gave up on
   when it is a timeout, an interrupted body, a response parse error or a ``SlowDown``
   message, with a short backoff (0.1 s x 1.7^n).
3. **this module**: :meth:`RetryPolicy.call` retries one whole storage operation (an
   UploadPart, a ranged read, the manifest PUT, a listing) when what reached us is still
   transient, with exponential backoff and full jitter, until ``max_attempts`` or
   ``max_total_s``. It exists because 1 and 2 give up after seconds, while S3 throttling
   and endpoint restarts last longer; its total time bounds the retrying done here
   (an attempt in flight may add what 1 and 2 spend inside it).

Permanent errors (access denied, missing bucket, bad credentials, any other 4xx) are
never retried: they are raised at once. Thread-safe: a policy is immutable.
"""

from __future__ import annotations

import random
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
Errors = tuple[type[BaseException], ...]

# The error classes of the S3 stack. botocore and aiohttp come with s3fs (the `s3` extra;
# aiohttp also with gcsfs and fsspec's http): where one is not installed, none of its errors
# can be raised, so its classes are left out of the checks (an empty tuple matches nothing).
CLIENT_ERRORS: Errors = ()  # an HTTP error response (botocore's ClientError)
CREDENTIAL_ERRORS: Errors = ()  # no or half credentials found
ENDPOINT_ERRORS: Errors = ()  # the endpoint cannot be reached
PERMANENT_ERRORS: Errors = (ssl.SSLError,)  # never retried: TLS failures, missing credentials
TRANSIENT_ERRORS: Errors = (ConnectionError, TimeoutError)  # resets, timeouts, interrupted bodies
STORAGE_FAILURES: Errors = (OSError,)  # everything a storage call may raise that is not a bug
try:
    import botocore.exceptions as boto_errors
except ImportError:
    pass
else:
    CLIENT_ERRORS = (boto_errors.ClientError,)
    CREDENTIAL_ERRORS = (boto_errors.NoCredentialsError, boto_errors.PartialCredentialsError)
    ENDPOINT_ERRORS = (boto_errors.EndpointConnectionError,)
    PERMANENT_ERRORS += (boto_errors.SSLError, *CREDENTIAL_ERRORS)
    TRANSIENT_ERRORS += (boto_errors.ConnectionError, boto_errors.HTTPClientError, boto_errors.IncompleteReadError)
    STORAGE_FAILURES += (boto_errors.BotoCoreError, boto_errors.ClientError)
try:
    import aiohttp
except ImportError:
    pass
else:
    PERMANENT_ERRORS += (aiohttp.ClientSSLError,)
    TRANSIENT_ERRORS += (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
    STORAGE_FAILURES += (aiohttp.ClientError,)

TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "PriorRequestNotComplete",
        "OperationAborted",
        "XAmzContentSHA256Mismatch",
        "BadDigest",
        "IncompleteBody",
    }
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in attempts and total time.

    The n-th retry (n = 0, 1, ...) sleeps a uniform random time in
    ``[0, min(max_backoff_s, initial_backoff_s * 2**n)]`` ("full jitter": many ranks
    hitting one throttled prefix spread out instead of retrying in lockstep). No retry
    starts if it would end its sleep after ``max_total_s`` since the first attempt.
    """

    max_attempts: int = 10
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 15.0
    max_total_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 < initial_backoff_s <= max_backoff_s, got {self.initial_backoff_s} and {self.max_backoff_s}"
            )
        if self.max_total_s < 0:
            raise ValueError(f"max_total_s must be >= 0, got {self.max_total_s}")

    def backoffs(self, rng: random.Random | None = None) -> Iterator[float]:
        """The sleep before each retry, in order (``max_attempts - 1`` of them)."""
        draw = (rng or random).uniform
        for n in range(self.max_attempts - 1):
            yield draw(0.0, min(self.max_backoff_s, self.initial_backoff_s * 2.0**n))

    def call(
        self,
        fn: Callable[[], T],
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> T:
        """``fn()``, retried while it raises a transient error (see :func:`is_transient`).

        Raises a permanent error unchanged, at once. When a transient error outlasts the
        policy, raises :class:`RetriesExhausted` (its ``__cause__`` is the last error).
        """
        start = clock()
        delays = self.backoffs()
        attempts = 0
        while True:
            attempts += 1
            try:
                return fn()
            except Exception as e:
                if not is_transient(e):
                    raise
                delay = next(delays, None)
                elapsed = clock() - start
                if delay is None or elapsed + delay > self.max_total_s:
                    raise RetriesExhausted(attempts, elapsed, e) from e
            sleep(delay)


class RetriesExhausted(Exception):
    """A transient error kept coming back until the RetryPolicy gave up."""

    def __init__(self, attempts: int, elapsed_s: float, last: BaseException) -> None:
        super().__init__(f"still failing after {attempts} attempts over {elapsed_s:.1f} s: {last}")
        self.attempts = attempts
        self.elapsed_s = elapsed_s
        self.last = last


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from (s3fs raises an OSError from botocore's)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def client_error(error: BaseException) -> Any:
    """The botocore ClientError (an HTTP error response) behind ``error``, or None."""
    return next((e for e in causes(error) if isinstance(e, CLIENT_ERRORS)), None)


def error_code(error: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code (``"NoSuchBucket"``, or ``"403"`` for a body-less HEAD) and HTTP status."""
    ce = client_error(error)
    if ce is None:
        return None, None
    code = ce.response.get("Error", {}).get("Code")
    status = ce.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return (str(code) if code is not None else None), (int(status) if status is not None else None)


def is_transient(error: BaseException) -> bool:
    """Whether retrying the operation that raised ``error`` may succeed.

    An HTTP error response is transient by its S3 code or its status (429 and 5xx);
    every other response (403, 404, 400...) is permanent. Without a response:
    connection resets, timeouts and interrupted bodies are transient; TLS failures and
    missing credentials are permanent; anything else (a bug) is not retried.
    """
    ce = client_error(error)
    if ce is not None:
        code, status = error_code(ce)
        return code in TRANSIENT_CODES or status in TRANSIENT_STATUS or code in {str(s) for s in TRANSIENT_STATUS}
    for e in causes(error):
        if isinstance(e, PERMANENT_ERRORS):
            return False
        if isinstance(e, TRANSIENT_ERRORS):
            return True
    return False
