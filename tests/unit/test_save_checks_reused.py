"""A save does not repeat the checks of what the last save of the same Checkpointer checked
and has not changed (issue #18: a save of 12,183 small DTensors spent 36 ms a rank checking
them and 39 ms making their items), and repeats every check of anything that changed or
that an unfinished save did not get to."""

from __future__ import annotations

import collections
import sys
from typing import Any

import pytest
import torch
from torch.distributed.tensor import Shard

from shardckpt.errors import UnsupportedValueError
from tests.support.distributed import run_ranks

_PLANNING = {"check_savable", "create_local_plan"}  # the local plan's checks (the writer looks dtypes up too)


def _counting(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, seen: collections.Counter[str]) -> None:
    """Count ``owner.name``'s calls by the planning checks, by key."""
    real = getattr(owner, name)

    def counted(*args: Any, key: str, **kwargs: Any) -> Any:
        if sys._getframe(1).f_code.co_name in _PLANNING:
            seen[key] += 1
        return real(*args, key=key, **kwargs)

    monkeypatch.setattr(owner, name, counted)


def _reuse_and_change(rank: int, world: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    import shardckpt
    from shardckpt.engine import savable
    from shardckpt.format import datafile

    mesh = init_device_mesh("cpu", (world,))
    state = {k: distribute_tensor(torch.arange(16.0).reshape(8, 2) + i, mesh, [Shard(0)]) for i, k in enumerate("abc")}
    keys: collections.Counter[str] = collections.Counter()  # check_str calls by key
    dtypes: collections.Counter[str] = collections.Counter()  # dtype_name calls by key
    with pytest.MonkeyPatch.context() as mp, shardckpt.Checkpointer() as ckpt:
        _counting(mp, savable, "check_str", keys)
        _counting(mp, datafile, "dtype_name", dtypes)
        ckpt.save(state, f"{path}/one")
        assert keys["a"] == 1 and dtypes["a"] >= 1  # the first save checks everything
        keys.clear(), dtypes.clear()
        ckpt.save(state, f"{path}/two")
        assert keys == {} and dtypes == {}, (keys, dtypes)  # unchanged: neither key, dtype nor item checked again

        # "b" changes dtype under its DTensor (its local tensor's data swapped): checked again, refused
        with torch.no_grad():  # to_local() is then the local tensor itself, not a view
            state["b"].to_local().data = torch.zeros(4, 2, dtype=torch.complex64)
        with pytest.raises(UnsupportedValueError, match=r"key 'b': dtype torch.complex64"):
            ckpt.save(state, f"{path}/three")
        assert keys == {} and dtypes == {"b": 1}, (keys, dtypes)  # only the changed tensor (its key was checked)

        # a save after the refusal trusts nothing the refused one made
        with torch.no_grad():
            state["b"].to_local().data = torch.ones(4, 2)
        keys.clear(), dtypes.clear()
        ckpt.save(state, f"{path}/four")
        assert set(keys) == {"a", "b", "c"}, keys
    target = {k: distribute_tensor(torch.zeros(8, 2), mesh, [Shard(0)]) for k in "abc"}
    shardckpt.load(target, f"{path}/four")
    assert torch.equal(target["b"].full_tensor(), torch.ones(8, 2))
    assert torch.equal(target["c"].full_tensor(), torch.arange(16.0).reshape(8, 2) + 2)


def test_a_save_skips_the_checks_of_an_unchanged_layout_and_repeats_those_of_a_changed_one(tmp_path: Any) -> None:
    run_ranks(_reuse_and_change, 2, str(tmp_path))


def _refused_items_stay_refused(rank: int, world: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    import shardckpt
    from shardckpt.format import datafile

    mesh = init_device_mesh("cpu", (world,))
    long_key = "k" * 5000  # its data-file header entry is over the (lowered) limit: refused by the item checks
    state = {
        "a": distribute_tensor(torch.zeros(4, 2), mesh, [Shard(0)]),
        long_key: distribute_tensor(torch.zeros(4), mesh, [Shard(0)]),
    }
    with pytest.MonkeyPatch.context() as mp, shardckpt.Checkpointer() as ckpt:
        mp.setattr(datafile, "MAX_HEADER_BYTES", 4096)
        for attempt in range(2):  # the second save must not trust the items the first one made
            with pytest.raises(UnsupportedValueError, match="header"):
                ckpt.save(state, f"{path}/c{attempt}")


def test_items_a_refused_save_made_are_checked_again(tmp_path: Any) -> None:
    run_ranks(_refused_items_stay_refused, 2, str(tmp_path))
