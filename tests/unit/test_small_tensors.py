"""Thousands of small tensors (issue #18): written in few large writes, saved and loaded
without full garbage collections, and the bytes unchanged (the golden test pins them)."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.engine import Checkpointer
from shardckpt.engine.datawrite import BATCH_BYTES
from shardckpt.storage import LocalStorage
from shardckpt.storage.base import WriteStream


class _SizedStream:
    def __init__(self, inner: WriteStream, sizes: list[int]) -> None:
        self._inner, self._sizes = inner, sizes

    def write(self, data: memoryview | bytes) -> None:
        self._sizes.append(len(data))
        self._inner.write(data)

    def finish(self) -> None:
        self._inner.finish()

    def abort(self) -> None:
        self._inner.abort()


class WriteSizeStorage(LocalStorage):
    """Records the size of every write() into a data file."""

    def __init__(self, root: str, sizes: dict[str, list[int]]) -> None:
        super().__init__(root)
        self.sizes = sizes

    def open_write(self, name: str) -> WriteStream:
        return _SizedStream(super().open_write(name), self.sizes.setdefault(name, []))


def _small_state(n: int, numel: int = 256) -> dict[str, Any]:
    return {f"layer{i}.w": torch.full((numel,), float(i)) for i in range(n)}


def test_many_small_tensors_are_written_in_few_large_writes(tmp_path: Path) -> None:
    sizes: dict[str, list[int]] = {}
    state = _small_state(2000)  # 1 KiB each, 2 MiB in all
    state["big"] = torch.arange(3 * 2**20 // 4, dtype=torch.float32)  # 3 MiB, written block by block
    path = str(tmp_path / "ckpt")
    with Checkpointer(storage_factory=lambda url, options=None: WriteSizeStorage(url, sizes)) as ckpt:
        ckpt.save(state, path, num_io_threads=1, hash_block_bytes=2**20)
    [data_file] = [name for name in sizes if name.startswith("data/")]
    writes = sizes[data_file]
    # The big tensor's three 1 MiB blocks, the header and the 2,000 small chunks gathered
    # into at most a few writes (the header is flushed before the big tensor), not 2,002.
    assert len(writes) <= 3 + 3, writes
    assert max(writes) <= BATCH_BYTES
    assert sum(writes) == (tmp_path / "ckpt" / data_file).stat().st_size
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    shardckpt.load(got, path)  # verify=True: every block hash checked
    assert all(torch.equal(got[k], state[k]) for k in state)


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generations of the collections that run inside the test."""
    seen: list[int] = []

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(int(info["generation"]))

    gc.callbacks.append(record)
    try:
        yield seen
    finally:
        gc.callbacks.remove(record)


def test_a_save_and_a_load_of_many_small_tensors_run_no_full_collection(tmp_path: Path, collections: list[int]) -> None:
    """DCP's planning and reading run with the collector paused: before, a save of 3,000
    tensors ran ~190 collections here, full ones among them (each walks every object of
    the process); what is left are a few young ones outside DCP (flattening the state)."""
    state = _small_state(3000, numel=16)
    gc.collect()
    collections.clear()
    shardckpt.save(state, str(tmp_path / "ckpt"), num_io_threads=2)
    assert 2 not in collections and len(collections) < 40, f"collections of generations {collections} in the save"
    assert gc.isenabled()
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    collections.clear()
    shardckpt.load(got, str(tmp_path / "ckpt"))
    assert 2 not in collections and len(collections) < 40, f"collections of generations {collections} in the load"
    assert gc.isenabled()
    assert torch.equal(got["layer2999.w"], state["layer2999.w"])


