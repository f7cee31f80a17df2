"""The first hour of a new user (issue #15): what a fresh clone's README leads to.

One step-naming scheme (the manager's ``step_0000000100``; a plain ``step_100`` is a
checkpoint, not a step, and says so), ``pathlib.Path`` everywhere a path is taken, a
non-zero exit for every CLI command given a missing path, a short Manifest repr, one
traceback per save error, and the timeout defaults.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

import shardckpt
from shardckpt.cli.app import main
from shardckpt.format import layout


def state(v: float) -> dict:
    return {"model": {"w": torch.full((4, 3), float(v))}, "step": int(v)}


def blank() -> dict:
    return {"model": {"w": torch.zeros(4, 3)}, "step": -1}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- 1: one step-naming scheme


def test_only_the_managers_own_spelling_is_a_step():
    assert layout.step_dir_name(100) == "step_0000000100"
    assert layout.parse_step_dir("step_0000000100") == 100
    assert layout.parse_step_dir("runs/exp1/step_0000000100/") == 100
    assert layout.parse_step_dir("step_12345678901") == 12345678901  # more than 10 digits, no padding
    # Other spellings of 100 would give step 100 a second folder: not steps.
    for name in ("step_100", "step_00000000100", "step_0100", "step_", "step_-000000001", "Step_0000000100"):
        assert layout.parse_step_dir(name) is None, name
    assert layout.looks_like_step_dir("step_100") and not layout.looks_like_step_dir("final")


def test_readme_paths_work_together(tmp_path, capsys, caplog):
    """README: save to runs/exp1/step_100, a manager on runs/exp1, then the shell section."""
    root = tmp_path / "runs" / "exp1"
    shardckpt.save(state(1), str(root / "step_100"))
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        with shardckpt.CheckpointManager(str(root)) as mgr:
            assert mgr.restore(blank()) is None  # step_100 is not one of its steps: a fresh start
            mgr.save(100, state(2))
            assert mgr.steps() == [100] and mgr.path(100) == f"{root}/step_0000000100"
    warned = [r.getMessage() for r in caplog.records if "step_100" in r.getMessage()]
    assert len(warned) == 1 and "not a step of this manager" in warned[0] and "step_0000000100" in warned[0]

    code, out, err = run(capsys, "inspect", str(root / "step_100"))
    assert code == 0 and "world_size  1" in out and err == ""
    code, out, _ = run(capsys, "verify", "--no-progress", str(root / "step_100"))
    assert code == 0 and out.startswith("OK")
    code, out, _ = run(capsys, "inspect", str(root / "step_0000000100"))
    assert code == 0

    code, out, _ = run(capsys, "ls", str(root))
    lines = out.splitlines()
    assert code == 0
    assert lines[1].split()[:2] == ["100", "committed"] and lines[1].endswith("latest")
    (other,) = [ln for ln in lines if ln.startswith("step_100 ")]
    assert "checkpoint (not a manager step)" in other
    assert f"shardckpt inspect {root}/step_100" in out and "step_0000000100" in out

    code, out, _ = run(capsys, "ls", "--json", str(root))
    doc = json.loads(out)
    assert [(s["step"], s["folder"]) for s in doc["steps"]] == [(100, "step_0000000100")]
    assert [o["folder"] for o in doc["other_checkpoints"]] == ["step_100"]
    assert doc["other_checkpoints"][0]["world_size"] == 1 and doc["latest"] == 100


def test_the_manager_never_touches_a_plain_checkpoint_in_its_root(tmp_path):
    root = tmp_path / "run"
    shardckpt.save(state(7), str(root / "step_100"))
    shardckpt.save(state(8), str(root / "final"))
    with shardckpt.CheckpointManager(str(root), keep_last=1) as mgr:
        for step in (100, 200, 300):
            mgr.save(step, state(step))
        assert mgr.steps() == [300]
    assert sorted(os.listdir(root)) == ["final", "step_0000000300", "step_100"]
    got = blank()
    shardckpt.load(got, str(root / "step_100"))
    assert got["step"] == 7
    names = [o.name for o in shardckpt.manager.list_other_checkpoints(root)]
    assert names == ["final", "step_100"]


def test_ls_of_a_folder_with_only_plain_checkpoints_says_there_are_no_steps(tmp_path, capsys):
    shardckpt.save(state(1), str(tmp_path / "step_100"))
    code, out, _ = run(capsys, "ls", str(tmp_path))
    assert code == 0
    assert (
        out.splitlines()[0]
        == f"{tmp_path}: no manager step folders (a CheckpointManager names step 100 step_0000000100)"
    )
    assert "step_100  checkpoint (not a manager step)" in out


def test_ls_of_an_empty_folder_exits_0_and_says_so(tmp_path, capsys):
    code, out, _ = run(capsys, "ls", str(tmp_path))
    assert code == 0 and out.startswith(f"{tmp_path}: no checkpoints")


def test_ls_of_a_checkpoint_points_to_inspect(tmp_path, capsys):
    shardckpt.save(state(1), str(tmp_path / "step_100"))
    code, out, err = run(capsys, "ls", str(tmp_path / "step_100"))
    assert code == 2 and out == ""
    assert err.startswith(f"shardckpt ls: error: {tmp_path}/step_100 is a checkpoint, not a CheckpointManager root")
    assert f"shardckpt inspect {tmp_path}/step_100" in err and f"shardckpt ls {tmp_path}`" in err


def test_inspect_of_a_manager_root_points_to_ls(tmp_path, capsys):
    with shardckpt.CheckpointManager(str(tmp_path)) as mgr:
        mgr.save(1, state(1))
    code, out, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and out == ""
    assert "not a checkpoint but a folder of them" in err and f"`shardckpt ls {tmp_path}`" in err
    assert "interrupted" not in err  # it is not an interrupted save


def test_inspect_of_a_users_folder_says_shardckpt_did_not_write_it(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    code, _, err = run(capsys, "inspect", str(tmp_path))
    assert code == 2 and "was not written by shardckpt (it holds 'notes.txt')" in err


# ---------------------------------------------------------------- 2: pathlib.Path wherever a path is taken


def test_every_public_entry_point_takes_a_path_object(tmp_path):
    from shardckpt.convert.audit import describe_checkpoint, verify_checkpoint

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert shardckpt.save(state(1), a).world_size == 1
    shardckpt.save(state(2), b)
    assert shardckpt.async_save(state(3), c).wait() is not None
    got = blank()
    shardckpt.load(got, c)
    assert got["step"] == 3
    assert shardckpt.read_manifest(a).tensors["model.w"].shape == (4, 3)
    assert verify_checkpoint(a).ok and describe_checkpoint(a)["num_tensors"] == 1
    assert shardckpt.read_state_dict(b)["step"] == 2
    diff = shardckpt.diff_checkpoints(a, b)
    assert (diff.a, diff.b) == (str(a), str(b)) and diff.changed == ["model.w", "step"]

    out = tmp_path / "w.safetensors"
    assert shardckpt.export_checkpoint(a, out, format="safetensors").num_tensors == 1
    assert shardckpt.export_checkpoint(a, tmp_path / "hf", format="hf").files[-1].endswith("index.json")
    assert shardckpt.export_checkpoint(a, tmp_path / "w.pt", format="torch").num_tensors == 1
    report = shardckpt.import_checkpoint(out, tmp_path / "imported")
    assert report.path == str(tmp_path / "imported")
    got = blank()
    shardckpt.load(got, tmp_path / "imported", strict=False)
    assert torch.equal(got["model"]["w"], torch.full((4, 3), 1.0))

    with shardckpt.Checkpointer() as ckpt:
        ckpt.save(state(4), tmp_path / "d")
        assert ckpt.open_storage(tmp_path / "d").exists("manifest.json")


def test_manager_and_listing_take_a_path_object(tmp_path):
    with shardckpt.CheckpointManager(tmp_path / "run", keep_last=1) as mgr:
        assert mgr.root == str(tmp_path / "run")
        mgr.save(1, state(1))
        mgr.save(2, state(2))
        assert mgr.steps() == [2] and mgr.path(2) == f"{tmp_path}/run/step_0000000002"
    assert [i.step for i in shardckpt.list_root(tmp_path / "run")] == [2]
    with shardckpt.CheckpointManager(tmp_path / "run", read_only=True) as mgr:
        got = blank()
        assert mgr.restore(got) == 2 and got["step"] == 2


def test_a_url_root_keeps_its_double_slash():
    """Never pathlib for URLs: Path('memory://x') would be 'memory:/x'."""
    with shardckpt.CheckpointManager("memory://first-hour/run/") as mgr:
        assert mgr.root == "memory://first-hour/run"
        assert mgr.path(5) == "memory://first-hour/run/step_0000000005"
        mgr.save(5, state(5))
        assert mgr.steps() == [5]


@pytest.mark.parametrize("bad", [b"runs/exp1", 3, None])
def test_a_path_that_is_not_str_or_pathlike_is_a_clear_type_error(tmp_path, bad):
    with pytest.raises(TypeError, match=r"must be a str or os\.PathLike"):
        shardckpt.save(state(1), bad)
    with pytest.raises(TypeError, match=r"must be a str or os\.PathLike"):
        shardckpt.CheckpointManager(bad)
    with pytest.raises(TypeError, match=r"must be a str or os\.PathLike"):
        shardckpt.list_root(bad)


def test_lightning_checkpoint_io_takes_a_path_object(tmp_path):
    pytest.importorskip("lightning")
    from shardckpt.integrations.lightning import ShardckptCheckpointIO

    io = ShardckptCheckpointIO()
    path = tmp_path / "epoch=0.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(3.0)}, "global_step": 7, "epoch": 0}, path)
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))
    io.remove_checkpoint(path)
    assert not path.exists()
    io.teardown()


# ---------------------------------------------------------------- 3: a missing path is exit 2, one line naming it


MISSING_PATH_CASES = [
    ["ls", "{nope}"],
    ["inspect", "{nope}"],
    ["verify", "{nope}"],
    ["export", "{nope}", "{tmp}/out.safetensors", "--format", "safetensors"],
    ["export", "{nope}", "{tmp}/hf", "--format", "hf"],
    ["import", "{nope}", "{tmp}/imported"],
    ["diff", "{nope}", "{ckpt}"],
    ["diff", "{ckpt}", "{nope}"],
    ["materialize", "{nope}", "{tmp}/copy"],
]


def test_the_missing_path_cases_cover_every_command():
    from shardckpt.cli.base import COMMANDS

    assert {argv[0] for argv in MISSING_PATH_CASES} == set(COMMANDS)


@pytest.mark.parametrize(
    "argv",
    MISSING_PATH_CASES,
    ids=lambda argv: " ".join(argv[:1] + [a.split("/")[-1] for a in argv[1:3]]),
)
def test_every_command_exits_2_on_a_missing_path(tmp_path, capsys, argv):
    ckpt = tmp_path / "ckpt"
    shardckpt.save(state(1), ckpt)
    nope = tmp_path / "runs" / "nope"
    code, out, err = run(capsys, *(a.format(nope=nope, tmp=tmp_path, ckpt=ckpt) for a in argv))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"shardckpt {argv[0]}: error: ")
    assert str(nope) in err and ("does not exist" in err or "no such file" in err)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # nothing written on the way


# ---------------------------------------------------------------- 4: timeouts chosen for humans


def test_default_timeouts_report_a_missing_rank_in_minutes_and_wait_longer_for_io():
    import inspect

    from shardckpt.engine.options import Timeouts

    assert Timeouts.of(None) == Timeouts(arrive_s=600.0, io_s=1800.0)
    assert Timeouts.of(45) == Timeouts(arrive_s=45.0, io_s=45.0)  # a number bounds every wait
    for bad in (0, -1, True, "60"):
        with pytest.raises(ValueError, match="timeout_s must be a number of seconds > 0"):
            Timeouts.of(bad)
    for fn in (shardckpt.load, shardckpt.Checkpointer.load, shardckpt.CheckpointManager):
        assert inspect.signature(fn).parameters["timeout_s"].default is None, fn
    for doc in (shardckpt.Checkpointer.save.__doc__, shardckpt.Checkpointer.load.__doc__):
        assert "default 1800 s" not in doc and "after 600 s" in doc


def test_a_lightning_strategy_takes_the_same_timeout_defaults():
    pytest.importorskip("lightning")
    from shardckpt.integrations.lightning.strategy import ShardckptOptions

    assert ShardckptOptions().timeout_s is None and ShardckptOptions(timeout_s=30).timeout_s == 30
    with pytest.raises(ValueError, match="timeout_s must be a number of seconds > 0"):
        ShardckptOptions(timeout_s=0)


# ---------------------------------------------------------------- 5: a Manifest prints as one short line


def test_manifest_repr_is_one_short_line_however_big_the_manifest():
    from shardckpt.format.manifest import ChunkRecord, FileRecord, Manifest, TensorRecord

    files = {f"data/0123456789ab-r{r:05d}-00.safetensors": FileRecord(2**28, "0" * 16, r) for r in range(4)}
    chunk = ChunkRecord((0, 0), (1024, 1024), next(iter(files)), 0, 4 * 2**20, ("0" * 16,) * 64)
    m = Manifest(
        world_size=4,
        process_layout=tuple({"rank": r, "host": "h", "local_rank": r} for r in range(4)),
        tensors={f"model.layers.{i}.w": TensorRecord("F32", (1024, 1024), (chunk,)) for i in range(20_000)},
        values={"step": 100, "lr": 0.1, "name": "x" * 10_000},
        files=files,
        hash_block_bytes=2**16,
        created_at="2025-01-02T03:04:05+00:00",
        shardckpt_version="1.0",
        torch_version="2.13.0",
        metadata={"metrics": {"loss": 0.5}, "note": "y" * 10_000},
    )
    assert repr(m) == (
        "Manifest(format_version=1, world_size=4, tensors=20000, values=3, files=4, bytes=1.0 GiB, "
        "created_at='2025-01-02T03:04:05+00:00')"
    )
    assert str(m) == repr(m)


def test_a_saved_manifest_prints_its_own_counts(tmp_path):
    m = shardckpt.save({"a": torch.zeros(256), "b": torch.zeros(3), "step": 1}, tmp_path / "c")
    assert repr(m).startswith("Manifest(format_version=1, world_size=1, tensors=2, values=1, files=")
    assert f"created_at={m.created_at!r})" in repr(m)


# ---------------------------------------------------------------- 6: one traceback per save error


def _rendered(e: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(e))


@pytest.mark.parametrize("kind", ["save", "async_save"])
def test_a_save_into_a_foreign_folder_prints_one_traceback_with_one_message(tmp_path, kind):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(shardckpt.errors.DestinationNotEmptyError) as info:
        if kind == "save":
            shardckpt.save(state(1), dest)
        else:
            shardckpt.async_save(state(1), dest).wait()
    text = _rendered(info.value)
    assert text.count("Traceback (most recent call last)") == 1, text
    assert "During handling of the above exception" not in text and "direct cause" not in text, text
    assert "torch/distributed/checkpoint" not in text, text  # no DCP internals
    assert str(info.value) == (
        f"save to {dest}: the folder already holds 1 entry that is not part of a shardckpt checkpoint "
        "('notes.txt'); shardckpt saves only into a new or empty folder, or over its own checkpoint, so it never "
        "deletes or overwrites your files. Save to a new path (one folder per checkpoint, e.g. runs/exp1/step_100) "
        "or empty this one."
    )
    # The original, with the traceback through the writer, is kept for whoever debugs shardckpt.
    original = info.value.failures[0]
    assert type(original) is type(info.value) and original is not info.value
    assert (dest / "notes.txt").read_text() == "mine" and sorted(os.listdir(dest)) == ["notes.txt"]


def test_a_corrupt_load_prints_one_traceback(tmp_path):
    path = tmp_path / "c"
    shardckpt.save({"w": torch.ones(1000)}, path, hash_block_bytes=4096)
    (data,) = (path / "data").glob("*-00.safetensors")
    raw = bytearray(data.read_bytes())
    raw[-10] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(shardckpt.IntegrityError) as info:
        shardckpt.load({"w": torch.zeros(1000)}, path)
    text = _rendered(info.value)
    assert text.count("Traceback (most recent call last)") == 1 and "torch/distributed/checkpoint" not in text, text
    assert str(info.value).startswith(f"{path} (rank 0): file 'data/") and "checksum mismatch" in str(info.value)


def test_a_storage_errors_oserror_stays_its_cause(tmp_path):
    """The errno and file of a failing disk tell something new: kept as __cause__."""
    import errno

    from shardckpt.storage.local import LocalStorage

    class Full(LocalStorage):
        def create_exclusive(self, name, data):
            raise OSError(errno.ENOSPC, "No space left on device", f"{self.root}/{name}")

    with shardckpt.Checkpointer(storage_factory=lambda url, options=None: Full(url)) as ckpt:
        with pytest.raises(shardckpt.StorageError) as info:
            ckpt.save(state(1), tmp_path / "c")
    err = info.value
    assert err.errno == errno.ENOSPC and str(err).startswith(f"save to {tmp_path}/c failed: OSError: [Errno 28]")
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC
    assert "During handling of the above exception" not in _rendered(err)


# ---------------------------------------------------------------- 7: sparse tensors, refused by name


@pytest.mark.parametrize("kind", ["save", "async_save", "load"])
def test_a_sparse_tensor_is_refused_with_the_fix_not_a_memory_format_riddle(tmp_path, kind):
    path = tmp_path / "c"
    with pytest.raises(shardckpt.UnsupportedValueError) as info:
        if kind == "save":
            shardckpt.save({"s": torch.eye(3).to_sparse()}, path)
        elif kind == "async_save":
            shardckpt.async_save({"s": torch.eye(3).to_sparse()}, path).wait()
        else:
            shardckpt.save({"s": torch.eye(3)}, path)
            shardckpt.load({"s": torch.eye(3).to_sparse()}, path)
    msg = str(info.value)
    assert msg.startswith("key 's': ") and "sparse_coo tensor" in msg and ".to_dense()" in msg, msg
    assert "memory format" not in msg
    assert os.path.exists(path / "manifest.json") == (kind == "load")  # a refused save commits nothing


# ---------------------------------------------------------------- 8: the README's Lightning import


def test_the_readme_lightning_import_works():
    pytest.importorskip("lightning")
    import shardckpt.integrations.lightning as lightning_integration

    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    line = "from shardckpt.integrations.lightning import ShardckptFSDPStrategy"
    assert line in readme
    for name in ("ShardckptFSDPStrategy", "ShardckptModelParallelStrategy", "ShardckptCheckpointIO"):
        assert name in readme and hasattr(lightning_integration, name), name
    assert "lightning_strategy" not in readme
