"""Vectored reads (issue #18): ``Storage.read_into_many`` fills many buffers with one read,
and ``BoxReader.read_run`` reads a run of small chunks straight into their targets, then
verifies each, with the staged path kept for targets that cannot take the saved bytes."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from damage import flip_byte

import shardckpt
from shardckpt.engine.boxes import BoxReader, RunBox
from shardckpt.engine.loading import read_manifest
from shardckpt.errors import IntegrityError
from shardckpt.storage import LocalStorage, open_storage
from shardckpt.storage import local as local_module
from shardckpt.storage.base import WriteBuffer, byte_view

PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes


@pytest.fixture
def data_file(tmp_path: Any) -> LocalStorage:
    (tmp_path / "f.bin").write_bytes(PAYLOAD)
    return LocalStorage(str(tmp_path))


def _buffers(sizes: Sequence[int]) -> list[Any]:
    """Byte memoryviews, 2-D float32 arrays (a target's ``numpy()``) and empty buffers mixed."""
    out: list[Any] = []
    for i, n in enumerate(sizes):
        if n % 8 == 0 and i % 2:
            out.append(np.zeros((n // 8, 2), dtype=np.float32))
        else:
            out.append(memoryview(bytearray(n)))
    return out


def _joined(outs: Sequence[Any]) -> bytes:
    return b"".join(byte_view(o).tobytes() for o in outs)


def test_read_into_many_fills_buffers_of_every_kind_back_to_back(data_file: LocalStorage) -> None:
    sizes = [8, 0, 16, 3, 0, 64, 1, 1000]
    outs = _buffers(sizes)
    data_file.read_into_many("f.bin", 100, outs)
    assert _joined(outs) == PAYLOAD[100 : 100 + sum(sizes)]


def test_read_into_many_over_more_buffers_than_one_preadv_takes(data_file: LocalStorage) -> None:
    outs = [memoryview(bytearray(3)) for _ in range(local_module._IOV_MAX + 500)]  # 4,572 bytes, two preadv calls
    data_file.read_into_many("f.bin", 7, outs)
    assert _joined(outs) == PAYLOAD[7 : 7 + 3 * len(outs)]


def test_read_into_many_goes_on_after_short_reads(data_file: LocalStorage, monkeypatch: Any) -> None:
    """preadv may return fewer bytes than asked (a signal, a network file system): the rest
    is read, also from the middle of a buffer."""
    real = os.preadv
    calls: list[int] = []

    def short_preadv(fd: int, buffers: list[Any], offset: int) -> int:
        calls.append(offset)
        first = byte_view(buffers[0])
        return real(fd, [first[: min(5, len(first))]], offset)  # at most 5 bytes a call

    monkeypatch.setattr(local_module.os, "preadv", short_preadv)
    outs = _buffers([8, 13, 16, 2])
    data_file.read_into_many("f.bin", 50, outs)
    assert _joined(outs) == PAYLOAD[50:89]
    assert len(calls) >= 39 // 5  # it did go on, call after call


def test_read_into_many_past_the_end_is_eof_naming_file_and_byte(data_file: LocalStorage) -> None:
    outs = _buffers([16, 32])
    with pytest.raises(EOFError, match=r"f\.bin: file ends at byte 10240, expected 28 more bytes"):
        data_file.read_into_many("f.bin", len(PAYLOAD) - 20, outs)


def test_a_missing_file_is_file_not_found(data_file: LocalStorage) -> None:
    with pytest.raises(FileNotFoundError):
        data_file.read_into_many("nope.bin", 0, _buffers([8]))


class _CountingStorage(LocalStorage):
    """Overrides read_into only, as fault-injecting and counting subclasses do."""

    reads: list[tuple[int, int]]

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        self.reads.append((offset, len(out)))
        super().read_into(name, offset, out)


def test_a_subclass_that_overrides_read_into_sees_every_byte_of_a_vectored_read(tmp_path: Any) -> None:
    (tmp_path / "f.bin").write_bytes(PAYLOAD)
    storage = _CountingStorage(str(tmp_path))
    storage.reads = []
    outs = _buffers([8, 24, 5])
    storage.read_into_many("f.bin", 30, outs)
    assert storage.reads == [(30, 37)]  # one joined read through read_into
    assert _joined(outs) == PAYLOAD[30:67]


def test_the_default_for_other_storages_is_one_joined_read() -> None:
    storage = open_storage("memory://readv-test/c")
    storage.write_atomic("f.bin", PAYLOAD)
    assert not isinstance(storage, LocalStorage)
    outs = _buffers([8, 0, 40, 7])
    storage.read_into_many("f.bin", 1000, outs)
    assert _joined(outs) == PAYLOAD[1000:1055]
    with pytest.raises(EOFError):
        storage.read_into_many("f.bin", len(PAYLOAD) - 4, _buffers([8]))


# ------------------------------------------------------------------ BoxReader.read_run


class _BufferLog(LocalStorage):
    """Records the buffers of every vectored read."""

    seen: list[WriteBuffer]

    def read_into_many(self, name: str, offset: int, outs: Sequence[WriteBuffer]) -> None:
        self.seen.extend(outs)
        super().read_into_many(name, offset, outs)


def _small_checkpoint(path: str, rows: int = 4, block: int = 4096) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {f"t{i:02d}": torch.randn(rows + i, 3, generator=g) for i in range(12)}
    state["bf"] = torch.randn(5, 2, generator=g).to(torch.bfloat16)
    shardckpt.save(state, path, hash_block_bytes=block, num_io_threads=1)  # one data file
    return state


def _run_of(path: str, keys: Sequence[str], storage: LocalStorage) -> tuple[BoxReader, list[RunBox]]:
    """Whole-chunk boxes of ``keys``, in file order, which must lie back to back."""
    manifest = read_manifest(storage)
    boxes = BoxReader(storage, manifest, verify=True, where=f"{path} (rank 0)")
    chunks = sorted(((manifest.tensors[k].chunks[0], k) for k in keys), key=lambda e: e[0].byte_offset)
    run = [RunBox(k, c, boxes.span(k, c, (0,) * len(c.sizes), c.sizes)) for c, k in chunks]
    for a, b in itertools.pairwise(run):
        assert a.chunk.file == b.chunk.file and a.chunk.byte_offset + a.span.hi == b.chunk.byte_offset + b.span.lo
    return boxes, run


def test_a_run_is_read_straight_into_contiguous_targets_and_staged_for_the_others(tmp_path: Any) -> None:
    path = str(tmp_path / "ck")
    state = _small_checkpoint(path)
    storage = _BufferLog(path)
    storage.seen = []
    boxes, run = _run_of(path, list(state), storage)
    dests: list[torch.Tensor] = []
    for b in run:
        saved = state[b.key]
        if b.key == "t03":  # a strided target
            dests.append(torch.zeros(saved.shape[::-1], dtype=saved.dtype).T)
        elif b.key == "t05":  # a cast
            dests.append(torch.zeros(saved.shape, dtype=torch.float64))
        else:  # float32 and bfloat16 of the saved dtype, contiguous
            dests.append(torch.zeros_like(saved))
    assert boxes.read_run(run, dests) == run[-1].chunk.byte_offset + run[-1].span.hi - run[0].chunk.byte_offset
    for b, d in zip(run, dests, strict=True):
        assert torch.equal(d, state[b.key].to(d.dtype)), b.key
        in_place = any(np.shares_memory(d.reshape(-1).view(torch.uint8).numpy(), v) for v in storage.seen)
        assert in_place == (b.key not in ("t03", "t05")), b.key


def test_a_flipped_byte_fails_the_run_naming_rank_file_key_and_block(tmp_path: Any) -> None:
    path = str(tmp_path / "ck")
    state = _small_checkpoint(path, rows=1000)  # 12 KB a chunk: 3 blocks of 4 KiB
    manifest = read_manifest(path)
    rec = manifest.tensors["t07"].chunks[0]
    flip_byte(os.path.join(path, rec.file), rec.byte_offset + 2 * 4096 + 130)  # in block 2
    boxes, run = _run_of(path, list(state), LocalStorage(path))
    dests = [torch.zeros_like(state[b.key]) for b in run]
    with pytest.raises(IntegrityError) as err:
        boxes.read_run(run, dests)
    message = str(err.value)
    assert "(rank 0)" in message and repr(rec.file) in message and "key 't07'" in message
    assert "checksum mismatch in block 2" in message
    # the boxes before it in the file were read and verified
    assert all(
        torch.equal(d, state[b.key]) for b, d in zip(run, dests, strict=True) if b.chunk.byte_offset < rec.byte_offset
    )


def test_boxes_not_on_block_boundaries_verify_across_their_pieces(tmp_path: Any) -> None:
    """A resharded box that is one run of its chunk but not whole blocks is read into its
    target with the rest of its first and last blocks beside it; a flipped byte in that rest
    (outside the target) still fails the read."""
    path = str(tmp_path / "ck")
    w = torch.arange(600 * 4, dtype=torch.float32).reshape(600, 4)  # 16 bytes a row, 256 rows a block
    v = w + 0.5
    shardckpt.save({"a": w, "b": v}, path, hash_block_bytes=4096, num_io_threads=1)
    storage = LocalStorage(path)
    manifest = read_manifest(storage)
    boxes = BoxReader(storage, manifest, verify=True, where=path)
    (first, k1), (second, k2) = sorted(
        ((manifest.tensors[k].chunks[0], k) for k in ("a", "b")), key=lambda e: e[0].byte_offset
    )
    assert first.byte_offset + first.byte_length == second.byte_offset
    # rows 300..599 of the first (its blocks 1-2: 44 rows before the box), rows 0..299 of the second (block 0-1)
    run = [
        RunBox(k1, first, boxes.span(k1, first, (300, 0), (300, 4))),
        RunBox(k2, second, boxes.span(k2, second, (0, 0), (300, 4))),
    ]
    assert run[0].span.lo == 4096 and run[1].span.hi == 8192  # pieces around both targets
    dests = [torch.zeros(300, 4), torch.zeros(300, 4)]
    boxes.read_run(run, dests)
    saved = {"a": w, "b": v}
    assert torch.equal(dests[0], saved[k1][300:]) and torch.equal(dests[1], saved[k2][:300])
    flip_byte(os.path.join(path, second.file), second.byte_offset + 400 * 16 + 1)  # row 400: read, not loaded
    with pytest.raises(IntegrityError, match=rf"key '{k2}'.*checksum mismatch in block 1"):
        boxes.read_run(run, [torch.zeros(300, 4), torch.zeros(300, 4)])
