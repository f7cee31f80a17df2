"""The manager's sweep of retired folders with format-3 steps under the root (issue #16):
a format-3 manifest's groups are marked like a version-2 manifest's files, so the sweep
deletes exactly the retired files that no committed manifest, of any version, reads."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import shardckpt
from shardckpt.convert.audit import verify_checkpoint
from shardckpt.engine.loading import read_any_manifest
from shardckpt.format import layout
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.manager.references import manifest_reads
from shardckpt.storage import open_storage
from tests.support.v3_fixture import Split, write_v3


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(64, 64, generator=g) for i in range(4)}


def _step(root: Path, step: int) -> Path:
    return root / layout.step_dir_name(step)


def _names(d: Path) -> set[str]:
    data = d / layout.DATA_DIR
    return {f"{layout.DATA_DIR}/{f}" for f in os.listdir(data)} if data.exists() else set()


def _read_by_committed(root: Path) -> dict[str, set[str]]:
    """What the committed checkpoints under ``root`` read, any version."""
    needed: dict[str, set[str]] = {}
    for d in sorted(root.iterdir()):
        if (d / layout.MANIFEST_NAME).exists():
            for where, names in manifest_reads(read_any_manifest(open_storage(str(d))), d.name).items():
                needed.setdefault(where, set()).update(names)
    return needed


def _retire(d: Path) -> None:
    """What retention does to a step that others read: its manifest goes, its files stay."""
    (d / layout.MANIFEST_NAME).unlink()
    if not (d / layout.REFERENCED_NAME).exists():
        (d / layout.REFERENCED_NAME).write_bytes(layout.referenced_marker())


def test_the_sweep_marks_format_3_groups_in_a_mixed_root(tmp_path: Path) -> None:
    root = tmp_path / "run"
    sd = _state(0)
    with shardckpt.CheckpointManager(root, incremental=True, keep_last=100, num_io_threads=4) as mgr:
        mgr.save(1, sd)
        sd = {**sd, "t0": sd["t0"] + 1}
        mgr.save(2, sd)  # reads step 1's unchanged chunks
    assert read_any_manifest(str(_step(root, 2))).bases == (layout.step_dir_name(1),)
    tensors = {k: (v, Split((2, 1))) for k, v in _state(1).items()}
    base = write_v3(_step(root, 3), tensors, ranks=3, files_per_rank=2, save_id="aa")
    marker = (_step(root, 1) / layout.SAVE_MARKER_NAME).read_bytes()
    (_step(root, 3) / layout.SAVE_MARKER_NAME).write_bytes(marker)  # a real save leaves one; the fixture not
    write_v3(_step(root, 4), tensors, ranks=2, save_id="bb", base=base, from_base=("t1",))
    shardckpt.save(_state(2), str(_step(root, 5)), format_version=3)
    _retire(_step(root, 1))
    _retire(_step(root, 3))
    needed = _read_by_committed(root)
    step1, step3 = layout.step_dir_name(1), layout.step_dir_name(3)
    unread = _names(_step(root, 1)) - needed[step1]
    assert unread and needed[step1] <= _names(_step(root, 1))  # step 2 reads some of step 1, not all
    assert needed[step3] == _names(_step(root, 3))  # data files, index records (rank 2's: no data), pages
    with shardckpt.CheckpointManager(root, keep_last=100):  # start-up sweeps the retired folders
        pass
    assert _names(_step(root, 1)) == needed[step1]  # exactly the unread files went
    assert _names(_step(root, 3)) == needed[step3]  # step 4 reads step 3's whole save: all kept
    for step in (2, 4, 5):
        assert verify_checkpoint(str(_step(root, step))).ok, step
    # Once no committed step reads step 3's save, its folder goes.
    (_step(root, 4) / layout.MANIFEST_NAME).unlink()
    with shardckpt.CheckpointManager(root, keep_last=100):
        pass
    assert not _step(root, 3).exists()
    assert _names(_step(root, 1)) == needed[step1]  # step 2 still reads these


def test_a_format_3_manifest_reads_every_name_of_each_group(tmp_path: Path) -> None:
    tensors = {k: (v, Split((3, 1))) for k, v in _state(3).items()}
    written = write_v3(tmp_path / "step_1", tensors, ranks=4, files_per_rank=2, ranks_per_page=3)
    m = read_any_manifest(str(tmp_path / "step_1"))
    assert isinstance(m, ManifestV3)
    reads = manifest_reads(m, "step_1")
    on_disk = _names(tmp_path / "step_1")
    assert reads == {"step_1": on_disk}
    assert len(written.page_names) == 2 and set(written.page_names) <= reads["step_1"]
    assert set(written.index_names.values()) <= reads["step_1"]
