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
    holders: dict[tuple[str, Any], list[int]] = {}  # ranks in ascending order
    items: dict[tuple[str, Any], WriteItem] = {}
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
    lost: list[set[tuple[str, Any]]] = [set() for _ in all_plans]

    def size(key: tuple[str, Any]) -> int:
        return item_bytes(items[key]) or 1

    def give(key: tuple[str, Any], rank: int) -> None:
        load[rank] += size(key)
        for r in holders[key]:
            if r != rank:
                lost[r].add(key)

    shared = []
    for key, ranks in holders.items():
        if len(ranks) == 1:
            load[ranks[0]] += size(key)
        else:
            shared.append(key)
    if small_to is not None:
        shared = _place_small(shared, small_to, holders, size, give)
    shared.sort(key=lambda k: (-size(k), k[0], tuple(k[1] or ())))
    everyone = list(range(len(all_plans)))
    least = [(n, r) for r, n in enumerate(load)]  # (load, rank), stale entries skipped
    heapq.heapify(least)
    for key in shared:
        ranks = holders[key]
        if ranks == everyone:
            while least[0][0] != load[least[0][1]]:
                heapq.heappop(least)
            rank = least[0][1]
        else:
            rank = min(ranks, key=lambda r: (load[r], r))
        give(key, rank)
        heapq.heappush(least, (load[rank], rank))
    return [
        dataclasses.replace(plan, items=[it for it in plan.items if (it.index.fqn, it.index.offset) not in gone])
        if gone
        else plan
        for plan, gone in zip(all_plans, lost, strict=True)
    ]


def _place_small(
    shared: list[tuple[str, Any]],
    small_to: int,
    holders: dict[tuple[str, Any], list[int]],
    size: Callable[[tuple[str, Any]], int],
    give: Callable[[tuple[str, Any], int], None],
) -> list[tuple[str, Any]]:
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
