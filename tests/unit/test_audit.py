"""verify_checkpoint / describe_checkpoint: clean checkpoints pass, every kind of damage is named."""

from __future__ import annotations

import datetime
import json
import math
import os
import struct
from typing import ClassVar

import pytest
import torch
from damage import chunk_of, flip_byte
from distributed import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import shardckpt
from shardckpt.convert import audit
from shardckpt.convert.audit import Problem, describe_checkpoint, verify_checkpoint
from shardckpt.errors import CheckpointNotFoundError, ManifestError, NotCommittedError
from shardckpt.format.manifest import seal
from shardckpt.storage import LocalStorage

BLOCK = 4096


def state() -> dict:
    return {
        "model": {
            "w": torch.arange(3000, dtype=torch.float32).reshape(60, 50),  # 12000 bytes: 3 blocks
            "b": torch.linspace(-1, 1, 7).to(torch.bfloat16),
            "e": torch.zeros(0, 4),
        },
        "step": 7,
        "opt": {"lr": 1e-3, "betas": (0.9, 0.95), "bad": float("nan")},
    }


def make_checkpoint(path: str, num_io_threads: int = 1) -> dict:
    """Save ``state()`` to ``path``; return the manifest as plain JSON (read independently of audit)."""
    shardckpt.save(state(), path, hash_block_bytes=BLOCK, num_io_threads=num_io_threads)
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


@pytest.fixture
def ckpt(tmp_path) -> tuple[str, dict]:
    path = str(tmp_path / "ckpt")
    return path, make_checkpoint(path)


def test_clean_checkpoint_counts_every_file_chunk_and_byte(ckpt):
    path, m = ckpt
    report = verify_checkpoint(path)
    assert report.ok and report.problems == []
    assert report.files_checked == len(m["files"]) == 1
    assert report.chunks_checked == 3
    (name,) = m["files"]
    assert report.bytes_hashed == os.path.getsize(os.path.join(path, name)) == m["files"][name]["size"]
    assert report.to_json()["ok"] is True


@pytest.mark.parametrize("piece", [7, 1000, BLOCK, BLOCK + 8, 1 << 20])
def test_read_piece_size_does_not_change_the_verdict(ckpt, piece):
    """Blocks straddle pieces for most sizes: the streaming hash must equal the one-shot one."""
    path, m = ckpt
    assert verify_checkpoint(path, read_piece_bytes=piece).ok
    c = chunk_of(m, "model.w")
    flip_byte(os.path.join(path, c["file"]), c["byte_offset"] + 2 * BLOCK + 3)
    report = verify_checkpoint(path, read_piece_bytes=piece)
    keyed = [p for p in report.problems if p.key is not None]
    assert [(p.file, p.key) for p in keyed] == [(c["file"], "model.w")]
    assert "1 of 3 checksum blocks" in keyed[0].message and "block 2 " in keyed[0].message


def test_flipped_byte_names_file_key_block_and_whole_file_hash(ckpt):
    path, m = ckpt
    c = chunk_of(m, "model.w")
    flip_byte(os.path.join(path, c["file"]), c["byte_offset"] + 5000)
    report = verify_checkpoint(path)
    assert not report.ok
    assert len(report.problems) == 2
    block, whole = report.problems
    assert (block.file, block.key) == (c["file"], "model.w")
    start = c["byte_offset"] + BLOCK
    assert f"block 1 = file bytes [{start}, {start + BLOCK})" in block.message
    assert (whole.file, whole.key) == (c["file"], None)
    assert m["files"][c["file"]]["hash"] in whole.message
    assert str(block).startswith(f"{c['file']}, key 'model.w': ")
    assert report.chunks_checked == 3  # damaged chunks were still fully re-hashed


def test_damage_in_two_keys_is_reported_for_both(ckpt):
    path, m = ckpt
    for key in ("model.w", "model.b"):
        c = chunk_of(m, key)
        flip_byte(os.path.join(path, c["file"]), c["byte_offset"] + c["byte_length"] - 1)
    keys = sorted(p.key for p in verify_checkpoint(path).problems if p.key)
    assert keys == ["model.b", "model.w"]


def test_truncated_file_reports_size_and_every_cut_chunk(ckpt):
    path, m = ckpt
    w, b = chunk_of(m, "model.w"), chunk_of(m, "model.b")
    assert w["byte_offset"] < b["byte_offset"]  # the writer puts the largest tensor first
    name = w["file"]
    cut = w["byte_offset"] + 100
    os.truncate(os.path.join(path, name), cut)
    report = verify_checkpoint(path)
    size_problems = [p for p in report.problems if p.key is None]
    assert len(size_problems) == 1
    assert f"is {cut} bytes, the manifest says {m['files'][name]['size']}" in size_problems[0].message
    cut_keys = sorted(p.key for p in report.problems if p.key is not None)
    assert cut_keys == ["model.b", "model.w"]
    assert all("run past the end of the file" in p.message for p in report.problems if p.key)
    assert report.chunks_checked == 1  # only the empty model.e
    assert report.bytes_hashed == cut


