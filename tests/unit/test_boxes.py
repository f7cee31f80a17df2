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


def _read_sizes(monkeypatch, boxes: BoxReader) -> list[int]:
    """The length of every read ``boxes`` makes from now on, in order."""
    sizes: list[int] = []
    read_into = boxes.files.read_into
    monkeypatch.setattr(
        boxes.files, "read_into", lambda name, at, out: (sizes.append(len(out)), read_into(name, at, out))
    )
    return sizes


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


@pytest.mark.parametrize(("start", "rows"), [((5, 0), 3), ((5, 0), 30), ((16, 0), 17), ((1, 0), 62), ((60, 0), 4)])
def test_a_run_that_is_not_whole_blocks_is_read_in_place_and_verified(saved, monkeypatch, start, rows):
    """A resharded box that is one run of the chunk's bytes (whole rows) but not whole
    blocks is read straight into ``dest``; only its first and last blocks' other bytes go
    to side buffers, and every block it touches is still verified."""
    path, w = saved
    monkeypatch.setattr(BoxReader, "in_place_min_bytes", 0)  # this chunk is 16 KiB
    boxes = _boxes(path)
    chunk = boxes.manifest.tensors["w"].chunks[0]
    sizes = _read_sizes(monkeypatch, boxes)
    dest = torch.empty(rows, COLS)
    n = boxes.read_box("w", chunk, start, dest)
    assert torch.equal(dest, w[start[0] : start[0] + rows])
    box_bytes = rows * COLS * 4
    assert box_bytes in sizes and all(s < BLOCK for s in sizes if s != box_bytes)  # no staging buffer of the box
    lo = start[0] * COLS * 4 // BLOCK * BLOCK
    assert n == min(chunk.byte_length, -(-(start[0] + rows) * COLS * 4 // BLOCK) * BLOCK) - lo


@pytest.mark.parametrize("row", [4, 20, 40])  # in the first block's rest, the box, the last block's rest
def test_a_flipped_byte_around_an_in_place_run_is_named_by_its_block(saved, monkeypatch, row):
    path, _ = saved
    monkeypatch.setattr(BoxReader, "in_place_min_bytes", 0)
    chunk = CheckpointSource(path).manifest.tensors["w"].chunks[0]
    flip_byte(os.path.join(path, chunk.file), chunk.byte_offset + row * COLS * 4 + 3)
    with pytest.raises(IntegrityError, match=rf"block {row // 16}\b") as e:
        _boxes(path).read_box("w", chunk, (10, 0), torch.empty(25, COLS))  # rows 10-34: blocks 0-2
    assert chunk.file in str(e.value) and "'w'" in str(e.value)


def test_a_small_run_is_read_with_its_blocks_in_one_read(saved, monkeypatch):
    """Below ``in_place_min_bytes`` a box is staged with its whole blocks in one read."""
    path, w = saved
    boxes = _boxes(path)
    chunk = boxes.manifest.tensors["w"].chunks[0]
    sizes = _read_sizes(monkeypatch, boxes)
    dest = torch.empty(3, COLS)
    boxes.read_box("w", chunk, (5, 0), dest)
    assert torch.equal(dest, w[5:8]) and sizes == [BLOCK]


def test_verify_pieces_equals_verify_blocks_on_every_split():
    """Blocks hashed across pieces give the hashes of the joined bytes, wherever the pieces
    are cut; a flipped byte anywhere names its block."""
    import random

    from shardckpt.format import integrity

    rng = random.Random(7)
    for _ in range(200):
        block = rng.choice([64, 128, 4096])
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 5 * block)))
        first = rng.randrange(3)
        expected = ("0" * 16,) * first + tuple(integrity.block_hashes(memoryview(data), block))
        cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
        pieces = [memoryview(data)[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        integrity.verify_pieces(pieces, first_block=first, block_bytes=block, expected=expected, where="w")
        bad = bytearray(data)
        at = rng.randrange(len(data))
        bad[at] ^= 1
        pieces = [memoryview(bytes(bad))[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        with pytest.raises(IntegrityError, match=rf"block {first + at // block}\b"):
            integrity.verify_pieces(pieces, first_block=first, block_bytes=block, expected=expected, where="w")
