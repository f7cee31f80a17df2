"""The owner record: one writing CheckpointManager per root.

``<root>/.shardckpt-owner.json`` names the manager that writes there (host, pid, job
id, heartbeat). A second manager is refused unless the record belongs to the same job
(a torchrun/SLURM restart), to a dead process on this host, has not been refreshed for
``stale_after_s``, or the caller asks to take over. This is a guard against mistakes
(two jobs pointed at one folder), not a distributed lock: two managers starting in the
same instant on an object store could both win.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass

from shardckpt import layout
from shardckpt.errors import RootInUseError
from shardckpt.storage import Storage

JOB_ID_VARIABLES = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")


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


def read_owner(storage: Storage) -> OwnerRecord | None:
    if not storage.exists(layout.OWNER_NAME):
        return None
    try:
        doc = json.loads(storage.read_bytes(layout.OWNER_NAME))
        return OwnerRecord(**doc)
    except (ValueError, TypeError):
        return None  # unreadable record: treat as absent, it is ours to replace


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def may_take_over(current: OwnerRecord, me: OwnerRecord, stale_after_s: float) -> bool:
    if current.job_id is not None and current.job_id == me.job_id:
        return True
    if current.host == me.host and not _pid_alive(current.pid):
        return True
    return time.time() - current.heartbeat_at > stale_after_s


def claim(storage: Storage, me: OwnerRecord, *, takeover: bool, stale_after_s: float) -> None:
    """Write ``me`` as the owner of the root, or raise RootInUseError."""
    current = read_owner(storage)
    if current is not None and current.token != me.token and not takeover and not may_take_over(current, me, stale_after_s):
        age = time.time() - current.heartbeat_at
        raise RootInUseError(
            f"{storage.url} is in use by another CheckpointManager (host {current.host}, pid {current.pid}, "
            f"job {current.job_id or 'unknown'}, last active {age:.0f} s ago). Two writers would delete each "
            "other's checkpoints. Use another root, stop the other job, or pass takeover=True if it is dead."
        )
    write(storage, me)


def write(storage: Storage, record: OwnerRecord) -> None:
    storage.write_atomic(layout.OWNER_NAME, json.dumps(asdict(record)).encode())


def release(storage: Storage, me: OwnerRecord) -> None:
    current = read_owner(storage)
    if current is not None and current.token == me.token:
        storage.delete([layout.OWNER_NAME])
