"""The read side of a load of many small chunks (issue #18): how many threads read, the
one integrity call per run of boxes, and the whole-chunk spans a BoxReader keeps."""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from damage import flip_byte

import shardckpt
from shardckpt import Checkpointer
from shardckpt.engine import reader
from shardckpt.engine.boxes import BoxReader, RunBox, Span
from shardckpt.engine.loading import read_manifest
from shardckpt.engine.reader import PlannedRead, reader_threads
from shardckpt.errors import IntegrityError
from shardckpt.format import integrity
from shardckpt.storage import LocalStorage

MIB = 1 << 20


def _run(begin: int, nbytes: int, boxes: int = 2) -> list[PlannedRead]:
    """A run of ``boxes`` back-to-back boxes of ``nbytes`` in all, from byte ``begin``."""
    each = nbytes // boxes
    out = []
    for i in range(boxes):
        chunk: Any = dataclasses.make_dataclass("C", ["byte_offset"])(begin + i * each)
        span = Span(0, each, 0, each - 1, (each,), (1,), torch.uint8)
        out.append(PlannedRead(None, chunk, RunBox("k", chunk, span)))  # type: ignore[arg-type]
    return out


def test_reader_threads_grow_with_the_bytes_read_up_to_the_threads_and_runs() -> None:
    assert reader_threads([_run(0, 16 * MIB)], 4) == 1  # a small load: the calling thread alone
    assert reader_threads([_run(0, 8 * MIB), _run(8 * MIB, 8 * MIB)], 4) == 1
    big = [_run(i * 40 * MIB, 40 * MIB) for i in range(3)]  # 120 MiB in 3 runs
    assert reader_threads(big, 8) == 3  # one per run at most
    assert reader_threads(big, 2) == 2  # never more than asked for
    many = [_run(i * 15 * MIB, 15 * MIB) for i in range(20)]  # 300 MiB in 20 runs
    assert reader_threads(many, 16) == 1 + 300 // 32  # one more per 32 MiB
    empty = [[PlannedRead(None, None, None)]]  # type: ignore[arg-type]
    assert reader_threads(empty, 4) == 1
    # an object store (no limit by bytes): a thread per run, up to the threads asked for
    assert reader_threads([_run(0, 8 * MIB), _run(8 * MIB, 8 * MIB)], 8, bytes_per_thread=None) == 2
    assert reader_threads(many, 8, bytes_per_thread=None) == 8
    assert reader_threads([], 8, bytes_per_thread=None) == 1
    assert reader_threads([], 4) == 1


class _ThreadLog(LocalStorage):
    """Records the thread of every vectored read."""

    threads: set[str]

    def read_into_many(self, name: str, offset: int, outs: Sequence[Any]) -> None:
        self.threads.add(threading.current_thread().name)
        super().read_into_many(name, offset, outs)


def _small_state(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"t{i:03d}": torch.randn(64 + i % 7, generator=g) for i in range(n)}


def _count_pool_tasks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets one item per task the reader hands its thread pool."""
    submitted: list[int] = []

    class CountingPool(reader.ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            submitted.append(1)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(reader, "ThreadPoolExecutor", CountingPool)
    return submitted


def test_a_load_past_the_bytes_per_thread_reads_with_helper_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _small_state(300)
    shardckpt.save(state, str(tmp_path / "ck"), num_io_threads=1)
    submitted = _count_pool_tasks(monkeypatch)
    monkeypatch.setattr(reader, "READ_BYTES_PER_THREAD", 4096)  # ~80 KB: every thread asked for
    monkeypatch.setattr(reader, "RUN_MAX_BYTES", 2048)  # ~40 runs
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    shardckpt.load(got, str(tmp_path / "ck"), num_io_threads=3)
    assert len(submitted) == 2  # the calling thread is the third
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_an_object_store_load_reads_each_run_on_a_thread_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads from an object store wait on the network: a small load there keeps every
    thread it asks for (one per run at most), where a local one reads on the calling thread."""
    state = _small_state(300)
    url = f"memory://shardckpt-readpath/{uuid.uuid4().hex}"
    shardckpt.save(state, url, num_io_threads=1)
    submitted = _count_pool_tasks(monkeypatch)
    monkeypatch.setattr(reader, "RUN_MAX_BYTES", 2048)  # ~40 runs of ~80 KB in all
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    shardckpt.load(got, url, num_io_threads=3)
    assert len(submitted) == 2  # the calling thread is the third
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_a_corrupt_chunk_read_by_a_helper_thread_fails_the_load_naming_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _small_state(300)
    path = str(tmp_path / "ck")
    shardckpt.save(state, path, num_io_threads=1)
    rec = read_manifest(path).tensors["t250"].chunks[0]
    flip_byte(os.path.join(path, rec.file), rec.byte_offset + 5)
    monkeypatch.setattr(reader, "READ_BYTES_PER_THREAD", 4096)
    monkeypatch.setattr(reader, "RUN_MAX_BYTES", 2048)
    threads: set[str] = set()

    def logging_storage(url: str, options: Any = None) -> _ThreadLog:
        storage = _ThreadLog(url)
        storage.threads = threads
        return storage

    got = {k: torch.zeros_like(v) for k, v in state.items()}
    with pytest.raises(IntegrityError, match=r"key 't250'.*checksum mismatch in block 0"):
        with Checkpointer(storage_factory=logging_storage) as ckpt:
            ckpt.load(got, path, num_io_threads=4)
    assert "MainThread" in threads  # the calling thread reads too


