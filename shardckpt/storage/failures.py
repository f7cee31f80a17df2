"""What an object store's failure means, in words a user can act on.

:func:`translate` turns an exception raised by fsspec, s3fs or botocore (or the retry
policy giving up on one) into the error shardckpt raises: a StorageError that names the
action, the object (bucket and key on S3), the store's own code and message, and a hint
for the codes with a known fix; or a FileNotFoundError for an object that is absent (and
only then: "does not exist" is ENOENT or 404, never a guess). Secrets are masked by the
caller's redactor. Used by :class:`~shardckpt.storage.fsspec_storage.FsspecStorage`.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from shardckpt.errors import StorageError
from shardckpt.storage.retry import (
    CREDENTIAL_ERRORS,
    ENDPOINT_ERRORS,
    RetriesExhausted,
    RetryPolicy,
    client_error,
    error_code,
)

HINTS = {
    "NoSuchBucket": "the bucket does not exist: create it or fix the URL (shardckpt never creates buckets)",
    "AccessDenied": "the credentials in use may not do this: check the IAM or bucket policy (shardckpt needs "
    "s3:GetObject, s3:PutObject, s3:ListBucket, s3:DeleteObject and s3:AbortMultipartUpload on the prefix)",
    "InvalidAccessKeyId": "check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
    "or the key and secret in storage_options)",
    "ExpiredToken": "the session token has expired: refresh the credentials (AWS_SESSION_TOKEN or the profile)",
}
HINTS["403"] = HINTS["AllAccessDisabled"] = HINTS["AccessDenied"]
HINTS["SignatureDoesNotMatch"] = HINTS["InvalidToken"] = HINTS["InvalidAccessKeyId"]


def translate(
    error: BaseException, action: str, where: str, redact: Callable[[str], str], policy: RetryPolicy
) -> BaseException:
    """The error to raise for ``error``, met while trying to ``action`` the object
    ``where`` (raise it ``from failure_cause(error)``). ``policy``: the retry policy
    that was in effect, named when it gave up."""
    if isinstance(error, RetriesExhausted):
        return StorageError(
            message(
                action,
                where,
                error.last,
                f"a transient error persisted through {error.attempts} attempts over {error.elapsed_s:.1f} s "
                f"(RetryPolicy max_attempts={policy.max_attempts}, max_total_s={policy.max_total_s}); "
                "the store is overloaded or unreachable, try again later",
                redact,
            )
        )
    if isinstance(error, FileNotFoundError):
        if error_code(error)[0] == "NoSuchBucket":
            return StorageError(message(action, where, error, HINTS["NoSuchBucket"], redact))
        return FileNotFoundError(errno.ENOENT, redact(f"{where}: no such file"))
    hint = HINTS.get(error_code(error)[0] or "", "")
    if isinstance(error, CREDENTIAL_ERRORS):
        hint = HINTS["InvalidAccessKeyId"]
    elif isinstance(error, ENDPOINT_ERRORS):
        hint = "cannot reach the endpoint: check AWS_ENDPOINT_URL or storage_options endpoint_url"
    return StorageError(message(action, where, error, hint, redact))


def failure_cause(error: BaseException) -> BaseException:
    """The exception a translated error is chained to: the last attempt's, after retries."""
    return error.last if isinstance(error, RetriesExhausted) else error


def message(action: str, where: str, error: BaseException, hint: str, redact: Callable[[str], str]) -> str:
    """``cannot <action> <where>: <code> (HTTP <status>): <the store's message>. <Hint>.``"""
    code, status = error_code(error)
    what = code or type(error).__name__
    if status is not None and code != str(status):
        what = f"{what} (HTTP {status})"
    detail = server_message(error) or str(error)
    text = f"cannot {action} {where}: {what}: {detail}"
    return redact(f"{text.rstrip('. ')}. {hint[:1].upper()}{hint[1:]}".rstrip(". ") + ".")


def server_message(error: BaseException) -> str | None:
    """The store's own message (botocore's ClientError ``Error.Message``), if any."""
    ce = client_error(error)
    if ce is None:
        return None
    text = ce.response.get("Error", {}).get("Message")
    return str(text) if text else None
