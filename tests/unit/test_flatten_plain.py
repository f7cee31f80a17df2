"""The save planner's shortcut past DCP's flattening (issue #18): for every state it takes,
the flat state and key paths are DCP's, and the planner ends up set up as DCP's would be."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from shardckpt.engine._torch_private import flatten_state_dict
from shardckpt.engine.planner import SavePlanner
from shardckpt.engine.state import flatten_plain_dicts

_T = torch.ones(2)

_PLAIN: list[dict[str, Any]] = [
    {},
    {"w": _T, "step": 3, "lr": 0.5, "name": "run", "done": False, "none": None},
    {"model": {"layer.0.w": _T, "b": torch.zeros(1, requires_grad=True)}, "optim": {"state": {"0": {"m": _T}}}},
    {"empty": {}, "a": {"b": {"c": {"d": torch.nn.Parameter(torch.ones(1))}}}},
    {"a.b": _T, "a": {"c": _T}},
]

_OTHERS: list[dict[str, Any]] = [
    {"list": [_T, _T]},  # DCP walks into lists of tensors
    {"ints": [1, 2]},
    {"tuple": (_T,)},
    {"obj": object()},
    {"a.b": _T, "a": {"b": _T}},  # two leaves on one flat key: DCP raises
    {"a": {1: _T}},  # DCP turns the int key into "1"
]


@pytest.mark.parametrize("state", _PLAIN)
def test_a_state_of_plain_dicts_flattens_as_dcp_flattens_it(state: dict[str, Any]) -> None:
    got = flatten_plain_dicts(state)
    assert got is not None
    flat, mappings = got
    want_flat, want_mappings = flatten_state_dict(state)
    assert list(flat) == list(want_flat)  # the same keys in the same order
    assert all(flat[k] is want_flat[k] for k in flat)
    assert mappings == want_mappings


@pytest.mark.parametrize("state", _OTHERS)
def test_anything_else_is_left_to_dcp(state: dict[str, Any]) -> None:
    assert flatten_plain_dicts(state) is None


def test_deep_nesting_is_left_to_dcp() -> None:
    deep: dict[str, Any] = {"w": _T}
    for _ in range(5000):
        deep = {"d": deep}
    assert flatten_plain_dicts(deep) is None


@pytest.mark.parametrize("state", _PLAIN)
def test_the_planner_is_set_up_as_dcp_sets_it_up(state: dict[str, Any]) -> None:
    """Every attribute DCP's own set_up_planner sets (a new one in a later torch too) has
    the value it would have."""
    ours, dcps = SavePlanner(), SavePlanner()
    ours.set_up_planner(state, None, True)
    DefaultSavePlanner.set_up_planner(dcps, state, None, True)
    assert vars(ours).keys() == vars(dcps).keys()
    for name, value in vars(dcps).items():
        if name == "state_dict":
            assert list(ours.state_dict) == list(value)
            assert all(ours.state_dict[k] is v for k, v in value.items())
        else:
            assert getattr(ours, name) == value, name