# ------------------------------------------------------------------ integrity.first_mismatch

BLOCK = 16


def _hashes(data: bytes) -> tuple[str, ...]:
    return tuple(integrity.block_hashes(memoryview(data), BLOCK))


def test_first_mismatch_finds_the_first_bad_box_of_every_kind() -> None:
    one, two = b"a" * 10, bytes(range(40))  # a box inside one block, a box of three blocks
    good = ([one, two], [10, 40], [0, 0], [_hashes(one), _hashes(two)])
    assert integrity.first_mismatch(*good, BLOCK) == -1
    bad_small = ([one, one, two], [10, 10, 40], [0, 0, 0], [_hashes(one), _hashes(b"b" * 10), _hashes(two)])
    assert integrity.first_mismatch(*bad_small, BLOCK) == 1
    bad_block_2 = bytearray(two)
    bad_block_2[35] ^= 1
    assert (
        integrity.first_mismatch([one, bytes(bad_block_2)], [10, 40], [0, 0], [_hashes(one), _hashes(two)], BLOCK) == 1
    )
    # a small box at a block the manifest has no hash for (a hostile manifest)
    assert integrity.first_mismatch([one], [10], [1], [_hashes(one)], BLOCK) == 0
    # a box read in pieces (target and the rest of its blocks): checked across the pieces
    pieces = [memoryview(two[:7]), memoryview(two[7:33]), memoryview(two[33:])]
    assert integrity.first_mismatch([one, pieces], [10, 40], [0, 0], [_hashes(one), _hashes(two)], BLOCK) == -1
    pieces[1] = memoryview(bytes(26))
    assert integrity.first_mismatch([one, pieces], [10, 40], [0, 0], [_hashes(one), _hashes(two)], BLOCK) == 1


def test_a_run_of_one_block_chunks_fails_at_the_flipped_one_naming_rank_file_key_and_block(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    state = _small_state(20)  # chunks of ~300 bytes: each inside one 4 KiB block
    shardckpt.save(state, path, hash_block_bytes=4096, num_io_threads=1)
    manifest = read_manifest(path)
    rec = manifest.tensors["t013"].chunks[0]
    flip_byte(os.path.join(path, rec.file), rec.byte_offset + 17)
    boxes = BoxReader(LocalStorage(path), manifest, verify=True, where=f"{path} (rank 3)")
    chunks = sorted(((manifest.tensors[k].chunks[0], k) for k in state), key=lambda e: e[0].byte_offset)
    run = [RunBox(k, c, boxes.span(k, c, (0,), c.sizes)) for c, k in chunks]
    dests = [torch.zeros_like(state[k]) for _, k in chunks]
    with pytest.raises(IntegrityError) as err:
        boxes.read_run(run, dests)
    message = str(err.value)
    assert "(rank 3)" in message and repr(rec.file) in message and "key 't013'" in message
    assert "checksum mismatch in block 0" in message


# ------------------------------------------------------------------ BoxReader.span of whole chunks


def test_whole_chunk_spans_are_kept_per_shape_dtype_and_length(tmp_path: Path) -> None:
    path = str(tmp_path / "ck")
    g = torch.Generator().manual_seed(2)
    state = {k: torch.randn(64, 32, generator=g) for k in ("a", "b")}  # 8 KiB: two 4 KiB blocks
    state |= {"h": torch.randn(64, 32, generator=g).half(), "p": torch.randn(2, 5, generator=g)}
    shardckpt.save(state, path, hash_block_bytes=4096)
    manifest = read_manifest(path)
    boxes = BoxReader(LocalStorage(path), manifest, verify=True, where=path)
    chunk = {k: manifest.tensors[k].chunks[0] for k in state}
    a = boxes.span("a", chunk["a"], (0, 0), (64, 32))
    assert (a.lo, a.hi, a.first, a.last, a.lengths, a.strides, a.dtype) == (
        0,
        8192,
        0,
        2047,
        (64, 32),
        (32, 1),
        torch.float32,
    )
    assert boxes.span("b", chunk["b"], torch.Size([0, 0]), torch.Size([64, 32])) is a  # same shape, dtype, length
    h = boxes.span("h", chunk["h"], (0, 0), (64, 32))
    assert (h.hi, h.last, h.dtype) == (4096, 2047, torch.float16)  # same shape, another dtype
    short = chunk["a"].replace(byte_length=8000)  # a chunk shorter than its shape (hostile)
    assert boxes.span("a", short, (0, 0), (64, 32)).hi == 8000  # not the kept span of a full chunk
    part = boxes.span("a", chunk["a"], (2, 0), (3, 32))  # rows 2..4: within block 0
    assert (part.lo, part.hi, part.first, part.last, part.lengths) == (0, 4096, 64, 159, (3, 32))
    p = boxes.span("p", chunk["p"], (0, 0), (2, 5))
    assert (p.lo, p.hi, p.last, p.strides) == (0, 40, 9, (5, 1))
