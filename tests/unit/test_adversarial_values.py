"""Values and layouts that must be refused (or accepted) at planning time, by type.

Issue #13: save must refuse, before any byte is written, what load would refuse
(items 10, 13); Stateful objects' collectives run in the same order on every rank
(item 15); ranks loading different checkpoints fail loudly (item 3, load half).
"""

from __future__ import annotations

import datetime
import glob
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks
from safetensors import safe_open

import shardckpt
from shardckpt.errors import (
    InconsistentRanksError,
    ManifestError,
    StateDictMismatchError,
    UnsupportedValueError,
)
from shardckpt.format import datafile, manifest, values

# ---------------------------------------------------------------- helpers


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def assert_nothing_written(folder: Any) -> None:
    """No manifest (nothing committed), and no byte written at all: the refusal came at
    planning time, before the save created its folder."""
    assert not os.path.exists(os.path.join(folder, "manifest.json"))
    assert not os.path.exists(folder) or os.listdir(folder) == []


def refused_save(state: dict[str, Any], path: Any) -> UnsupportedValueError:
    with pytest.raises(UnsupportedValueError) as info:
        shardckpt.save(state, str(path))
    assert_nothing_written(path)
    return info.value


def deep_list(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v]
    return v


# ---------------------------------------------------------------- item 10: what the reader refuses


def test_save_refuses_more_dims_than_the_reader_accepts(tmp_path):
    ndim = datafile.MAX_NDIM + 1
    err = refused_save({"w": torch.zeros([1] * ndim)}, tmp_path / "c")
    msg = str(err)
    assert "'w'" in msg and f"{ndim} dimensions" in msg and f"at most {datafile.MAX_NDIM}" in msg
    assert "reshape" in msg


def test_save_at_the_dims_limit_loads_back(tmp_path):
    t = torch.arange(2.0).reshape([2] + [1] * (datafile.MAX_NDIM - 1))
    shardckpt.save({"w": t}, str(tmp_path / "c"))
    target = {"w": torch.zeros_like(t)}
    shardckpt.load(target, str(tmp_path / "c"))
    assert same_bits(target["w"], t)


def test_save_refuses_a_dimension_the_reader_refuses(tmp_path):
    # An empty tensor may have any dimension, but the manifest reader caps every size.
    err = refused_save({"w": torch.zeros(0, 2**62)}, tmp_path / "c")
    assert "'w'" in str(err) and str(2**62) in str(err)


@pytest.mark.parametrize(
    "state",
    [
        {"w\ud800": torch.zeros(2)},  # a tensor key: goes into a safetensors header
        {"m": {"\udfff": torch.zeros(2)}},  # a nested dict key: part of the flattened key
        {"opt": {"x\ud800y": 1}},  # a key inside a value: goes into manifest.json
        {"name": "lone \ud800 surrogate"},  # a str value
    ],
    ids=["tensor-key", "nested-key", "value-dict-key", "str-value"],
)
def test_save_refuses_strings_that_utf8_cannot_encode(tmp_path, state):
    err = refused_save(state, tmp_path / "c")
    assert "surrogate" in str(err) and "UTF-8" in str(err)


UNUSUAL_KEYS = ["ключ 😀", 'q"uote\\back', "new\nline", "nul\x00byte", "__metadata__", "a@0", "$dollar", " ", ""]


def test_unusual_but_allowed_keys_round_trip_and_open_with_safetensors(tmp_path):
    path = str(tmp_path / "c")
    state = {k: torch.full((2, 3), float(i)) for i, k in enumerate(UNUSUAL_KEYS)}
    shardckpt.save(state, path)
    target = {k: torch.zeros(2, 3) for k in UNUSUAL_KEYS}
    shardckpt.load(target, path)
    for k in UNUSUAL_KEYS:
        assert same_bits(target[k], state[k]), k
    seen = {}
    for f in glob.glob(os.path.join(path, "data", "*.safetensors")):
        with safe_open(f, "pt") as fh:
            for name in fh.keys():
                seen[name] = fh.get_tensor(name)
    # Whole tensors are stored under their key; __metadata__ and keys with '@' get a suffix.
    by_key = {name if name in state else name.rsplit("@", 1)[0]: t for name, t in seen.items()}
    assert set(by_key) == set(UNUSUAL_KEYS)
    for k in UNUSUAL_KEYS:
        assert same_bits(by_key[k], state[k]), k


