"""``materialize`` of a format-3 checkpoint (issue #16): every rule expanded, every chunk
resolved through the verified pages and index records, copied and verified into format 1;
the copy loads bitwise and passes verify. A format-3 output is refused by name."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.cli.app import main
from shardckpt.convert import materialize_checkpoint
from shardckpt.convert.audit import verify_checkpoint
from shardckpt.errors import IntegrityError, ManifestError
from shardckpt.format import layout
from tests.support.v3_fixture import Boxes, Split, write_v3


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(3)
    return {
        "model": {"w": torch.randn(40, 24, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16)},
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "step": 9,
        "cfg": {"lr": 0.5},
    }


def _zeros() -> dict[str, object]:
    return {
        "model": {"w": torch.zeros(40, 24), "b": torch.zeros(7, dtype=torch.bfloat16)},
        "scalar": torch.tensor(0.0),
        "empty": torch.zeros(0, 3),
        "step": 0,
        "cfg": {"lr": 0.0},
    }


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_a_saved_format_3_checkpoint_materializes_into_format_1_that_loads_bitwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "src", tmp_path / "copy"
    shardckpt.save(_state(), src, format_version=3, num_io_threads=2)
    assert main(["materialize", str(src), str(out), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format_version"] == 1 and report["tensor_bytes"] == 40 * 24 * 4 + 7 * 2 + 4
    m = shardckpt.read_manifest(out)
    assert m.format_version == 1 and m.bases == () and m.values["step"] == 9
    assert [p["rank"] for p in m.process_layout] == [0]
    shutil.rmtree(src)  # the copy needs nothing of the source
    got = _zeros()
    shardckpt.load(got, out)
    want = _state()
    for k in ("w", "b"):
        assert _bitwise(got["model"][k], want["model"][k]), k  # type: ignore[index]
    assert _bitwise(got["scalar"], want["scalar"]) and got["step"] == 9 and got["cfg"] == {"lr": 0.5}  # type: ignore[arg-type]
    assert verify_checkpoint(out).ok


def test_an_incremental_fixture_with_irregular_tensors_and_an_idle_rank_materializes(tmp_path: Path) -> None:
    """4 simulated ranks, 2 files each, 2 ranks to a page, a listed tiling, a base beside it:
    every chunk is found through its group's page and index record, also in the base."""
    g = torch.Generator().manual_seed(4)
    w, irr, frozen = torch.randn(10, 4, generator=g), torch.randn(5, 2, generator=g), torch.randn(6, 6, generator=g)
    base_tensors = {"w": (w + 1, Split((2, 1))), "frozen": (frozen, Split((3, 2)))}
    base = write_v3(tmp_path / "s0", base_tensors, ranks=4, files_per_rank=2, ranks_per_page=2, save_id="ab")
    tensors = {"w": (w, Split((3, 1))), "irr": (irr, Boxes((((0, 0), (1, 2)), ((1, 0), (4, 2)))))}
    write_v3(tmp_path / "s1", tensors, ranks=5, files_per_rank=2, ranks_per_page=2, values={"step": 2},
             save_id="cd", base=base, from_base=("frozen",))  # fmt: skip
    report = materialize_checkpoint(tmp_path / "s1", tmp_path / "copy")
    assert report.format_version == 1
    assert [(f.folder, f.own) for f in report.folders] == [("s1", True), ("s0", False)]
    m = shardckpt.read_manifest(tmp_path / "copy")
    assert m.bases == () and len(m.process_layout) == 5
    assert [c.sizes for c in m.tensors["irr"].chunks] == [(1, 2), (4, 2)]
    shutil.rmtree(tmp_path / "s0")
    got = {"w": torch.zeros(10, 4), "irr": torch.zeros(5, 2), "frozen": torch.zeros(6, 6), "step": 0}
    shardckpt.load(got, tmp_path / "copy")
    assert torch.equal(got["w"], w) and torch.equal(got["irr"], irr) and torch.equal(got["frozen"], frozen)
    assert got["step"] == 2 and verify_checkpoint(tmp_path / "copy").ok


def test_a_damaged_format_3_source_commits_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shardckpt.save(_state(), src, format_version=3)
    data = sorted((src / layout.DATA_DIR).glob("*.safetensors"))[0]
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=data.name):
        materialize_checkpoint(src, tmp_path / "a")
    assert not (tmp_path / "a").exists() or not os.listdir(tmp_path / "a")
    index = next((src / layout.DATA_DIR).glob("*.index.json"))
    index.write_bytes(index.read_bytes() + b" ")
    with pytest.raises(ManifestError, match=r"index record of rank 0"):
        materialize_checkpoint(src, tmp_path / "b")
    assert not (tmp_path / "b").exists() or not os.listdir(tmp_path / "b")


def test_a_format_3_output_is_refused_with_the_way_to_get_one(tmp_path: Path) -> None:
    shardckpt.save(_state(), tmp_path / "src", format_version=3)
    with pytest.raises(ValueError, match=r"format_version=3 is not written by materialize.*format_version=3\)"):
        materialize_checkpoint(tmp_path / "src", tmp_path / "copy", format_version=3)
    assert not (tmp_path / "copy").exists()
