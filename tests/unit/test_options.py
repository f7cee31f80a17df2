"""Typed options: IOOptions (Checkpointer, per call, manager), SaveRequest/persist,
RetentionPolicy and SaveSchedule given to the manager, and the shortcuts beside them."""

from __future__ import annotations

import functools
import subprocess
import sys
import threading
import uuid
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt import (
    Checkpointer,
    CheckpointManager,
    IOOptions,
    RetentionPolicy,
    RetryPolicy,
    SaveSchedule,
    TransferOptions,
)
from shardckpt.engine.saving import SaveRequest, persist, writer_options
from shardckpt.storage import Storage, open_storage

SMALL = TransferOptions(part_bytes=5 * 2**20, single_put_bytes=5 * 2**20, max_concurrency=3)
PATIENT = TransferOptions(retry=RetryPolicy(max_attempts=3, max_total_s=5.0))


class RecordingFactory:
    """A storage factory that opens real storage and records every call's arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any] | None, TransferOptions | None]] = []

    def __call__(self, url: str, storage_options: dict[str, Any] | None = None, *transfer: TransferOptions) -> Storage:
        self.calls.append((url, storage_options, transfer[0] if transfer else None))
        return open_storage(url, storage_options, *transfer)

    def transfers(self) -> set[TransferOptions | None]:
        return {t for _, _, t in self.calls}


def _memory_url(name: str) -> str:
    return f"memory://shardckpt-options-{uuid.uuid4().hex[:8]}/{name}"


def _state(n: int = 8) -> dict[str, Any]:
    return {f"t{i}": torch.full((256,), float(i)) for i in range(n)}


# ---------------------------------------------------------------- IOOptions


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_io_threads": 0}, ValueError, r"num_io_threads must be an int in \[1, 256\], got 0"),
        ({"num_io_threads": 257}, ValueError, "got 257"),
        ({"num_io_threads": True}, ValueError, "got True"),
        ({"num_io_threads": 2.0}, ValueError, "got 2.0"),
        ({"hash_block_bytes": 2048}, ValueError, r"multiple of 64 in \[4096, 2\*\*30\], got 2048"),
        ({"hash_block_bytes": 4096 + 32}, ValueError, "got 4128"),
        ({"hash_block_bytes": 2**31}, ValueError, "got 2147483648"),
        (
            {"transfer": {"part_bytes": 2**24}},
            TypeError,
            "transfer must be a shardckpt.TransferOptions or None, got dict",
        ),
    ],
)
def test_io_options_reject_bad_values_when_created(kwargs, error, message):
    with pytest.raises(error, match=message):
        IOOptions(**kwargs)


def test_io_options_defaults_and_shortcuts():
    io = IOOptions(num_io_threads=3, hash_block_bytes=8192, transfer=SMALL)
    assert IOOptions().save_threads("runs/x") == 4 and IOOptions().save_threads("s3://b/x") == 8
    assert IOOptions().load_threads() == 4 and io.load_threads() == 3 and io.save_threads("s3://b/x") == 3
    assert io.with_shortcuts() is io  # nothing given: the same options
    assert io.with_shortcuts(num_io_threads=5) == IOOptions(num_io_threads=5, hash_block_bytes=8192, transfer=SMALL)
    assert io.with_shortcuts(hash_block_bytes=4096).num_io_threads == 3
    with pytest.raises(ValueError, match="num_io_threads"):
        io.with_shortcuts(num_io_threads=0)  # a shortcut is validated like the field
    assert io.transfer_for("file:///tmp/x") is None and io.transfer_for("memory://x") is SMALL
    with pytest.raises(AttributeError):
        io.num_io_threads = 4  # type: ignore[misc]  # frozen


def test_checkpointer_io_is_the_default_and_shortcuts_override_it(tmp_path):
    with Checkpointer(io=IOOptions(num_io_threads=3, hash_block_bytes=8192)) as ckpt:
        assert ckpt.io.num_io_threads == 3
        plain = ckpt.save(_state(), str(tmp_path / "a"))
        block = ckpt.save(_state(), str(tmp_path / "b"), hash_block_bytes=4096)
        threads = ckpt.save(_state(), str(tmp_path / "c"), num_io_threads=1)
        replaced = ckpt.save(_state(), str(tmp_path / "d"), io=IOOptions(num_io_threads=2))
        handle = ckpt.async_save(_state(), str(tmp_path / "e"), num_io_threads=5, hash_block_bytes=4096)
        staged = handle.wait()
    assert plain is not None and (plain.hash_block_bytes, len(plain.files)) == (8192, 3)
    assert block is not None and (block.hash_block_bytes, len(block.files)) == (4096, 3)
    assert threads is not None and (threads.hash_block_bytes, len(threads.files)) == (8192, 1)
    # io= replaces the Checkpointer's options whole: its block size is IOOptions' default
    assert replaced is not None and (replaced.hash_block_bytes, len(replaced.files)) == (8 * 2**20, 2)
    assert staged is not None and (staged.hash_block_bytes, len(staged.files)) == (4096, 5)


def test_bad_options_fail_before_anything_is_written(tmp_path):
    with Checkpointer() as ckpt:
        with pytest.raises(TypeError, match=r"unexpected keyword arguments \['overwite'\]"):
            ckpt.save(_state(), str(tmp_path / "a"), overwite=True)  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="hash_block_bytes"):
            ckpt.async_save(_state(), str(tmp_path / "b"), hash_block_bytes=1000)
        with pytest.raises(ValueError, match="timeout_s must be a number of seconds > 0, got 0"):
            ckpt.save(_state(), str(tmp_path / "c"), timeout_s=0)
        with pytest.raises(TypeError, match=r"io must be a shardckpt\.IOOptions"):
            ckpt.save(_state(), str(tmp_path / "d"), io={"num_io_threads": 2})  # type: ignore[typeddict-item]
        with pytest.raises(ValueError, match="num_io_threads"):
            ckpt.load({}, str(tmp_path / "e"), num_io_threads=300)
    assert not any(tmp_path.iterdir())
    with pytest.raises(TypeError, match=r"io must be a shardckpt\.IOOptions"):
        Checkpointer(io=4)  # type: ignore[arg-type]


# ---------------------------------------------------------------- transfer and retry reach the storage


def test_transfer_reaches_the_storage_of_saves_and_loads():
    factory = RecordingFactory()
    url = _memory_url("step_1")
    with Checkpointer(io=IOOptions(transfer=SMALL), storage_factory=factory) as ckpt:
        ckpt.save(_state(), url)
        assert factory.transfers() == {SMALL}
        ckpt.async_save(_state(), _memory_url("step_2"), io=IOOptions(transfer=PATIENT))
        ckpt.wait()
        assert factory.calls[-1][2] is PATIENT  # a call's io replaces the Checkpointer's
        got = {k: torch.zeros(256) for k in _state()}
        ckpt.load(got, url, io=IOOptions(transfer=PATIENT), num_io_threads=2)
        assert factory.calls[-1] == (url, None, PATIENT)
        assert torch.equal(got["t7"], torch.full((256,), 7.0))
        storage = ckpt.open_storage(url)
        assert storage.transfer is SMALL  # type: ignore[attr-defined]  # FsspecStorage keeps its settings


def test_local_paths_get_no_transfer(tmp_path):
    factory = RecordingFactory()
    with Checkpointer(io=IOOptions(transfer=SMALL), storage_factory=factory) as ckpt:
        ckpt.save(_state(), str(tmp_path / "a"))  # open_storage refuses transfer for a local path
    assert factory.calls and factory.transfers() == {None}


def test_manager_passes_io_to_saves_restores_and_its_root():
    factory = RecordingFactory()
    root = _memory_url("run")
    io = IOOptions(hash_block_bytes=4096, transfer=PATIENT)
    with Checkpointer(storage_factory=factory) as ckpt:
        with CheckpointManager(root, io=io, num_io_threads=1, checkpointer=ckpt, async_save=True) as mgr:
            mgr.save(1, _state())
            mgr.wait()
            manifest = mgr.manifest(1)
            got = {k: torch.zeros(256) for k in _state()}
            assert mgr.restore(got) == 1
        assert factory.calls[0] == (root, None, PATIENT)  # the root: listing, ownership, retention
        assert factory.transfers() == {PATIENT}
        assert {url for url, _, _ in factory.calls} == {root, f"{root}/step_0000000001"}
    assert manifest.hash_block_bytes == 4096 and len(manifest.files) == 1  # num_io_threads=1 replaced io's None
    assert torch.equal(got["t3"], torch.full((256,), 3.0))


def test_manager_gives_io_to_the_checkpointer_it_creates(monkeypatch):
    factory = RecordingFactory()
    monkeypatch.setattr(shardckpt.engine.checkpointer, "open_storage", factory)
    with CheckpointManager(_memory_url("run"), io=IOOptions(transfer=SMALL)) as mgr:
        mgr.save(1, _state())
    assert len(factory.calls) >= 2 and factory.transfers() == {SMALL}


# ---------------------------------------------------------------- persist and SaveRequest


def test_persist_takes_a_request_and_opens_storage_on_the_saving_thread(tmp_path):
    path = str(tmp_path / "p")
    opened_on: list[str] = []

    def opener() -> Storage:
        opened_on.append(threading.current_thread().name)
        return open_storage(path)

    writer = writer_options(IOOptions(num_io_threads=2), path, overwrite=False, metadata={"step": 3})
    manifest = persist(_state(), SaveRequest(path, writer, open_storage=opener))
    assert manifest is not None and manifest.metadata == {"step": 3} and len(manifest.files) == 2
    assert opened_on == [threading.current_thread().name]
    with pytest.raises(ValueError, match="timeout_s"):
        SaveRequest(path, writer, open_storage=opener, timeout_s=-1)
    with pytest.raises(TypeError):
        persist(_state(), SaveRequest(path, writer, open_storage=opener), None)  # type: ignore[misc]


def test_a_bounded_async_save_whose_storage_fails_to_open_raises_instead_of_hanging(tmp_path):
    def refuse(url: str, storage_options: Any = None) -> Storage:
        raise PermissionError(f"{url}: not today")

    outcome: list[BaseException] = []

    def run() -> None:
        with Checkpointer(storage_factory=refuse) as ckpt:
            handle = ckpt.async_save(_state(), str(tmp_path / "x"), max_staging_bytes=0)
            try:
                handle.wait(30)
            except BaseException as e:  # noqa: BLE001 - recorded for the assertion below
                outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)  # a daemon: if the bug is back, it must not block exit
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "async_save never returned: the bounded source was not released"
    assert len(outcome) == 1 and isinstance(outcome[0], PermissionError)


# ---------------------------------------------------------------- manager policies


def test_manager_applies_a_given_retention_policy(tmp_path):
    policy = RetentionPolicy(keep_last=2, keep_every_n_steps=3)
    with CheckpointManager(str(tmp_path), retention=policy) as mgr:
        for step in range(1, 8):
            mgr.save(step, _state(1))
        assert mgr.retention is policy
        assert mgr.steps() == [3, 6, 7]


def test_manager_best_step_uses_the_retention_policys_monitor(tmp_path):
    policy = RetentionPolicy(keep_last=1, keep_best=1, monitor="acc", mode="max")
    with CheckpointManager(str(tmp_path), retention=policy) as mgr:
        for step, acc in ((1, 0.5), (2, 0.9), (3, 0.7), (4, 0.6)):
            mgr.save(step, _state(1), metrics={"acc": acc})
        assert mgr.steps() == [2, 4] and mgr.best_step() == 2


def test_manager_applies_a_given_save_schedule(tmp_path):
    with CheckpointManager(str(tmp_path), schedule=SaveSchedule(save_interval_steps=4)) as mgr:
        saved = [step for step in range(1, 10) if mgr.save(step, _state(1))]
        assert saved == [4, 8] and mgr.steps() == [4, 8]
        assert mgr.schedule.save_interval_s is None


def test_shortcuts_build_the_policies(tmp_path):
    with CheckpointManager(str(tmp_path), keep_last=2, mode="max", save_interval_steps=3) as mgr:
        assert mgr.retention == RetentionPolicy(keep_last=2, mode="max")
        assert mgr.schedule == SaveSchedule(save_interval_steps=3)
    with CheckpointManager(str(tmp_path)) as mgr:
        assert mgr.retention == RetentionPolicy() and mgr.schedule == SaveSchedule()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"retention": RetentionPolicy(keep_last=3), "keep_last": 3},
            r"got both retention=RetentionPolicy\(\.\.\.\) and keep_last=3; set keep_last in the RetentionPolicy",
        ),
        ({"retention": RetentionPolicy(), "mode": "max"}, "and mode='max'"),
        ({"schedule": SaveSchedule(), "save_interval_steps": 10}, r"schedule=SaveSchedule\(\.\.\.\) and save_interval"),
        ({"schedule": SaveSchedule(), "save_on_preemption": False}, "and save_on_preemption=False"),
        ({"read_only": True, "save_on_preemption": True}, "read_only=True CheckpointManager cannot save"),
        (
            {"read_only": True, "schedule": SaveSchedule(save_on_preemption=True)},
            "cannot save on preemption",
        ),
        ({"max_staging_bytes": -1}, "max_staging_bytes must be >= 0"),
        ({"num_io_threads": 0}, "num_io_threads"),
        ({"timeout_s": 0}, "timeout_s must be"),
    ],
)
def test_manager_rejects_conflicting_or_bad_options_before_touching_the_root(tmp_path, kwargs, message):
    root = tmp_path / "root"
    with pytest.raises(ValueError, match=message):
        CheckpointManager(str(root), **kwargs)
    assert not root.exists()  # nothing claimed, nothing written


def test_manager_rejects_a_policy_of_the_wrong_type(tmp_path):
    with pytest.raises(TypeError, match=r"retention must be a shardckpt\.RetentionPolicy or None, got SaveSchedule"):
        CheckpointManager(str(tmp_path), retention=SaveSchedule())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"io must be a shardckpt\.IOOptions"):
        CheckpointManager(str(tmp_path), io=TransferOptions())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"save_interval_steps": 0}, "save_interval_steps must be an int >= 1, got 0"),
        ({"save_interval_steps": 2.5}, "got 2.5"),
        ({"save_interval_s": 0}, "save_interval_s must be a number of seconds > 0, or None, got 0"),
        ({"save_interval_s": float("inf")}, "got inf"),
        ({"preemption_exit_code": 256}, r"preemption_exit_code must be an int in \[0, 255\]"),
        ({"preemption_exit_code": -1}, "got -1"),
    ],
)
def test_save_schedule_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SaveSchedule(**kwargs)


def test_save_schedule_rules():
    schedule = SaveSchedule(save_interval_steps=5, save_interval_s=60)
    assert [s for s in range(1, 12) if schedule.due_at_step(s)] == [5, 10]
    assert not schedule.due_after(59.9) and schedule.due_after(60.0)
    assert not SaveSchedule().due_after(10**9)  # no time rule
    with pytest.raises(TypeError, match="save_on_preemption must be a bool"):
        SaveSchedule(save_on_preemption="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------- public surface


def test_new_names_are_exported():
    for name in ("IOOptions", "SaveKwargs", "SaveSchedule", "TransferOptions", "RetryPolicy"):
        assert name in shardckpt.__all__, name
    assert shardckpt.IOOptions is shardckpt.engine.IOOptions
    assert shardckpt.SaveSchedule is shardckpt.manager.SaveSchedule
    assert shardckpt.TransferOptions is shardckpt.storage.TransferOptions
    assert shardckpt.RetryPolicy is shardckpt.storage.RetryPolicy


def test_io_options_without_transfer_do_not_load_the_object_store_stack():
    code = (
        "import sys, shardckpt; shardckpt.IOOptions(num_io_threads=2); "
        "print('shardckpt.storage.fsspec_storage' in sys.modules, 'botocore' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["False", "False"]


def test_save_kwargs_lists_exactly_what_save_accepts(tmp_path):
    """Every SaveKwargs key is accepted by save (a typo in the TypedDict would be refused)."""
    kwargs = shardckpt.SaveKwargs(
        process_group=None,
        overwrite=False,
        metadata={"a": 1},
        storage_options=None,
        timeout_s=60.0,
        io=IOOptions(),
        num_io_threads=1,
        hash_block_bytes=4096,
        incremental=True,
        base=None,
        format_version=None,
    )
    assert set(kwargs) == shardckpt.SaveKwargs.__optional_keys__
    manifest = functools.partial(shardckpt.save, _state(2), str(tmp_path / "k"))(**kwargs)
    assert manifest is not None and manifest.metadata == {"a": 1} and manifest.hash_block_bytes == 4096