def test_save_refuses_a_key_too_long_for_a_safetensors_header(tmp_path, monkeypatch):
    monkeypatch.setattr(datafile, "MAX_HEADER_BYTES", 4096)
    err = refused_save({"k" * 5000: torch.zeros(1)}, tmp_path / "c")
    assert "4096" in str(err) and "header" in str(err)


def test_save_refuses_values_too_large_for_a_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", 10_000)
    err = refused_save({"w": torch.zeros(1), "big": "x" * 20_000}, tmp_path / "c")
    assert "'big'" in str(err) and "10000" in str(err)


# ---------------------------------------------------------------- item 13: local errors get their own type


@pytest.mark.parametrize(
    "make, fix",
    [
        (lambda: torch.eye(3).to_sparse(), ".to_dense()"),
        (lambda: torch.eye(3).to_sparse_csr(), ".to_dense()"),
        (lambda: torch.zeros(3, device="meta"), "materialize"),
        (lambda: torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)]), "unbind"),
    ],
    ids=["sparse-coo", "sparse-csr", "meta", "nested"],
)
def test_save_refuses_tensors_without_plain_storage_by_type(tmp_path, make, fix):
    err = refused_save({"ok": torch.ones(2), "m": {"bad": make()}}, tmp_path / "c")
    assert "'m.bad'" in str(err) and fix in str(err)


def test_async_save_refuses_a_sparse_tensor_by_type(tmp_path):
    path = tmp_path / "c"
    with pytest.raises(UnsupportedValueError, match="to_dense"):
        shardckpt.async_save({"s": torch.eye(3).to_sparse()}, str(path)).wait()
    assert_nothing_written(path)


@pytest.mark.parametrize("depth", [values.MAX_VALUE_DEPTH + 1, 500])
def test_save_refuses_a_value_nested_too_deeply(tmp_path, depth):
    # Just over the limit, the manifest would nest deeper than readers accept
    # (datafile.MAX_JSON_DEPTH); far over it, encoding would exhaust the recursion limit.
    err = refused_save({"v": deep_list(depth), "w": torch.ones(2)}, tmp_path / "c")
    assert "'v'" in str(err) and str(values.MAX_VALUE_DEPTH) in str(err)


