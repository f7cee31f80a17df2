"""Single-process save/load: every dtype, odd tensor layouts, plain values, errors.

No process group anywhere here; multi-rank behaviour lives in test_distributed.py.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

import shardckpt
from shardckpt.engine.loading import read_manifest
from shardckpt.engine.reader import Reader
from shardckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IntegrityError,
    NotCommittedError,
    StateDictMismatchError,
    UnsupportedValueError,
)
from shardckpt.storage import LocalStorage

pytestmark = pytest.mark.compat  # the subset .ci/torch_compat runs on other torch releases

# ---------------------------------------------------------------- helpers


def random_bits(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor whose bytes are random: NaN payloads, -0.0, subnormals, inf all show up."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


def data_files(folder) -> list[str]:
    data = os.path.join(folder, "data")
    return sorted(os.listdir(data)) if os.path.isdir(data) else []


def assert_nothing_committed(folder) -> None:
    assert not os.path.exists(os.path.join(folder, "manifest.json"))
    assert data_files(folder) == []


def same_value(a, b) -> bool:
    """Equality that also compares types (bool vs int, tuple vs list), NaN and the sign of 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return a == b


# ---------------------------------------------------------------- dtypes

SUPPORTED = [
    (torch.float64, "F64"),
    (torch.float32, "F32"),
    (torch.float16, "F16"),
    (torch.bfloat16, "BF16"),
    (torch.float8_e4m3fn, "F8_E4M3"),
    (torch.float8_e5m2, "F8_E5M2"),
    (torch.float8_e4m3fnuz, "F8_E4M3FNUZ"),
    (torch.float8_e5m2fnuz, "F8_E5M2FNUZ"),
    (torch.int64, "I64"),
    (torch.int32, "I32"),
    (torch.int16, "I16"),
    (torch.int8, "I8"),
    (torch.uint8, "U8"),
    (torch.uint16, "U16"),
    (torch.uint32, "U32"),
    (torch.uint64, "U64"),
    (torch.bool, "BOOL"),
]


def _signed(bits: int, pattern: int) -> int:
    return pattern - (1 << bits) if pattern >> (bits - 1) else pattern


# A quiet NaN with a payload and a negative signalling NaN, written into the first elements.
NAN_PAYLOADS = {
    torch.float64: (torch.int64, [_signed(64, p) for p in (0x7FF8000000000001, 0xFFF0000000000123)]),
    torch.float32: (torch.int32, [_signed(32, p) for p in (0x7FC00001, 0xFF812345)]),
    torch.float16: (torch.int16, [_signed(16, p) for p in (0x7E01, 0xFC05)]),
    torch.bfloat16: (torch.int16, [_signed(16, p) for p in (0x7FC1, 0xFF81)]),
}


@pytest.mark.parametrize("dtype,name", SUPPORTED, ids=[n for _, n in SUPPORTED])
def test_every_safetensors_dtype_round_trips_bitwise(tmp_path, dtype, name):
    src = random_bits(dtype, (8, 33), seed=len(name))
    if dtype in NAN_PAYLOADS:
        int_dtype, patterns = NAN_PAYLOADS[dtype]
        src.view(int_dtype).view(-1)[: len(patterns)] = torch.tensor(patterns, dtype=int_dtype)
        assert torch.isnan(src.view(-1)[:2]).all()
    manifest = shardckpt.save({"t": src}, str(tmp_path / "c"))
    assert manifest.tensors["t"].dtype == name

    target = {"t": torch.zeros_like(src)}
    assert not same_bits(target["t"], src)
    shardckpt.load(target, str(tmp_path / "c"))
    assert same_bits(target["t"], src)


def _complex64() -> torch.Tensor:
    return torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)


def _qint8() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated; still a user input
        return torch.quantize_per_tensor(torch.tensor([0.5, -0.5]), 0.1, 0, torch.qint8)


def _e8m0() -> torch.Tensor:
    return torch.zeros(4, dtype=torch.uint8).view(torch.float8_e8m0fnu)


