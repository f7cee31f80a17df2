"""The owner record: one writing CheckpointManager per root.

``<root>/.shardckpt-owner.json`` names the manager that writes there (token, host, pid,
job id, heartbeat). Rules:

- **Claim** (:func:`claim`): the record is created with ``create_exclusive``, so of two
  managers starting on a fresh root exactly one wins (link(2) locally, ``If-None-Match``
  on S3). An existing record is taken over only if it belongs to the same job (a
  torchrun/SLURM restart), to a dead process on this host, was not refreshed for
  ``stale_after_s``, is unreadable, or the caller passed ``takeover=True``.
- **Take-over** (:func:`_take_over`): the taker first creates, exclusively, a gate named
  after the exact bytes of the record it judged (``.shardckpt-owner.json.takeover-<hash>``),
  so of two takers of one record only one goes on; it re-reads the record, deletes it only
  if its bytes are unchanged (a record refreshed in the meantime is judged again), creates
  its own exclusively, and removes the gate. A gate left by a taker that died is cleared
  after :data:`GATE_ABANDONED_S` (or at once if its process is dead on this host).
- **Heartbeat** (:class:`Heartbeat`): a thread of the owning manager rewrites the record
  every ``stale_after_s / 4`` seconds, after re-reading it: if another token is there
  (someone took over), it marks ownership lost and never writes again.
- **Before deleting** anything, the manager re-reads the record (:meth:`Heartbeat.check`);
  a manager that lost ownership deletes nothing and refuses to save.
- **Release** (:func:`let_go`, at ``close``): the heartbeat stops, and the record is
  deleted only if it is still the manager's own.

Residual windows (the storage has no compare-and-swap): a heartbeat's re-read and rewrite
are two operations, so a take-over landing between them is overwritten by the old owner;
the new owner then sees a foreign token at its next check and stops (one owner remains,
the old one). The same holds for the re-read right before a delete: ownership lost in
those milliseconds is noticed at the next check. Two takers clearing one abandoned gate
in the same instant can both pass it; the final exclusive create still lets only one of
them create the record, but the other's delete may remove the winner's record. On S3,
deletes and the heartbeat's PUT are unconditional, so these windows are a round trip
long; a store without conditional writes (HTTP 501) makes every create a HEAD + PUT
(FsspecStorage warns), and then two managers starting together can both win.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace

from shardckpt.errors import RootInUseError
from shardckpt.format import layout
from shardckpt.storage import Storage

log = logging.getLogger("shardckpt")

JOB_ID_VARIABLES = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")
GATE_ABANDONED_S = 60.0
"""A take-over gate older than this was left by a taker that died: taking over takes
milliseconds (three small writes)."""
CLAIM_ATTEMPTS = 50
"""How often a claim re-judges a record that changed under it before giving up."""

_TOKEN = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class OwnerRecord:
    token: str
    host: str
    pid: int
    job_id: str | None
    started_at: float
    heartbeat_at: float

    @classmethod
    def for_this_process(cls) -> OwnerRecord:
        now = time.time()
        job = next((os.environ[v] for v in JOB_ID_VARIABLES if os.environ.get(v) not in (None, "", "none")), None)
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), job, now, now)

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def describe(self) -> str:
        age = time.time() - self.heartbeat_at
        return f"host {self.host}, pid {self.pid}, job {self.job_id or 'unknown'}, last active {age:.0f} s ago"


def _parse(raw: bytes) -> OwnerRecord | None:
    """The record in ``raw``, or None if it is not one (hand-edited, another tool's)."""
    try:
        doc = json.loads(raw)
        record = OwnerRecord(**doc)
    except (ValueError, TypeError):
        return None
    if not (
        isinstance(record.token, str)
        and _TOKEN.match(record.token)
        and isinstance(record.host, str)
        and isinstance(record.pid, int)
        and isinstance(record.heartbeat_at, (int, float))
    ):
        return None
    return record


def _read_raw(storage: Storage, name: str = layout.OWNER_NAME) -> bytes | None:
    """The bytes of ``name``, or None if it does not exist. Storage errors other than
    "not found" raise: an unreadable root is never taken for a free one."""
    try:
        return storage.read_bytes(name)
    except FileNotFoundError:
        return None


def read_owner(storage: Storage) -> OwnerRecord | None:
    """The current owner, or None if there is no record or it cannot be parsed."""
    raw = _read_raw(storage)
    return None if raw is None else _parse(raw)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or a pid we cannot ask about): assume alive
    return True


