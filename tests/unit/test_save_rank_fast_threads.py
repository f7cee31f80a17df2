"""A Checkpointer's writer threads and batch buffers, kept from one save to the next
(issue #18): the same threads and buffers serve the next save, a failure still stops
the other files and is raised, close() stops the threads, and the bytes saved through
reused (dirty) buffers are what a fresh save writes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.engine import Checkpointer
from shardckpt.engine.datawrite import BATCH_BYTES
from shardckpt.engine.write_threads import WriteThreads
from shardckpt.storage import LocalStorage


def _who(buffer: bytearray) -> tuple[int, int]:
    return threading.get_ident(), id(buffer)


def test_threads_and_buffers_are_kept_for_the_next_run() -> None:
    together = threading.Barrier(3, timeout=10)  # three tasks at once: three threads

    def who(buffer: bytearray) -> tuple[int, int]:
        together.wait()
        return _who(buffer)

    threads = WriteThreads()
    try:
        first = threads.run([who] * 3, threading.Event())
        second = threads.run([who] * 3, threading.Event())
    finally:
        threads.close()
    assert len({b for _, b in first}) == 3  # a buffer per task of a run
    assert {b for _, b in first} == {b for _, b in second}  # the same three buffers
    assert len({t for t, _ in first}) == 3
    assert {t for t, _ in second} == {t for t, _ in first}  # no thread started for the second run
    assert threading.get_ident() not in {t for t, _ in first}


def test_buffers_are_batch_sized() -> None:
    threads = WriteThreads()
    try:
        sizes = threads.run([lambda buffer: len(buffer)] * 2, threading.Event())
    finally:
        threads.close()
    assert sizes == [BATCH_BYTES, BATCH_BYTES]


def test_a_failing_task_cancels_the_others_and_is_raised_after_they_stop() -> None:
    threads = WriteThreads()
    cancel = threading.Event()
    stopped: list[str] = []

    def waits(buffer: bytearray) -> None:
        assert cancel.wait(10), "never cancelled"
        stopped.append("waiter")

    def fails(buffer: bytearray) -> None:
        raise OSError("disk full")

    try:
        with pytest.raises(OSError, match="disk full"):
            threads.run([waits, fails], cancel)
        assert cancel.is_set()
        assert stopped == ["waiter"]  # run() returned only after the other task ended
        assert threads.run([lambda buffer: 7], threading.Event()) == [7]  # still usable
    finally:
        threads.close()


def test_close_stops_the_threads_and_refuses_further_runs() -> None:
    threads = WriteThreads()
    [(ident, _)] = threads.run([_who], threading.Event())
    threads.close()
    assert ident not in {t.ident for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="closed"):
        threads.run([_who], threading.Event())
    threads.close()  # idempotent


def _data_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "data").iterdir())}


def _state(scale: float, n: int) -> dict[str, Any]:
    return {f"t{i}": torch.full((300 + i,), scale * i) for i in range(n)}


def test_saves_through_kept_buffers_write_what_a_fresh_save_writes(tmp_path: Path) -> None:
    """The second save's buffers still hold the first save's (larger) bytes; the files must
    hold only the second save's. Compared with a fresh Checkpointer's save of the same
    state: every byte after each header, and the values loaded with every checksum."""
    kept = Checkpointer()
    try:
        kept.save(_state(1.0, 400), str(tmp_path / "big"), num_io_threads=3)
        kept.save(_state(-2.0, 150), str(tmp_path / "kept"), num_io_threads=3)
    finally:
        kept.close()
    with Checkpointer() as fresh:
        fresh.save(_state(-2.0, 150), str(tmp_path / "fresh"), num_io_threads=3)
    ours, theirs = _data_files(tmp_path / "kept"), _data_files(tmp_path / "fresh")
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours.values(), theirs.values(), strict=True):
        header_a, header_b = 8 + int.from_bytes(a[:8], "little"), 8 + int.from_bytes(b[:8], "little")
        assert len(a) - header_a == len(b) - header_b
        assert a[header_a:] == b[header_b:]  # the tensors' bytes (headers name each save's id)
    got = {k: torch.zeros_like(v) for k, v in _state(0.0, 150).items()}
    shardckpt.load(got, str(tmp_path / "kept"))
    assert all(torch.equal(got[k], v) for k, v in _state(-2.0, 150).items())


class _FailingStorage(LocalStorage):
    def open_write(self, name: str) -> Any:
        if name.startswith("data/") and name.endswith("-01.safetensors"):
            raise OSError(f"no space left for {name}")
        return super().open_write(name)


def test_a_failed_save_leaves_the_checkpointer_able_to_save(tmp_path: Path) -> None:
    fail = {"on": True}

    def factory(url: str, options: Any = None) -> LocalStorage:
        return _FailingStorage(url) if fail["on"] else LocalStorage(url)

    state = _state(3.0, 60)
    with Checkpointer(storage_factory=factory) as ckpt:
        with pytest.raises(Exception, match="no space left"):
            ckpt.save(state, str(tmp_path / "a"), num_io_threads=2)
        fail["on"] = False
        ckpt.save(state, str(tmp_path / "b"), num_io_threads=2)
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    shardckpt.load(got, str(tmp_path / "b"))
    assert all(torch.equal(got[k], v) for k, v in state.items())


def _items(n: int) -> list[Any]:
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    def item(i: int) -> WriteItem:
        size = torch.Size([1 + (i * 37) % 50])
        return WriteItem(
            index=MetadataIndex(f"t{i}", torch.Size([0])),
            type=WriteItemType.TENSOR,
            tensor_data=TensorWriteData(
                ChunkStorageMetadata(torch.Size([0]), size), TensorProperties(torch.float32), size
            ),
        )

    return [item(i) for i in range(n)]


def test_the_split_of_the_same_items_is_kept_and_of_other_items_made_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardckpt.engine import write_threads
    from shardckpt.engine.datawrite import split_by_bytes

    calls: list[int] = []
    monkeypatch.setattr(write_threads, "split_by_bytes", lambda items, n: calls.append(n) or split_by_bytes(items, n))
    items = _items(40)
    threads = WriteThreads()
    try:
        first = threads.split_items(items, 4)
        assert first == split_by_bytes(items, 4) and calls == [4]
        first[0].clear()  # the caller's to change: the kept split is not
        again = threads.split_items(list(items), 4)  # a new list of the same objects: kept
        assert again == split_by_bytes(items, 4) and calls == [4]
        threads.split_items(items, 3)  # another thread count
        equal_copy = _items(40)  # equal items, other objects: split anew
        assert threads.split_items(equal_copy, 3) == split_by_bytes(equal_copy, 3) and calls == [4, 3, 3]
        assert all(
            b is c
            for bucket, kept in zip(threads.split_items(equal_copy, 3), split_by_bytes(equal_copy, 3), strict=True)
            for b, c in zip(bucket, kept, strict=True)
        )
        changed = [*equal_copy[:-1], _items(41)[40]]  # one item replaced: split anew
        threads.split_items(changed, 3)
        assert calls == [4, 3, 3, 3]
    finally:
        threads.close()


def test_saves_of_a_reused_plan_put_the_same_tensors_in_the_same_files(tmp_path: Path) -> None:
    from safetensors import safe_open

    state = {f"w{i}": torch.full((1 + (i * 13) % 40,), float(i)) for i in range(60)}
    with shardckpt.Checkpointer() as ckpt:
        for name in ("a", "b", "c"):
            ckpt.save(state, str(tmp_path / name), num_io_threads=3)
    contents = []
    for name in ("a", "b", "c"):
        files = sorted((tmp_path / name / "data").iterdir())
        contents.append([sorted(k for k in safe_open(str(f), "pt").keys()) for f in files])
    assert len(contents[0]) == 3 and contents[0] == contents[1] == contents[2]
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    shardckpt.load(got, str(tmp_path / "c"))
    assert all(torch.equal(got[k], state[k]) for k in state)