@pytest.mark.parametrize(
    "make,dtype_text,hint",
    [
        (_complex64, "complex64", "view_as_real"),
        (_qint8, "qint8", "Convert the tensor"),
        (_e8m0, "float8_e8m0fnu", "Convert"),
    ],
    ids=["complex64", "qint8", "float8_e8m0fnu"],
)
def test_unsupported_dtype_is_refused_at_save_naming_key_and_fix(tmp_path, make, dtype_text, hint):
    folder = tmp_path / "c"
    state = {"model": {"ok": torch.ones(3), "bad_weight": make()}}
    with pytest.raises(UnsupportedValueError) as info:
        shardckpt.save(state, str(folder))
    text = str(info.value)
    assert "'model.bad_weight'" in text
    assert dtype_text in text
    assert hint in text
    assert_nothing_committed(folder)


# ---------------------------------------------------------------- tensor shapes and layouts


def test_zero_size_and_0d_tensors_round_trip(tmp_path):
    src = {"empty": torch.empty(0, 5), "empty3": torch.empty(3, 0, 2, dtype=torch.int16), "scalar": torch.tensor(-2.5)}
    shardckpt.save(src, str(tmp_path / "c"))
    target = {
        "empty": torch.empty(0, 5),
        "empty3": torch.empty(3, 0, 2, dtype=torch.int16),
        "scalar": torch.tensor(9.0),
    }
    shardckpt.load(target, str(tmp_path / "c"))
    assert target["empty"].shape == (0, 5)
    assert target["empty3"].shape == (3, 0, 2)
    assert target["scalar"].shape == () and target["scalar"].item() == -2.5


def test_non_contiguous_sources_save_their_logical_values(tmp_path):
    big = torch.arange(48.0).reshape(6, 8)
    src = {
        "transposed": big.t(),
        "stepped": big[::2, 1::3],
        "narrowed": big.view(-1)[5:11],
        "expanded": torch.arange(3.0).expand(4, 3),
        "channels_last": torch.arange(24.0).reshape(1, 2, 3, 4).contiguous(memory_format=torch.channels_last),
    }
    assert not any(t.is_contiguous() for k, t in src.items() if k != "narrowed")
    shardckpt.save(src, str(tmp_path / "c"))
    target = {k: torch.full(t.shape, -1.0) for k, t in src.items()}
    shardckpt.load(target, str(tmp_path / "c"))
    for k, t in src.items():
        assert torch.equal(target[k], t), k


def test_a_small_view_of_a_large_storage_writes_only_the_view(tmp_path):
    big = torch.arange(1_000_000, dtype=torch.float32)
    shardckpt.save({"w": big[10:14]}, str(tmp_path / "c"))
    written = sum(os.path.getsize(tmp_path / "c" / "data" / f) for f in data_files(tmp_path / "c"))
    assert written < 4096
    target = {"w": torch.zeros(4)}
    shardckpt.load(target, str(tmp_path / "c"))
    assert target["w"].tolist() == [10.0, 11.0, 12.0, 13.0]


@pytest.mark.parametrize("num_io_threads", [1, 3])
def test_tensor_spanning_several_hash_blocks(tmp_path, num_io_threads):
    src = {
        "w": torch.randn(5123, generator=torch.Generator().manual_seed(1)),
        "b": torch.arange(2000, dtype=torch.int64),
    }
    manifest = shardckpt.save(src, str(tmp_path / "c"), hash_block_bytes=4096, num_io_threads=num_io_threads)
    assert len(manifest.tensors["w"].chunks[0].block_hashes) == 6  # 20,492 bytes
    assert len(manifest.tensors["b"].chunks[0].block_hashes) == 4  # 16,000 bytes
    assert len(data_files(tmp_path / "c")) == min(num_io_threads, 2)
    target = {"w": torch.zeros(5123), "b": torch.zeros(2000, dtype=torch.int64)}
    shardckpt.load(target, str(tmp_path / "c"), num_io_threads=2)
    assert torch.equal(target["w"], src["w"]) and torch.equal(target["b"], src["b"])


# ---------------------------------------------------------------- nesting and plain values


