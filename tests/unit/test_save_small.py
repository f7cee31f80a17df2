"""The small-tensor save's shortcuts (issue #18): results packed into columns for the
coordinator, headers built from columns, detach() only when needed. Each must leave what
is written and committed exactly what the per-chunk path gave."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

import shardckpt
from shardckpt.engine import write_results
from shardckpt.engine.datawrite import WrittenFile
from shardckpt.engine.incremental import ChunkLocation
from shardckpt.engine.manifest_builder import _file_records
from shardckpt.engine.writer import _InlineValue
from shardckpt.errors import StorageError
from shardckpt.format import datafile
from shardckpt.format.manifest import FileRecord


def _results(rank: int, record: FileRecord, *, file: str = "") -> list[WriteResult]:
    """Three chunks of one rank in one file, and a value."""
    name = file or f"data/r{rank}.safetensors"
    chunks = [
        WriteResult(
            index=MetadataIndex(f"w{i}", torch.Size([rank * 4, 0])),
            size_in_bytes=16 * (i + 1),
            storage_data=ChunkLocation(name, 64 + 16 * i, 16 * (i + 1), (f"{rank:x}{i:015x}",), record, None),
        )
        for i in range(3)
    ]
    value = WriteResult(index=MetadataIndex("step"), size_in_bytes=0, storage_data=_InlineValue(b"7"))
    return [value, *chunks]


def test_packed_results_locate_every_chunk_as_the_unpacked_ones_do() -> None:
    per_rank = [_results(r, FileRecord(size=200 + r, hash=f"{r:016x}", rank=r)) for r in range(3)]
    packed = [pickle.loads(pickle.dumps(write_results.pack(rs))) for rs in per_rank]  # the trip to the coordinator
    assert [len(rs) for rs in packed] == [2, 2, 2]  # the value and one packed result per rank
    found, named = write_results.located(packed)
    plain, plain_named = write_results.located(per_rank)
    assert found == plain
    assert found["w2", (8, 0)] == ("data/r2.safetensors", 96, 48, ("2000000000000002",), None)
    assert found["w2", torch.Size([8, 0])] is found["w2", (8, 0)]  # metadata looks chunks up by torch.Size
    assert found["step", None] == _InlineValue(b"7")
    assert (
        _file_records(named)
        == _file_records(plain_named)
        == {f"data/r{r}.safetensors": FileRecord(size=200 + r, hash=f"{r:016x}", rank=r) for r in range(3)}
    )


def test_written_files_pack_into_the_columns_their_results_would_give() -> None:
    record = FileRecord(size=200, hash="c" * 16, rank=1)
    items = [r.index for r in _results(1, record)[1:]]
    written = WrittenFile(
        "data/r1.safetensors",
        record,
        [WriteItem(index=i, type=WriteItemType.SHARD) for i in items],
        [64, 80, 96],  # as _results lays them out
        [16, 32, 48],
        [("1000000000000000",), ("1000000000000001",), ("1000000000000002",)],
        [None, None, None],
    )
    value = _results(1, record)[:1]
    from_files = pickle.loads(pickle.dumps(write_results.pack(value, [written])))
    from_results = write_results.pack(value + written.results())
    assert from_files == from_results
    assert from_files[1].storage_data.file_of == [0, 0, 0] and from_files[1].size_in_bytes == 96
    assert write_results.located([from_files])[0] == write_results.located([_results(1, record)])[0]


def test_one_file_name_with_two_records_still_fails_after_packing() -> None:
    first = write_results.pack(_results(0, FileRecord(size=200, hash="a" * 16, rank=0), file="data/x.safetensors"))
    second = write_results.pack(_results(1, FileRecord(size=300, hash="b" * 16, rank=1), file="data/x.safetensors"))
    _, named = write_results.located([first, second])
    with pytest.raises(StorageError, match=re.escape("data/x.safetensors names two different files")):
        _file_records(named)
    same = write_results.pack(_results(1, FileRecord(size=200, hash="a" * 16, rank=0), file="data/x.safetensors"))
    assert list(_file_records(write_results.located([first, same])[1])) == ["data/x.safetensors"]  # equal: fine


def test_results_without_chunks_pass_through_unpacked() -> None:
    values = _results(0, FileRecord(size=1, hash="0" * 16, rank=0))[:1]
    assert write_results.pack(values) is values


def test_header_from_columns_is_build_headers_bytes() -> None:
    entries = [
        datafile.HeaderEntry("a@0,0", "F32", (2, 3), 0, 24),
        datafile.HeaderEntry("b", "BF16", (5,), 24, 34),
        datafile.HeaderEntry('odd "name"', "I8", (), 34, 35),  # escaped: the json.dumps path
    ]
    for some in (entries[:2], entries):
        columns = datafile.HeaderColumns(
            [e.name for e in some], [e.dtype for e in some], [e.shape for e in some], [e.begin for e in some],
            [e.end for e in some],
        )  # fmt: skip
        raw = datafile.build_header_columns(columns, {"rank": "0"})
        assert raw == datafile.build_header(some, {"rank": "0"})
        n = datafile.header_length(raw[:8], file="f", file_size=len(raw) + some[-1].end)
        parsed, meta = datafile.parse_header(raw[8 : 8 + n], file="f", file_size=len(raw) + some[-1].end)
        assert parsed == some and meta == {"rank": "0"}


def test_tensors_that_need_grad_or_a_copy_are_saved_by_value(tmp_path: Path) -> None:
    """detach() is skipped for tensors without grad; those with grad, views with strides
    and bfloat16 (no numpy view) still save their values."""
    base = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    state = {
        "param": torch.nn.Parameter(torch.linspace(0, 1, 48)),
        "strided": base.t()[:, ::2],
        "bf16": torch.arange(10, dtype=torch.bfloat16),
        "many": {f"t{i}": torch.full((i + 1,), float(i)) for i in range(300)},
    }
    manifest = shardckpt.save(state, tmp_path / "c", num_io_threads=2)
    assert manifest is not None and manifest.format_version == 1
    got = {
        "param": torch.zeros(48),
        "strided": torch.zeros(8, 4),
        "bf16": torch.zeros(10, dtype=torch.bfloat16),
        "many": {f"t{i}": torch.zeros(i + 1) for i in range(300)},
    }
    shardckpt.load(got, tmp_path / "c")  # every block hash verified
    assert torch.equal(got["param"], state["param"].detach())
    assert torch.equal(got["strided"], base.t()[:, ::2])
    assert torch.equal(got["bf16"], state["bf16"])
    assert all(torch.equal(got["many"][k], v) for k, v in state["many"].items())
    assert state["param"].requires_grad  # the saved tensor itself is left as it was
