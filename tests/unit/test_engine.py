"""Checkpointer: one engine object owning staging buffers, the pending save, groups and storage."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed import run_ranks

import shardckpt
from shardckpt import ShardckptError
from shardckpt.engine import Checkpointer, default_checkpointer
from shardckpt.storage import LocalStorage
from shardckpt.storage.base import WriteStream

pytestmark = pytest.mark.compat  # the subset .ci/torch_compat runs on other torch releases


class CountingStorage(LocalStorage):
    """Counts the files written through it (shared counter, so child storages count too)."""

    def __init__(self, root: str, counter: list[str] | None = None) -> None:
        super().__init__(root)
        self.counter: list[str] = [] if counter is None else counter

    def open_write(self, name: str) -> WriteStream:
        self.counter.append(name)
        return super().open_write(name)

    def write_atomic(self, name: str, data: bytes) -> None:
        self.counter.append(name)
        super().write_atomic(name, data)

    def create_exclusive(self, name: str, data: bytes) -> None:
        self.counter.append(name)
        super().create_exclusive(name, data)

    def child(self, name: str) -> CountingStorage:
        return CountingStorage(self._path(name), self.counter)


class GatedStorage(LocalStorage):
    """Data writes wait until ``gate`` is set: keeps a save pending as long as a test needs."""

    def __init__(self, root: str, gate: threading.Event) -> None:
        super().__init__(root)
        self.gate = gate

    def open_write(self, name: str) -> WriteStream:
        assert self.gate.wait(60), "the test never opened the gate"
        return super().open_write(name)


def _state(value: float) -> dict[str, Any]:
    return {"w": torch.full((64, 64), value), "step": int(value)}


def _loaded(path: str, ckpt: Checkpointer | None = None) -> dict[str, Any]:
    got: dict[str, Any] = {"w": torch.zeros(64, 64), "step": -1}
    (ckpt or default_checkpointer()).load(got, path)
    return got


def test_two_checkpointers_have_two_saves_pending_and_both_commit(tmp_path):
    gate = threading.Event()
    factory = lambda url, options=None: GatedStorage(url, gate)  # noqa: E731
    with Checkpointer(storage_factory=factory) as a, Checkpointer(storage_factory=factory) as b:
        sa, sb = _state(1.0), _state(2.0)
        ha = a.async_save(sa, str(tmp_path / "a" / "step_1"))
        hb = b.async_save(sb, str(tmp_path / "b" / "step_2"))
        sa["w"].zero_()  # staged: mutating the caller's state changes nothing saved
        sb["w"].zero_()
        assert not ha.done() and not hb.done()  # both in flight at once
        assert a.pending is ha and b.pending is hb
        gate.set()
        assert ha.wait(60) is not None and hb.wait(60) is not None
    for name, step, value in (("a/step_1", 1, 1.0), ("b/step_2", 2, 2.0)):
        got = _loaded(str(tmp_path / name))
        assert got["step"] == step and torch.equal(got["w"], torch.full((64, 64), value))


def test_close_frees_staging_and_is_idempotent(tmp_path):
    ckpt = Checkpointer()
    ckpt.async_save(_state(3.0), str(tmp_path / "c"))
    assert ckpt.staging_stats()["staged_bytes"] == 64 * 64 * 4
    ckpt.close()  # waits for the save first
    assert ckpt.pending is None and ckpt.closed
    assert ckpt.staging_stats()["staged_bytes"] == 0
    ckpt.close()
    assert ckpt.wait() is None
    assert _loaded(str(tmp_path / "c"))["step"] == 3


def test_close_frees_a_bounded_saves_arena(tmp_path):
    ckpt = Checkpointer()
    sd = {f"t{i}": torch.zeros(2**18) for i in range(4)}  # 4 MiB
    ckpt.async_save(sd, str(tmp_path / "b"), max_staging_bytes=2**20)
    ckpt.wait()
    assert ckpt.staging_stats()["staged_bytes"] > 0
    ckpt.close()
    assert ckpt.staging_stats()["staged_bytes"] == 0


def test_close_raises_the_pending_saves_error_once(tmp_path):
    target = str(tmp_path / "taken")
    shardckpt.save({"w": torch.ones(2)}, target)
    ckpt = Checkpointer()
    ckpt.async_save({"w": torch.zeros(2)}, target)  # refused in the background: already committed
    with pytest.raises(shardckpt.CheckpointExistsError):
        ckpt.close()
    ckpt.close()  # already closed: nothing left to raise
    assert ckpt.staging_stats()["staged_bytes"] == 0


def test_storage_is_injected_without_monkeypatch(tmp_path):
    written: list[str] = []
    factory = lambda url, options=None: CountingStorage(url, written)  # noqa: E731
    with Checkpointer(storage_factory=factory) as ckpt:
        ckpt.save(_state(4.0), str(tmp_path / "s"))
        saved = len(written)
        assert saved >= 2 and any(name.endswith("manifest.json") for name in written)
        ckpt.async_save(_state(5.0), str(tmp_path / "t"))
        ckpt.wait()
        assert len(written) >= 2 * saved
        assert _loaded(str(tmp_path / "t"), ckpt)["step"] == 5
    before = len(written)
    shardckpt.save(_state(6.0), str(tmp_path / "u"))  # the default Checkpointer has its own storage
    assert len(written) == before


def test_manager_uses_the_given_checkpointer_and_leaves_it_open(tmp_path):
    written: list[str] = []
    ckpt = Checkpointer(storage_factory=lambda url, options=None: CountingStorage(url, written))
    with shardckpt.CheckpointManager(str(tmp_path / "root"), checkpointer=ckpt, async_save=True) as mgr:
        mgr.save(7, _state(7.0))
        mgr.wait()
    assert written and not ckpt.closed
    got: dict[str, Any] = {"w": torch.zeros(64, 64), "step": -1}
    with shardckpt.CheckpointManager(str(tmp_path / "root"), read_only=True, checkpointer=ckpt) as mgr:
        assert mgr.restore(got) == 7
    assert got["step"] == 7
    ckpt.close()


def test_a_closed_checkpointer_refuses_to_save_or_load(tmp_path):
    ckpt = Checkpointer()
    ckpt.save(_state(1.0), str(tmp_path / "x"))
    ckpt.close()
    with pytest.raises(ShardckptError, match="this Checkpointer is closed"):
        ckpt.save(_state(1.0), str(tmp_path / "y"))
    with pytest.raises(ShardckptError, match="this Checkpointer is closed"):
        ckpt.async_save(_state(1.0), str(tmp_path / "y"))
    with pytest.raises(ShardckptError, match="this Checkpointer is closed"):
        ckpt.load({"w": torch.zeros(64, 64), "step": 0}, str(tmp_path / "x"))
    assert not (tmp_path / "y").exists()


def test_the_default_checkpointer_is_lazy_and_replaced_once_closed(tmp_path):
    first = default_checkpointer()
    assert default_checkpointer() is first
    shardckpt.async_save(_state(8.0), str(tmp_path / "d"))
    assert first.pending is not None
    first.close()
    second = default_checkpointer()
    assert second is not first and not second.closed
    assert shardckpt.staging_stats()["staged_bytes"] == 0
    assert _loaded(str(tmp_path / "d"))["step"] == 8


def _two_engines_on_ranks(rank: int, world: int, root: str) -> None:
    with Checkpointer() as a, Checkpointer() as b:
        sa, sb = _state(10.0), _state(20.0)
        ha = a.async_save(sa, f"{root}/a")
        hb = b.async_save(sb, f"{root}/b")  # a's save still runs, on a's own gloo group
        t = torch.ones(1)
        dist.all_reduce(t)  # a training collective while both saves run
        ha.wait()
        hb.wait()
        got = {"w": torch.zeros(64, 64), "step": -1}
        a.load(got, f"{root}/b")
        assert got["step"] == 20  # the replicated value, saved by rank 0
        assert len(a._groups) == 1 and len(b._groups) == 1
    assert not a._groups and not b._groups  # destroyed by close


def test_two_checkpointers_on_ranks(tmp_path):
    run_ranks(_two_engines_on_ranks, 2, str(tmp_path))


def test_an_error_naming_other_ranks_failures_survives_pickling():
    """DCP gathers each rank's exception with pickle; the stand-ins for other ranks'
    failures (only a type name and text travel) must survive that, not break it."""
    import pickle

    from shardckpt.engine.collective import raise_failures

    failures: dict[int, BaseException] = {1: OSError(5, "EIO on rank 1"), 2: ValueError("bad value on rank 2")}
    with pytest.raises(ShardckptError) as info:
        raise_failures("save to /ckpt", failures)
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value)
    assert "rank 1" in str(copy)
    remote = pickle.loads(pickle.dumps(_remote("ValueError", "bad value on rank 2")))
    assert (remote.type_name, str(remote)) == ("ValueError", "bad value on rank 2")


def _remote(type_name: str, text: str) -> BaseException:
    from shardckpt.engine.collective import _Remote

    return _Remote(type_name, text)


def test_ranks_that_failed_the_same_way_share_one_line_and_the_message_stays_bounded():
    """1,000 ranks out of disk space make one line, not 1,000; distinct messages keep a
    line each (in the order of their lowest rank), at most SHOWN_FAILURES of them."""
    from shardckpt.engine.collective import SHOWN_FAILURES, raise_failures

    with pytest.raises(shardckpt.StorageError) as same:
        raise_failures("save to /ckpt", {r: OSError(28, "No space left on device") for r in range(1000)})
    assert str(same.value) == "save to /ckpt failed on ranks 0-999: OSError: [Errno 28] No space left on device"
    assert len(same.value.failures) == 1000

    mixed = {0: ValueError("a"), 1: ValueError("b"), 2: ValueError("a"), 3: ValueError("a"), 5: KeyError("k")}
    with pytest.raises(ShardckptError) as info:
        raise_failures("load of /ckpt", mixed)
    assert str(info.value).splitlines() == [
        "load of /ckpt failed on ranks 0-3, 5:",
        "  ranks 0, 2, 3: ValueError: a",
        "  rank 1: ValueError: b",
        "  rank 5: KeyError: 'k'",
    ]

    many = {r: ValueError(f"v{r}") for r in range(3 * SHOWN_FAILURES)}
    with pytest.raises(ShardckptError) as bounded:
        raise_failures("save to /ckpt", many)
    lines = str(bounded.value).splitlines()
    assert len(lines) == 1 + SHOWN_FAILURES + 1
    assert (
        lines[-1]
        == f"  ranks {SHOWN_FAILURES}-{3 * SHOWN_FAILURES - 1}: {2 * SHOWN_FAILURES} other message(s), in err.failures"
    )
