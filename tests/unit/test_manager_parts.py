"""The CheckpointManager's parts called directly: the save trigger, the SIGTERM flag and
the incremental chain (shardckpt/manager/trigger.py, chain.py). One process, no I/O
except one manager on tmp_path."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest

import shardckpt
from shardckpt.engine.collective import RankGroup
from shardckpt.manager.chain import IncrementalChain
from shardckpt.manager.schedule import SaveSchedule
from shardckpt.manager.trigger import SaveTrigger


def no_collective() -> RankGroup:
    raise AssertionError("the trigger asked for the manager's group, so it would run a collective")


def test_trigger_runs_no_collective_without_a_time_rule_or_sigterm():
    trigger = SaveTrigger(SaveSchedule(save_interval_steps=10), is_coordinator=True)
    assert trigger.shared_flags(no_collective) == (False, False)
    trigger.close()


def test_trigger_shares_the_time_rule_with_every_rank():
    asked = []

    def ranks() -> RankGroup:
        asked.append(True)
        return RankGroup.current(None)  # one process: any_true is local

    trigger = SaveTrigger(SaveSchedule(save_interval_s=3600), is_coordinator=True)
    assert trigger.shared_flags(ranks) == (False, False)  # an hour has not passed
    assert asked == [True]


def test_sigterm_saves_exits_and_puts_the_previous_handler_back(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        mgr = shardckpt.CheckpointManager(
            tmp_path, save_interval_steps=1000, save_on_preemption=True, preemption_exit_code=17
        )
        assert mgr.save(1, {"step": 1}) is False  # not due
        os.kill(os.getpid(), signal.SIGTERM)  # the manager's handler: recorded, the process lives
        assert seen == []
        with pytest.raises(SystemExit) as exited:
            mgr.save(2, {"step": 2})
        assert exited.value.code == 17
        assert mgr.steps() == [2]
        os.kill(os.getpid(), signal.SIGTERM)  # close() put the handler from before the manager back
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def manifest(version: int, chain: object) -> SimpleNamespace:
    return SimpleNamespace(format_version=version, metadata={} if chain is None else {"incremental_chain": chain})


def test_chain_bases_on_the_newest_step_until_full_every():
    chain = IncrementalChain(full_every=3)
    read = {5: manifest(2, 0)}
    assert chain.base_for(1, None, read.__getitem__) == (None, 0)  # nothing committed: full
    assert chain.base_for(6, 5, read.__getitem__) == (5, 1)
    chain.record(6, 1)
    assert chain.base_for(7, 6, read.__getitem__) == (6, 2)  # recorded, not read
    chain.record(7, 2)
    assert chain.base_for(8, 7, read.__getitem__) == (None, 0)  # the third save after a full one
    assert chain.base_for(5, 7, read.__getitem__) == (None, 0)  # a step not after the newest: full


@pytest.mark.parametrize("found", [manifest(1, None), manifest(2, None), manifest(2, True), manifest(2, -1)])
def test_chain_never_bases_on_a_step_not_saved_incrementally(found):
    assert IncrementalChain(full_every=None).base_for(9, 8, {8: found}.__getitem__) == (None, 0)


def test_chain_forgets_a_deleted_step():
    chain = IncrementalChain(full_every=None)
    chain.record(3, 4)
    chain.forget(3)
    assert chain.base_for(4, 3, {3: manifest(1, None)}.__getitem__) == (None, 0)  # read again: a v1 manifest


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "3"])
def test_chain_refuses_a_full_every_that_is_not_a_positive_int(bad):
    with pytest.raises(ValueError, match="full_every must be a positive int or None"):
        IncrementalChain(full_every=bad)
