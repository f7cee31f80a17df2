"""BoxReader: the one read-and-verify path for tensor bytes, shared by shardckpt.load
(engine.reader.Reader) and the readers without a process group (convert.source.CheckpointSource)."""

from __future__ import annotations

import os

import pytest
import torch
from damage import flip_byte

import shardckpt
from shardckpt.convert.source import CheckpointSource
from shardckpt.engine.boxes import BoxReader
from shardckpt.engine.loading import read_manifest
from shardckpt.errors import IntegrityError
from shardckpt.storage import open_storage

BLOCK = 4096
ROWS, COLS = 64, 64  # float32: 256 bytes a row, 16 rows a checksum block


@pytest.fixture
def saved(tmp_path):
    path = str(tmp_path / "ck")
    w = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS)
    shardckpt.save({"w": w}, path, hash_block_bytes=BLOCK)
    return path, w


def _boxes(path: str, verify: bool = True) -> BoxReader:
    storage = open_storage(path)
    return BoxReader(storage, read_manifest(storage), verify=verify, where=path)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize(
    ("start", "shape"),
    [((0, 0), (ROWS, COLS)), ((16, 0), (16, COLS)), ((5, 0), (3, COLS)), ((3, 7), (10, 20)), ((63, 63), (1, 1))],
)
def test_read_box_gives_the_saved_box(saved, verify, start, shape):
    path, w = saved
    boxes = _boxes(path, verify)
    chunk = boxes.manifest.tensors["w"].chunks[0]
    want = w[start[0] : start[0] + shape[0], start[1] : start[1] + shape[1]]
    dest = torch.empty(shape)
    n = boxes.read_box("w", chunk, start, dest)
    assert torch.equal(dest, want)
    assert n >= want.numel() * 4 and (not verify or n % BLOCK == 0 or n == chunk.byte_length)
    # into a strided destination of another dtype: converted on the way in
    wide = torch.zeros(shape[0], 2 * shape[1], dtype=torch.float64)
    boxes.read_box("w", chunk, start, wide[:, ::2])
    assert torch.equal(wide[:, ::2], want.double())


def test_read_box_of_nothing_reads_nothing(saved):
    path, _ = saved
    boxes = _boxes(path)
    assert boxes.read_box("w", boxes.manifest.tensors["w"].chunks[0], (4, 0), torch.empty(0, COLS)) == 0


def test_a_flipped_byte_is_caught_by_every_reader(saved, tmp_path):
    path, w = saved
    chunk = CheckpointSource(path).manifest.tensors["w"].chunks[0]
    flip_byte(os.path.join(path, chunk.file), chunk.byte_offset + 20 * COLS * 4)  # row 20: block 1
    with pytest.raises(IntegrityError, match=r"block 1\b") as by_box_reader:
        _boxes(path).read_box("w", chunk, (16, 0), torch.empty(16, COLS))
    with pytest.raises(IntegrityError, match=r"block 1\b") as by_source:
        CheckpointSource(path).read_tensor("w")
    with pytest.raises(IntegrityError, match=r"block 1\b") as by_load:
        shardckpt.load({"w": torch.empty(ROWS, COLS)}, path)
    for e in (by_box_reader, by_source, by_load):
        assert chunk.file in str(e.value) and "'w'" in str(e.value), str(e.value)
    # the block around the flipped byte is all that is wrong: the rows before it still read
    assert torch.equal(CheckpointSource(path).read_box("w", (0, 0), (16, COLS)), w[:16])
    assert torch.equal(CheckpointSource(path, verify=False).read_box("w", (0, 0), (16, COLS)), w[:16])


def test_a_truncated_data_file_is_named_by_every_reader(saved):
    path, _ = saved
    chunk = CheckpointSource(path).manifest.tensors["w"].chunks[0]
    full = os.path.join(path, chunk.file)
    os.truncate(full, os.path.getsize(full) - 1)
    with pytest.raises(IntegrityError, match="the manifest says") as by_source:
        CheckpointSource(path).read_tensor("w")
    with pytest.raises(IntegrityError, match="the manifest says") as by_load:
        shardckpt.load({"w": torch.empty(ROWS, COLS)}, path)
    assert chunk.file in str(by_source.value) and path in str(by_source.value)
    assert chunk.file in str(by_load.value) and "(rank 0)" in str(by_load.value)
    os.remove(full)
    with pytest.raises(IntegrityError, match="is missing"):
        CheckpointSource(path).read_tensor("w")
