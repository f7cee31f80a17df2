"""The fast recovery tier: every rank's shard in its node's ``local_dir``, copied to other nodes.

:class:`LocalTier` saves one step asynchronously: the shard image is staged in the
foreground (:func:`shard_image.stage_image`, the only stall), then a background thread
commits it to ``local_dir`` (:class:`LocalStore`), sends it to the rank's partner(s) on
other nodes and commits the replicas it receives (:mod:`replication`), then applies
retention. :meth:`LocalTier.restore` decides collectively which step every rank can get
(its own copy, or one a live rank holds) and loads it in place (:class:`LocalRestorer`,
in :mod:`~shardckpt.manager.local_restore`); it returns None, with the reason in a log
line, when none is complete here (another world size, shards lost on every node), and
the caller falls back to the durable tier.

Local steps are bound to one durable root (the tier id, :func:`root_tier_id`) and each
local save to a save id the coordinator draws: a restore only assembles shards of one
save of this root, and never reads nor deletes another root's files.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.engine.collective import RankGroup
from shardckpt.engine.staging import Stager
from shardckpt.errors import IntegrityError, ManifestError, ShardckptError
from shardckpt.format import local_step
from shardckpt.format.local_step import ShardIndex
from shardckpt.manager import replication, shard_image
from shardckpt.manager.local_restore import LocalRestorer
from shardckpt.manager.local_store import LocalStore, byte_view
from shardckpt.manager.replication import Topology
from shardckpt.storage.base import Storage

log = logging.getLogger("shardckpt")


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
        self._restorer = LocalRestorer(group, self._topology, self._store, tier, options.local_dir)

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
        return self._restorer.restore(state_dict, not_older_than=not_older_than)

    @property
    def state_overwritten(self) -> bool:
        """Whether the last restore copied part of a copy found damaged into the state and
        then found no other copy (restore_tiers raises if no durable step is left either)."""
        return self._restorer.state_overwritten

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
