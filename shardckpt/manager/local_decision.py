"""Which local step a restore loads, and from whom: pure, computed alike on every rank from
what every rank reported it holds (:meth:`shardckpt.manager.local_tier.LocalTier.restore`
gathers the reports; this module decides)."""

from __future__ import annotations

from shardckpt.manager.replication import Topology

# (step, rank, world_size, holder, data_bytes, xxh3, save_id): one committed shard a rank can read.
Report = tuple[int, int, int, int, int, str, str]


def choose(
    reports: list[list[Report]],
    topology: Topology,
    world_size: int,
    excluded: set[tuple[str, Report]],
    not_older_than: int | None,
) -> tuple[int | None, dict[int, tuple[int, Report]], str]:
    """Pure, computed alike on every rank from the gathered ``reports`` (per rank, what
    it can read). The newest step of which one save has a copy of every rank's shard, and
    for each rank who provides it (itself if it can, else the lowest rank holding a copy);
    else None and why. Shards of different saves of one step (an earlier attempt's
    replica) are never mixed; a step two saves complete is ambiguous and skipped."""
    holders: dict[int, dict[str, dict[int, list[tuple[int, Report]]]]] = {}
    other_worlds: set[int] = set()
    for provider, reps in enumerate(reports):
        for rep in reps:
            if (topology.nodes[provider], rep) in excluded:
                continue
            if rep[2] != world_size:
                other_worlds.add(rep[2])
                continue
            by_save = holders.setdefault(rep[0], {}).setdefault(rep[6], {})
            by_save.setdefault(rep[1], []).append((provider, rep))
    if not holders:
        if other_worlds:
            return None, {}, f"local steps were saved by {sorted(other_worlds)} ranks; this job has {world_size}"
        return None, {}, "no committed local step on any rank"
    why = ""
    for step in sorted(holders, reverse=True):
        if not_older_than is not None and step < not_older_than:
            return None, {}, f"{why}the newest complete local step is older than the durable step {not_older_than}"
        saves = holders[step]
        complete = sorted(sid for sid, by_rank in saves.items() if all(r in by_rank for r in range(world_size)))
        if len(complete) > 1:
            why += f"step {step}: saves {complete} are each complete, which is newest is unknown; "
            continue
        if not complete:
            have = set().union(*(set(by_rank) for by_rank in saves.values()))
            missing = [r for r in range(world_size) if r not in have]
            if missing:
                why += f"step {step}: no live copy of the shard of rank(s) {missing[:8]}; "
            else:
                why += f"step {step}: its shards come from {len(saves)} different saves, none complete; "
            continue
        sources = {}
        for r in range(world_size):
            copies = saves[complete[0]][r]
            own = [c for c in copies if c[0] == r]
            sources[r] = own[0] if own else min(copies)
        return step, sources, ""
    return None, {}, why.rstrip("; ")