def may_take_over(current: OwnerRecord, me: OwnerRecord, stale_after_s: float) -> bool:
    if current.job_id is not None and current.job_id == me.job_id:
        return True
    if current.host == me.host and not _pid_alive(current.pid):
        return True
    return time.time() - current.heartbeat_at > stale_after_s


def claim(storage: Storage, me: OwnerRecord, *, takeover: bool, stale_after_s: float) -> None:
    """Make ``me`` the owner of the root, or raise RootInUseError. Coordinator only.

    Race-safe: of several managers claiming at once exactly one returns (see the module
    docstring for the take-over protocol and its residual windows)."""
    data = me.encode()
    for attempt in range(CLAIM_ATTEMPTS):
        try:
            storage.create_exclusive(layout.OWNER_NAME, data)
            return
        except FileExistsError:
            pass
        raw = _read_raw(storage)
        if raw is None:
            continue  # released in the meantime: try the create again
        current = _parse(raw)
        if current is not None and current.token == me.token:
            return
        if current is not None and not takeover and not may_take_over(current, me, stale_after_s):
            raise RootInUseError(
                f"{storage.url} is in use by another CheckpointManager ({current.describe()}). Two writers "
                "would delete each other's checkpoints. Use another root, stop the other job, or pass "
                "takeover=True if it is dead."
            )
        if _take_over(storage, raw, data, me):
            log.warning(
                "shardckpt: took over %s/%s from %s",
                storage.url,
                layout.OWNER_NAME,
                current.describe() if current is not None else "an unreadable owner record",
            )
            return
        time.sleep(0.001 * (1 + attempt % 10))  # someone else is at it: let them finish, then judge again
    raise RootInUseError(
        f"{storage.url}/{layout.OWNER_NAME}: the owner record kept changing during {CLAIM_ATTEMPTS} attempts "
        "to claim the root; several managers are starting on it at once. Start one manager per root."
    )


def _take_over(storage: Storage, judged: bytes, data: bytes, me: OwnerRecord) -> bool:
    """Replace the record whose bytes are ``judged`` by ``data``; False if another
    taker holds the gate, the record changed, or someone else created one first."""
    gate = f"{layout.OWNER_NAME}.takeover-{hashlib.sha256(judged).hexdigest()[:32]}"
    try:
        storage.create_exclusive(gate, data)
    except FileExistsError:
        _clear_if_abandoned(storage, gate, me)
        return False
    try:
        if _read_raw(storage) != judged:
            return False  # refreshed, released or replaced since we judged it
        storage.delete([layout.OWNER_NAME])
        try:
            storage.create_exclusive(layout.OWNER_NAME, data)
        except FileExistsError:
            return False  # a manager claiming the (now free) root won the create
        return True
    finally:
        try:
            storage.delete([gate])
        except OSError as e:  # the claim itself is decided; a gate left behind expires
            log.warning(
                "shardckpt: could not remove the take-over gate %s/%s (%s); it is ignored after %.0f s",
                storage.url,
                gate,
                e,
                GATE_ABANDONED_S,
            )


def _clear_if_abandoned(storage: Storage, gate: str, me: OwnerRecord) -> None:
    """Delete a take-over gate whose taker died before removing it (else nobody could
    ever take the record over again)."""
    raw = _read_raw(storage, gate)
    holder = None if raw is None else _parse(raw)
    if raw is None:
        return
    dead = holder is not None and holder.host == me.host and not _pid_alive(holder.pid)
    if holder is None or dead or time.time() - holder.heartbeat_at > GATE_ABANDONED_S:
        log.warning(
            "shardckpt: removing %s/%s, left by a manager that died while taking over the root", storage.url, gate
        )
        storage.delete([gate])


def write(storage: Storage, record: OwnerRecord) -> None:
    storage.write_atomic(layout.OWNER_NAME, record.encode())


def release(storage: Storage, me: OwnerRecord) -> None:
    """Delete the record if it is still ``me``'s (a manager that lost the root leaves
    the new owner's record alone)."""
    current = read_owner(storage)
    if current is not None and current.token == me.token:
        storage.delete([layout.OWNER_NAME])


