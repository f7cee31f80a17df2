"""The public DCP drop-in (``shardckpt.dcp``) on one process, and the two defects it fixed:
the engine Writer under DCP's DefaultSavePlanner, the engine Reader built from a path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.api import CheckpointException

import shardckpt
from shardckpt.dcp import StorageReader, StorageWriter
from shardckpt.engine.planner import LoadPlanner, SavePlanner
from shardckpt.engine.writer import Writer, WriterOptions
from shardckpt.errors import CheckpointExistsError, DestinationNotEmptyError, IntegrityError, UnsupportedValueError
from shardckpt.storage import open_storage


def _state() -> dict:
    return {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "step": 7,
        "name": "run-a",
        "opt": {"lr": 0.5, "betas": (0.9, 0.95), "groups": [1, [2, 3]], "nan": float("nan")},
    }


def _target() -> dict:
    return {"w": torch.zeros(3, 4), "step": 0, "name": "", "opt": {"lr": 0.0, "betas": None, "groups": [], "nan": 0.0}}


def _check(target: dict) -> None:
    assert torch.equal(target["w"], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert target["step"] == 7 and target["name"] == "run-a"
    assert target["opt"]["lr"] == 0.5 and target["opt"]["betas"] == (0.9, 0.95)
    assert target["opt"]["groups"] == [1, [2, 3]]
    assert target["opt"]["nan"] != target["opt"]["nan"]  # NaN came back as NaN


def _failure(e: CheckpointException) -> BaseException:
    """The error DCP gathered from the (single) rank."""
    ((err, _stack),) = e.failures.values()
    return err


def test_engine_writer_with_default_planner_saves_values_as_json(tmp_path):
    """Defect: DefaultSavePlanner hands values as torch.save pickles, which the Writer
    took for JSON (UnicodeDecodeError in build_manifest after every data file was written)."""
    writer = Writer(open_storage(str(tmp_path / "c")), WriterOptions())
    dcp.save(_state(), storage_writer=writer, planner=DefaultSavePlanner(), no_dist=True)
    assert writer.manifest is not None and writer.manifest.values["step"] == 7
    target = _target()
    shardckpt.load(target, str(tmp_path / "c"))
    _check(target)


def test_engine_writer_refuses_unencodable_value_before_writing_data(tmp_path):
    writer = Writer(open_storage(str(tmp_path / "c")), WriterOptions())
    with pytest.raises(CheckpointException) as info:
        dcp.save(
            {"w": torch.ones(4), "bad": object()}, storage_writer=writer, planner=DefaultSavePlanner(), no_dist=True
        )
    err = _failure(info.value)
    assert isinstance(err, UnsupportedValueError) and "'bad'" in str(err) and "object" in str(err)
    assert not (tmp_path / "c" / "data").exists() or not os.listdir(tmp_path / "c" / "data")


@pytest.mark.parametrize("planners", ["dcp", "ours"])
def test_save_load_roundtrip_through_public_writer_and_reader(tmp_path, planners):
    save_planner = DefaultSavePlanner() if planners == "dcp" else SavePlanner()
    load_planner = DefaultLoadPlanner() if planners == "dcp" else LoadPlanner(allow_partial_load=False)
    path = str(tmp_path / "c")
    dcp.save(_state(), storage_writer=StorageWriter(path), planner=save_planner)
    m = shardckpt.read_manifest(path)
    assert set(m.tensors) == {"w"} and m.values["name"] == "run-a"
    target = _target()
    dcp.load(target, storage_reader=StorageReader(path), planner=load_planner)
    _check(target)
    target = _target()
    shardckpt.load(target, path)  # and the other way round
    _check(target)


def test_shardckpt_save_loads_through_dcp_load(tmp_path):
    path = tmp_path / "c"
    shardckpt.save(_state(), path)
    target = _target()
    dcp.load(target, storage_reader=StorageReader(path))
    _check(target)


def test_default_load_planner_never_unpickles(tmp_path, monkeypatch):
    path = str(tmp_path / "c")
    dcp.save(_state(), storage_writer=StorageWriter(path))

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load called on the load path")

    monkeypatch.setattr(torch, "load", no_torch_load)
    target = _target()
    dcp.load(target, storage_reader=StorageReader(path))
    _check(target)


def test_checkpoint_id_form(tmp_path):
    path = str(tmp_path / "c")
    dcp.save(_state(), checkpoint_id=path, storage_writer=StorageWriter())
    target = _target()
    dcp.load(target, checkpoint_id=path, storage_reader=StorageReader())
    _check(target)
    assert StorageWriter.validate_checkpoint_id(tmp_path) and not StorageWriter.validate_checkpoint_id(3)
    # A checkpoint_id given to dcp.save wins over the constructor's path.
    dcp.save(_state(), checkpoint_id=tmp_path / "b", storage_writer=StorageWriter(tmp_path / "a"))
    assert shardckpt.read_manifest(tmp_path / "b").values["step"] == 7 and not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="metadata must be plain JSON"):
        StorageWriter(metadata={"when": object()})


def test_writer_without_path_says_how_to_give_one():
    with pytest.raises(CheckpointException) as info:
        dcp.save(_state(), storage_writer=StorageWriter())
    assert "checkpoint_id" in str(_failure(info.value))


def test_unencodable_value_refused_before_any_byte(tmp_path):
    class Opaque:
        pass

    path = tmp_path / "c"
    with pytest.raises(CheckpointException) as info:
        dcp.save({"w": torch.ones(3), "cfg": {"obj": Opaque()}}, storage_writer=StorageWriter(path))
    err = _failure(info.value)
    assert isinstance(err, UnsupportedValueError)
    assert "'cfg.obj'" in str(err) and "Opaque" in str(err)
    assert not path.exists() or os.listdir(path) == []  # nothing left: no data, no marker


def test_unstorable_dtype_refused_before_the_folder_is_claimed(tmp_path):
    path = tmp_path / "c"
    with pytest.raises(CheckpointException) as info:
        dcp.save({"z": torch.ones(3, dtype=torch.complex64)}, storage_writer=StorageWriter(path))
    err = _failure(info.value)
    assert isinstance(err, UnsupportedValueError) and "'z'" in str(err) and "view_as_real" in str(err)
    assert not path.exists()


def test_overwrite_and_foreign_folder(tmp_path):
    path = tmp_path / "c"
    dcp.save(_state(), storage_writer=StorageWriter(path))
    with pytest.raises(CheckpointException) as info:
        dcp.save(_state(), storage_writer=StorageWriter(path))
    assert isinstance(_failure(info.value), CheckpointExistsError)
    new = _state() | {"step": 8}
    dcp.save(new, storage_writer=StorageWriter(path, overwrite=True))
    assert shardckpt.read_manifest(path).values["step"] == 8
    assert len(os.listdir(path / "data")) == len(shardckpt.read_manifest(path).files)  # old files removed
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointException) as info:
        dcp.save(_state(), storage_writer=StorageWriter(tmp_path / "mine", overwrite=True))
    assert isinstance(_failure(info.value), DestinationNotEmptyError)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_reader_verifies_checksums(tmp_path):
    path = tmp_path / "c"
    dcp.save({"w": torch.ones(64)}, storage_writer=StorageWriter(path))
    (name,) = shardckpt.read_manifest(path).files
    data = bytearray((path / name).read_bytes())
    data[-1] ^= 0xFF
    (path / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(64)}, storage_reader=StorageReader(path))
    assert isinstance(_failure(info.value), IntegrityError)
    target = {"w": torch.zeros(64)}
    dcp.load(target, storage_reader=StorageReader(path, verify=False))
    assert target["w"][0] == 1.0


def test_options_and_fsspec_url():
    url = "memory://shardckpt-dcp-test/c"
    writer = StorageWriter(url, num_io_threads=3, metadata={"step": 1}, storage_options={})
    dcp.save({"w": torch.arange(10.0), "k": [1, 2]}, storage_writer=writer)
    m = shardckpt.read_manifest(url)
    assert m.metadata == {"step": 1} and len(m.files) == 1  # one tensor: one file whatever the threads
    target = {"w": torch.zeros(10), "k": []}
    dcp.load(target, storage_reader=StorageReader(url, io=shardckpt.IOOptions(num_io_threads=2)))
    assert torch.equal(target["w"], torch.arange(10.0)) and target["k"] == [1, 2]
    with pytest.raises(ValueError, match="num_io_threads"):
        StorageWriter(url, num_io_threads=0)


def test_async_save_through_writer(tmp_path):
    path = tmp_path / "c"
    future = dcp.async_save(_state(), storage_writer=StorageWriter(path))
    future.result()
    target = _target()
    dcp.load(target, storage_reader=StorageReader(path))
    _check(target)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointException) as info:
        dcp.load(_target(), storage_reader=StorageReader(tmp_path / "nope"))
    # DCP turns a failed read_metadata into its own AssertionError; our message is kept.
    assert "no checkpoint at" in str(_failure(info.value)) and "nope: the path does not exist" in str(info.value)


def test_reader_json_values_are_decoded_for_overriding_planner(tmp_path):
    """A planner that overrides load_bytes gets a byte stream that we built from the
    decoded JSON (weights_only-safe), never bytes read from the checkpoint."""
    path = str(tmp_path / "c")
    dcp.save(_state(), storage_writer=StorageWriter(path))
    seen = {}

    class Custom(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            seen[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    target = _target()
    dcp.load(target, storage_reader=StorageReader(path), planner=Custom())
    assert seen["step"] == 7 and seen["opt.betas"] == (0.9, 0.95)
    assert json.dumps(seen["opt.groups"]) == "[1, [2, 3]]"


def test_the_rest_of_shardckpt_reads_what_dcp_saved(tmp_path, capsys):
    from shardckpt.cli.app import main
    from shardckpt.format import layout

    root = tmp_path / "run"
    step = root / layout.step_dir_name(100)
    dcp.save(_state(), storage_writer=StorageWriter(step, metadata={"step": 100}))
    assert main(["verify", str(step)]) == 0
    assert main(["ls", str(root)]) == 0
    assert layout.step_dir_name(100) in capsys.readouterr().out
    manager = shardckpt.CheckpointManager(root, read_only=True)
    try:
        assert manager.steps() == [100]
        target = _target()
        assert manager.restore(target) == 100
        _check(target)
    finally:
        manager.close()
    shardckpt.export_checkpoint(step, tmp_path / "w.safetensors", format="safetensors")
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], _state()["w"])


def test_interop_recipe_runs(tmp_path, monkeypatch):
    """docs/interop.md's "DCP drop-in" recipe, verbatim (test_docs.py runs only a page's first block)."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "interop.md").read_text("utf-8")
    section = page.split("## DCP drop-in\n", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/interop.md#dcp-drop-in", "exec"), {"__name__": "__main__"})
    assert shardckpt.read_manifest("runs/dcp/step_0000000200").values["step"] == 100
