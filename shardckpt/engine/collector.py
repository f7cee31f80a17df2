"""Python's cyclic garbage collector, paused while a save or a load runs.

A save or load builds tens of objects per chunk (DCP's write and read items, plans,
metadata; our results and records) and keeps them until it returns. With thousands of
chunks those allocations trigger full collections, and each one walks every object of
the process (the model, the optimizer, the whole program), only to find no garbage. That
was the largest single cost of saving thousands of small tensors: a 4-rank save of 3,058
tensors of 4-64 KiB took 9-10 s with the collector on and 3.8-5.4 s with it paused
(docs/benchmarks.md, issue #18). DCP's own ``get_state_dict`` pauses it the same way.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic collector off inside, back on after unless it was off before.

    Objects are still freed by reference counting inside; only reference cycles wait for
    the next collection after the block. Only on the main thread (a sync save, a load):
    ``gc.disable`` is process-wide, and an async save's background thread runs for as long
    as its writes take, so pausing there would let the training thread's cycles pile up
    for minutes; that thread runs with the collector as the program set it. Two pauses
    cannot overlap, since only one thread takes them.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
