"""The test suite. One folder per kind of test; run one with ``bash tests/run.sh tests/unit``.

    unit/         one process, no server: format, parsers, planner, engine, manager, CLI, conversion
    storage/      storage backends and their failures: local, memory://, S3 (moto), full disks
    distributed/  several gloo/CPU ranks: resharding, hangs, training state, Lightning, torchrun
    slow/         long trial loops and soaks (marked ``slow``: ``-m "not slow"`` skips them);
                  by default a short form that still hits every kind of fault point,
                  ``SHARDCKPT_STRESS=1`` the long form (many more trials, docs/reliability.md)
    support/      helpers, imported by module name from every folder: ``distributed``
                  (run_ranks, run_command: every process a test starts, under a deadline;
                  ranks fork from a server that imported torch once),
                  ``damage``, ``s3server``, and scripts run in child processes: ``crash_job``,
                  ``doc_runner`` with ``doc_prelude`` (the documentation's snippets)

The suite has a time budget (about 15 minutes on 2 cores): a process start with its torch
import costs seconds, so tests share launches where they can (ranks forked by
``run_ranks``, one launch per world size for the documentation's blocks, one fork server
for the crash trials), and loops keep their long form behind ``SHARDCKPT_STRESS=1``.

Test file names are unique across folders: pytest imports them by basename (no
``__init__.py`` here) and puts their folder on sys.path, which a spawned rank inherits
to import its worker function by module name.
"""

from __future__ import annotations

import os
import sys

import pytest

SLOW = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow") + os.sep


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if str(item.path).startswith(SLOW):
            item.add_marker(pytest.mark.slow)


# The helpers, for every test module and every process a test spawns (a spawned child
# gets the parent's sys.path); tests/ itself too, as before the move.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "support"))
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The shared moto server fixture, for every test module that asks for ``s3``. Imported into
# each test module instead, it reads as an unused import that the tests' ``s3`` parameters
# redefine (pyflakes F401, F811).
from s3server import s3  # noqa: E402, F401 - needs support/ on sys.path first (above)
