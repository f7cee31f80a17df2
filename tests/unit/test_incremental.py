"""Incremental checkpoints (issue #17), in one process: what is written, what is shared,
and that deleting never loses a byte a kept checkpoint reads."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.convert.audit import verify_checkpoint
from shardckpt.engine.loading import read_manifest
from shardckpt.errors import CheckpointExistsError, IntegrityError, ManifestError
from shardckpt.format import layout
from shardckpt.format.manifest import manifest_to_json, parse_manifest
from shardckpt.storage import open_storage
from shardckpt.storage.folder import remove_checkpoint


def _state(seed: int = 0) -> dict[str, torch.Tensor | int]:
    g = torch.Generator().manual_seed(seed)
    return {
        "frozen": torch.randn(256, 512, generator=g),
        "emb": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "adapter": torch.randn(8, 512, generator=g),
        "step": 0,
    }


def _zeros_like(sd: dict[str, object]) -> dict[str, object]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1 for k, v in sd.items()}


def _own_bytes(path: Path) -> int:
    data = path / "data"
    return sum(f.stat().st_size for f in data.iterdir()) if data.exists() else 0


def _assert_same(got: dict[str, object], want: dict[str, object]) -> None:
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), k  # type: ignore[arg-type]
        else:
            assert got[k] == v, k


def test_unchanged_chunks_are_not_written_and_load_follows_references(tmp_path: Path) -> None:
    sd = _state()
    m0 = shardckpt.save(sd, tmp_path / "s0", incremental=True)
    assert m0 is not None and m0.format_version == 2 and m0.bases == ()
    sd["adapter"] = sd["adapter"] + 1  # type: ignore[operator]
    sd["step"] = 1
    m1 = shardckpt.save(sd, tmp_path / "s1", base=tmp_path / "s0")
    assert m1 is not None and m1.bases == ("s0",)
    shared = {n for n, f in m1.files.items() if f.checkpoint == "s0"}
    assert shared and all(m1.tensors[k].chunks[0].file in shared for k in ("frozen", "emb"))
    assert m1.tensors["adapter"].chunks[0].file not in shared
    # Only the adapter's bytes (plus a header) were written.
    assert _own_bytes(tmp_path / "s1") < 8 * 512 * 4 + 1024
    assert (tmp_path / "s0" / layout.REFERENCED_NAME).exists()
    got = _zeros_like(sd)
    shardckpt.load(got, tmp_path / "s1")
    _assert_same(got, sd)
    report = verify_checkpoint(str(tmp_path / "s1"))
    assert report.ok and report.files_checked == len(m1.files)


def test_nothing_changed_writes_no_data_and_chains_flatten(tmp_path: Path) -> None:
    sd = _state()
    shardckpt.save(sd, tmp_path / "s0", incremental=True)
    shardckpt.save(sd, tmp_path / "s1", base=tmp_path / "s0")
    assert _own_bytes(tmp_path / "s1") == 0
    m2 = shardckpt.save(sd, tmp_path / "s2", base=tmp_path / "s1")
    # s1 only pointed at s0: s2 points at s0 directly, never at a reference.
    assert m2 is not None and m2.bases == ("s0",) and _own_bytes(tmp_path / "s2") == 0
    got = _zeros_like(sd)
    shardckpt.load(got, tmp_path / "s2")
    _assert_same(got, sd)


def test_a_fresh_checkpointer_reads_the_base_manifest(tmp_path: Path) -> None:
    sd = _state()
    shardckpt.save(sd, tmp_path / "s0", incremental=True)
    with shardckpt.Checkpointer() as ck:  # no memory of s0: it reads s0's manifest
        m1 = ck.save(sd, tmp_path / "s1", base=tmp_path / "s0")
    assert m1 is not None and m1.bases == ("s0",) and _own_bytes(tmp_path / "s1") == 0


def test_changed_dtype_shape_or_block_size_is_written_again(tmp_path: Path) -> None:
    sd = _state()
    shardckpt.save(sd, tmp_path / "s0", incremental=True)
    sd["emb"] = sd["emb"].float()  # type: ignore[union-attr]  # same values, another dtype
    sd["adapter"] = torch.cat([sd["adapter"], sd["adapter"]])  # type: ignore[list-item]
    m1 = shardckpt.save(sd, tmp_path / "s1", base=tmp_path / "s0")
    assert m1 is not None
    assert m1.files[m1.tensors["frozen"].chunks[0].file].checkpoint == "s0"
    for key in ("emb", "adapter"):
        assert m1.files[m1.tensors[key].chunks[0].file].checkpoint is None, key
    m2 = shardckpt.save(sd, tmp_path / "s2", base=tmp_path / "s1", hash_block_bytes=4096)
    assert m2 is not None and m2.bases == ()  # other block hashes: nothing can be reused
    got = _zeros_like(sd)
    shardckpt.load(got, tmp_path / "s2")
    _assert_same(got, sd)


def test_a_plain_checkpoint_as_base_gives_a_full_save(tmp_path: Path) -> None:
    sd = _state()
    m0 = shardckpt.save(sd, tmp_path / "s0")
    assert m0 is not None and m0.format_version == 1  # plain saves stay format 1
    m1 = shardckpt.save(sd, tmp_path / "s1", base=tmp_path / "s0")
    assert m1 is not None and m1.bases == () and m1.format_version == 2


def test_base_must_be_a_sibling(tmp_path: Path) -> None:
    sd = _state()
    shardckpt.save(sd, tmp_path / "a" / "s0", incremental=True)
    with pytest.raises(ValueError, match="same parent folder"):
        shardckpt.save(sd, tmp_path / "b" / "s1", base=tmp_path / "a" / "s0")
    assert not (tmp_path / "b" / "s1" / "manifest.json").exists()


def test_missing_base_names_the_base(tmp_path: Path) -> None:
    sd = _state()
    shardckpt.save(sd, tmp_path / "s0", incremental=True)
    shardckpt.save(sd, tmp_path / "s1", base=tmp_path / "s0")
    for f in (tmp_path / "s0" / "data").iterdir():
        f.unlink()  # "deleted by hand"
    with pytest.raises(IntegrityError, match=r"base checkpoint 's0'.*deleted or moved by hand"):
        shardckpt.load(_zeros_like(sd), tmp_path / "s1")
    report = verify_checkpoint(str(tmp_path / "s1"))
    assert not report.ok


def test_a_referenced_checkpoint_is_never_overwritten_or_removed(tmp_path: Path, caplog) -> None:
    sd = _state()
    shardckpt.save(sd, tmp_path / "s0", incremental=True)
    shardckpt.save(sd, tmp_path / "s1", base=tmp_path / "s0")
    with pytest.raises(CheckpointExistsError, match="incremental checkpoints beside this one"):
        shardckpt.save(sd, tmp_path / "s0", overwrite=True)
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        assert not remove_checkpoint(open_storage(str(tmp_path / "s0")), why="test")
    assert "read its data files" in caplog.text
    got = _zeros_like(sd)
    shardckpt.load(got, tmp_path / "s1")
    _assert_same(got, sd)


def _live_bytes_ok(root: Path, mgr: shardckpt.CheckpointManager, sd: dict[str, object]) -> None:
    """Every listed step loads bitwise (the newest) and verifies."""
    for step in mgr.steps():
        assert verify_checkpoint(mgr.path(step)).ok, step
    got = _zeros_like(sd)
    assert mgr.restore(got) == mgr.latest_step()
    _assert_same(got, sd)


@pytest.mark.parametrize("retention", [{"keep_last": 2}, {"keep_every_n_steps": 3, "keep_last": 1}])
def test_manager_retention_keeps_what_kept_steps_read(tmp_path: Path, retention: dict[str, int]) -> None:
    root = tmp_path / "run"
    sd = _state()
    with shardckpt.CheckpointManager(root, incremental=True, full_every=4, **retention) as mgr:
        for step in range(1, 11):
            sd["adapter"] = sd["adapter"] + 1  # type: ignore[operator]
            sd["step"] = step
            mgr.save(step, sd)
            m = mgr.manifest(step)
            assert (m.bases == ()) == (step % 4 == 1), (step, m.bases)  # full every 4th save
            assert m.metadata["incremental_chain"] == (step - 1) % 4
            _live_bytes_ok(root, mgr, sd)
        steps = mgr.steps()
    # Every folder left is a committed step or holds only files a committed step reads.
    needed: dict[str, set[str]] = {}
    for s in steps:
        m = read_manifest(open_storage(str(root / layout.step_dir_name(s))))
        for name, f in m.files.items():
            needed.setdefault(f.checkpoint or layout.step_dir_name(s), set()).add(name)
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = {f"data/{f.name}" for f in (d / "data").iterdir()} if (d / "data").exists() else set()
        if not (d / "manifest.json").exists():
            assert files and files <= needed.get(d.name, set()), d.name  # a retired step: only shared files
    assert set(needed) <= {d.name for d in root.iterdir()}


def test_manager_incremental_after_restart_and_clean_up_of_retired_steps(tmp_path: Path) -> None:
    root = tmp_path / "run"
    sd = _state()
    with shardckpt.CheckpointManager(root, incremental=True, keep_last=1) as mgr:
        mgr.save(1, sd)
        sd["adapter"] = sd["adapter"] + 1  # type: ignore[operator]
        mgr.save(2, sd)  # step 1 retired: its frozen bytes live on for step 2
    assert not (root / "step_0000000001" / "manifest.json").exists()
    assert (root / "step_0000000001" / layout.REFERENCED_NAME).exists()
    with shardckpt.CheckpointManager(root, incremental=True, keep_last=1) as mgr:
        got = _zeros_like(sd)
        assert mgr.restore(got) == 2
        _assert_same(got, sd)
        mgr.save(3, sd)  # against step 2 (read from its manifest): nothing new to write
        assert _own_bytes(root / "step_0000000003") == 0
        assert mgr.manifest(3).bases == ("step_0000000001", "step_0000000002")
    # A full save with nothing referencing the old folders lets the sweep remove them.
    with shardckpt.CheckpointManager(root, incremental=True, keep_last=1, full_every=1) as mgr:
        mgr.save(4, sd)
        assert mgr.manifest(4).bases == ()
    assert sorted(os.listdir(root)) == ["step_0000000004"]


def test_manager_sweep_leaves_shared_files_when_a_manifest_is_unreadable(tmp_path: Path) -> None:
    root = tmp_path / "run"
    sd = _state()
    with shardckpt.CheckpointManager(root, incremental=True, keep_last=1) as mgr:
        mgr.save(1, sd)
        mgr.save(2, sd)
    manifest = root / "step_0000000002" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"step"', b'"stop"'))  # breaks its checksum
    with shardckpt.CheckpointManager(root, incremental=True, keep_last=1):
        pass
    assert any((root / "step_0000000001" / "data").iterdir())  # what step 2 may read is kept


def test_a_base_file_written_by_a_rank_beyond_this_world_size_parses(tmp_path: Path) -> None:
    """A run resumed on fewer ranks saves against a base written by more: the reused file's
    record keeps the rank that wrote it (3 of 4), and the manifest must still parse. Before,
    such a save committed a manifest that every reader refused ('rank 3 >= world_size 3')."""
    sd = _state()
    shardckpt.save(sd, tmp_path / "s0", incremental=True)
    m1 = shardckpt.save(sd, tmp_path / "s1", base=tmp_path / "s0")
    assert m1 is not None and m1.world_size == 1 and m1.bases == ("s0",)
    written_by_rank_3 = {n: dataclasses.replace(f, rank=3) for n, f in m1.files.items()}
    parsed = parse_manifest(manifest_to_json(dataclasses.replace(m1, files=written_by_rank_3)), source="s1")
    assert {f.rank for f in parsed.files.values()} == {3}
    own = {n: dataclasses.replace(f, rank=3, checkpoint=None) for n, f in m1.files.items()}
    with pytest.raises(ManifestError, match=r"rank 3 >= world_size 1"):
        parse_manifest(manifest_to_json(dataclasses.replace(m1, files=own, bases=())), source="s1")


def test_a_plain_save_over_the_last_base_makes_the_checkpointer_forget_its_chunks(tmp_path: Path) -> None:
    """Before: the Checkpointer still offered the replaced save's chunks as the base, so the
    next save pointed at files the overwrite had removed and failed at its commit."""
    sd = _state()
    with shardckpt.Checkpointer() as ck:
        ck.save(sd, tmp_path / "s0", incremental=True)
        ck.save(sd, tmp_path / "s0", overwrite=True)  # plain: no digests to reuse any more
        m1 = ck.save(sd, tmp_path / "s1", base=tmp_path / "s0")
    assert m1 is not None and m1.bases == ()  # a full save, as against any plain base
    got = _zeros_like(sd)
    shardckpt.load(got, tmp_path / "s1")
    _assert_same(got, sd)


def test_the_sweep_remembers_marks_until_a_manifest_changes(tmp_path: Path, monkeypatch) -> None:
    from shardckpt.manager import references

    sd = _state()
    shardckpt.save(sd, tmp_path / "s0", incremental=True)
    shardckpt.save(sd, tmp_path / "s1", base=tmp_path / "s0")
    parsed: list[str] = []
    real = references.read_any_manifest

    def counting(storage):  # type: ignore[no-untyped-def]
        parsed.append(storage.url)
        return real(storage)

    monkeypatch.setattr(references, "read_any_manifest", counting)
    root, cache = open_storage(str(tmp_path)), references.MarkCache()
    first = references.LiveFiles.of(root, ["s0", "s1"], cache)
    again = references.LiveFiles.of(root, ["s0", "s1"], cache)
    assert len(parsed) == 2 and first.by_folder == again.by_folder
    assert first.of_folder("s0") >= {
        n for n, f in read_manifest(open_storage(str(tmp_path / "s1"))).files.items() if f.checkpoint == "s0"
    }
    sd["adapter"] = sd["adapter"] + 1  # type: ignore[operator]
    shardckpt.save(sd, tmp_path / "s1", overwrite=True)  # s1 replaced: a plain save, reads nothing of s0
    later = references.LiveFiles.of(root, ["s0", "s1"], cache)
    assert len(parsed) == 3  # only the replaced manifest was read again
    assert later.by_folder["s0"] == set(read_manifest(open_storage(str(tmp_path / "s0"))).files)
    assert later.of_folder("s1") and not (later.of_folder("s1") & first.of_folder("s1"))


def test_the_prefilter_never_decides_a_skip_and_digests_match_the_bytes(tmp_path: Path, monkeypatch) -> None:
    import xxhash

    from shardckpt.engine import incremental

    whole: list[int] = []
    real = incremental.digest_hex

    def counting(data):  # type: ignore[no-untyped-def]
        whole.append(len(data))
        return real(data)

    monkeypatch.setattr(incremental, "digest_hex", counting)
    sd = {"a": torch.arange(4096, dtype=torch.float32), "b": torch.ones(2048), "c": torch.zeros(1000)}
    m0 = shardckpt.save(sd, tmp_path / "s0", incremental=True, hash_block_bytes=4096)
    assert whole == []  # no base: nothing hashed ahead; the digests come from the write
    sd["a"][-1] = -1.0  # only the last of a's 4 checksum blocks changes: the pre-filter passes it
    sd["b"] = sd["b"] * 2  # the first block changes: the pre-filter rules it out
    m1 = shardckpt.save(sd, tmp_path / "s1", base=tmp_path / "s0", hash_block_bytes=4096)
    assert m0 is not None and m1 is not None
    # c (one block: digested at once, reused) and a (first block equal, then the full digest); b's
    # first block differs, so its digest comes from the write
    assert sorted(whole) == [1000 * 4, 4096 * 4]
    assert {k for k, t in m1.tensors.items() if m1.files[t.chunks[0].file].checkpoint is None} == {"a", "b"}
    for key, t in m1.tensors.items():  # hashed ahead (a), while written (b) or reused (c): the chunk's digest
        assert t.chunks[0].digest == xxhash.xxh3_128_hexdigest(sd[key].numpy().tobytes()), key
    got = {k: torch.full_like(v, 7.0) for k, v in sd.items()}
    shardckpt.load(got, tmp_path / "s1")
    _assert_same(got, sd)  # type: ignore[arg-type]


def test_a_save_id_equal_to_a_base_files_id_fails_before_the_commit(tmp_path: Path, monkeypatch) -> None:
    import uuid as uuid_module

    from shardckpt.errors import ShardckptError

    fixed = uuid_module.UUID("0123456789ab" + "0" * 20)
    monkeypatch.setattr(uuid_module, "uuid4", lambda: fixed)  # both saves draw the same id
    sd = _state()
    shardckpt.save(sd, tmp_path / "s0", incremental=True)
    sd["adapter"] = sd["adapter"] + 1  # type: ignore[operator]
    with pytest.raises(ShardckptError, match="names two different files"):
        shardckpt.save(sd, tmp_path / "s1", base=tmp_path / "s0")
    assert not (tmp_path / "s1").exists()  # the failed save removed what it wrote, and only that
    got = _zeros_like(sd)
    shardckpt.load(got, tmp_path / "s0")  # the base is untouched
    monkeypatch.undo()
    m1 = shardckpt.save(sd, tmp_path / "s1", base=tmp_path / "s0")  # a new id: fine
    assert m1 is not None and m1.bases == ("s0",)


def test_a_format_3_base_is_refused_with_what_to_do_instead(tmp_path: Path) -> None:
    """An incremental save names its base; a format-3 base (no incremental support yet) must
    be refused saying which save and how to go on, not as an internal read_manifest call."""
    state = {"w": torch.randn(8, 8)}
    shardckpt.save(state, tmp_path / "step_1", format_version=3)
    with pytest.raises(shardckpt.UnsupportedFormatVersionError) as err:
        shardckpt.save(state, tmp_path / "step_2", base=tmp_path / "step_1")
    text = str(err.value)
    assert "base" in text and "step_1" in text
    assert "shardckpt.read_manifest" not in text
    assert "materialize" in text and "--format-version 1" in text
    assert not (tmp_path / "step_2" / layout.MANIFEST_NAME).exists()
    assert (tmp_path / "step_1" / layout.MANIFEST_NAME).exists()
