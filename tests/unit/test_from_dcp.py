"""The differences docs/from_dcp.md lists, pinned side by side: what DCP does on the torch
installed here, what shardckpt does instead, and the option that gives DCP's behaviour.

If a torch release changes one of DCP's behaviours, the DCP half of a test fails and the
page needs the same change. One process, no process group (DCP warns that it assumes one
process; those warnings are silenced here).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

import shardckpt
from shardckpt.errors import (
    CheckpointExistsError,
    DestinationNotEmptyError,
    ShardckptError,
    StateDictMismatchError,
    UnsupportedValueError,
)


@pytest.fixture(autouse=True)
def _quiet_dcp() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*", category=UserWarning)
        warnings.filterwarnings("ignore", message="Detected an existing checkpoint", category=UserWarning)
        yield


def test_dcp_overwrites_a_checkpoint_we_refuse_unless_overwrite(tmp_path):
    dcp.save({"w": torch.ones(2)}, checkpoint_id=tmp_path / "dcp")
    dcp.save({"w": torch.zeros(2)}, checkpoint_id=tmp_path / "dcp")
    got = {"w": torch.empty(2)}
    dcp.load(got, checkpoint_id=tmp_path / "dcp")
    assert got["w"].tolist() == [0.0, 0.0]

    shardckpt.save({"w": torch.ones(2)}, tmp_path / "ours")
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        shardckpt.save({"w": torch.zeros(2)}, tmp_path / "ours")
    shardckpt.save({"w": torch.zeros(2)}, tmp_path / "ours", overwrite=True)
    shardckpt.load(got, tmp_path / "ours")
    assert got["w"].tolist() == [0.0, 0.0]


def test_dcp_writes_next_to_foreign_files_we_refuse_the_folder(tmp_path):
    for name in ("dcp", "ours"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("keep me")
    dcp.save({"w": torch.ones(2)}, checkpoint_id=tmp_path / "dcp")
    assert sorted(os.listdir(tmp_path / "dcp")) == [".metadata", "__0_0.distcp", "notes.txt"]
    with pytest.raises(DestinationNotEmptyError):
        shardckpt.save({"w": torch.ones(2)}, tmp_path / "ours", overwrite=True)
    assert os.listdir(tmp_path / "ours") == ["notes.txt"]


def test_dcp_skips_checkpoint_keys_the_target_lacks_we_need_strict_false(tmp_path):
    saved = {"w": torch.ones(2), "extra": torch.ones(1)}
    dcp.save(saved, checkpoint_id=tmp_path / "dcp")
    got = {"w": torch.zeros(2)}
    dcp.load(got, checkpoint_id=tmp_path / "dcp")
    assert got["w"].tolist() == [1.0, 1.0]
    # ...but a target key the checkpoint lacks is an error in DCP too.
    with pytest.raises(CheckpointException, match="Missing key in checkpoint state_dict: absent"):
        dcp.load({"w": torch.zeros(2), "absent": torch.zeros(1)}, checkpoint_id=tmp_path / "dcp")

    shardckpt.save(saved, tmp_path / "ours")
    got = {"w": torch.zeros(2)}
    with pytest.raises(StateDictMismatchError, match="strict=False"):
        shardckpt.load(got, tmp_path / "ours")
    assert got["w"].tolist() == [0.0, 0.0]
    result = shardckpt.load(got, tmp_path / "ours", strict=False)
    assert got["w"].tolist() == [1.0, 1.0] and result.unexpected_keys == ["extra"]


def test_dcp_casts_any_dtype_silently_we_cast_floats_on_request_only(tmp_path):
    saved = torch.tensor([0.7, 1.2345678, -2.5])
    dcp.save({"w": saved}, checkpoint_id=tmp_path / "dcp")
    bf16, ints = {"w": torch.zeros(3, dtype=torch.bfloat16)}, {"w": torch.zeros(3, dtype=torch.int64)}
    dcp.load(bf16, checkpoint_id=tmp_path / "dcp")
    dcp.load(ints, checkpoint_id=tmp_path / "dcp")
    assert torch.equal(bf16["w"], saved.to(torch.bfloat16))
    assert ints["w"].tolist() == [0, 1, -2]  # truncated, without a word

    shardckpt.save({"w": saved}, tmp_path / "ours")
    ours = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    with pytest.raises(StateDictMismatchError, match="allow_dtype_cast=True"):
        shardckpt.load(ours, tmp_path / "ours")
    shardckpt.load(ours, tmp_path / "ours", allow_dtype_cast=True)
    assert torch.equal(ours["w"].view(torch.int16), bf16["w"].view(torch.int16))
    with pytest.raises(StateDictMismatchError, match="converts only between floating dtypes"):
        shardckpt.load({"w": torch.zeros(3, dtype=torch.int64)}, tmp_path / "ours", allow_dtype_cast=True)


def test_dcp_pickles_any_value_we_store_json_and_refuse_the_rest(tmp_path):
    dcp.save({"tags": {"a", "b"}, "dtype": torch.float16}, checkpoint_id=tmp_path / "dcp")
    got: dict[str, object] = {"tags": None, "dtype": None}
    dcp.load(got, checkpoint_id=tmp_path / "dcp")
    assert got == {"tags": {"a", "b"}, "dtype": torch.float16}
    with open(tmp_path / "dcp" / ".metadata", "rb") as f:
        assert f.read(1) == b"\x80"  # a pickle: loading it runs whatever the file says

    with pytest.raises(UnsupportedValueError, match="'tags'"):
        shardckpt.save({"tags": {"a", "b"}}, tmp_path / "ours")
    shardckpt.save({"tags": sorted({"a", "b"}), "dtype": str(torch.float16), "cfg": {"lr": 0.1}}, tmp_path / "ours")
    mine: dict[str, object] = {"tags": None, "dtype": None, "cfg": {"lr": 0.0}}
    shardckpt.load(mine, tmp_path / "ours")
    assert mine == {"tags": ["a", "b"], "dtype": "torch.float16", "cfg": {"lr": 0.1}}


def test_our_files_are_json_and_safetensors(tmp_path):
    shardckpt.save({"w": torch.arange(4.0), "step": 3}, tmp_path / "ours")
    with open(tmp_path / "ours" / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["values"]["step"] == 3
    names = {c["file"] for t in manifest["tensors"].values() for c in t["chunks"]}
    for name in names:
        with safe_open(str(tmp_path / "ours" / name), framework="pt") as sf:
            assert [sf.get_tensor(k).tolist() for k in sf.keys()] == [[0.0, 1.0, 2.0, 3.0]]


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optim = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optim.step()
    return model, optim


def _fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(3, 2)
    return model, torch.optim.Adam(model.parameters())


def test_dcp_leaves_a_fresh_optimizer_empty_we_fill_it(tmp_path):
    model, optim = _trained()
    dcp.save({"model": model, "optim": optim}, checkpoint_id=tmp_path / "dcp")
    fresh_model, fresh_optim = _fresh()
    dcp.load({"model": fresh_model, "optim": fresh_optim}, checkpoint_id=tmp_path / "dcp")
    assert torch.equal(fresh_model.weight, model.weight)
    assert dict(fresh_optim.state) == {}  # no error, no state: the first step starts Adam over

    shardckpt.save({"model": model, "optim": optim}, tmp_path / "ours")
    fresh_model, fresh_optim = _fresh()
    shardckpt.load({"model": fresh_model, "optim": fresh_optim}, tmp_path / "ours")
    assert torch.equal(fresh_optim.state[fresh_model.weight]["exp_avg"], optim.state[model.weight]["exp_avg"])


def test_dcp_errors_are_not_exceptions_ours_are(tmp_path):
    assert not issubclass(CheckpointException, Exception)  # `except Exception` misses it
    with pytest.raises(CheckpointException):
        dcp.load({"w": torch.zeros(1)}, checkpoint_id=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as info:
        shardckpt.load({"w": torch.zeros(1)}, tmp_path / "nowhere")
    assert isinstance(info.value, ShardckptError) and isinstance(info.value, Exception)
