"""The fast tier's restore: which local step every rank can get, and loading it in place.

:class:`LocalRestorer` is :meth:`LocalTier.restore <shardckpt.manager.local_tier.LocalTier.restore>`'s
engine: every rank reports the shards it holds, :func:`~shardckpt.manager.local_decision.choose`
picks the newest step complete across the live ranks and who provides each shard, the
providers read and send the copies (:mod:`replication`), each rank checks its copy's header
against the target and reads it into the state, verified. A damaged copy is excluded and the
choice made again; None, with the reason in a log line, sends the caller to the durable tier.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from shardckpt.engine.collective import RankGroup, typed_transport_errors
from shardckpt.engine.state import PlainState
from shardckpt.errors import IntegrityError, ManifestError
from shardckpt.format import datafile, local_step
from shardckpt.manager import replication, shard_image
from shardckpt.manager.local_decision import Report, choose
from shardckpt.manager.local_store import HeldShard, LocalStore, byte_view
from shardckpt.manager.replication import Topology

log = logging.getLogger("shardckpt")

# A copy of a shard: the path of a file of this node, or an image in memory (read or received).
Copy = str | torch.Tensor


def _threads() -> int:
    """Threads that copy one image (memory-bound: a few are enough)."""
    return max(1, min(8, os.cpu_count() or 1))


def _tensor(copy: Copy) -> torch.Tensor:
    if isinstance(copy, str):
        raise TypeError(f"{copy}: a file copy is never sent, only an image read into memory")
    return copy


def _head(copy: Copy, size: int, where: str) -> bytes:
    """The header of a copy of ``size`` bytes, its length prefix included (bounded by ``size``)."""
    if isinstance(copy, str):
        with open(copy, "rb") as f:
            prefix = f.read(datafile.HEADER_LEN_BYTES)
            n = datafile.header_length(prefix, file=where, file_size=size)
            return prefix + f.read(n)
    prefix = bytes(byte_view(copy[: datafile.HEADER_LEN_BYTES]))
    n = datafile.header_length(prefix, file=where, file_size=size)
    return bytes(byte_view(copy[: datafile.HEADER_LEN_BYTES + n]))


class LocalRestorer:
    """The restore side of one rank's :class:`~shardckpt.manager.local_tier.LocalTier`, which
    owns it and calls :meth:`restore` on every rank of ``group`` in the same order, from one
    thread. ``tier``: the durable root's tier id; ``local_dir``: for log lines."""

    def __init__(self, group: RankGroup, topology: Topology, store: LocalStore, tier: str, local_dir: str) -> None:
        self._group = group
        self._topology = topology
        self._store = store
        self.tier = tier
        self.local_dir = local_dir
        # Whether the last restore copied part of a copy found damaged into the state and
        # then found no other copy (restore_tiers raises if no durable step is left either).
        self.state_overwritten = False

    def restore(self, state_dict: dict[str, Any], *, not_older_than: int | None = None) -> int | None:
        """Collective. Load the newest local step complete across the live ranks (and not
        older than ``not_older_than``) into ``state_dict`` in place; returns the step, or
        None (with a log line saying why) when the caller must use the durable tier."""
        g = self._group
        plain = PlainState.of(state_dict)  # on every rank, before any rank may return
        foreign = self._store.foreign()
        if foreign:
            log.info(
                "shardckpt: local tier (%s): ignoring %s, local steps of another durable root or of an older "
                "layout (left in place: remove them once no job needs them)",
                self.local_dir,
                foreign[:5],
            )
        held = {s.key(): s for s in self._store.scan()}
        reports = self._gather(
            [
                (*k[:2], s.index.world_size, k[2], s.index.data_bytes, s.index.xxh3, s.index.save_id)
                for k, s in held.items()
            ]
        )
        excluded: set[tuple[str, Report]] = set()
        self.state_overwritten = False
        while True:
            step, sources, why = choose(reports, self._topology, g.world_size, excluded, not_older_than)
            if step is None:
                log.info("shardckpt: local tier (%s): no step to restore: %s", self.local_dir, why)
                return None
            copies, bad = self._read_sources(step, sources, held)
            if self._exclude(step, self._gather(bad), excluded):
                continue
            mine = self._transfer(step, sources, copies)
            provider, report = sources[g.rank]
            where = f"local step {step} of rank {g.rank}" + ("" if provider == g.rank else f" (from rank {provider})")
            contents, problem = self._check(mine, report, plain, where)
            named = [f"rank {r}: {p[0]}" for r, p in enumerate(self._gather([problem])) if p[0] is not None]
            if named or contents is None:
                log.info("shardckpt: local step %d cannot be loaded (%s); using the durable tier", step, named[0])
                return None
            self.state_overwritten = True
            failed = self._fill(mine, contents, (provider, report), plain, where)
            if self._exclude(step, self._gather(failed), excluded):
                continue
            g.agree(f"loading {where}", functools.partial(shard_image.finish_load, contents, plain))
            self.state_overwritten = False
            return step

    def _exclude(self, step: int, failed: list[list[Any]], excluded: set[tuple[str, Report]]) -> bool:
        """Note the copies some rank found damaged (gathered (provider, report) pairs), so
        that ``choose`` looks for other copies; whether there were any."""
        if not any(failed):
            return False
        for pairs in failed:
            excluded.update((self._topology.nodes[provider], tuple(report)) for provider, report in pairs)
        log.warning("shardckpt: local step %d: damaged copies %s; trying other copies", step, failed)
        return True

    def _read_sources(
        self, step: int, sources: dict[int, tuple[int, Report]], held: dict[tuple[int, int, int], HeldShard]
    ) -> tuple[dict[int, Copy], list[tuple[int, Report]]]:
        """Every shard of ``step`` this rank provides: its own as a path (read later, straight
        into the state), another rank's read whole and verified to be sent; and the copies
        that failed."""
        me = self._group.rank
        copies: dict[int, Copy] = {}
        bad: list[tuple[int, Report]] = []
        for rank, (provider, report) in sorted(sources.items()):
            if provider != me:
                continue
            path = held[(report[0], report[1], report[3])].path
            try:
                if rank == me:
                    copies[rank] = path
                    continue
                with shard_image.file_reader(path) as read:
                    copies[rank] = shard_image.read_verified(read, report[4], report[5], where=path, threads=_threads())
            except (IntegrityError, OSError, EOFError) as e:
                log.warning("shardckpt: rank %d: reading the local copy %s: %s", me, path, e)
                bad.append((me, report))
        return copies, bad

    def _transfer(self, step: int, sources: dict[int, tuple[int, Report]], copies: dict[int, Copy]) -> Copy:
        """Collective: every shard whose provider is another rank is sent to its rank."""
        me = self._group.rank
        ops: list[tuple[str, torch.Tensor, int, int]] = []
        for rank, (provider, report) in sorted(sources.items()):
            if provider == rank:
                continue
            if provider == me:
                ops.append(("send", _tensor(copies[rank]), rank, 0))
            elif rank == me:
                copies[me] = torch.empty(report[4], dtype=torch.uint8)
                ops.append(("recv", _tensor(copies[me]), provider, 0))
        replication.run_p2p(self._group, ops, f"local tier: fetching shards of step {step} from partners")
        return copies[me]

    def _check(
        self, copy: Copy, report: Report, plain: PlainState, where: str
    ) -> tuple[local_step.ImageContents | None, str | None]:
        """The header of this rank's copy and why it cannot be loaded into ``plain`` (checked
        on every rank, then gathered, so that no rank raises alone), or None."""
        try:
            head = _head(copy, report[4], where)
            contents = local_step.read_image(head, where=where, size=report[4])
        except (ManifestError, OSError) as e:
            return None, str(e)
        if contents.world_size != self._group.world_size or contents.rank != self._group.rank:
            return None, f"{where} holds rank {contents.rank} of {contents.world_size}"
        if (contents.tier_id, contents.save_id) != (self.tier, report[6]):
            return None, (
                f"{where} belongs to root {contents.tier_id}, save {contents.save_id}; its index says root "
                f"{self.tier}, save {report[6]}"
            )
        return contents, shard_image.target_problem(contents, plain)

    def _fill(
        self, copy: Copy, contents: local_step.ImageContents, source: tuple[int, Report], plain: PlainState, where: str
    ) -> list[tuple[int, Report]]:
        """Read this rank's copy into ``plain``'s tensors, verified; [source] if it failed."""
        report = source[1]
        try:
            if isinstance(copy, str):
                with shard_image.file_reader(copy) as read:
                    shard_image.fill_state(read, contents, report[4], plain, report[5], where=where, threads=_threads())
            else:
                read = shard_image.buffer_reader(copy)
                shard_image.fill_state(read, contents, report[4], plain, report[5], where=where, threads=_threads())
        except (IntegrityError, OSError, EOFError) as e:
            log.warning("shardckpt: rank %d: %s", self._group.rank, e)
            return [source]
        return []

    def _gather(self, mine: list[Any]) -> list[list[Any]]:
        g = self._group
        if not g.is_distributed:
            return [mine]
        out: list[Any] = [None] * g.world_size
        with typed_transport_errors("local tier: sharing what each rank holds"):
            dist.all_gather_object(out, mine, group=g.group)
        return out
