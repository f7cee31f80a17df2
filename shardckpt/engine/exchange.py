"""One collective round trip that names the ranks it waited for in vain.

A save or load needs few messages: every rank tells the coordinator something (it
arrived, its plan or its fingerprint, its write results, what went wrong), and the
coordinator answers each rank (the plan, the outcome). :meth:`Exchange.round_trip` is
that round trip, with the guarantee a ``monitored_barrier`` gives and an
``all_gather_object`` does not: the coordinator waits for each rank until a deadline and
then names the ranks that did not come. Any other failure (a rank's error, a rank whose
process went away, the coordinator's decision) is answered to every rank, so all raise
the same error together. So one round trip replaces a barrier and a gather (or a gather
and a scatter): a save is two of them (see :mod:`shardckpt.engine.protocol`), a load one
plus DCP's own.

A timeout is final for the group, as it is for ``monitored_barrier``: when a wait times
out, gloo closes every connection of the group ("Application timeout caused pair
closure"), so the coordinator raises RankTimeoutError naming the missing ranks and the
ranks that came raise RankFailureError saying the coordinator closed its connection.

On the wire, over a gloo group's point-to-point messages: each rank sends its size
then its payload to the coordinator (tags unique to this round trip, so a late message
never matches a later round trip), and the coordinator sends each rank its size then its
answer. Payloads are pickled, as torch's ``*_object`` collectives do: they are messages
between the ranks of one job (plans, write results, error texts), never checkpoint
bytes, which are only ever read as safetensors and JSON.
"""

from __future__ import annotations

import datetime
import logging
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from shardckpt import errors
from shardckpt.engine.collective import _Remote, is_lost_peer, is_timeout, lost_peer_error, raise_failures
from shardckpt.errors import RankFailureError, RankTimeoutError, ShardckptError

T = TypeVar("T")
log = logging.getLogger("shardckpt")
_TAG_SPAN = 1 << 28  # tags wrap around well below gloo's int range; 4 tags per round trip
_POLL_S = 0.001  # how long a message whose deadline already passed may still take to be taken


