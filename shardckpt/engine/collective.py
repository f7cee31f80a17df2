"""The one wrapper collective phases go through: a failure on any rank is seen on every rank.

DCP gathers per-rank exceptions into a ``CheckpointException`` (a ``BaseException``,
so ``except Exception`` misses it); :func:`translated_failures` turns it into the
matching :class:`ShardckptError` subclass, with every rank's message and
``err.failures``. :meth:`RankGroup.agree` runs a local check on every rank and
raises everywhere if it failed anywhere, so no rank walks into a collective alone.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from shardckpt import errors
from shardckpt.errors import RankFailureError, RankTimeoutError, ShardckptError, StorageError

T = TypeVar("T")
log = logging.getLogger("shardckpt")


@dataclass(frozen=True)
class RankGroup:
    """Who takes part in a collective call. ``group`` is None for the default group."""

    group: Any
    rank: int
    world_size: int
    is_distributed: bool
    coordinator_rank: int = 0

    @classmethod
    def current(cls, process_group: Any = None) -> RankGroup:
        if process_group is None and not (dist.is_available() and dist.is_initialized()):
            return cls(None, 0, 1, False)
        return cls(
            process_group,
            dist.get_rank(process_group),
            dist.get_world_size(process_group),
            True,
        )

    @property
    def is_coordinator(self) -> bool:
        return self.rank == self.coordinator_rank

    def agree(self, action: str, fn: Callable[[], T]) -> T:
        """Collective: run ``fn`` on every rank; if it raised on any rank, raise on all.

        The error raised is of the type raised on the lowest failing rank (when it is a
        ShardckptError) and its message lists every failing rank's message.
        """
        try:
            result, failure = fn(), None
        except Exception as e:  # noqa: BLE001 - gathered and re-raised on every rank below
            result, failure = None, e
        if not self.is_distributed:
            if failure is not None:
                _raise_alone(action, failure)
            return result  # type: ignore[return-value]
        summaries: list[Any] = [None] * self.world_size
        mine = None if failure is None else (type(failure).__name__, str(failure))
        with typed_transport_errors(action):
            dist.all_gather_object(summaries, mine, group=self.group)
        failures = {r: s for r, s in enumerate(summaries) if s is not None}
        if failures:
            by_rank: dict[int, BaseException] = {r: _Remote(*s) for r, s in failures.items()}
            if failure is not None:
                by_rank[self.rank] = failure
            raise_failures(action, by_rank, local=failure)
        return result  # type: ignore[return-value]

    def decide(self, action: str, fn: Callable[[], T]) -> T:
        """Collective: run ``fn`` on the coordinator only and give its result to every rank.

        Used where ranks must not disagree (which step to restore, whether a
        wall-clock interval has passed). If ``fn`` raises, every rank raises.
        """
        if not self.is_distributed:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - typed as on several ranks, or re-raised
                _raise_alone(action, e)
        payload: list[Any] = [None]
        failure: Exception | None = None
        if self.is_coordinator:
            try:
                payload[0] = ("ok", fn())
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                failure = e
                payload[0] = ("error", type(e).__name__, str(e))
        src = (
            dist.get_global_rank(self.group, self.coordinator_rank) if self.group is not None else self.coordinator_rank
        )
        with typed_transport_errors(action):
            dist.broadcast_object_list(payload, src=src, group=self.group)
        if payload[0][0] == "error":
            remote = failure if failure is not None else _Remote(payload[0][1], payload[0][2])
            raise_failures(action, {self.coordinator_rank: remote}, local=failure)
        return payload[0][1]  # type: ignore[no-any-return]

    def any_true(self, flags: list[bool]) -> list[bool]:
        """Collective: element-wise OR of ``flags`` over all ranks (one small all_reduce)."""
        if not self.is_distributed:
            return list(flags)
        import torch

        device = "cpu"
        if dist.get_backend(self.group) == "nccl":
            device = f"cuda:{torch.cuda.current_device()}"
        t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
        with typed_transport_errors("sharing per-rank flags (preemption, save interval)"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(x) for x in t.tolist()]


def checkpoint_group(process_group: Any, timeout_s: float, groups: dict[Any, Any], purpose: str = "save") -> Any:
    """The group a save or load talks over. Collective on first use.

    For the whole world (``process_group`` None or spanning every rank): a gloo group
    with every rank, created once per purpose and timeout and kept in ``groups`` (a
    :class:`shardckpt.engine.Checkpointer`'s, which destroys them when closed), so an
    async save's background thread never uses the training group and ``timeout_s``
    bounds every wait. For a subgroup:
    the group itself (creating a twin on only some ranks would desynchronize
    ``new_group`` across the job); pass a gloo subgroup to get the same guarantees.
    """
    whole_world = process_group is None or dist.get_world_size(process_group) == dist.get_world_size()
    if not whole_world:
        return process_group
    key = (purpose, float(timeout_s))
    if key not in groups:
        try:
            groups[key] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError as e:  # DistStoreError: some rank never came to create it
            raise RankTimeoutError(
                f"creating the checkpoint process group: not every rank arrived within {timeout_s:g} s "
                f"({e}). Every rank must make the same save/load calls in the same order."
            ) from e
    return groups[key]


def destroy_groups(groups: list[Any]) -> None:
    """Destroy the gloo groups a Checkpointer created (:func:`checkpoint_group`), best
    effort: a failure is logged at DEBUG, never raised (it must not hide a save's error).
    Collective, as ``dist.destroy_process_group``."""
    if groups and dist.is_available() and dist.is_initialized():
        for g in groups:
            try:
                dist.destroy_process_group(g)
            except Exception as e:  # noqa: BLE001 - freeing is best effort; never hide the save's error
                log.debug("shardckpt: destroying a checkpoint process group failed: %s", e)


def is_gloo(group: Any) -> bool:
    return group is not None and dist.get_backend(group) == "gloo"


def arrive(group: Any, action: str, timeout_s: float, *, hint: str = "") -> None:
    """Collective over a gloo ``group``: wait until every rank arrives, at most ``timeout_s``.

    Raises RankTimeoutError naming the ranks that did not arrive (rank 0 of the group
    knows which; the others learn that the barrier failed), with ``hint`` appended.
    """
    if not is_gloo(group):
        return  # monitored_barrier exists for gloo only; other groups rely on their own timeout
    try:
        dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        if is_lost_peer(e):
            raise lost_peer_error(action, e) from e
        raise RankTimeoutError(
            f"{action}: not every rank arrived within {timeout_s:g} s ({e}). A rank that skipped the "
            "call, crashed, or is stuck holds everyone else; check the named ranks' logs. The "
            f"checkpoint was not committed; earlier checkpoints are intact.{hint}"
        ) from e


_LOST_PEER_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")
_TIMEOUT_MARKERS = ("timed out", "timeout")


def is_timeout(e: BaseException) -> bool:
    """Whether ``e`` is the process group's report that a collective timed out."""
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _TIMEOUT_MARKERS)


def is_lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is the transport's report that another rank's process went away."""
    text = str(e).lower()
    return isinstance(e, (RuntimeError, ConnectionError)) and any(m in text for m in _LOST_PEER_MARKERS)


def lost_peer_error(action: str, e: BaseException) -> RankFailureError:
    return RankFailureError(
        f"{action}: lost the connection to another rank ({str(e).splitlines()[0][:300]}). That rank's "
        "process crashed or was killed; its own log says why. Whatever was not committed before is "
        "not committed now (a step exists only with its manifest: check `shardckpt ls`); restart "
        "the job, and it resumes from the newest committed checkpoint."
    )


@contextlib.contextmanager
def typed_transport_errors(action: str, *, timeouts: bool = True) -> Iterator[None]:
    """Turn the process group's raw RuntimeError into a typed one: a peer that died ->
    RankFailureError, a collective that timed out -> RankTimeoutError (unless
    ``timeouts=False``: the caller has a better message). ShardckptErrors and anything
    else pass through unchanged."""
    try:
        yield
    except ShardckptError:
        raise
    except (RuntimeError, ConnectionError) as e:
        if is_lost_peer(e):
            raise lost_peer_error(action, e) from e
        if timeouts and is_timeout(e):
            raise RankTimeoutError(
                f"{action}: a collective timed out ({str(e).splitlines()[0][:300]}). A rank that "
                "skipped the call, crashed, or is stuck holds everyone else; check the other ranks' logs."
            ) from e
        raise


def _raise_alone(action: str, failure: Exception) -> NoReturn:
    """Without a process group: an OSError from storage becomes the StorageError (errno
    kept) that several ranks would raise; anything else is raised as it is."""
    if isinstance(failure, OSError) and not isinstance(failure, ShardckptError):
        raise_failures(action, {0: failure}, local=failure, alone=True)
    raise failure


class _Remote(Exception):
    """Stand-in for an exception raised on another rank (only its type name and text travel)."""

    def __init__(self, type_name: str, text: str) -> None:
        super().__init__(text)
        self.type_name = type_name

    def __reduce__(self) -> tuple[type[_Remote], tuple[str, str]]:
        # Errors that carry these (ShardckptError.failures) may be pickled by a caller
        # such as DCP, which gathers each rank's exception; the default would call
        # _Remote(text) and fail.
        return (_Remote, (self.type_name, str(self)))


def raise_failures(
    action: str, failures: dict[int, BaseException], local: BaseException | None = None, *, alone: bool = False
) -> NoReturn:
    """Raise one error describing per-rank failures.

    On a rank that failed itself with something that is not a ShardckptError or an
    OSError (a KeyboardInterrupt, a bug, a library's own error), that exception is
    re-raised as it is, so ``except KeyboardInterrupt`` works and nothing calls a local,
    deterministic problem a dead peer; the other ranks' failures are added as a note.
    Every other rank gets a ShardckptError typed after the lowest failing rank (a
    ShardckptError or StorageError there keeps its type; anything else is a
    RankFailureError naming the rank and what it raised).

    ``alone``: a call by one process, without a process group: there are no ranks to
    name, so the error raised for its own ShardckptError has the same type and message,
    and for an OSError, a StorageError says what failed.

    One traceback per error: the original exceptions, tracebacks included, stay in
    ``err.failures``; ``err.__cause__`` is only an exception that tells something the
    message does not (the OSError under a StorageError), never a ShardckptError whose
    text is already in the message nor another rank's stand-in."""
    lines = _failure_lines(failures)
    msg = f"{action} failed on {rank_list(sorted(failures))}:\n  " + "\n  ".join(lines)
    if len(lines) == 1:
        msg = f"{action} failed on {lines[0]}"
    if alone and local is not None:
        msg = str(local) if isinstance(local, ShardckptError) else f"{action} failed: {type(local).__name__}: {local}"
    if local is not None and not isinstance(local, (ShardckptError, OSError)):
        if len(failures) > 1 and hasattr(local, "add_note"):
            local.add_note(msg)
        raise local
    first = failures[min(failures)]
    template = local if isinstance(local, ShardckptError) else first
    cls: type[ShardckptError] = RankFailureError
    if isinstance(template, ShardckptError):
        cls = type(template)
    elif isinstance(template, OSError):
        cls = StorageError  # a full disk, a permission problem: still an OSError to callers
    elif isinstance(template, _Remote):
        named = getattr(errors, template.type_name, None)
        if isinstance(named, type) and issubclass(named, ShardckptError):
            cls = named
    err = cls(msg)
    err.failures = dict(failures)
    if isinstance(template, OSError) and isinstance(err, OSError) and template.errno is not None:
        # Only errno (also a StorageError's own): strerror/filename would make str() drop our message.
        err.errno = template.errno
    raise err from _underlying(local if local is not None else first)


SHOWN_FAILURES = 10
"""At most this many distinct per-rank messages in an error; ranks that failed with the
same type and text share one line, so 1,000 ranks with one cause make one line."""


def _failure_lines(failures: dict[int, BaseException]) -> list[str]:
    """One line per distinct ``type: text``, naming its ranks, in the order of each
    one's lowest rank; past :data:`SHOWN_FAILURES`, one line counting the rest."""
    by_text: dict[str, list[int]] = {}
    for r, e in sorted(failures.items()):
        name = e.type_name if isinstance(e, _Remote) else type(e).__name__
        by_text.setdefault(f"{name}: {e}" if str(e) else name, []).append(r)
    lines = [f"{rank_list(ranks)}: {text}" for text, ranks in list(by_text.items())[:SHOWN_FAILURES]]
    rest = list(by_text.values())[SHOWN_FAILURES:]
    if rest:
        ranks = sorted(r for group in rest for r in group)
        lines.append(f"{rank_list(ranks)}: {len(rest)} other message(s), in err.failures")
    return lines


def rank_list(ranks: list[int]) -> str:
    """``rank 3``, or ``ranks 0-3, 7`` for sorted ``ranks`` (runs of consecutive ranks shortened)."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    runs: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}" if prev > start + 1 else f"{start}, {prev}")
        if r is not None:
            start = prev = r
    return "ranks " + ", ".join(runs)


def _underlying(e: BaseException) -> BaseException | None:
    """What an error gathered from a rank adds below the error raised for it: nothing for
    another rank's stand-in or a ShardckptError (its text is in the message) beyond the
    exception it was itself raised from; the exception itself otherwise."""
    if isinstance(e, _Remote):
        return None
    if isinstance(e, ShardckptError):
        return e.__cause__
    return e


@contextlib.contextmanager
def translated_failures(action: str, rank: int | None = None, *, alone: bool = False) -> Iterator[None]:
    """Turn DCP's CheckpointException into a ShardckptError raised on every rank
    (``rank``: this process's rank in the group DCP ran on; its own failure is then
    re-raised as :func:`raise_failures` says). ``alone``: DCP ran without a process
    group, so the failure is this process's (see :func:`raise_failures`).

    Also silences DCP's warning that a call without a process group "assumes the
    intent" is single-process: for shardckpt that is a documented, supported mode.
    """
    try:
        with warnings.catch_warnings(), typed_transport_errors(action, timeouts=False):
            warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent")
            yield
    except CheckpointException as e:
        failures = {r: (pair[0] if isinstance(pair, tuple) else pair) for r, pair in e.failures.items()}
        if alone:
            rank = 0
        raise_failures(action, failures, local=failures.get(rank) if rank is not None else None, alone=alone)