def test_appended_bytes_are_a_size_problem_only(ckpt):
    path, m = ckpt
    (name,) = m["files"]
    with open(os.path.join(path, name), "ab") as f:
        f.write(b"junk")
    report = verify_checkpoint(path)
    assert [(p.file, p.key) for p in report.problems] == [(name, None)]
    assert "truncated or replaced" in report.problems[0].message


def test_missing_file_is_reported_with_the_keys_it_held(tmp_path):
    path = str(tmp_path / "ckpt")
    m = make_checkpoint(path, num_io_threads=2)
    assert len(m["files"]) == 2
    gone = chunk_of(m, "model.w")["file"]
    os.remove(os.path.join(path, gone))
    report = verify_checkpoint(path)
    assert [(p.file, p.key) for p in report.problems] == [(gone, None)]
    assert "missing" in report.problems[0].message and "'model.w'" in report.problems[0].message
    assert report.files_checked == 1  # the other file is still verified


def test_header_that_is_not_json_is_reported_and_data_still_checked(ckpt):
    path, m = ckpt
    (name,) = m["files"]
    with open(os.path.join(path, name), "r+b") as f:
        f.seek(8)
        assert f.read(1) == b"{"
        f.seek(8)
        f.write(b"X")
    report = verify_checkpoint(path)
    header = [p for p in report.problems if "header" in p.message]
    assert len(header) == 1 and header[0].file == name and "not valid JSON" in header[0].message
    assert not any(p.key for p in report.problems)  # the tensor bytes are intact
    assert report.chunks_checked == 3


def test_absurd_header_length_is_reported(ckpt):
    path, m = ckpt
    (name,) = m["files"]
    with open(os.path.join(path, name), "r+b") as f:
        f.write(struct.pack("<Q", 2**40))
    problems = verify_checkpoint(path).problems
    assert any(p.file == name and "absurd" in p.message for p in problems)


def test_header_that_disagrees_with_manifest_names_the_key(ckpt):
    path, m = ckpt
    (name,) = m["files"]
    full = os.path.join(path, name)
    with open(full, "rb") as f:
        raw = f.read()
    assert raw.count(b"[60,50]") == 1
    with open(full, "wb") as f:
        f.write(raw.replace(b"[60,50]", b"[50,60]"))
    problems = [p for p in verify_checkpoint(path).problems if p.key is not None]
    assert [p.key for p in problems] == ["model.w"]
    assert "F32 [50, 60]" in problems[0].message and "F32 [60, 50]" in problems[0].message


def test_manifest_chunk_pointing_elsewhere_leaves_a_header_entry_unclaimed(ckpt):
    path, m = ckpt
    b = chunk_of(m, "model.b")
    b["byte_offset"] -= 8  # still inside the file, so the manifest parses
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(seal(json.dumps(m).encode()))  # a consistent (re-sealed) but wrong manifest
    problems = verify_checkpoint(path).problems
    header = [p for p in problems if "header" in p.message]
    assert len(header) == 2
    assert header[0].key == "model.b" and "lists no tensor at bytes" in header[0].message
    start = b["byte_offset"] + 8
    assert header[1].key is None
    assert f"tensor 'model.b' at bytes [{start}, {start + 14}), which no manifest chunk uses" in header[1].message
    assert any(p.key == "model.b" and "checksum blocks differ" in p.message for p in problems)


class _FlakyStorage(LocalStorage):
    """Fails every read of one file; records the length of every read."""

    broken: ClassVar[str] = ""  # class-wide: the test sets both; open_storage makes the instances
    lengths: ClassVar[list[int]] = []

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        self.lengths.append(len(out))
        if name == self.broken:
            raise PermissionError(13, "Permission denied", name)
        super().read_into(name, offset, out)


