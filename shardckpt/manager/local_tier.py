"""The fast recovery tier: every rank's shard in its node's ``local_dir``, copied to other nodes.

:class:`LocalTier` saves one step asynchronously: the shard image is staged in the
foreground (:func:`shard_image.stage_image`, the only stall), then a background thread
commits it to ``local_dir`` (:class:`LocalStore`), sends it to the rank's partner(s) on
other nodes and commits the replicas it receives (:mod:`replication`), then applies
retention. :meth:`LocalTier.restore` decides collectively which step every rank can get
(its own copy, or one a live rank holds) and loads it in place; it returns None, with the
reason in a log line, when none is complete here (another world size, shards lost on
every node), and the caller falls back to the durable tier.

Local steps are bound to one durable root (the tier id, :func:`root_tier_id`) and each
local save to a save id the coordinator draws: a restore only assembles shards of one
save of this root, and never reads nor deletes another root's files.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.engine.collective import RankGroup, typed_transport_errors
from shardckpt.engine.staging import Stager
from shardckpt.engine.state import PlainState
from shardckpt.errors import IntegrityError, ManifestError, ShardckptError
from shardckpt.format import datafile, local_step
from shardckpt.format.local_step import ShardIndex
from shardckpt.manager import replication, shard_image
from shardckpt.manager.local_decision import Report, choose
from shardckpt.manager.local_store import HeldShard, LocalStore, byte_view
from shardckpt.manager.replication import Topology
from shardckpt.storage.base import Storage

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


@dataclass(frozen=True)
class LocalTierOptions:
    """``local_dir``: a node-local folder (RAM disk or NVMe), the same path on every rank
    of a node; ``interval_steps``: a local save is due at steps divisible by it;
    ``replicas``: copies of each shard on other nodes; ``keep_last``: local steps kept."""

    local_dir: str
    interval_steps: int = 1
    replicas: int = 1
    keep_last: int = 2

    def __post_init__(self) -> None:
        for name, low in (("interval_steps", 1), ("replicas", 0), ("keep_last", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"local tier: {name} must be an int >= {low}, got {value!r}")
        if "://" in self.local_dir:
            raise ValueError(
                f"local_dir must be a node-local path (a RAM disk such as /dev/shm/run, or local NVMe), "
                f"got the URL {self.local_dir!r}; the durable root is the place for URLs"
            )


class LocalTier:
    """One rank's part of the fast tier. Collective: construct it, and call ``save``,
    ``wait``, ``restore`` and ``close``, on every rank of ``group`` in the same order.
    ``group`` is a gloo group of its own (the background thread uses it). Drive it from
    one thread; whoever creates it calls :meth:`close`. ``tier``: the durable root's tier
    id (:func:`root_tier_id`, the same on every rank). ``store``: the rank's
    :class:`LocalStore` (tests pass a subclass that fails)."""

    def __init__(self, options: LocalTierOptions, group: RankGroup, tier: str, store: LocalStore | None = None) -> None:
        self.options = options
        self._group = group
        self._topology = Topology.gather(group)
        self._topology.check(options.replicas if group.world_size > 1 else 0)
        self._store = store if store is not None else LocalStore(options.local_dir, group.rank, tier)
        if self._store.tier != tier:
            raise ValueError(f"local tier of root {tier} given a store of root {self._store.tier}")
        self.tier = tier
        # Each local save's id comes from this object's nonce (drawn once, here) and a count
        # of its saves, so every rank derives the same id without a collective per save.
        self._nonce = group.decide("local tier: drawing the nonce of its save ids", lambda: uuid.uuid4().hex)
        self._saves = 0
        self._stager = Stager()
        self._thread: threading.Thread | None = None
        self._pending_step: int | None = None
        self._failure: BaseException | None = None
        self._closed = False
        # Whether the last restore copied part of a copy found damaged into the state and
        # then found no other copy (restore_tiers raises if no durable step is left either).
        self.state_overwritten = False

    def due(self, step: int) -> bool:
        return step % self.options.interval_steps == 0

    # ------------------------------------------------------------ save

    def save(self, step: int, state_dict: dict[str, Any]) -> None:
        """Collective. Stage this rank's shard of ``state_dict`` as local step ``step`` and
        return; the write, the replication and retention run in the background and their
        failure is raised (on every rank) by the next call.

        One collective in the foreground: the previous local save's outcome and this one's
        staging are agreed on together (a failure of the previous one is raised before
        staging), so the stall is the staging copy plus one gather."""
        self._check_open()
        previous, failure = self._join()
        g = self._group
        # One id per local save, the same on every rank: a restore never mixes shards of
        # two saves of one step (an earlier attempt's replica, a save cut off midway).
        self._saves += 1
        save_id = hashlib.sha256(f"{self._nonce}:{self._saves}".encode()).hexdigest()[:16]

        def stage() -> torch.Tensor:
            if failure is not None:
                raise failure
            return shard_image.stage_image(
                self._stager,
                state_dict,
                step=step,
                rank=g.rank,
                world_size=g.world_size,
                tier=self.tier,
                save_id=save_id,
            )

        action = f"local save of step {step}: staging"
        image = g.agree(action if previous is None else f"local save of step {previous}, then {action}", stage)
        self._pending_step = step
        self._thread = threading.Thread(
            target=self._run, args=(step, save_id, image), name="shardckpt-local-save", daemon=False
        )
        self._thread.start()

    def _run(self, step: int, save_id: str, image: torch.Tensor) -> None:
        try:
            self.write_step(step, save_id, image)
        except BaseException as e:  # noqa: BLE001 - raised on every rank by wait()
            self._failure = e

    def write_step(self, step: int, save_id: str, image: torch.Tensor) -> None:
        """Exchange replicas with partners (the one collective, on the tier's group, made
        first so that a local failure never leaves a partner waiting), then commit
        ``image`` and the replicas received, and apply retention. The save thread's body."""
        g = self._group
        digest = local_step.digest_of(byte_view(image))
        replicas = self.options.replicas if g.world_size > 1 else 0
        received: dict[int, tuple[torch.Tensor, int]] = {}
        if replicas:
            received = replication.exchange(g, self._topology, replicas, image, replication.digest_int(digest))
        shards = [(ShardIndex(step, g.rank, g.world_size, g.rank, image.numel(), digest, self.tier, save_id), image)]
        for src, (buf, sent) in sorted(received.items()):
            got = local_step.digest_of(byte_view(buf))
            if got != replication.digest_hex(sent):
                raise IntegrityError(
                    f"rank {g.rank}: the replica of rank {src}'s step {step} arrived with xxh3 {got}, "
                    f"sent as {replication.digest_hex(sent)}; not committed"
                )
            shards.append((ShardIndex(step, src, g.world_size, g.rank, buf.numel(), got, self.tier, save_id), buf))
        failures: list[ShardckptError] = []
        for index, data in shards:  # each one committed even if another failed
            try:
                self._store.commit(index, byte_view(data))
            except ShardckptError as e:
                failures.append(e)
        if failures:
            raise failures[0]
        self._store.retain(self.options.keep_last)

    def wait(self) -> None:
        """Collective. Finish the pending local save; raise its failure on every rank."""
        if self._thread is None:
            return
        step, failure = self._join()

        def result() -> None:
            if failure is not None:
                raise failure

        self._group.agree(f"local save of step {step}", result)

    def _join(self) -> tuple[int | None, BaseException | None]:
        """This rank's part of finishing the pending save (not collective): its step and
        failure, (None, None) when none was pending. The caller agrees on the outcome."""
        if self._thread is None:
            return None, None
        thread, self._thread = self._thread, None
        thread.join()
        step, self._pending_step = self._pending_step, None
        failure, self._failure = self._failure, None
        return step, failure

    # ------------------------------------------------------------ restore

    def restore(self, state_dict: dict[str, Any], *, not_older_than: int | None = None) -> int | None:
        """Collective. Load the newest local step complete across the live ranks (and not
        older than ``not_older_than``) into ``state_dict`` in place; returns the step, or
        None (with a log line saying why) when the caller must use the durable tier."""
        self._check_open()
        self.wait()
        g = self._group
        plain = PlainState.of(state_dict)  # on every rank, before any rank may return
        foreign = self._store.foreign()
        if foreign:
            log.info(
                "shardckpt: local tier (%s): ignoring %s, local steps of another durable root or of an older "
                "layout (left in place: remove them once no job needs them)",
                self.options.local_dir,
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
                log.info("shardckpt: local tier (%s): no step to restore: %s", self.options.local_dir, why)
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

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Collective. Finish the pending save, then remove the files this tier wrote (a
        clean exit leaves no local steps; other names in ``local_dir`` stay). Idempotent."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._store.remove_written()

    def _check_open(self) -> None:
        if self._closed:
            raise ShardckptError(f"local tier {self.options.local_dir}: closed")


def open_local_tier(
    checkpointer: Checkpointer,
    process_group: Any,
    timeout_s: float,
    options: LocalTierOptions | None,
    storage: Storage,
    *,
    create_record: bool,
) -> LocalTier | None:
    """Collective (creates the tier's gloo group, purpose ``"local"``, gathers node ids, and
    the coordinator reads, or with ``create_record`` creates, the root's record): the
    manager's tier for the durable root ``storage``; None without ``options``, or when the
    root has no record and may not get one (a read-only manager: a log line says so)."""
    if options is None:
        return None
    group = RankGroup.current(process_group)
    if group.is_distributed:
        group = RankGroup.current(checkpointer.group(process_group, timeout_s, purpose="local"))
    tier = group.decide(
        f"reading the local tier's record of {storage.url}", lambda: root_tier_id(storage, create=create_record)
    )
    if tier is None:
        log.info(
            "shardckpt: local tier (%s) off: %s has no %s (only a writing manager creates it)",
            options.local_dir,
            storage.url,
            local_step.ROOT_RECORD_NAME,
        )
        return None
    return LocalTier(options, group, tier)


def root_tier_id(storage: Storage, *, create: bool) -> str | None:
    """Coordinator. The tier id of the durable root ``storage``
    (:func:`local_step.tier_id` of its location and its record's id); the record is created
    exclusively when missing and ``create``, else None. Written once, never replaced."""
    where = f"{storage.url}/{local_step.ROOT_RECORD_NAME}"
    try:
        raw = storage.read_bytes(local_step.ROOT_RECORD_NAME)
    except FileNotFoundError:
        if not create:
            return None
        try:
            storage.create_exclusive(local_step.ROOT_RECORD_NAME, local_step.root_record(uuid.uuid4().hex))
        except FileExistsError:
            pass  # another manager made it first: use theirs
        raw = storage.read_bytes(local_step.ROOT_RECORD_NAME)
    try:
        record_id = local_step.parse_root_record(raw, where=where)
    except ManifestError as e:
        raise ManifestError(
            f"{e}. It is the fast tier's id of this root; move the file away to let the manager write a new one "
            "(local steps saved under the old id are then no longer restored)"
        ) from e
    return local_step.tier_id(storage.location, record_id)


def restore_tiers(tier: LocalTier, state_dict: dict[str, Any], newest_durable: int | None, root: str) -> int | None:
    """Collective: the local step if it is at least as new as the durable tier's newest
    (``newest_durable``); logs which tier and why. None: restore from the durable tier."""
    step = tier.restore(state_dict, not_older_than=newest_durable)
    if step is None and tier.state_overwritten and newest_durable is None:
        raise IntegrityError(
            f"the local tier ({tier.options.local_dir}) found its only copies damaged while reading them into the "
            f"state, and {root} has no durable step: the state now holds part of a damaged copy. Rebuild it "
            "(fresh initialisation) before training; the warnings above name the damaged files"
        )
    if step is not None:
        log.info(
            "shardckpt: restored step %d from the local tier (%s); the durable tier's newest is %s",
            step,
            tier.options.local_dir,
            newest_durable,
        )
    else:
        log.info("shardckpt: restoring from the durable tier (%s): newest step %s", root, newest_durable)
    return step