def test_nested_dicts_and_lists_of_tensors_and_values(tmp_path):
    src = {
        "model": {"layer": {"w": torch.nn.Parameter(torch.randn(3, 2)), "b": torch.arange(2.0)}},
        "buffers": [torch.ones(2), torch.full((1,), 7, dtype=torch.int32)],
        "mixed": [torch.tensor([1.5]), 4, "four", None, (4, 4)],
        "opt": {"lr": 0.001, "betas": (0.9, 0.95), "groups": [{"wd": 0.1}, {"wd": 0.0}]},
    }
    shardckpt.save(src, str(tmp_path / "c"))
    target = {
        "model": {"layer": {"w": torch.zeros(3, 2), "b": torch.zeros(2)}},
        "buffers": [torch.zeros(2), torch.zeros(1, dtype=torch.int32)],
        "mixed": [torch.zeros(1), 0, "", "x", None],
        "opt": {"lr": 0.0, "betas": None, "groups": [{"wd": None}, {"wd": None}]},
    }
    shardckpt.load(target, str(tmp_path / "c"))
    assert torch.equal(target["model"]["layer"]["w"], src["model"]["layer"]["w"].detach())
    assert torch.equal(target["model"]["layer"]["b"], src["model"]["layer"]["b"])
    assert torch.equal(target["buffers"][0], src["buffers"][0])
    assert torch.equal(target["buffers"][1], src["buffers"][1])
    assert torch.equal(target["mixed"][0], src["mixed"][0])
    assert same_value(target["mixed"][1:], [4, "four", None, (4, 4)])
    assert same_value(target["opt"], {"lr": 0.001, "betas": (0.9, 0.95), "groups": [{"wd": 0.1}, {"wd": 0.0}]})


PLAIN_VALUES = {
    "int": 7,
    "negative_big_int": -(2**70),
    "big_int": 2**100 + 1,
    "float": 0.1,
    "nan": float("nan"),
    "inf": float("inf"),
    "minus_inf": float("-inf"),
    "minus_zero": -0.0,
    "unicode": 'héllo ✓ 😀 \u0000 "quoted" \\',
    "empty_str": "",
    "true": True,
    "false": False,
    "none": None,
    "list": [1, "a", None, 2.5, [True]],
    "empty_list": [],
    "tuple": (1, 2),
    "nested_tuple": ((1, (2, ())), [3, (4,)], (float("nan"), -0.0)),
    "dollar_dict_in_tuple": ({"$tuple": [1], "$float": "nan", "a": (1,)},),
    "dict_in_list_in_tuple": ([{"k": (1, 2)}],),
}


@pytest.mark.parametrize("name", list(PLAIN_VALUES))
def test_plain_value_round_trips_with_its_type(tmp_path, name):
    value = PLAIN_VALUES[name]
    shardckpt.save({"w": torch.ones(1), "v": value}, str(tmp_path / "c"))
    target = {"w": torch.zeros(1), "v": object()}
    shardckpt.load(target, str(tmp_path / "c"))
    assert same_value(target["v"], value), (target["v"], value)


def test_dicts_with_dollar_keys_round_trip(tmp_path):
    src = {"d": {"$tuple": (1, 2), "$float": "nan", "$dict": {"$x": [1]}, "plain": {"$": None}}}
    shardckpt.save(src, str(tmp_path / "c"))
    target = {"d": {"$tuple": None, "$float": None, "$dict": {"$x": None}, "plain": {"$": 0}}}
    shardckpt.load(target, str(tmp_path / "c"))
    assert same_value(target, src)


class _Opaque:
    pass


NON_JSON = {
    "a_set": ({1, 2}, "builtins.set"),
    "numpy_scalar": (np.float32(1.5), "numpy.float32"),
    "numpy_int": (np.int64(3), "numpy.int64"),
    "an_object": (_Opaque(), "_Opaque"),
    "bytes": (b"raw", "builtins.bytes"),
    "tensor_in_tuple": ((torch.ones(2), 1), "torch.Tensor"),
    "tensor_in_tuple_in_list": ([(1, torch.ones(1))], "torch.Tensor"),
    "int_keyed_dict_in_tuple": (({1: "a"},), "int"),
    "set_deep_in_dict": ({"inner": [1, {2}]}, "builtins.set"),
}


@pytest.mark.parametrize("name", list(NON_JSON))
def test_non_json_value_is_refused_naming_key_and_type(tmp_path, name):
    value, type_text = NON_JSON[name]
    folder = tmp_path / "c"
    with pytest.raises(UnsupportedValueError) as info:
        shardckpt.save({"w": torch.ones(2), "state": {name: value}}, str(folder))
    text = str(info.value)
    assert f"'state.{name}" in text
    assert type_text in text
    assert_nothing_committed(folder)


