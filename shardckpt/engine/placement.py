"""Where each replicated write item of a save is stored: exactly one rank, the replicated
bytes spread evenly (LPT), and in a format-3 save the small ones on the coordinator.

:func:`balance_replicated` is :class:`shardckpt.engine.planner.SavePlanner`'s dedup step;
the small-tensor limits are shared with :mod:`shardckpt.engine.write_v3`.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
from collections.abc import Callable
from typing import Any

from torch.distributed.checkpoint.planner import SavePlan, WriteItem

from shardckpt.engine.staging import item_bytes

# Format 3: a replicated item of at most this many bytes, held by the coordinator among
# others, is stored by the coordinator, up to SMALL_REPLICATED_BUDGET_BYTES in all (see
# balance_replicated; docs/format.md section 12.3, "Small replicated tensors").
SMALL_REPLICATED_BYTES = 64 * 1024
SMALL_REPLICATED_BUDGET_BYTES = 64 * 1024 * 1024

Key = tuple[str, Any]
"""A write item's place: its key and offsets (``(item.index.fqn, item.index.offset)``)."""


def balance_replicated(all_plans: list[SavePlan], *, small_to: int | None = None) -> list[SavePlan]:
    """Keep each item on exactly one rank, spreading replicated bytes evenly.

    Items held by one rank stay there. With ``small_to`` (a rank, the coordinator of a
    format-3 save), replicated items of at most ``SMALL_REPLICATED_BYTES`` that this rank
    holds go to it first, smallest first, while their sum stays within
    ``SMALL_REPLICATED_BUDGET_BYTES``: then a loading rank finds all of them in one rank's
    index record (an AdamW ``step`` per parameter would otherwise send it to hundreds).
    The other replicated items go, largest first, to the least-loaded rank that holds
    them (LPT scheduling; ties to the lowest rank), counting what ``small_to`` already
    took. Deterministic for given plans. Items are keyed by (key, offsets), hashed in C,
    and an item held by every rank takes the least-loaded rank from a heap: a few dict
    steps per item, O(log ranks) per replicated item held everywhere.
    """
    holders: dict[Key, list[int]] = {}  # ranks in ascending order
    items: dict[Key, WriteItem] = {}
    for rank, plan in enumerate(all_plans):
        for item in plan.items:
            key = (item.index.fqn, item.index.offset)
            items[key] = item
            ranks = holders.get(key)
            if ranks is None:
                holders[key] = [rank]
            else:
                ranks.append(rank)
    load = [0] * len(all_plans)
    shared: dict[Key, list[int]] = {}
    for key, ranks in holders.items():
        if len(ranks) == 1:
            load[ranks[0]] += item_bytes(items[key]) or 1
        else:
            shared[key] = ranks
    winners = assign_replicated(shared, lambda k: item_bytes(items[k]) or 1, load, small_to=small_to)
    return [
        dataclasses.replace(plan, items=kept) if len(kept) != len(plan.items) else plan
        for plan, kept in (
            (plan, [it for it in plan.items if winners.get((it.index.fqn, it.index.offset), rank) == rank])
            for rank, plan in enumerate(all_plans)
        )
    ]


def assign_replicated(
    shared: dict[Key, list[int]], size: Callable[[Key], int], load: list[int], *, small_to: int | None = None
) -> dict[Key, int]:
    """The rank that stores each item held by several ranks: ``shared`` maps each such item
    (key, offsets) to its holders in ascending order; ``size(key)`` is its bytes (at least
    1); ``load`` each rank's bytes of the items only it holds (updated in place). The steps
    of :func:`balance_replicated` after it has counted the items; the global plan from
    rules (:mod:`shardckpt.engine.rule_plan`) calls it with the same arguments, so both
    place every item alike. O(shared log shared), O(log ranks) per item every rank holds."""
    winners: dict[Key, int] = {}

    def give(key: Key, rank: int) -> None:
        load[rank] += size(key)
        winners[key] = rank

    keys = list(shared)
    if small_to is not None:
        keys = _place_small(keys, small_to, shared, size, give)
    keys.sort(key=lambda k: (-size(k), k[0], tuple(k[1] or ())))
    everyone = list(range(len(load)))
    least = [(n, r) for r, n in enumerate(load)]  # (load, rank), stale entries skipped
    heapq.heapify(least)
    for key in keys:
        ranks = shared[key]
        if ranks is everyone or ranks == everyone:
            while least[0][0] != load[least[0][1]]:
                heapq.heappop(least)
            rank = least[0][1]
        else:
            rank = min(ranks, key=load.__getitem__)  # ascending: the first least loaded is the lowest
        give(key, rank)
        heapq.heappush(least, (load[rank], rank))
    return winners


def _place_small(
    shared: list[Key],
    small_to: int,
    holders: dict[Key, list[int]],
    size: Callable[[Key], int],
    give: Callable[[Key, int], None],
) -> list[Key]:
    """:func:`balance_replicated`'s first pass with ``small_to``: the small replicated items
    that rank holds go to it, smallest first, within the budget; returns the others."""
    budget = SMALL_REPLICATED_BUDGET_BYTES
    rest = []
    for key in sorted(shared, key=lambda k: (size(k), k[0], tuple(k[1] or ()))):
        n, ranks = size(key), holders[key]
        held = ranks[bisect.bisect_left(ranks, small_to) : bisect.bisect_right(ranks, small_to)]
        if n <= SMALL_REPLICATED_BYTES and n <= budget and held:
            give(key, small_to)
            budget -= n
        else:
            rest.append(key)
    return rest
