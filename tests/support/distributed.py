"""Run a test body on N gloo/CPU ranks (torch.multiprocessing.spawn), like torchrun would.

``run_ranks(fn, world_size, *args)`` calls ``fn(rank, world_size, *args)`` in every
rank with the default process group initialized, and fails the test with the rank's
traceback if any rank raises or the run exceeds ``timeout_s``.
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ["LOCAL_RANK"] = str(rank)
    import datetime

    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, world_size, *args)
        # Everyone leaves together: rank 0 hosts the store, and a rank that tears down
        # its group after rank 0 exited can abort in gloo's C++ threads.
        dist.barrier()
    except BaseException as e:
        raise RuntimeError(f"rank {rank} failed:\n{traceback.format_exc()}") from e
    dist.destroy_process_group()
    # The test body passed on every rank (the barrier above). Leave without running C++
    # destructors at interpreter exit: gloo's teardown can rarely abort ("terminate called
    # without an active exception") on a loaded machine, failing a test that passed.
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)