def test_int_keyed_dicts_load_in_place_under_their_own_keys(tmp_path):
    """A plain optimizer.state_dict() is keyed by int param ids; values must land on d[1], not d['1']."""
    folder = str(tmp_path / "c")
    shardckpt.save({"w": torch.ones(2), "by_id": {1: "a", 2: ("b", 3)}}, folder)
    target = {"w": torch.zeros(2), "by_id": {1: None, 2: None}}
    shardckpt.load(target, folder)
    assert target["by_id"] == {1: "a", 2: ("b", 3)}
    assert list(target["by_id"]) == [1, 2]


def test_plain_optimizer_state_dict_round_trips(tmp_path):
    def trained(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01 * seed)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        return model, opt

    model, opt = trained(1)
    shardckpt.save({"model": model.state_dict(), "optim": opt.state_dict()}, str(tmp_path / "o"))
    model2, opt2 = trained(2)
    target = {"model": model2.state_dict(), "optim": opt2.state_dict()}
    shardckpt.load(target, str(tmp_path / "o"))
    opt2.load_state_dict(target["optim"])
    ref = opt.state_dict()
    got = opt2.state_dict()
    assert got["param_groups"][0]["lr"] == ref["param_groups"][0]["lr"] == 0.01
    for pid in (0, 1):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got["state"][pid][k], ref["state"][pid][k]), (pid, k)


def test_keys_that_collide_after_flattening_are_refused_clearly(tmp_path):
    with pytest.raises(UnsupportedValueError, match=r"a\.b"):
        shardckpt.save({"a.b": 1, "a": {"b": 2}}, str(tmp_path / "c"))


# ---------------------------------------------------------------- Stateful


class Counter:
    """A Stateful whose state_dict() builds fresh objects, as most real ones do."""

    def __init__(self, n: int, weights: torch.Tensor) -> None:
        self.n = n
        self.weights = weights
        self.loaded_with: dict | None = None

    def state_dict(self) -> dict:
        return {"n": self.n, "weights": self.weights.clone(), "history": (self.n, self.n * 2)}

    def load_state_dict(self, sd: dict) -> None:
        self.loaded_with = sd
        self.n = sd["n"]
        self.weights = sd["weights"].clone()


def test_stateful_objects_round_trip(tmp_path):
    shardckpt.save({"counter": Counter(5, torch.arange(3.0)), "step": 11}, str(tmp_path / "c"))
    fresh = Counter(0, torch.zeros(3))
    target = {"counter": fresh, "step": 0}
    shardckpt.load(target, str(tmp_path / "c"))
    assert target["counter"] is fresh
    assert fresh.n == 5
    assert torch.equal(fresh.weights, torch.arange(3.0))
    assert fresh.loaded_with is not None and fresh.loaded_with["history"] == (5, 10)
    assert target["step"] == 11


# ---------------------------------------------------------------- URLs


def test_memory_url_round_trips():
    url = f"memory://shardckpt-tests/{uuid.uuid4().hex}/ckpt"
    try:
        shardckpt.save({"w": torch.arange(6.0).reshape(2, 3), "step": 3}, url)
        fs = fsspec.filesystem("memory")
        assert fs.isfile(url.removeprefix("memory://") + "/manifest.json")
        target = {"w": torch.zeros(2, 3), "step": 0}
        shardckpt.load(target, url)
        assert torch.equal(target["w"], torch.arange(6.0).reshape(2, 3)) and target["step"] == 3
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://").rsplit("/", 1)[0], recursive=True)


def test_file_url_round_trips_into_the_plain_folder(tmp_path):
    url = f"file://{tmp_path}/ckpt"
    shardckpt.save({"w": torch.arange(4, dtype=torch.int32)}, url)
    assert (tmp_path / "ckpt" / "manifest.json").is_file()
    target = {"w": torch.zeros(4, dtype=torch.int32)}
    shardckpt.load(target, str(tmp_path / "ckpt"))
    assert target["w"].tolist() == [0, 1, 2, 3]
    target = {"w": torch.zeros(4, dtype=torch.int32)}
    shardckpt.load(target, url)
    assert target["w"].tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------- target mismatches