def test_value_depth_limit_is_the_same_for_save_and_load(tmp_path):
    path = str(tmp_path / "c")
    at_limit = deep_list(values.MAX_VALUE_DEPTH)
    shardckpt.save({"v": at_limit, "t": (((1,),),)}, path)
    target: dict[str, Any] = {"v": None, "t": None}
    shardckpt.load(target, path)
    assert target["v"] == at_limit and target["t"] == (((1,),),)
    with pytest.raises(UnsupportedValueError):
        values.encode_value(deep_list(values.MAX_VALUE_DEPTH + 1), key="v")
    with pytest.raises(ManifestError, match="nests"):
        values.decode_value(deep_list(values.MAX_VALUE_DEPTH + 1), where="v")
    # A tuple costs two JSON levels ({"$tuple": [...]}); both sides count the JSON.
    tuples: Any = 1
    for _ in range(values.MAX_VALUE_DEPTH // 2 + 1):
        tuples = (tuples,)
    with pytest.raises(UnsupportedValueError):
        values.encode_value(tuples, key="t")


def test_save_refuses_a_state_dict_nested_too_deeply(tmp_path):
    state: dict[str, Any] = {}
    node = state
    for _ in range(3000):
        node["a"] = {}
        node = node["a"]
    node["t"] = torch.zeros(1)
    with pytest.raises(UnsupportedValueError, match="nest"):
        shardckpt.save(state, str(tmp_path / "c"))
    assert_nothing_written(tmp_path / "c")
    with pytest.raises(UnsupportedValueError, match="nest"):
        shardckpt.async_save(state, str(tmp_path / "c")).wait()
    assert_nothing_written(tmp_path / "c")
    shardckpt.save({"a": {"t": torch.ones(1)}}, str(tmp_path / "shallow"))
    with pytest.raises(UnsupportedValueError, match="nest"):
        shardckpt.load(state, str(tmp_path / "shallow"), strict=False)


@pytest.fixture
def saved(tmp_path) -> str:
    path = str(tmp_path / "saved")
    shardckpt.save({"w": torch.arange(6.0).reshape(2, 3), "lr": 0.5}, path)
    return path


@pytest.mark.parametrize(
    "make, fix",
    [
        (lambda: torch.empty(2, 3, device="meta"), "materialize"),
        (lambda: torch.zeros(2, 3).to_sparse(), ".to_dense()"),
    ],
    ids=["meta", "sparse"],
)
def test_load_into_a_tensor_without_plain_storage_is_refused_by_type(saved, make, fix):
    target = {"w": make(), "lr": 0.0}
    with pytest.raises((UnsupportedValueError, StateDictMismatchError)) as info:
        shardckpt.load(target, saved)
    assert "'w'" in str(info.value) and fix in str(info.value)
    assert target["lr"] == 0.0  # nothing loaded


# ---------------------------------------------------------------- item 15: Stateful calls in one order


class CollectiveStateful:
    """Like an FSDP wrapper: state_dict()/load_state_dict() run a collective. The
    all_gather of the key name proves every rank is in the same object's call."""

    def __init__(self, name: str, value: torch.Tensor, group: Any) -> None:
        self.name, self.value, self.group = name, value, group

    def _in_step(self) -> None:
        names: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(names, self.name, group=self.group)
        assert names == [self.name] * len(names), f"ranks called different Statefuls at once: {names}"
        total = torch.ones(1)
        dist.all_reduce(total, group=self.group)

    def state_dict(self) -> dict[str, Any]:
        self._in_step()
        return {"value": self.value}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._in_step()
        self.value = sd["value"]


def _stateful_in_rank_order(rank: int, world: int, path: str) -> None:
    # A short timeout: a mismatched call order fails in seconds instead of hanging.
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=15))
    names = ["model", "optim", "sched"]
    order = names if rank == 0 else list(reversed(names))
    want = {n: torch.arange(4.0) + 10 * i for i, n in enumerate(names)}
    state = {n: CollectiveStateful(n, want[n].clone(), group) for n in order}
    shardckpt.save(state, path, timeout_s=30)
    order = list(reversed(names)) if rank == 0 else names
    target = {n: CollectiveStateful(n, torch.zeros(4), group) for n in order}
    shardckpt.load(target, path, timeout_s=30)
    for n in names:
        assert same_bits(target[n].value, want[n]), n


def test_stateful_collectives_run_in_the_same_order_on_every_rank(tmp_path):
    run_ranks(_stateful_in_rank_order, 2, str(tmp_path / "c"))


# ---------------------------------------------------------------- item 3: ranks load one checkpoint


def _load_per_rank_paths(rank: int, world: int, paths: list[str], expect_error: bool) -> None:
    target = {"w": torch.zeros(4)}
    if not expect_error:
        shardckpt.load(target, paths[rank], timeout_s=30)
        assert same_bits(target["w"], torch.arange(4.0))
        return
    with pytest.raises(InconsistentRanksError) as info:
        shardckpt.load(target, paths[rank], timeout_s=30)
    msg = str(info.value)
    for r, p in enumerate(paths):
        assert f"rank {r}: {p}" in msg, msg
    assert same_bits(target["w"], torch.zeros(4))  # nothing loaded
    # Every rank raised the same message.
    msgs: list[Any] = [None] * world
    dist.all_gather_object(msgs, msg)
    assert msgs == [msg] * world


def test_ranks_loading_different_checkpoints_raise_the_same_error(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shardckpt.save({"w": torch.arange(4.0)}, a)
    shardckpt.save({"w": torch.arange(4.0) + 1}, b)
    run_ranks(_load_per_rank_paths, 2, [a, b], True)


def test_ranks_spelling_one_checkpoint_differently_load_it(tmp_path):
    a = str(tmp_path / "a")
    shardckpt.save({"w": torch.arange(4.0)}, a)
    run_ranks(_load_per_rank_paths, 2, [a, os.path.join(str(tmp_path), ".", "a") + "/"], False)
