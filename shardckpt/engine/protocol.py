"""The save and load protocols: a save in two round trips, reusing the last plan; a load's
reads in one (after the round trip that checks the manifest and targets, in loading.py).

DCP's ``dcp.save`` makes four collectives (gather the local plans, scatter the global
plan, gather the write results, broadcast the outcome), and a save needs two bounded
barriers around them (every rank arrived; every rank finished writing) so that a rank
that is missing is named instead of hanging the others. :func:`save_in_rounds` drives
the same public planner and storage-writer methods, in DCP's order, over two
:meth:`~shardckpt.engine.exchange.Exchange.round_trip` calls, each of which is a
monitored gather plus an answer:

1. **Plan.** Every rank plans locally (``set_up_planner``, ``create_local_plan``,
   ``prepare_local_plan``) and sends the coordinator its layout fingerprint
   (:func:`~shardckpt.engine.planner.layout_fingerprint`), its host and location, its
   values' digests and, unless it holds the plan agreed for that fingerprint last time,
   its local plan; a format-3 save sends instead the summary of a global plan from rules
   (:mod:`~shardckpt.engine.rule_plan`: a digest of its table, its mesh coordinate per group
   of tensors, its own bytes), from which the coordinator answers every rank the same
   placement of the items several ranks hold, and each rank keeps its items; when a rank's
   items are not what rules give, or the summaries disagree, the coordinator answers
   "resend" and every rank sends its local plan (one more round trip, today's checks and
   words). When every rank holds the last save's plan and every fingerprint
   matches it, the coordinator reuses its global plan (re-checking only the values, in
   O(ranks x values): ``SavePlanner.adopt_global_plan``, with the keys' share of the
   manifest counted when the plan was made); otherwise it runs ``create_global_plan``. Then
   ``prepare_global_plan`` checks the locations and claims the folder, and each rank gets
   the save id, with its new plan only when the plan changed. Ranks that arrive too late
   are named here. (When a rank left its plan out but the coordinator cannot reuse, the
   coordinator asks for the plans: one more round trip, only after a rank missed an
   answer.)
2. **Write and commit.** Every rank runs ``finish_plan`` and ``write_data`` and sends
   its write results; the coordinator (naming ranks whose writes did not end in time)
   calls ``finish``, which commits the manifest, and tells every rank the outcome.

A failure anywhere is answered to every rank, so all raise together (see
:meth:`~shardckpt.engine.exchange.Exchange.round_trip`).

:func:`read_in_rounds` is a load's reading: DCP's load steps (``read_metadata``,
``set_up_planner``, ``set_up_storage_reader``, ``create_local_plan``,
``prepare_local_plan``, the global step, ``finish_plan``, ``read_data``) on every rank,
then one round trip that names a rank whose reads did not end within the I/O bound and
raises any rank's failure on every rank. The global step runs on each rank over its own
plan, as DCP runs it when a load has no collectives (rank-local metadata): DCP's default
load planner and our reader change nothing across ranks there
(``tests/unit/test_protocol.py`` pins that on the installed torch), so gathering the
plans for it would be a round trip for nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from dataclasses import dataclass, field
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, WriteItem

from shardckpt.engine.claim import check_ranks_agree
from shardckpt.engine.exchange import Exchange
from shardckpt.engine.manifest_builder import ManifestBuilder
from shardckpt.engine.options import Timeouts
from shardckpt.engine.plan_checks import ValueSummary, value_summary
from shardckpt.engine.plan_records import PlanRecords
from shardckpt.engine.planner import LoadPlanner, SavePlanner, layout_fingerprint, plan_mappings
from shardckpt.engine.reader import Reader
from shardckpt.engine.rule_plan import (
    Irregular,
    RuleSummary,
    RuleTable,
    decode_winners,
    derive_plan,
    encode_winners,
    layouts_of,
    plan_from_rules,
    summarize,
)
from shardckpt.engine.writer import Writer


@dataclass
class PlanCache:
    """The plan of the last save over one group, kept for the next save with the same
    layout. Each rank keeps its own final plan; the coordinator also keeps every rank's
    fingerprint, the global plan, DCP's metadata and what the plan's keys take in the
    manifest (``SavePlanner.manifest_key_bytes``). Owned by one Checkpointer per group
    (:class:`Rounds`); used by one save at a time."""

    fingerprint: str | None = None  # this rank's layout, and the plan agreed for it
    plan_id: str | None = None
    central: SavePlan | None = None
    fingerprints: list[str] = field(default_factory=list)  # coordinator: every rank's
    global_plans: list[SavePlan] = field(default_factory=list)
    metadata: Metadata | None = None
    key_bytes: int = 0
    global_id: str | None = None
    item_texts: ItemTexts = field(default_factory=lambda: ItemTexts())
    manifests: ManifestBuilder | None = None  # coordinator: the manifests of the plan's saves (formats 1, 2)
    records: PlanRecords | None = None  # coordinator: the tensor records of the plan's saves (format 3)

    def fits(self, offers: list[_Offer]) -> bool:
        """Coordinator: every rank holds the cached plan and its layout did not change."""
        return (
            self.global_id is not None
            and [o.fingerprint for o in offers] == self.fingerprints
            and all(o.plan_id == self.global_id for o in offers)
        )


class ItemTexts:
    """Each write item's ``repr`` for :func:`layout_fingerprint`, kept from one save to the
    next for the same item object (the Checkpointer's ``ItemCache`` hands out the same
    frozen items while a DTensor's layout holds). Keeps the last save's items alive, so an
    ``id`` is never another object's. Used by one save at a time.

    When a plan's items are, position by position, the last plan's item objects or items
    of the same ``repr`` (those DCP plans anew each save), with equal key paths and
    placement, the text hashed is the same, and so is the digest: the last one is given
    without joining and hashing the texts again (12 ms a save at 3,000 items)."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[WriteItem, str]] = {}
        self._now: dict[int, tuple[WriteItem, str]] = {}
        self._order: list[str] = []  # the texts of the items of the plan being hashed, in order
        self._digest: _LastDigest | None = None

    def __call__(self, item: WriteItem) -> str:
        kept = self._last.get(id(item))
        text = kept[1] if kept is not None and kept[0] is item else repr(item)
        self._now[id(item)] = (item, text)
        self._order.append(text)
        return text

    def fingerprint(self, plan: SavePlan, small_replicated_to: int | None) -> str:
        """:func:`layout_fingerprint` of ``plan``; then only its items are kept."""
        mappings = plan_mappings(plan)
        last = self._digest
        if last is not None and last.holds(plan.items, mappings, small_replicated_to):
            return last.digest
        self._now, self._order = {}, []
        try:
            digest = layout_fingerprint(plan, small_replicated_to=small_replicated_to, item_text=self)
            copied = None if mappings is None else dict(mappings)  # the caller's dict may change
            self._digest = _LastDigest(list(plan.items), self._order, copied, small_replicated_to, digest)
        finally:
            self._last, self._now, self._order = self._now, {}, []
        return digest


@dataclass(frozen=True)
class _LastDigest:
    """What :meth:`ItemTexts.fingerprint` hashed last (``texts``: each item's, in order)."""

    items: list[WriteItem]
    texts: list[str]
    mappings: dict[str, Any] | None
    small_replicated_to: int | None
    digest: str

    def holds(self, items: list[WriteItem], mappings: dict[str, Any] | None, small_to: int | None) -> bool:
        """Whether ``items`` with ``mappings`` and ``small_to`` make the very text hashed last."""
        if small_to != self.small_replicated_to or len(items) != len(self.items) or mappings != self.mappings:
            return False
        for item, was, text in zip(items, self.items, self.texts, strict=True):
            if item is not was and repr(item) != text:
                return False
        return True


@dataclass
class Rounds:
    """The exchanges and plan caches of one :class:`~shardckpt.engine.Checkpointer`, one
    pair per process group it saves or loads over (None: this process alone)."""

    _by_group: dict[Any, tuple[Exchange, PlanCache]] = field(default_factory=dict)

    def over(self, group: Any) -> tuple[Exchange, PlanCache]:
        if group not in self._by_group:
            self._by_group[group] = (Exchange.over(group), PlanCache())
        return self._by_group[group]

    def close(self) -> None:
        self._by_group.clear()


@dataclass(frozen=True)
class _Offer:
    """What a rank sends the coordinator in the planning round trip."""

    fingerprint: str
    plan_id: str | None  # the plan this rank holds for ``fingerprint``, if any
    storage_data: dict[str, Any]  # rank, host, location: fresh every save
    values: ValueSummary  # value digests and JSON sizes
    plan: SavePlan | None  # the local plan, unless ``plan_id`` or ``rules`` is set
    rules: RuleSummary | Irregular | None = None  # format 3, first ask: instead of the plan


def save_in_rounds(
    state: dict[str, Any],
    writer: Writer,
    planner: SavePlanner,
    exchange: Exchange,
    cache: PlanCache,
    *,
    path: str,
    timeouts: Timeouts,
    slow_io_hint: str = "",
) -> None:
    """Plan, write and commit ``state`` (see the module docstring). Collective over the
    exchange's group; raises on every rank if any rank failed. The manifest is then
    ``writer.manifest`` on the coordinator."""
    _SaveRounds(state, writer, planner, exchange, cache, path, timeouts, slow_io_hint).run()


class _SaveRounds:
    def __init__(
        self,
        state: dict[str, Any],
        writer: Writer,
        planner: SavePlanner,
        exchange: Exchange,
        cache: PlanCache,
        path: str,
        timeouts: Timeouts,
        slow_io_hint: str,
    ) -> None:
        self.state, self.writer, self.planner = state, writer, planner
        self.exchange, self.cache, self.path, self.timeouts = exchange, cache, path, timeouts
        self.slow_io_hint = slow_io_hint
        self.local: SavePlan | None = None
        self.fingerprint = ""
        self.metadata: Metadata | None = None
        self.rules: tuple[RuleSummary | Irregular, RuleTable] | None = None

    def run(self) -> None:
        central = self._plan()
        self._write_and_commit(central)

    # ------------------------------------------------------------ round trip 1

    def _plan(self) -> SavePlan:
        arrive_s = self.timeouts.arrive_s
        answer: tuple[Any, ...] = ("resend",)
        for force in (False, True):
            answer = self.exchange.round_trip(
                f"save to {self.path}",
                functools.partial(self._offer, force),
                self._global_plan,
                wait_s=arrive_s,
                reply_s=2 * arrive_s,  # the others' arrival, then the coordinator's planning
                waiting=f"save to {self.path}: waiting for every rank to call save and plan its part",
            )
            if answer[0] != "resend":
                break
        kind, plan_id, data = answer
        cache = self.cache
        if kind == "rules":  # the same winners for every rank; this rank's plan from them
            assert self.local is not None
            winners, storage_data = data
            data = derive_plan(self.local, decode_winners(winners), self.exchange.rank, storage_data)
            kind = "plan"
        if kind == "plan":
            cache.fingerprint, cache.plan_id, cache.central = self.fingerprint, plan_id, data
            return data  # type: ignore[no-any-return]
        assert kind == "reuse" and cache.central is not None and plan_id == cache.plan_id, answer
        return dataclasses.replace(cache.central, storage_data=data)

    def _offer(self, force: bool) -> _Offer:
        """This rank's offer (planning locally the first time: DCP's local step)."""
        if self.local is None:
            ex = self.exchange
            self.planner.set_up_planner(self.state, None, ex.is_coordinator)  # our Writer: no storage_meta
            self.writer.set_up_storage_writer(ex.is_coordinator, rank=ex.rank, use_collectives=True)
            self.local = self.writer.prepare_local_plan(self.planner.create_local_plan())
            self.fingerprint = self.cache.item_texts.fingerprint(self.local, self.planner.small_replicated_to)
        held = self.cache.plan_id if self.cache.fingerprint == self.fingerprint and not force else None
        rules = None
        if held is None and not force and self.planner.small_replicated_to is not None:  # format 3
            if self.rules is None:
                self.rules = summarize(self.local, layouts_of(self.planner.state_dict, self.local))
            rules = self.rules[0]
        return _Offer(
            self.fingerprint,
            held,
            dict(self.local.storage_data),
            value_summary(self.local),
            None if held is not None or rules is not None else self.local,
            rules,
        )

    def _global_plan(self, offers: list[_Offer]) -> list[tuple[Any, ...]]:
        """Coordinator: the global plan (reused or made), the claim of the folder, and
        each rank's answer. DCP's global step."""
        # first: ranks of other options (a format, a block size) plan and summarize otherwise
        check_ranks_agree(self.writer.storage.url, [o.storage_data for o in offers])
        cache = self.cache
        reuse = cache.fits(offers)
        ruled = None
        if reuse:
            self.planner.adopt_global_plan([o.values for o in offers], cache.key_bytes)
            plans, metadata = cache.global_plans, cache.metadata
        elif any(o.rules is not None for o in offers):
            # None when the coordinator itself held the last plan (sent no summary)
            ruled = (
                None
                if self.rules is None
                else plan_from_rules(
                    [o.rules for o in offers], self.rules[1], small_to=self.planner.small_replicated_to
                )
            )
            if ruled is None:  # irregular, disagreeing or mixed with held plans: every rank sends its plan
                return [("resend",)] * len(offers)
            self.planner.adopt_global_plan([o.values for o in offers], ruled.key_bytes)
            plans, metadata = [SavePlan([]) for _ in offers], ruled.metadata  # a reuse needs only storage_data
        elif any(o.plan is None for o in offers):
            return [("resend",)] * len(offers)
        else:
            plans, metadata = self.planner.create_global_plan([o.plan for o in offers if o.plan is not None])
        fresh = [dataclasses.replace(p, storage_data=o.storage_data) for p, o in zip(plans, offers, strict=True)]
        finals = self.writer.prepare_global_plan(fresh)  # the locations agree; the folder is claimed
        self.metadata = metadata
        if reuse:
            return [("reuse", cache.global_id, f.storage_data) for f in finals]
        plan_id = uuid.uuid4().hex
        cache.fingerprints = [o.fingerprint for o in offers]
        cache.global_plans, cache.metadata, cache.global_id = plans, metadata, plan_id
        assert self.planner.manifest_key_bytes is not None  # counted by create_global_plan or the rules
        cache.key_bytes = self.planner.manifest_key_bytes
        if ruled is not None:
            winners = encode_winners(ruled.winners)  # once, not per rank
            return [("rules", plan_id, (winners, f.storage_data)) for f in finals]
        return [("plan", plan_id, f) for f in finals]

    # ------------------------------------------------------------ round trip 2

    def _write_and_commit(self, central: SavePlan) -> None:
        def write() -> Any:
            final = self.planner.finish_plan(central)
            return self.writer.write_data(final, self.planner).value()

        def commit(results: list[Any]) -> list[None]:
            assert self.metadata is not None
            cache = self.cache
            if cache.manifests is None or cache.manifests.metadata is not self.metadata:  # a new plan
                cache.manifests = ManifestBuilder(self.metadata)
            if cache.records is None or cache.records.metadata is not self.metadata:
                cache.records = PlanRecords(self.metadata)
            self.writer.finish(self.metadata, results, cache.manifests, cache.records)
            return [None] * len(results)

        self.exchange.round_trip(
            f"save to {self.path}",
            write,
            commit,
            wait_s=self.timeouts.io_s,
            reply_s=self.timeouts.io_s + self.timeouts.arrive_s,  # the slowest writes, then the commit
            waiting=f"save to {self.path}: waiting for every rank to finish writing",
            hint=self.slow_io_hint,
        )


def read_in_rounds(
    state: dict[str, Any],
    reader: Reader,
    planner: LoadPlanner,
    exchange: Exchange,
    *,
    path: str,
    timeouts: Timeouts,
    slow_io_hint: str = "",
) -> None:
    """Fill ``state`` (a plain state_dict) through DCP's load steps, then agree that every
    rank's reads succeeded (see the module docstring). Collective over the exchange's
    group; raises on every rank if any rank failed."""

    def read() -> None:
        metadata = reader.read_metadata()
        planner.set_up_planner(state, metadata, exchange.is_coordinator)
        reader.set_up_storage_reader(metadata, exchange.is_coordinator, rank=exchange.rank, use_collectives=False)
        local = reader.prepare_local_plan(planner.create_local_plan())
        (central,) = reader.prepare_global_plan(planner.create_global_plan([local]))
        reader.read_data(planner.finish_plan(central), planner).wait()

    exchange.round_trip(
        f"load of {path}",
        read,
        lambda everyone: [None] * len(everyone),
        wait_s=timeouts.io_s,
        reply_s=timeouts.io_s + timeouts.arrive_s,
        waiting=f"load of {path}: waiting for every rank to finish reading",
        hint=slow_io_hint,
    )