def test_strict_load_lists_missing_and_unexpected_keys_and_reads_nothing(tmp_path):
    shardckpt.save({"a": torch.ones(2), "saved_only": torch.ones(1), "v": 1}, str(tmp_path / "c"))
    target = {"a": torch.zeros(2), "target_only": torch.zeros(1), "v": 0}
    with pytest.raises(StateDictMismatchError) as info:
        shardckpt.load(target, str(tmp_path / "c"))
    text = str(info.value)
    assert "missing from the checkpoint: 'target_only'" in text
    assert "not in the state_dict: 'saved_only'" in text
    assert "strict=False" in text
    assert target["a"].tolist() == [0.0, 0.0] and target["v"] == 0


def test_non_strict_load_fills_the_intersection_only(tmp_path):
    shardckpt.save({"a": torch.ones(2), "saved_only": torch.ones(1), "v": 1}, str(tmp_path / "c"))
    target = {"a": torch.zeros(2), "target_only": torch.full((1,), 3.0), "v": 0}
    shardckpt.load(target, str(tmp_path / "c"), strict=False)
    assert target["a"].tolist() == [1.0, 1.0]
    assert target["target_only"].tolist() == [3.0]
    assert target["v"] == 1
    assert "saved_only" not in target


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    shardckpt.save({"enc": {"w": torch.ones(2, 3)}}, str(tmp_path / "c"))
    with pytest.raises(StateDictMismatchError) as info:
        shardckpt.load({"enc": {"w": torch.zeros(3, 2)}}, str(tmp_path / "c"), strict=False)
    text = str(info.value)
    assert "'enc.w'" in text and "[2, 3]" in text and "[3, 2]" in text


def test_dtype_mismatch_names_key_and_both_dtypes(tmp_path):
    shardckpt.save({"w": torch.ones(2, dtype=torch.bfloat16)}, str(tmp_path / "c"))
    with pytest.raises(StateDictMismatchError) as info:
        shardckpt.load({"w": torch.zeros(2, dtype=torch.float32)}, str(tmp_path / "c"))
    text = str(info.value)
    assert "'w'" in text and "bfloat16" in text and "float32" in text


def test_tensor_saved_but_value_in_target_is_a_mismatch(tmp_path):
    shardckpt.save({"w": torch.ones(2)}, str(tmp_path / "c"))
    with pytest.raises(StateDictMismatchError, match="'w': saved as a tensor"):
        shardckpt.load({"w": 0}, str(tmp_path / "c"))


def test_loading_into_views_writes_through_to_the_shared_storage(tmp_path):
    src = {
        "a": torch.arange(12.0).reshape(3, 4),
        "b": torch.arange(100.0, 104.0).reshape(2, 2),
        "c": torch.arange(6.0).reshape(2, 3),
    }
    shardckpt.save(src, str(tmp_path / "c"))
    base = torch.zeros(5, 6)
    other = torch.zeros(3, 2)
    target = {"a": base[:3, 1:5], "b": base[3:5, 0:2], "c": other.t()}
    assert not any(t.is_contiguous() for t in target.values())
    shardckpt.load(target, str(tmp_path / "c"))
    expected = torch.zeros(5, 6)
    expected[:3, 1:5] = src["a"]
    expected[3:5, 0:2] = src["b"]
    assert torch.equal(base, expected)
    assert torch.equal(other, src["c"].t())


def test_loading_into_two_views_of_one_storage(tmp_path):
    shardckpt.save({"x": torch.tensor([1.0, 2.0, 3.0]), "y": torch.tensor([4.0, 5.0, 6.0])}, str(tmp_path / "c"))
    base = torch.zeros(2, 3)
    shardckpt.load({"x": base[0], "y": base[1]}, str(tmp_path / "c"))
    assert base.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]


def test_strided_view_with_step_as_target(tmp_path):
    shardckpt.save({"w": torch.arange(1.0, 5.0)}, str(tmp_path / "c"))
    base = torch.zeros(8)
    shardckpt.load({"w": base[::2]}, str(tmp_path / "c"))
    assert base.tolist() == [1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0]