def test_unreadable_file_is_a_problem_and_reads_stay_small(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt")
    m = make_checkpoint(path, num_io_threads=2)
    broken = chunk_of(m, "model.b")["file"]
    _FlakyStorage.broken, _FlakyStorage.lengths = broken, []
    monkeypatch.setattr(audit, "open_storage", lambda url, options=None: _FlakyStorage(url))
    report = verify_checkpoint(path, read_piece_bytes=1024)
    assert [(p.file, p.key) for p in report.problems] == [(broken, None)]
    assert "PermissionError" in report.problems[0].message
    assert report.files_checked == 1
    assert 0 < max(_FlakyStorage.lengths) <= 1024


def test_not_committed_and_missing_paths_raise_typed_errors(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(NotCommittedError, match=r"has no manifest\.json"):
        verify_checkpoint(str(tmp_path / "half"))
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        verify_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(NotCommittedError):
        describe_checkpoint(str(tmp_path / "half"))


def test_malformed_manifest_raises_manifest_error(ckpt):
    path, _ = ckpt
    with open(os.path.join(path, "manifest.json"), "w") as f:
        f.write('{"format": "shardckpt"')
    with pytest.raises(ManifestError, match="checksum"):
        verify_checkpoint(path)


def test_progress_bar_goes_to_stderr(ckpt, capsys):
    path, _ = ckpt
    verify_checkpoint(path, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "verify" in err and "100%" in err


def test_problem_formats_with_and_without_key():
    assert str(Problem("data/a.safetensors", "k", "bad")) == "data/a.safetensors, key 'k': bad"
    assert str(Problem("data/a.safetensors", None, "bad")) == "data/a.safetensors: bad"


def test_describe_summarises_the_manifest(ckpt):
    path, m = ckpt
    d = describe_checkpoint(path)
    json.dumps(d, allow_nan=False)  # strict JSON, although a value is NaN
    assert d["format_version"] == 1 and d["world_size"] == 1
    assert d["shardckpt_version"] == shardckpt.__version__ and d["torch_version"] == torch.__version__
    assert datetime.datetime.fromisoformat(d["created_at"]).tzinfo is not None
    assert d["process_layout"][0]["rank"] == 0
    assert (d["num_keys"], d["num_tensors"], d["num_values"], d["num_files"]) == (7, 3, 4, 1)
    (name,) = m["files"]
    assert d["total_bytes"] == os.path.getsize(os.path.join(path, name))
    assert d["tensor_bytes"] == 12000 + 7 * 2
    assert d["keys"]["model.w"] == {"kind": "tensor", "dtype": "F32", "shape": [60, 50], "chunks": 1, "bytes": 12000}
    assert d["keys"]["model.b"] == {"kind": "tensor", "dtype": "BF16", "shape": [7], "chunks": 1, "bytes": 14}
    assert d["keys"]["model.e"]["shape"] == [0, 4] and d["keys"]["model.e"]["bytes"] == 0
    assert d["keys"]["step"] == {"kind": "value", "type": "int", "value": 7}
    assert d["keys"]["opt.betas"] == {"kind": "value", "type": "tuple", "value": {"$tuple": [0.9, 0.95]}}
    assert d["keys"]["opt.bad"] == {"kind": "value", "type": "float", "value": {"$float": "nan"}}
    assert list(d["keys"]) == sorted(d["keys"])


def test_verify_and_describe_through_fsspec():
    url = "memory://audit-test/ckpt"
    shardckpt.save(state(), url, hash_block_bytes=BLOCK)
    report = verify_checkpoint(url, read_piece_bytes=1000)
    assert report.ok and report.chunks_checked == 3
    assert describe_checkpoint(url)["keys"]["model.w"]["shape"] == [60, 50]


# ---------------------------------------------------------------- two ranks


def _save_two_ranks(rank: int, world: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.arange(3000, dtype=torch.float32).reshape(60, 50), mesh, [Shard(0)])
    shardckpt.save({"w": w, "step": 1}, path, hash_block_bytes=BLOCK)


def test_sharded_checkpoint_from_two_ranks(tmp_path):
    path = str(tmp_path / "ckpt")
    run_ranks(_save_two_ranks, 2, path)
    d = describe_checkpoint(path)
    assert d["world_size"] == 2 and d["keys"]["w"]["chunks"] == 2 and d["keys"]["w"]["bytes"] == 12000
    assert verify_checkpoint(path).chunks_checked == 2
    with open(os.path.join(path, "manifest.json")) as f:
        m = json.load(f)
    second = next(c for c in m["tensors"]["w"]["chunks"] if c["offsets"] == [30, 0])
    assert m["files"][second["file"]]["rank"] == 1
    flip_byte(os.path.join(path, second["file"]), second["byte_offset"] + second["byte_length"] // 2)
    keyed = [p for p in verify_checkpoint(path).problems if p.key]
    assert [(p.file, p.key) for p in keyed] == [(second["file"], "w")]
    assert "chunk at offsets [30, 0]" in keyed[0].message
    assert math.ceil(second["byte_length"] / BLOCK) == 2 and "1 of 2 checksum blocks" in keyed[0].message