def test_a_save_leaves_a_disabled_collector_disabled(tmp_path: Path) -> None:
    gc.disable()
    try:
        shardckpt.save(_small_state(3), str(tmp_path / "ckpt"))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_load_of_many_small_tensors_submits_at_most_one_task_per_reader_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardckpt.engine import reader

    submitted: list[int] = []

    class CountingPool(reader.ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            submitted.append(1)
            return super().submit(fn, *args, **kwargs)

    state = _small_state(500, numel=16)
    shardckpt.save(state, str(tmp_path / "ckpt"))
    monkeypatch.setattr(reader, "ThreadPoolExecutor", CountingPool)
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    shardckpt.load(got, str(tmp_path / "ckpt"), num_io_threads=3)
    # was one per tensor: 500; 32 KiB in all are read by the calling thread alone
    assert submitted == []
    assert all(torch.equal(got[k], state[k]) for k in state)


class ReadLogStorage(LocalStorage):
    """Records every ranged read of a data file: (name, offset, length)."""

    def __init__(self, root: str, reads: list[tuple[str, int, int]]) -> None:
        super().__init__(root)
        self.reads = reads

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        if name.startswith("data/"):
            self.reads.append((name, offset, len(out)))
        super().read_into(name, offset, out)


def _load_logging_reads(state: dict[str, Any], path: str, **kwargs: Any) -> list[tuple[str, int, int]]:
    reads: list[tuple[str, int, int]] = []
    with Checkpointer(storage_factory=lambda url, options=None: ReadLogStorage(url, reads)) as ckpt:
        ckpt.load(state, path, **kwargs)
    return reads


def test_a_load_reads_back_to_back_small_chunks_with_one_read_and_large_ones_alone(tmp_path: Path) -> None:
    from shardckpt.engine.reader import RUN_ITEM_MAX_BYTES, RUN_MAX_BYTES

    state = _small_state(2000)  # 1 KiB each, 2 MiB in all
    state["big"] = torch.arange(3 * 2**20 // 4, dtype=torch.float32)  # 3 MiB > RUN_ITEM_MAX_BYTES
    path = str(tmp_path / "ckpt")
    shardckpt.save(state, path, num_io_threads=1)
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    reads = _load_logging_reads(got, path, num_io_threads=2)
    assert all(torch.equal(got[k], state[k]) for k in state)
    lengths = sorted(n for _, _, n in reads)
    # was one read per chunk (2,001); now the big tensor alone and the small ones in runs
    assert lengths[-1] == 3 * 2**20 > RUN_ITEM_MAX_BYTES
    assert len(reads) <= 1 + -(-2000 * 1024 // RUN_MAX_BYTES) + 2, lengths  # + a break at the big one
    assert sum(lengths) == 2000 * 1024 + 3 * 2**20  # every byte once, none twice
    spans = sorted((off, off + n) for _, off, n in reads)
    assert all(a_end <= b for (_, a_end), (b, _) in itertools.pairwise(spans))


def test_a_partial_load_joins_no_read_across_a_chunk_it_skips(tmp_path: Path) -> None:
    state = _small_state(200)
    path = str(tmp_path / "ckpt")
    shardckpt.save(state, path, num_io_threads=1)
    wanted = {k: torch.zeros_like(v) for i, (k, v) in enumerate(state.items()) if i % 2 == 0}
    reads = _load_logging_reads(wanted, path, strict=False)
    assert sum(n for _, _, n in reads) == 100 * 1024  # only the chunks loaded: a gap ends a run
    assert all(torch.equal(wanted[k], state[k]) for k in wanted)


def test_a_joined_read_of_mixed_dtypes_copies_each_tensor_from_its_own_bytes(tmp_path: Path) -> None:
    """2-byte tensors of odd length put the next fp32 chunk at an offset that is not a
    multiple of 4 inside the joined buffer."""
    state: dict[str, Any] = {}
    for i in range(50):
        state[f"h{i:02d}"] = torch.arange(3, dtype=torch.bfloat16) + i
        state[f"w{i:02d}"] = torch.arange(5, dtype=torch.float32) * i
        state[f"b{i:02d}"] = torch.tensor([i % 2 == 0, True, False])
    path = str(tmp_path / "ckpt")
    shardckpt.save(state, path, num_io_threads=1)
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    reads = _load_logging_reads(got, path)
    assert len(reads) < len(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_a_damaged_chunk_inside_a_joined_read_is_named_by_its_key(tmp_path: Path) -> None:
    from shardckpt.errors import IntegrityError
    from shardckpt.format.manifest import parse_manifest

    state = _small_state(300)
    path = tmp_path / "ckpt"
    shardckpt.save(state, str(path), num_io_threads=1)
    m = parse_manifest((path / "manifest.json").read_bytes(), source="test")
    [chunk] = m.tensors["layer123.w"].chunks
    data = path / chunk.file
    raw = bytearray(data.read_bytes())
    raw[chunk.byte_offset + 100] ^= 0xFF
    data.write_bytes(bytes(raw))
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    reads = _load_logging_reads({k: got[k] for k in list(got)[130:140]}, str(path), strict=False, num_io_threads=1)
    assert len(reads) == 1  # the ten chunks are one joined read
    with pytest.raises(IntegrityError, match=r"key 'layer123\.w'.*block 0"):
        shardckpt.load(got, str(path))


def test_a_background_save_leaves_the_collector_to_the_program(tmp_path: Path) -> None:
    """An async save's writes run on a background thread for as long as they take: the
    collector stays on there, so the training thread's reference cycles are still freed."""
    import threading

    from shardckpt.engine.collector import collector_paused

    seen: list[bool] = []

    def body() -> None:
        with collector_paused():
            seen.append(gc.isenabled())

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [True]
    with collector_paused():
        assert not gc.isenabled()  # the main thread (a sync save, a load) pauses it
    assert gc.isenabled()


_BAD_CHUNK_FIELDS = [
    ("offsets", [1.0], r"chunks\[1\]\.offsets: shape \[1\.0\]"),
    ("offsets", [True], r"chunks\[1\]\.offsets"),
    ("sizes", [-1], r"chunks\[1\]\.sizes: shape \[-1\]"),
    ("sizes", [999], r"chunks\[1\]: box \(16,\)\+\(999,\) lies outside shape \(32,\)"),
    ("file", "../x.safetensors", r"chunks\[1\]: file name '\.\./x\.safetensors' is not a plain relative name"),
    ("file", "data/other-r0-0.safetensors", r"chunks\[1\]: file 'data/other-r0-0\.safetensors' is not listed"),
    ("byte_offset", 2**62, r"chunks\[1\]\.byte_offset = 4611686018427387904 out of range"),
    ("byte_offset", 10**9, r"chunks\[1\]: byte range \[1000000000, .* lies beyond the end"),
    ("byte_length", 8, r"chunks\[1\]: byte_length 8 does not match sizes"),
    ("block_hashes", ["zz"], r"chunks\[1\]: expected 1 block hashes of 16 hex digits"),
    ("block_hashes", [], r"chunks\[1\]: expected 1 block hashes"),
    ("file", None, r"missing field tensors\['w'\]\.chunks\[1\]\.file"),
]


@pytest.mark.parametrize(("field", "bad", "message"), _BAD_CHUNK_FIELDS)
def test_the_quick_manifest_check_refuses_every_chunk_the_full_check_refuses(
    tmp_path: Path, field: str, bad: Any, message: str
) -> None:
    """The manifest parser checks all chunk records on a quick path that builds no message
    (format/manifest_bulk.py); every defect still ends in the full check's error, naming the
    field (issue #18)."""
    import json

    from shardckpt.errors import ManifestError
    from shardckpt.format.manifest import parse_manifest

    path = tmp_path / "ckpt"
    shardckpt.save({"w": torch.arange(32.0)}, str(path / "a"))
    doc = json.loads((path / "a" / "manifest.json").read_bytes())
    [chunk] = doc["tensors"]["w"]["chunks"]
    # Two chunks of 16, so the bad record is the second one (its index is named).
    first, second = dict(chunk), dict(chunk)
    first.update(sizes=[16], byte_length=64)
    second.update(offsets=[16], sizes=[16], byte_offset=chunk["byte_offset"] + 64, byte_length=64)
    doc["tensors"]["w"]["chunks"] = [first, second]
    parse_manifest(json.dumps(doc).encode(), source="ok")  # the block hash count still fits: one block
    if bad is None:
        del second[field]
    else:
        second[field] = bad
    with pytest.raises(ManifestError, match=message):
        parse_manifest(json.dumps(doc).encode(), source="src")


def test_every_recorded_hash_is_that_of_the_bytes_on_disk_for_every_dtype_and_shape(tmp_path: Path) -> None:
    """The write path's shortcuts (numpy's buffer for numpy dtypes, one hash call for a
    one-block chunk, the joined writes) record what hashing each chunk's bytes on disk
    block by block gives, and those bytes are the tensor's own."""
    from shardckpt.format import integrity
    from shardckpt.format.manifest import parse_manifest

    block = 4096
    state: dict[str, Any] = {
        "f32": torch.randn(300),
        "bf16": torch.randn(500).to(torch.bfloat16),
        "bool": torch.rand(77) > 0.5,
        "i64": torch.arange(-5, 40),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "strided": torch.arange(60, dtype=torch.int16).reshape(6, 10).t(),
        "grad": torch.ones(5, requires_grad=True),
        "blocks": torch.randn(3 * block // 4 + 7),  # three full blocks and a short one
        "exact": torch.randn(block // 4),  # exactly one block
    }
    path = tmp_path / "ckpt"
    shardckpt.save(state, str(path), num_io_threads=2, hash_block_bytes=block)
    m = parse_manifest((path / "manifest.json").read_bytes(), source="test")
    for name, record in m.files.items():
        hasher = integrity.new_file_hasher()
        hasher.update((path / name).read_bytes())
        assert hasher.hexdigest() == record.hash, name
    for key, tensor in state.items():
        [chunk] = m.tensors[key].chunks
        raw = (path / chunk.file).read_bytes()[chunk.byte_offset : chunk.byte_offset + chunk.byte_length]
        want = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert raw == want, key
        assert list(chunk.block_hashes) == integrity.block_hashes(memoryview(raw), block), key
    assert len(m.tensors["blocks"].chunks[0].block_hashes) == 4
    assert m.tensors["empty"].chunks[0].block_hashes == ()