# ---------------------------------------------------------------- existing / missing checkpoints


def test_save_onto_committed_checkpoint_is_refused_and_old_one_survives(tmp_path):
    folder = str(tmp_path / "c")
    shardckpt.save({"w": torch.ones(3)}, folder)
    before = data_files(folder)
    with pytest.raises(CheckpointExistsError) as info:
        shardckpt.save({"w": torch.full((3,), 2.0)}, folder)
    assert isinstance(info.value, FileExistsError)
    assert "overwrite=True" in str(info.value)
    assert data_files(folder) == before
    target = {"w": torch.zeros(3)}
    shardckpt.load(target, folder)
    assert target["w"].tolist() == [1.0, 1.0, 1.0]


def test_overwrite_replaces_and_removes_old_data_files(tmp_path):
    folder = str(tmp_path / "c")
    shardckpt.save({"w": torch.ones(3), "old_only": torch.ones(1)}, folder, num_io_threads=2)
    old = set(data_files(folder))
    assert len(old) == 2
    manifest = shardckpt.save({"w": torch.full((3,), 2.0)}, folder, overwrite=True)
    new = set(data_files(folder))
    assert new.isdisjoint(old)
    assert {f"data/{n}" for n in new} == set(manifest.files)
    target = {"w": torch.zeros(3)}
    shardckpt.load(target, folder)
    assert target["w"].tolist() == [2.0, 2.0, 2.0]