@dataclass
class Exchange:
    """Round trips over one process group, numbered so every rank tags them alike.

    ``group``: a gloo group (or None with ``world_size`` 1: one process alone, where a
    round trip is a local call). Every rank of the group calls :meth:`round_trip` the
    same number of times in the same order; one Exchange per group (a
    :class:`~shardckpt.engine.Checkpointer` keeps one for each group it talks over).
    Not thread-safe: one round trip at a time.
    """

    group: Any
    rank: int = 0
    world_size: int = 1
    coordinator_rank: int = 0
    device: str = "cpu"  # where messages are staged: the group's backend sends from there
    _seq: int = field(default=0, repr=False)

    @classmethod
    def over(cls, group: Any) -> Exchange:
        """An Exchange over ``group`` (None: this process alone). A subgroup given by the
        caller may be NCCL: its messages then go through the current CUDA device."""
        if group is None:
            return cls(None)
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend(group) == "nccl" else "cpu"
        return cls(group, dist.get_rank(group), dist.get_world_size(group), device=device)

    @property
    def is_coordinator(self) -> bool:
        return self.rank == self.coordinator_rank

    @property
    def alone(self) -> bool:
        return self.group is None

    def round_trip(
        self,
        action: str,
        mine: Callable[[], Any],
        decide: Callable[[list[Any]], list[Any]],
        *,
        wait_s: float,
        reply_s: float,
        waiting: str = "",
        hint: str = "",
    ) -> Any:
        """Collective: every rank runs ``mine()`` and sends the result (or the exception
        it raised) to the coordinator, which waits at most ``wait_s`` for all of them.
        If every rank came and none failed, the coordinator runs ``decide(values)`` (one
        value per rank, by rank) and sends each rank its item of the list it returns;
        this returns that item, on every rank.

        Otherwise every rank that came raises the same error: RankFailureError for a
        rank whose process went away, or the failing ranks' errors (as
        :meth:`RankGroup.agree` raises them), ``decide``'s error counting as the
        coordinator's. When ranks did not come within ``wait_s``, the coordinator raises
        RankTimeoutError naming them (the message starts with ``waiting``, default
        ``action``, and ends with ``hint``) and the others RankFailureError (see the
        module docstring). A rank waits at most ``reply_s`` for the answer, then raises
        RankTimeoutError naming the coordinator. A rank whose ``mine()`` raised something
        that is not an ``Exception`` (KeyboardInterrupt) sends it too, and re-raises it
        as it is once answered.
        """
        local: BaseException | None = None
        try:
            outcome: tuple[Any, ...] = ("ok", mine())
        except BaseException as e:  # noqa: BLE001 - sent to the coordinator, raised on every rank
            # A KeyboardInterrupt too: the others learn it now instead of at a timeout, and
            # this rank re-raises it as it is once answered (raise_failures).
            local = e
            outcome = ("error", type(e).__name__, str(e))
        if self.alone:
            if local is not None:
                if not isinstance(local, Exception):
                    raise local
                raise_failures(action, {0: local}, local=local, alone=True)
            return _settle(action, _decided(decide, [outcome[1]], 0)[0], local=None, rank=0, alone=True)
        self._seq = (self._seq + 1) % (_TAG_SPAN // 4)
        tag = self._seq * 4
        if self.is_coordinator:
            answers = self._coordinate(action, outcome, decide, tag, wait_s, (waiting or action, hint))
            return _settle(action, answers[self.rank], local=local, rank=self.rank)
        answer = self._ask(_encode(outcome), tag, reply_s, action)
        return _settle(action, answer, local=local, rank=self.rank)

    # ------------------------------------------------------------ coordinator

    def _coordinate(
        self,
        action: str,
        own: tuple[Any, ...],
        decide: Callable[[list[Any]], list[Any]],
        tag: int,
        wait_s: float,
        note: tuple[str, str],
    ) -> list[tuple[Any, ...]]:
        outcomes: dict[int, tuple[Any, ...]] = {self.rank: own}
        deadline = time.monotonic() + wait_s
        missing: list[int] = []
        lost: dict[int, BaseException] = {}
        sizes = {r: self._zeros(1, torch.int64) for r in range(self.world_size) if r != self.rank}
        size_works = {r: dist.irecv(t, src=self._global(r), group=self.group, tag=tag) for r, t in sizes.items()}
        for r in sorted(sizes):
            try:
                _wait(size_works[r], deadline)
                if missing:
                    continue  # it came, but gloo closed the group's connections at the first timeout
                payload = self._zeros(int(sizes[r].item()), torch.uint8)
                _wait(dist.irecv(payload, src=self._global(r), group=self.group, tag=tag + 1), deadline + wait_s)
                outcomes[r] = _decode(payload)
            except RuntimeError as e:
                if is_lost_peer(e):
                    lost[r] = e
                elif is_timeout(e):
                    missing.append(r)
                else:
                    raise
        answers = self._answers(action, outcomes, decide, missing, lost, wait_s, note)
        if missing:
            # A wait that timed out made gloo close every connection of the group: the ranks
            # that came learn it from their closed connection, not from an answer.
            return answers
        sends: list[Any] = []
        for r in sorted(outcomes):
            if r != self.rank:
                try:
                    sends += self._send(r, _encode(answers[r]), tag + 2)
                except RuntimeError as e:  # that rank's connection is gone: it finds out itself
                    log.warning("shardckpt: %s: could not answer rank %d (%s)", action, r, e)
        _finish_sends(sends, action)
        return answers

    def _answers(
        self,
        action: str,
        outcomes: dict[int, tuple[Any, ...]],
        decide: Callable[[list[Any]], list[Any]],
        missing: list[int],
        lost: dict[int, BaseException],
        wait_s: float,
        note: tuple[str, str],
    ) -> list[tuple[Any, ...]]:
        """Every rank's answer: the same failure for all, or ``decide``'s item for each
        (``note``: what the ranks were waiting for, and the hint for a timeout)."""
        if missing:
            shown = _rank_names(missing)
            waiting, hint = note
            text = (
                f"{waiting}: not every rank arrived within {wait_s:g} s ({shown} did not). A rank that skipped the "
                "call, crashed, or is stuck holds everyone else; check the named ranks' logs. The checkpoint "
                f"was not committed; earlier checkpoints are intact.{hint}"
            )
            return [("raise", "RankTimeoutError", text)] * self.world_size
        if lost:
            r = min(lost)
            text = str(lost_peer_error(f"{action}: rank {r}", lost[r]))
            return [("raise", "RankFailureError", text)] * self.world_size
        failed = {r: (o[1], o[2]) for r, o in outcomes.items() if o[0] == "error"}
        if failed:
            return [("failures", failed)] * self.world_size
        values = [outcomes[r][1] for r in range(self.world_size)]
        return _decided(decide, values, self.rank)

    # ------------------------------------------------------------ messages

    def _zeros(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(n, dtype=dtype, device=self.device)

    def _global(self, rank: int) -> int:
        return int(dist.get_global_rank(self.group, rank))

    def _send(self, rank: int, data: bytes, tag: int) -> list[Any]:
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        dst = self._global(rank)
        return [
            dist.isend(size, dst=dst, group=self.group, tag=tag),
            dist.isend(payload, dst=dst, group=self.group, tag=tag + 1),
        ]

    def _ask(self, data: bytes, tag: int, wait_s: float, action: str) -> tuple[Any, ...]:
        """Send ``data`` to the coordinator and return its answer, or raise
        RankTimeoutError / RankFailureError naming it."""
        rank = self.coordinator_rank
        deadline = time.monotonic() + wait_s
        sends: list[Any] = []
        try:
            sends = self._send(rank, data, tag)
            tag += 2
            size = self._zeros(1, torch.int64)
            _wait(dist.irecv(size, src=self._global(rank), group=self.group, tag=tag), deadline)
            payload = self._zeros(int(size.item()), torch.uint8)
            _wait(dist.irecv(payload, src=self._global(rank), group=self.group, tag=tag + 1), deadline + wait_s)
        except RuntimeError as e:
            if is_lost_peer(e):
                raise RankFailureError(
                    f"{action}: the coordinator (rank {rank}) closed its connection ({str(e).splitlines()[0][:200]}). "
                    "Either it gave up waiting for another rank (its own error names that rank, and nothing was "
                    "committed) or its process died (its log says why). Restart the job; it resumes from the "
                    "newest committed checkpoint."
                ) from e
            if not is_timeout(e):
                raise
            raise RankTimeoutError(
                f"{action}: the coordinator (rank {rank}) did not answer within {wait_s:g} s. It is stuck, "
                "crashed, or never made this call (its log says which); whether this save or load went "
                "through is for it to tell."
            ) from e
        _finish_sends(sends, action)
        return _decode(payload)


def _decided(decide: Callable[[list[Any]], list[Any]], values: list[Any], rank: int) -> list[tuple[Any, ...]]:
    """``decide(values)`` as answers, or its error as the deciding rank's failure for every rank."""
    try:
        return [("ok", v) for v in decide(values)]
    except BaseException as e:  # noqa: BLE001 - answered to every rank, raised there (a KeyboardInterrupt as is here)
        return [("decide-error", rank, type(e).__name__, str(e), e)] * len(values)


def _settle(
    action: str, answer: tuple[Any, ...], *, local: BaseException | None, rank: int, alone: bool = False
) -> Any:
    """Return the answer's value, or raise the error it carries (on every rank alike)."""
    kind = answer[0]
    if kind == "ok":
        return answer[1]
    if kind == "raise" and local is not None and not isinstance(local, Exception):
        raise local  # a KeyboardInterrupt stays one, whatever else went wrong
    if kind == "raise":
        cls = getattr(errors, answer[1], None)
        assert isinstance(cls, type) and issubclass(cls, ShardckptError)
        raise cls(answer[2])
    if kind == "failures":
        raise_gathered(action, answer[1], local=local, rank=rank)
    _, where, type_name, text, *own = answer
    mine = own[0] if own and where == rank else None
    raise_failures(action, {where: mine if mine is not None else _Remote(type_name, text)}, local=mine, alone=alone)


def raise_gathered(
    action: str, failures: dict[int, tuple[str, str]], *, local: BaseException | None, rank: int
) -> NoReturn:
    """Raise, as :func:`~shardckpt.engine.collective.raise_failures` does, the failures
    gathered in a round trip: ``(type name, text)`` by rank; ``local``, this rank's own."""
    by_rank: dict[int, BaseException] = {r: _Remote(*s) for r, s in failures.items()}
    if local is not None:
        by_rank[rank] = local
    raise_failures(action, by_rank, local=local)


def _encode(outcome: tuple[Any, ...]) -> bytes:
    if outcome[0] == "decide-error":
        outcome = outcome[:4]  # the exception object itself stays on the coordinator
    return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)


def _decode(payload: torch.Tensor) -> tuple[Any, ...]:
    # Messages between this job's own ranks (what torch's *_object collectives send too).
    value = pickle.loads(payload.cpu().numpy().tobytes())
    assert isinstance(value, tuple)
    return value


def _wait(work: Any, deadline: float) -> None:
    remaining = max(deadline - time.monotonic(), _POLL_S)
    work.wait(datetime.timedelta(seconds=remaining))


def _finish_sends(works: list[Any], action: str) -> None:
    """Wait for this rank's sends (the data has left once the answer came back); a send
    that fails is the receiving rank's problem, reported there, and logged here."""
    for w in works:
        try:
            w.wait(datetime.timedelta(seconds=60))
        except RuntimeError as e:
            log.warning("shardckpt: %s: a message to another rank was not delivered (%s)", action, e)


def _rank_names(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
