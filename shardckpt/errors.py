"""Every error shardckpt raises on purpose.

One base, :class:`ShardckptError`; each subclass also derives from the builtin that
fits, so ``except FileNotFoundError`` keeps working for callers that know nothing
about shardckpt. Messages say what was expected, what was found, where (rank, file,
key) and what to do. This module imports nothing from shardckpt.
"""

from __future__ import annotations

__all__ = [
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "DestinationNotEmptyError",
    "InconsistentRanksError",
    "IntegrityError",
    "ManifestError",
    "MissingDependencyError",
    "NotCommittedError",
    "RankFailureError",
    "RankTimeoutError",
    "RootInUseError",
    "ShardckptError",
    "StateDictMismatchError",
    "StorageError",
    "UnsupportedFormatVersionError",
    "UnsupportedValueError",
]


class ShardckptError(Exception):
    """Base class of every error shardckpt raises on purpose.

    ``failures`` maps rank -> the exception raised there when the error was
    gathered from several ranks of a collective call; it is empty otherwise.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.failures: dict[int, BaseException] = {}


class CheckpointNotFoundError(ShardckptError, FileNotFoundError):
    """The path holds no checkpoint at all."""


class NotCommittedError(CheckpointNotFoundError):
    """The folder exists but has no manifest: an interrupted or unfinished save."""


class CheckpointExistsError(ShardckptError, FileExistsError):
    """A committed checkpoint is already at the target path."""


class DestinationNotEmptyError(ShardckptError, FileExistsError):
    """The target folder of a save holds files that are not part of a shardckpt checkpoint."""


class InconsistentRanksError(ShardckptError, ValueError):
    """Ranks passed different arguments (path, options) to one collective call."""


class ManifestError(ShardckptError, ValueError):
    """The manifest (or a data-file header) is malformed, inconsistent or hostile."""


class UnsupportedFormatVersionError(ManifestError):
    """The checkpoint was written in a format version this shardckpt cannot read."""


class IntegrityError(ShardckptError, ValueError):
    """Bytes on storage do not match the checksums recorded at save time."""


class StateDictMismatchError(ShardckptError, ValueError):
    """The state_dict given to load() does not match the checkpoint (keys, shapes, dtypes)."""


class UnsupportedValueError(ShardckptError, TypeError):
    """A value in the state_dict cannot be stored (not JSON-representable, unsupported dtype)."""


class MissingDependencyError(ShardckptError, ImportError):
    """A feature needs a package that is not installed (``s3://`` needs s3fs, the ``s3``
    extra); the message names the ``pip install`` that adds it."""


class StorageError(ShardckptError, OSError):
    """A storage operation failed for a reason that is not about the checkpoint's content."""


class RankFailureError(ShardckptError, RuntimeError):
    """Another rank died, vanished or failed with an error that is not a shardckpt error:
    the job should be restarted. Deterministic local problems get their own types."""


class RootInUseError(ShardckptError, RuntimeError):
    """Another CheckpointManager is writing to the same root (or took it over from this one)."""


class RankTimeoutError(ShardckptError, TimeoutError):
    """Some ranks did not reach a point of a collective call within the timeout."""