def test_missing_path_is_checkpoint_not_found(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as info:
        shardckpt.load({"w": torch.zeros(1)}, str(tmp_path / "nowhere"))
    assert isinstance(info.value, FileNotFoundError)
    assert not isinstance(info.value, NotCommittedError)
    assert "does not exist" in str(info.value)


def test_folder_without_manifest_is_not_committed(tmp_path):
    folder = tmp_path / "c"
    shardckpt.save({"w": torch.ones(1)}, str(folder))
    os.unlink(folder / "manifest.json")
    with pytest.raises(NotCommittedError) as info:
        shardckpt.load({"w": torch.zeros(1)}, str(folder))
    assert isinstance(info.value, CheckpointNotFoundError)
    assert "interrupted" in str(info.value)


# ---------------------------------------------------------------- integrity


def _flip_byte(folder, key: str, element: int, dtype_size: int = 4) -> str:
    m = json.loads((folder / "manifest.json").read_text())
    chunk = m["tensors"][key]["chunks"][0]
    path = folder / chunk["file"]
    raw = bytearray(path.read_bytes())
    raw[chunk["byte_offset"] + element * dtype_size + 1] ^= 0x40
    path.write_bytes(bytes(raw))
    return chunk["file"]


def test_verify_detects_a_flipped_byte_and_names_file_and_key(tmp_path):
    folder = tmp_path / "c"
    shardckpt.save({"w": torch.arange(100.0), "other": torch.ones(3)}, str(folder))
    name = _flip_byte(folder, "w", element=37)
    with pytest.raises(IntegrityError) as info:
        shardckpt.load({"w": torch.zeros(100), "other": torch.zeros(3)}, str(folder))
    text = str(info.value)
    assert name in text and "'w'" in text and "checksum mismatch" in text


def test_verify_false_skips_the_check(tmp_path):
    folder = tmp_path / "c"
    shardckpt.save({"w": torch.arange(100.0)}, str(folder))
    _flip_byte(folder, "w", element=37)
    target = {"w": torch.zeros(100)}
    shardckpt.load(target, str(folder), verify=False)
    differs = (target["w"] != torch.arange(100.0)).nonzero().flatten().tolist()
    assert differs == [37]


# ---------------------------------------------------------------- partial reads through the Reader


class CountingStorage(LocalStorage):
    """LocalStorage that records every ranged read."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.reads: list[tuple[str, int, int]] = []

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        self.reads.append((name, offset, len(out)))
        super().read_into(name, offset, out)


class _BoxPlanner:
    """The two planner calls Reader.read_data makes for tensors: where to put a box, and done."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target
        self.committed: list[ReadItem] = []

    def resolve_tensor(self, item: ReadItem) -> torch.Tensor:
        return self.target

    def commit_tensor(self, item: ReadItem, tensor: torch.Tensor) -> None:
        self.committed.append(item)


def _read_rows(
    folder: str, first_row: int, num_rows: int, *, verify: bool
) -> tuple[torch.Tensor, CountingStorage, Reader]:
    storage = CountingStorage(folder)
    reader = Reader(storage, read_manifest(storage), verify=verify, num_io_threads=1)
    target = torch.zeros(num_rows, 64)
    item = ReadItem(
        type=LoadItemType.TENSOR,
        dest_index=MetadataIndex("w", torch.Size([first_row, 0])),
        dest_offsets=torch.Size([0, 0]),
        storage_index=MetadataIndex("w", torch.Size([0, 0])),
        storage_offsets=torch.Size([first_row, 0]),
        lengths=torch.Size([num_rows, 64]),
    )
    planner = _BoxPlanner(target)
    reader.read_data(LoadPlan([item]), planner).wait()
    assert planner.committed == [item]
    return target, storage, reader


@pytest.fixture
def rows_checkpoint(tmp_path) -> tuple[str, torch.Tensor]:
    src = torch.randn(1024, 64, generator=torch.Generator().manual_seed(3))
    folder = str(tmp_path / "c")
    shardckpt.save({"w": src}, folder, hash_block_bytes=4096)
    return folder, src


@pytest.mark.parametrize("verify", [True, False])
def test_block_aligned_partial_read_fetches_only_those_rows(rows_checkpoint, verify):
    folder, src = rows_checkpoint
    target, storage, reader = _read_rows(folder, 512, 256, verify=verify)
    assert torch.equal(target, src[512:768])
    chunk_offset = read_manifest(storage).tensors["w"].chunks[0].byte_offset
    assert [(o - chunk_offset, n) for _, o, n in storage.reads] == [(512 * 256, 256 * 256)]
    assert reader.bytes_read == 256 * 256


def test_unaligned_partial_read_without_verify_reads_exactly_the_rows(rows_checkpoint):
    folder, src = rows_checkpoint
    target, storage, _ = _read_rows(folder, 500, 10, verify=False)
    assert torch.equal(target, src[500:510])
    chunk_offset = read_manifest(storage).tensors["w"].chunks[0].byte_offset
    assert [(o - chunk_offset, n) for _, o, n in storage.reads] == [(500 * 256, 10 * 256)]


def test_unaligned_partial_read_with_verify_rounds_out_to_whole_blocks(rows_checkpoint):
    folder, src = rows_checkpoint
    target, storage, _ = _read_rows(folder, 500, 10, verify=True)
    assert torch.equal(target, src[500:510])
    chunk_offset = read_manifest(storage).tensors["w"].chunks[0].byte_offset
    # rows 500..509 are bytes 128000..130560 of the chunk: all inside block 31.
    assert [(o - chunk_offset, n) for _, o, n in storage.reads] == [(31 * 4096, 4096)]


def test_partial_read_verifies_only_the_blocks_it_reads(rows_checkpoint):
    folder, src = rows_checkpoint
    _flip_byte(Path(folder), "w", element=0)  # row 0, block 0
    target, _, _ = _read_rows(folder, 512, 256, verify=True)
    assert torch.equal(target, src[512:768])
    _flip_byte(Path(folder), "w", element=600 * 64)  # row 600, inside the range read
    with pytest.raises(IntegrityError, match=r"block 37\b"):
        _read_rows(folder, 512, 256, verify=True)


def test_entry_names_never_collide_in_a_data_file(tmp_path):
    """Keys with '@' or named __metadata__ get an offsets suffix, so safetensors reads every entry."""
    from safetensors import safe_open

    sd = {"x@0": torch.ones(2), "x": torch.zeros(3), "__metadata__": torch.full((2, 2), 7.0)}
    folder = tmp_path / "c"
    shardckpt.save(sd, str(folder), num_io_threads=1)
    (data,) = (folder / "data").iterdir()
    with safe_open(str(data), "pt") as f:
        names = set(f.keys())
        assert names == {"x@0@0", "x", "__metadata__@0,0"}
        assert torch.equal(f.get_tensor("x@0@0"), torch.ones(2))
        assert torch.equal(f.get_tensor("__metadata__@0,0"), torch.full((2, 2), 7.0))
