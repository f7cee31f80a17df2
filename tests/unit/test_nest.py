"""engine.state.nest / container_at: the one walker that rebuilds nested state_dicts from
paths (export, import, TrainState's load targets, the Lightning plugin and strategies)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shardckpt.engine._torch_private import flatten_state_dict
from shardckpt.engine.state import container_at, nest
from shardckpt.errors import ManifestError


def test_nest_builds_dicts_and_lists_with_placeholders():
    tree = nest([(["a", "b"], 1), (["l", 1], 2), (["m", 0, "k"], 3), (["a", "c"], 4), (["top"], None)])
    assert tree == {"a": {"b": 1, "c": 4}, "l": [None, 2], "m": [{"k": 3}], "top": None}


def test_nest_inverts_the_flattening():
    t = torch.ones(2)
    state = {"model": {"w": t, "layers": [{"w": t}, {"w": t}]}, "step": 7, "opt": {"betas": [0.9, 0.95]}}
    flat, paths = flatten_state_dict(state)
    assert nest((paths[k], v) for k, v in flat.items()) == state


@pytest.mark.parametrize(
    ("leaves", "message"),
    [
        ([((), 1)], "empty path"),
        ([(["a"], 1), (["a"], 2)], "same path"),
        ([(["a"], 1), (["a", "b"], 2)], "runs through a int"),
        ([(["a", 0], 1), (["a", "b"], 2)], "runs through a list"),
        ([(["a", "b"], 1), (["a", 0], 2)], "runs through a dict"),
    ],
)
def test_nest_refuses_paths_that_disagree(leaves, message):
    with pytest.raises(ManifestError, match=message):
        nest(leaves)


def test_container_at_makes_the_way_and_keeps_what_is_there():
    root: dict[str, Any] = {"a": {"keep": 1}}
    holder = container_at(root, ["a", "l", 2])
    assert holder == [None, None, None] and root == {"a": {"keep": 1, "l": [None, None, None]}}
    assert container_at(root, ["a", "keep2"]) is root["a"]
    assert container_at(root, ["x"]) is root
