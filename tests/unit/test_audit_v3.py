"""``shardckpt verify`` and ``inspect`` on format 3, and the tools that refuse it by name.

verify walks every page, index record and data byte of a format-3 checkpoint
(tests/support/v3_fixture.py, 4 simulated ranks) and reports every broken link in one run;
export, diff and read_state_dict read it as they read its version-1 twin; read_manifest says
it reads formats 1 and 2 only, naming itself and format 3 (the DCP StorageReader and
materialize read it: tests/unit/test_dcp_reader_v3.py, tests/unit/test_materialize_v3.py).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from v3_fixture import Boxes, Split, Written, write_v3

import shardckpt
from shardckpt.cli.app import main
from shardckpt.convert.audit import describe_checkpoint, verify_checkpoint
from shardckpt.convert.source import CheckpointSource
from shardckpt.errors import UnsupportedFormatVersionError


def _write(path: Any) -> Written:
    return write_v3(
        path,
        {
            "model.w": (torch.arange(40, dtype=torch.float32).reshape(10, 4), Split((4, 1))),
            "model.irr": (
                torch.arange(10, dtype=torch.float16).reshape(5, 2),
                Boxes((((0, 0), (1, 2)), ((1, 0), (4, 2)))),
            ),
        },
        ranks=4,
        values={"step": 5},
        files_per_rank=2,
        ranks_per_page=2,
    )


def _data(w: Written) -> list[str]:
    return [n for names in w.files_of_rank.values() for n in names]


def test_verify_reads_every_data_byte_of_a_format_3_checkpoint(tmp_path):
    w = _write(tmp_path / "c")
    report = verify_checkpoint(tmp_path / "c")
    assert report.ok, report.problems
    data = _data(w)
    assert report.files_checked == len(data) == 6
    assert report.chunks_checked == 4 + 2  # model.w's 4 cells, model.irr's 2 listed boxes
    assert report.bytes_hashed == sum(os.path.getsize(tmp_path / "c" / n) for n in data)
    assert main(["verify", str(tmp_path / "c")]) == 0


def test_verify_reports_every_broken_link_in_one_run(tmp_path, capsys):
    w = _write(tmp_path / "c")
    root = tmp_path / "c"
    victim = root / w.files_of_rank[1][0]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(bytes(raw))
    os.remove(root / w.index_names[3])  # page 1 holds ranks 2 and 3
    page = root / w.page_names[0]
    page.write_bytes(page.read_bytes()[:-1] + b" ")  # same size, another hash
    report = verify_checkpoint(root)
    where = {(p.file, p.key) for p in report.problems}
    assert (w.page_names[0], None) in where  # ranks 0 and 1 not checked: their page is untrusted
    assert (w.index_names[3], None) in where
    assert not any(p.file in w.files_of_rank[1] for p in report.problems)  # under the bad page: not read
    assert report.files_checked == len(w.files_of_rank[2])  # rank 2's files only
    text = " ".join(str(p) for p in report.problems)
    assert "checksum mismatch of the page" in text and "ranks 0..1 were not checked" in text
    assert "index record of rank 3" in text and "is missing" in text
    assert main(["verify", str(root)]) == 1  # EXIT_DAMAGED
    assert "FAILED" in capsys.readouterr().out


def test_verify_names_a_damaged_data_file_by_key(tmp_path):
    w = _write(tmp_path / "c")
    victim = tmp_path / "c" / w.files_of_rank[3][0]  # rank 3: model.w's last cell only
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(bytes(raw))
    report = verify_checkpoint(tmp_path / "c")
    messages = {(p.file, p.key): p.message for p in report.problems}
    assert "checksum blocks differ" in messages[(w.files_of_rank[3][0], "model.w")]
    assert "its index record says" in messages[(w.files_of_rank[3][0], None)]  # the whole-file hash


def test_inspect_summarizes_a_format_3_manifest(tmp_path, capsys):
    _write(tmp_path / "c")
    s = describe_checkpoint(tmp_path / "c")
    assert s["format_version"] == 3 and s["world_size"] == 4 and s["num_files"] == 6
    assert s["keys"]["model.w"] == {
        "kind": "tensor",
        "dtype": "F32",
        "shape": [10, 4],
        "chunks": 4,
        "bytes": 160,
        "by_rule": True,
    }
    assert s["keys"]["model.irr"]["by_rule"] is False and s["keys"]["step"]["value"] == 5
    assert s["total_bytes"] is None and s["tensor_bytes"] == 160 + 20
    assert s["file_table"] == [{"save_id": "0123456789ab", "ranks": 4, "files": 6, "pages": 2}]
    assert main(["inspect", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "shardckpt format 3" in out and "file sizes are in the index records" in out


def test_export_diff_and_read_state_dict_read_format_3_as_its_version_1_twin(tmp_path):
    state = {
        "model": {"w": torch.randn(12, 5), "b": torch.arange(7, dtype=torch.int64), "h": torch.randn(3, 4).half()},
        "step": 9,
        "note": ("a", 1.5),
    }
    shardckpt.save(state, tmp_path / "v1")
    m = state["model"]
    tensors = {
        "model.w": (m["w"], Split((3, 2))),  # 6 cells over 3 ranks
        "model.b": (m["b"], Boxes((((0,), (2,)), ((2,), (1,)), ((3,), (4,))))),  # irregular: listed
        "model.h": (m["h"], Split((1, 1))),
    }
    write_v3(tmp_path / "v3", tensors, ranks=3, values={"step": 9, "note": ("a", 1.5)})
    flat1 = shardckpt.read_state_dict(tmp_path / "v1", flat=True)
    flat3 = shardckpt.read_state_dict(tmp_path / "v3", flat=True)
    assert flat1.keys() == flat3.keys() and flat3["step"] == 9 and flat3["note"] == ("a", 1.5)
    for k in ("model.w", "model.b", "model.h"):
        assert torch.equal(flat1[k], flat3[k]) and flat1[k].dtype == flat3[k].dtype, k
    report = shardckpt.diff_checkpoints(tmp_path / "v1", tmp_path / "v3")
    assert report.identical, report
    box = CheckpointSource(tmp_path / "v3").read_box("model.w", (3, 1), (3, 3))  # parts of 4 of the 6 cells
    assert torch.equal(box, state["model"]["w"][3:6, 1:4])
    shardckpt.export_checkpoint(tmp_path / "v3", tmp_path / "out.safetensors", format="safetensors")
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "out.safetensors")
    assert torch.equal(exported["model.w"], state["model"]["w"])


def test_read_manifest_refuses_format_3_naming_itself(tmp_path):
    _write(tmp_path / "c")
    with pytest.raises(UnsupportedFormatVersionError, match=r"format-3 checkpoint.*shardckpt.read_manifest reads"):
        shardckpt.read_manifest(tmp_path / "c")


def test_ls_lists_a_format_3_step_with_the_bytes_in_its_folder(tmp_path, capsys):
    w = _write(tmp_path / "root" / "step_0000000007")
    from shardckpt.manager.steps import list_root

    (info,) = list_root(tmp_path / "root")
    folder = tmp_path / "root" / "step_0000000007"
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    assert (info.step, info.committed, info.world_size) == (7, True, 4)
    assert info.size_bytes == on_disk > sum(os.path.getsize(folder / n) for n in _data(w))
    assert main(["ls", str(tmp_path / "root")]) == 0
    assert "7" in capsys.readouterr().out
