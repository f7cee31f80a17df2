"""Incremental saves in format 3 (docs/format.md 12.7), in one process: the digests in the
index records, the base groups of the file table (flattened), what is written and read, and
the combinations still refused."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from v3_fixture import Split, write_v3
from v3files import assemble, read_v3

import shardckpt
from shardckpt.cli.app import main
from shardckpt.convert.audit import verify_checkpoint
from shardckpt.convert.materialize import materialize_checkpoint
from shardckpt.engine.base_v3 import BaseIndexV3
from shardckpt.engine.loading import read_manifest
from shardckpt.errors import IntegrityError, ManifestError, UnsupportedFormatVersionError
from shardckpt.format import layout
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.manager.steps import list_root
from shardckpt.storage import open_storage
from shardckpt.storage.local import LocalStorage


def _state(seed: int = 0) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {
        "frozen": torch.randn(256, 512, generator=g),  # 512 KiB
        "emb": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "adapter": torch.randn(8, 512, generator=g),
        "norm": torch.randn(16, generator=g),
        "step": 0,
    }


def _own_data_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in (path / "data").iterdir() if f.name.endswith(".safetensors"))


def _load(sd: dict[str, object], path: Path) -> dict[str, object]:
    got = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1 for k, v in sd.items()}
    shardckpt.load(got, path)
    return got


def _same(got: dict[str, object], want: dict[str, object]) -> bool:
    return all(torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v for k, v in want.items())  # type: ignore[arg-type]


def _save(sd: dict[str, object], path: Path, **kw: object) -> ManifestV3:
    m = shardckpt.save(sd, path, format_version=3, num_io_threads=1, **kw)  # type: ignore[arg-type]
    assert isinstance(m, ManifestV3)
    return m


def test_only_the_changed_tensor_is_written_and_the_base_group_is_in_the_file_table(tmp_path: Path) -> None:
    sd = _state()
    m0 = _save(sd, tmp_path / "s0", incremental=True)
    assert m0.bases == () and len(m0.file_table.groups) == 1
    sd["adapter"] = sd["adapter"] + 1  # type: ignore[operator]
    sd["step"] = 1
    m1 = _save(sd, tmp_path / "s1", base=tmp_path / "s0")
    assert m1.bases == ("s0",)
    own, base = m1.file_table.groups
    assert own.checkpoint is None and base == dataclasses.replace(m0.file_table.groups[0], checkpoint="s0")
    # the adapter's 16 KiB (plus a header) and nothing else
    assert 8 * 512 * 4 <= _own_data_bytes(tmp_path / "s1") < 8 * 512 * 4 + 512
    assert (tmp_path / "s0" / layout.REFERENCED_NAME).exists()
    parsed, chunks = read_v3(str(tmp_path / "s1"))  # the chain of both groups, every digest checked
    assert parsed.tensors == m1.tensors
    assert [c.folder for c in chunks["adapter"]] == [None]
    assert [c.folder for c in chunks["frozen"]] == ["s0"] and [c.folder for c in chunks["emb"]] == ["s0"]
    for key in ("frozen", "emb", "adapter", "norm"):
        want = sd[key]
        assert isinstance(want, torch.Tensor)
        assert torch.equal(assemble(chunks[key], tuple(want.shape), want.dtype), want), key
    assert _same(_load(sd, tmp_path / "s1"), sd)
    report = verify_checkpoint(str(tmp_path / "s1"))
    assert report.ok, report.problems


def test_index_records_carry_digests_only_for_incremental_saves(tmp_path: Path) -> None:
    sd = _state()
    for name, kw in (("plain", {}), ("incr", {"incremental": True})):
        m = _save(sd, tmp_path / name, **kw)
        group = m.file_table.groups[0]
        raw = (tmp_path / name / layout.rank_index_name(group.save_id, 0)).read_text()
        doc = json.loads(raw)
        assert doc["digests"] is (name == "incr")
        widths = {len(e) for f in doc["files"] for e in f["entries"]}
        assert widths == ({4} if name == "incr" else {3})
    read_v3(str(tmp_path / "incr"))  # each digest equals the xxh3-128 of its chunk's bytes
    assert verify_checkpoint(str(tmp_path / "incr")).ok  # the inline copy has none: still equal


def test_a_chain_is_flattened_and_an_unchanged_save_writes_no_data(tmp_path: Path) -> None:
    sd = _state()
    _save(sd, tmp_path / "s0", incremental=True)
    sd["adapter"] = sd["adapter"] * 2  # type: ignore[operator]
    _save(sd, tmp_path / "s1", base=tmp_path / "s0")
    m2 = _save(sd, tmp_path / "s2", base=tmp_path / "s1")
    assert m2.bases == ("s0", "s1")
    assert [g.checkpoint for g in m2.file_table.groups] == [None, "s0", "s1"]
    for g in m2.file_table.groups[1:]:  # each group is the save that wrote the files in its folder
        assert g.checkpoint is not None
        assert (tmp_path / g.checkpoint / layout.rank_page_name(g.save_id, 0)).exists()
    assert _own_data_bytes(tmp_path / "s2") == 0 and m2.file_table.groups[0].files == ((1, 0),)
    assert (tmp_path / "s1" / layout.REFERENCED_NAME).exists()
    assert _same(_load(sd, tmp_path / "s2"), sd)
    assert verify_checkpoint(str(tmp_path / "s2")).ok
    materialize_checkpoint(tmp_path / "s2", tmp_path / "copy")  # a standalone copy, no references
    assert read_manifest(open_storage(str(tmp_path / "copy"))).bases == ()
    assert _same(_load(sd, tmp_path / "copy"), sd)


def test_a_changed_dtype_shape_or_block_size_is_written_again(tmp_path: Path) -> None:
    sd = _state()
    _save(sd, tmp_path / "s0", incremental=True)
    sd["emb"] = sd["emb"].to(torch.float32)  # type: ignore[union-attr]
    sd["norm"] = torch.zeros(17)
    m1 = _save(sd, tmp_path / "s1", base=tmp_path / "s0")
    _, chunks = read_v3(str(tmp_path / "s1"))
    assert chunks["emb"][0].folder is None and chunks["norm"][0].folder is None
    assert chunks["frozen"][0].folder == "s0" and m1.bases == ("s0",)
    m2 = _save(sd, tmp_path / "s2", base=tmp_path / "s1", hash_block_bytes=1 << 16)
    assert m2.bases == () and _own_data_bytes(tmp_path / "s2") > 512 * 1024  # other blocks: a full save
    assert _same(_load(sd, tmp_path / "s2"), sd)


def test_a_format_3_base_needs_a_format_3_save_and_back(tmp_path: Path) -> None:
    sd = _state()
    _save(sd, tmp_path / "v3", incremental=True)
    shardckpt.save(sd, tmp_path / "v2", incremental=True)
    with pytest.raises(UnsupportedFormatVersionError, match="format_version=3") as err:
        shardckpt.save(sd, tmp_path / "a", base=tmp_path / "v3")
    assert "'" + str(tmp_path / "v3") + "'" in str(err.value) or "v3" in str(err.value)
    with pytest.raises(UnsupportedFormatVersionError, match="format_version=1 to build on it") as err:
        _save(sd, tmp_path / "b", base=tmp_path / "v2")
    assert "format-2" in str(err.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not (tmp_path / "v3" / layout.REFERENCED_NAME).exists()


def test_a_tampered_base_file_is_an_integrity_error_naming_it(tmp_path: Path) -> None:
    sd = _state()
    m0 = _save(sd, tmp_path / "s0", incremental=True)
    sd["adapter"] = sd["adapter"] + 1  # type: ignore[operator]
    _save(sd, tmp_path / "s1", base=tmp_path / "s0")
    g = m0.file_table.groups[0]
    name = layout.data_file_name(g.save_id, 0, 0)  # "frozen" is rank 0's first file
    with open(tmp_path / "s0" / name, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    with pytest.raises(IntegrityError) as err:
        _load(sd, tmp_path / "s1")
    assert name in str(err.value) and "s0" in str(err.value)


class _CountingStorage(LocalStorage):
    """Records every whole-record read (pages and index records)."""

    def __init__(self, root: str, seen: list[str]) -> None:
        super().__init__(root)
        self.seen = seen

    def read_bytes(self, name: str) -> bytes:
        self.seen.append(f"{os.path.basename(self.root)}/{name}")
        return super().read_bytes(name)

    def sibling(self, name: str) -> LocalStorage:
        return _CountingStorage(os.path.join(os.path.dirname(self.root), name), self.seen)


def _item(key: str, offsets: tuple[int, ...], sizes: tuple[int, ...], shape: tuple[int, ...]) -> WriteItem:
    return WriteItem(
        index=MetadataIndex(key, torch.Size(offsets)),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
            properties=TensorProperties(dtype=torch.float32),
            size=torch.Size(shape),
        ),
    )


def test_the_base_index_reads_only_the_records_of_the_ranks_holding_its_boxes(tmp_path: Path) -> None:
    w = torch.randn(16, 4)
    written = write_v3(tmp_path / "base", {"w": (w, Split((4, 1)))}, ranks=4, digests=True)
    seen: list[str] = []
    base = BaseIndexV3(_CountingStorage(str(tmp_path / "base"), seen), written.manifest, "base")
    mine = _item("w", (8, 0), (4, 4), (16, 4))  # rank 2's box
    other = _item("w", (6, 0), (4, 4), (16, 4))  # a box the base does not hold
    base.prefetch([mine, other])
    assert sorted(seen) == sorted(["base/" + written.page_names[0], "base/" + written.index_names[2]])
    found = base.candidate(mine, 4096)
    assert found is not None and found.in_base is not None and found.in_base.rank == 2
    assert found.file_record.checkpoint == "base" and found.in_base.group.checkpoint == "base"
    assert found.digest is not None and len(found.digest) == 32
    assert base.candidate(other, 4096) is None and base.candidate(mine, 8192) is None


def test_manager_keeps_a_retired_base_until_no_kept_step_reads_it(tmp_path: Path) -> None:
    root = tmp_path / "run"
    sd = _state()
    with shardckpt.CheckpointManager(root, incremental=True, format_version=3, keep_last=2, full_every=None) as mgr:
        for step in range(1, 5):
            sd["adapter"] = sd["adapter"] + 1  # type: ignore[operator]
            sd["step"] = step
            mgr.save(step, sd)
            m = mgr.manifest(step)
            assert isinstance(m, ManifestV3) and m.metadata["incremental_chain"] == step - 1
            assert m.bases == (() if step == 1 else (layout.step_dir_name(1),)), step  # only the adapter changes
        assert mgr.steps() == [3, 4]
    assert not (root / layout.step_dir_name(2)).exists()  # retired and read by no kept step: removed whole
    first = root / layout.step_dir_name(1)
    assert not (first / layout.MANIFEST_NAME).exists()  # retired: no longer a step
    g1 = mgr.manifest(4).file_table.groups[1]
    assert g1.checkpoint == first.name
    # the retired base keeps its data files, its page and the index record of the rank that wrote them
    assert (first / layout.rank_page_name(g1.save_id, 0)).exists()
    assert (first / layout.rank_index_name(g1.save_id, 0)).exists()
    assert (first / layout.data_file_name(g1.save_id, 0, 0)).exists()
    # shardckpt ls: step 4 reads step 1's files, counted in its size and in its INCREMENTAL cell
    info = {i.step: i for i in list_root(root)}
    shared = sum(f.stat().st_size for f in (first / "data").glob(f"{g1.save_id}-r*.safetensors"))
    assert info[4].bases == (first.name,) and info[4].base_bytes == shared > 512 * 1024
    assert info[4].size_bytes > shared and info[1].retired
    with shardckpt.CheckpointManager(root, incremental=True, format_version=3, keep_last=2) as mgr:
        got = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1 for k, v in sd.items()}
        assert mgr.restore(got) == 4
        assert _same(got, sd)
    for step in (3, 4):
        assert main(["verify", str(root / layout.step_dir_name(step))]) == 0, step
    # A full save that reads none of them lets the sweep remove every retired folder.
    with shardckpt.CheckpointManager(root, incremental=True, format_version=3, keep_last=1, full_every=1) as mgr:
        mgr.save(5, sd)
        assert mgr.manifest(5).bases == ()
    assert sorted(os.listdir(root)) == [layout.step_dir_name(5)]


def test_an_edited_base_index_record_fails_the_save_naming_it(tmp_path: Path) -> None:
    sd = _state()
    m0 = _save(sd, tmp_path / "s0", incremental=True)
    record = tmp_path / "s0" / layout.rank_index_name(m0.file_table.groups[0].save_id, 0)
    raw = record.read_bytes()
    record.write_bytes(raw.replace(b'"digests":true', b'"digests":fals'))  # same size, other hash
    with pytest.raises(ManifestError) as err:
        _save(sd, tmp_path / "s1", base=tmp_path / "s0")
    assert record.name in str(err.value) and "s0" in str(err.value)
    assert not (tmp_path / "s1" / layout.MANIFEST_NAME).exists()


def test_an_async_incremental_save_writes_only_what_changed(tmp_path: Path) -> None:
    sd = _state()
    _save(sd, tmp_path / "s0", incremental=True)
    sd["adapter"] = sd["adapter"] - 1  # type: ignore[operator]
    handle = shardckpt.async_save(sd, tmp_path / "s1", format_version=3, base=tmp_path / "s0")
    m1 = handle.wait()
    assert isinstance(m1, ManifestV3) and m1.bases == ("s0",)
    assert 8 * 512 * 4 <= _own_data_bytes(tmp_path / "s1") < 8 * 512 * 4 + 512
    assert _same(_load(sd, tmp_path / "s1"), sd)


def test_a_manager_that_changes_format_makes_its_next_save_full(tmp_path: Path) -> None:
    root = tmp_path / "run"
    sd = _state()
    # None and 1 are one family (version 1, 2 when incremental): step 6 builds on step 5 (its
    # chain is 2 long), whose bytes are all step 4's (nothing changed), so it lists step 4
    steps = ((1, None), (2, 3), (3, 3), (4, None), (5, 1), (6, None))
    for step, version in steps:
        with shardckpt.CheckpointManager(root, incremental=True, format_version=version) as mgr:
            mgr.save(step, sd)
            m = mgr.manifest(step)
            assert isinstance(m, ManifestV3) == (version == 3), step
            # a base of the other family would be refused: the chain starts again, full
            builds_on = {3: 2, 5: 4, 6: 4}.get(step)
            assert m.bases == ((layout.step_dir_name(builds_on),) if builds_on else ()), step
            assert m.metadata["incremental_chain"] == {3: 1, 5: 1, 6: 2}.get(step, 0), step