def let_go(storage: Storage, me: OwnerRecord, beat: Heartbeat) -> None:
    """Stop ``beat`` and release ``me``'s record if it is still ours. Coordinator. Best
    effort when the storage fails: a stale record is taken over by the next manager."""
    beat.close()
    try:
        release(storage, me)
    except OSError as e:
        log.warning(
            "shardckpt: could not release %s/%s (%s); the next manager takes it over once it is stale",
            storage.url,
            layout.OWNER_NAME,
            e,
        )


class RootOwnership:
    """A writing manager's hold on its root: :meth:`claim` (coordinator, at open) claims
    ``me``'s record and starts its :class:`Heartbeat`; :meth:`check` re-reads the record
    before a save or a delete; :meth:`let_go` (at ``close``) stops the heartbeat and
    releases the record. On other ranks, and on a read-only manager, nothing is claimed
    and :meth:`check` and :meth:`let_go` do nothing."""

    def __init__(self, storage: Storage, me: OwnerRecord) -> None:
        self._storage = storage
        self._me = me
        self._heartbeat: Heartbeat | None = None  # the coordinator's, while it owns the root

    def claim(self, *, takeover: bool, stale_after_s: float) -> None:
        """Coordinator. Claim the root (:func:`claim`), then keep the record fresh every
        ``stale_after_s / 4`` seconds."""
        claim(self._storage, self._me, takeover=takeover, stale_after_s=stale_after_s)
        self._heartbeat = Heartbeat(self._storage, self._me, interval_s=stale_after_s / 4)

    def check(self) -> None:
        """Coordinator: RootInUseError unless the owner record on storage is still ours."""
        if self._heartbeat is not None:
            self._heartbeat.check()

    def let_go(self) -> None:
        """Stop the heartbeat and release the owner record if it is still ours. Coordinator
        (a no-op elsewhere); best effort (:func:`let_go`). Idempotent."""
        beat, self._heartbeat = self._heartbeat, None
        if beat is not None:
            let_go(self._storage, self._me, beat)


class Heartbeat:
    """Keeps ``me``'s owner record fresh while the owning manager lives, and tells
    whether it still owns the root. Coordinator only; one per writing manager.

    A daemon thread refreshes the record every ``interval_s`` (re-read first: a foreign
    token there means another manager took over, and this one is marked lost and never
    writes again). :meth:`close` stops and joins the thread; call it before releasing.
    Thread-safe: :meth:`check` may run on the manager's thread while the beat runs."""

    def __init__(self, storage: Storage, me: OwnerRecord, interval_s: float) -> None:
        self._storage = storage
        self._me = me
        self._interval_s = interval_s
        self._lock = threading.Lock()  # one read-then-write of the record at a time
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardckpt-heartbeat", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> str | None:
        """Why this manager no longer owns the root, or None while it does."""
        return self._lost

    def check(self) -> None:
        """Re-read the record now; raise RootInUseError unless it is still ours."""
        with self._lock:
            self._verify()
        if self._lost is not None:
            raise RootInUseError(self._lost)

    def beat(self) -> None:
        """Refresh the record if it is still ours (else mark ownership lost)."""
        with self._lock:
            if self._verify():
                write(self._storage, replace(self._me, heartbeat_at=time.time()))

    def _verify(self) -> bool:
        if self._lost is not None:
            return False
        raw = _read_raw(self._storage)
        current = None if raw is None else _parse(raw)
        if current is not None and current.token == self._me.token:
            return True
        now = (
            "no record"
            if raw is None
            else "an unreadable record"
            if current is None
            else f"the record of {current.describe()}"
        )
        self._lost = (
            f"{self._storage.url}: this CheckpointManager no longer owns the root: {layout.OWNER_NAME} holds "
            f"{now}. Another manager took it over (takeover=True, or this one looked dead: no heartbeat "
            "for stale_owner_after_s). This manager writes and deletes nothing more; its committed steps "
            "are kept. Stop one of the two jobs, then open the root again."
        )
        log.warning("shardckpt: %s", self._lost)
        return False

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the next beat retries
                log.warning(
                    "shardckpt: could not refresh the owner record %s/%s (%s); retrying in %.1f s",
                    self._storage.url,
                    layout.OWNER_NAME,
                    e,
                    self._interval_s,
                )
            if self._lost is not None:
                return

    def close(self) -> None:
        """Stop and join the thread. Idempotent."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
