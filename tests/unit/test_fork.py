"""A forked child never hangs on what its parent's Checkpointer left behind.

``fork()`` copies a process's memory but only the calling thread: a Checkpointer's idle
writer threads, its pending async save's thread and its gloo groups do not exist in the
child. Before this was handled, ``shardckpt.save`` in a child forked after one save in
the parent waited forever for writer threads that were not there. Now the default
Checkpointer is per process, and a Checkpointer used in a fork of the process that
created it refuses at once, saying what to do; its ``close()`` there returns at once.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt import Checkpointer
from shardckpt.errors import ShardckptError
from shardckpt.storage import LocalStorage

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

CHILD_TIMEOUT_S = 30


def _state() -> dict[str, torch.Tensor]:
    # several data files, so that a save runs on its writer threads
    return {f"w{i}": torch.arange(i, i + 200_000, dtype=torch.float32) for i in range(8)}


def _in_child(body: Callable[[], str], report: Path) -> None:
    """Run ``body`` in a forked child, which writes its result (or its traceback) to
    ``report``; fail if the child does not end within CHILD_TIMEOUT_S (it hung)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            torch.set_num_threads(1)  # an OpenMP pool does not survive fork() either (not ours to test)
            report.write_text(body())
        except BaseException:  # noqa: BLE001 - reported to the parent
            report.write_text("child raised:\n" + traceback.format_exc())
            code = 1
        os._exit(code)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    said = report.read_text() if report.exists() else ""
    pytest.fail(f"the forked child hung for {CHILD_TIMEOUT_S} s (report: {said!r})")


def test_default_save_and_load_in_a_child_forked_after_a_save(tmp_path):
    state = _state()
    shardckpt.save(state, tmp_path / "parent")  # starts the default Checkpointer's writer threads

    def child() -> str:
        shardckpt.save(state, tmp_path / "child")
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        shardckpt.load(target, tmp_path / "child")
        return "ok" if all(torch.equal(target[k], v) for k, v in state.items()) else "loaded other values"

    _in_child(child, tmp_path / "report")
    assert (tmp_path / "report").read_text() == "ok"
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    shardckpt.load(target, tmp_path / "child")  # the child's checkpoint, committed
    assert all(torch.equal(target[k], v) for k, v in state.items())
    shardckpt.save(state, tmp_path / "parent_again")  # the parent's default still works


def test_a_checkpointer_used_in_a_forked_child_refuses_clearly(tmp_path):
    state = _state()
    with Checkpointer() as ckpt:
        ckpt.save(state, tmp_path / "parent")

        def child() -> str:
            answers = []
            for name, call in [
                ("save", lambda: ckpt.save(state, tmp_path / "child")),
                ("async_save", lambda: ckpt.async_save(state, tmp_path / "child_async")),
                ("load", lambda: ckpt.load({k: torch.zeros_like(v) for k, v in state.items()}, tmp_path / "parent")),
                ("wait", ckpt.wait),
            ]:
                try:
                    call()
                    answers.append(f"{name}: no error")
                except ShardckptError as e:
                    answers.append(f"{name}: {e}")
            ckpt.close()  # returns at once: nothing of the parent's is waited for or destroyed
            return "\n".join(answers)

        _in_child(child, tmp_path / "report")
        answers = (tmp_path / "report").read_text().splitlines()
        assert [a.split(":")[0] for a in answers] == ["save", "async_save", "load", "wait"], answers
        for a in answers:
            assert f"created in process {os.getpid()}" in a and "a fork of it" in a, a
            assert "create a Checkpointer in this process" in a, a
        assert not (tmp_path / "child").exists() and not (tmp_path / "child_async").exists()
        ckpt.save(state, tmp_path / "parent_again")  # the parent's Checkpointer is untouched
    assert (tmp_path / "parent_again" / "manifest.json").exists()


class _GatedStorage(LocalStorage):
    """Local storage whose data-file writes wait for ``gate``: keeps an async save pending."""

    def __init__(self, root: str, gate: threading.Event) -> None:
        super().__init__(root)
        self.gate = gate

    def open_write(self, name: str, **kwargs):  # type: ignore[no-untyped-def]
        self.gate.wait(CHILD_TIMEOUT_S)
        return super().open_write(name, **kwargs)


def test_a_pending_async_save_of_the_parent_is_not_waited_for_in_the_child(tmp_path):
    gate = threading.Event()
    state = _state()
    with Checkpointer(storage_factory=lambda url, options=None, *rest: _GatedStorage(url, gate)) as ckpt:
        handle = ckpt.async_save(state, tmp_path / "pending")
        assert not handle.done()

        def child() -> str:
            answers = []
            for name, call in [("handle.wait", handle.wait), ("Checkpointer.wait", ckpt.wait)]:
                try:
                    call()
                    answers.append(f"{name}: no error")
                except ShardckptError as e:
                    answers.append(f"{name}: {e}")
            ckpt.close()
            return "\n".join(answers)

        _in_child(child, tmp_path / "report")
        answers = (tmp_path / "report").read_text().splitlines()
        assert len(answers) == 2 and all("a fork of it" in a for a in answers), answers
        gate.set()
        assert ckpt.wait() is not None  # the parent's save goes on and commits
    assert (tmp_path / "pending" / "manifest.json").exists()


def test_a_manager_in_a_forked_child_neither_saves_nor_lets_go_of_the_parents_root(tmp_path):
    """The child's copy of the manager holds the parent's owner token: its close() must not
    release the parent's hold on the root (a second manager could then take it over)."""
    from shardckpt import CheckpointManager
    from shardckpt.errors import RootInUseError
    from shardckpt.format import layout

    state = _state()
    with CheckpointManager(tmp_path / "run", save_interval_steps=1) as mgr:
        mgr.save(1, state)
        owner = (tmp_path / "run" / layout.OWNER_NAME).read_bytes()

        def child() -> str:
            answers = []
            for name, call in [
                ("save", lambda: mgr.save(2, state, force=True)),
                ("restore", lambda: mgr.restore(state)),
            ]:
                try:
                    call()
                    answers.append(f"{name}: no error")
                except ShardckptError as e:
                    answers.append(f"{name}: {e}")
            mgr.close()  # must not release the parent's owner record
            return "\n".join(answers)

        _in_child(child, tmp_path / "report")
        answers = (tmp_path / "report").read_text().splitlines()
        assert [a.split(":")[0] for a in answers] == ["save", "restore"], answers
        assert all("a fork of it" in a for a in answers), answers
        assert (tmp_path / "run" / layout.OWNER_NAME).read_bytes() == owner  # still the parent's
        with pytest.raises(RootInUseError):
            CheckpointManager(tmp_path / "run")  # so nobody else may take the root
        assert mgr.steps() == [1]  # the child saved nothing
        mgr.save(3, state)
        assert mgr.steps() == [1, 3]
