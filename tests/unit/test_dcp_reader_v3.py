"""``shardckpt.dcp.StorageReader`` over format 3 (issue #16), on one process: ``dcp.load``
gets every rule expanded into DCP's chunks and reads through the format's checksum chain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException

import shardckpt
from shardckpt.dcp import StorageReader
from shardckpt.engine.planner import LoadPlanner
from shardckpt.errors import IntegrityError
from shardckpt.format import layout
from shardckpt.format.manifest_v3 import ManifestV3
from tests.support.v3_fixture import Boxes, Split, write_v3


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(5)
    return {
        "w": torch.randn(9, 7, generator=g),
        "b": torch.randn(5, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "step": 11,
        "opt": {"lr": 0.25, "betas": (0.9, 0.95)},
    }


def _zeros() -> dict[str, object]:
    return {
        "w": torch.zeros(9, 7),
        "b": torch.zeros(5, dtype=torch.bfloat16),
        "scalar": torch.tensor(0.0),
        "empty": torch.zeros(0, 4),
        "step": 0,
        "opt": {"lr": 0.0, "betas": None},
    }


def _same(got: dict[str, object], want: dict[str, object]) -> None:
    for k in ("w", "b", "scalar", "empty"):
        a, b = got[k], want[k]
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), k
    assert got["step"] == 11 and got["opt"] == {"lr": 0.25, "betas": (0.9, 0.95)}


@pytest.mark.parametrize("planner", ["dcp", "ours"])
def test_dcp_load_reads_what_save_wrote_in_format_3(tmp_path: Path, planner: str) -> None:
    path = tmp_path / "c"
    shardckpt.save(_state(), path, format_version=3)
    reader = StorageReader(path)
    target = _zeros()
    chosen = DefaultLoadPlanner() if planner == "dcp" else LoadPlanner(allow_partial_load=False)
    dcp.load(target, storage_reader=reader, planner=chosen)
    _same(target, _state())
    assert isinstance(reader.manifest, ManifestV3) and reader.bytes_read > 0


def test_every_rule_and_listed_chunk_reaches_dcp_and_reads_bitwise(tmp_path: Path) -> None:
    """Four simulated ranks, two files each, an irregular tiling beside rules; rank 3 holds
    nothing (no data file, an index record): dcp.load on one process reads every chunk."""
    g = torch.Generator().manual_seed(9)
    w, v, irr = torch.randn(12, 6, generator=g), torch.randn(6, 8, generator=g), torch.randn(5, 3, generator=g)
    uneven = Boxes((((0, 0), (2, 3)), ((2, 0), (3, 3))))  # rows 2 then 3: not torch.chunk's, so listed
    tensors = {"w": (w, Split((3, 2))), "v": (v, Split((1, 3))), "irr": (irr, uneven)}
    written = write_v3(tmp_path / "c", tensors, ranks=7, files_per_rank=2, values={"step": 4})
    assert 6 not in written.files_of_rank and 6 in written.index_names  # a rank that holds nothing
    assert written.manifest.tensors["irr"].rule is None and written.manifest.tensors["w"].rule is not None
    md = StorageReader(tmp_path / "c").read_metadata()
    assert [tuple(c.offsets) for c in md.state_dict_metadata["w"].chunks] == [  # type: ignore[union-attr]
        (r, c) for r in (0, 4, 8) for c in (0, 3)
    ]
    target = {"w": torch.zeros(12, 6), "v": torch.zeros(6, 8), "irr": torch.zeros(5, 3), "step": 0}
    dcp.load(target, storage_reader=StorageReader(tmp_path / "c"))
    assert torch.equal(target["w"], w) and torch.equal(target["v"], v) and torch.equal(target["irr"], irr)
    assert target["step"] == 4


def test_dcp_load_of_format_3_verifies_through_the_index_records(tmp_path: Path) -> None:
    path = tmp_path / "c"
    shardckpt.save(_state(), path, format_version=3)
    data = sorted((path / layout.DATA_DIR).glob("*.safetensors"))[0]
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit of a tensor's last byte: same size, another block hash
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_zeros(), storage_reader=StorageReader(path))
    ((err, _),) = info.value.failures.values()
    assert isinstance(err, IntegrityError) and data.name in str(err)


def test_the_writer_lays_out_files_as_the_fixture_does(tmp_path: Path) -> None:
    """The loader's unit tests run on tests/support/v3_fixture.py: the real writer's data
    files carry the same header metadata (format_version "3", save id, rank)."""
    path = tmp_path / "c"
    shardckpt.save(_state(), path, format_version=3)
    for f in (path / layout.DATA_DIR).glob("*.safetensors"):
        raw = f.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        meta = header["__metadata__"]
        assert meta["format"] == "shardckpt" and meta["format_version"] == "3" and meta["rank"] == "0", f.name
        assert f.name.startswith(meta["save_id"] + "-r00000-")
