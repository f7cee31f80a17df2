"""Incremental checkpoints (#17) on S3 (moto over HTTP): a CheckpointManager run whose
retention retires the step that later steps read from, and a plain ``save(base=)``.

What must hold on an object store as on a disk: a step writes only its changed tensors'
objects, restores bitwise and verifies; a retired step loses its manifest at once but its
shared objects stay (with the referenced marker) while a kept step reads them, and are
deleted when none does; a referenced checkpoint is never overwritten.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from s3server import FaultProxy, S3Server

import shardckpt
from shardckpt.convert.audit import verify_checkpoint
from shardckpt.errors import CheckpointExistsError
from shardckpt.format import layout

# Only our RetryPolicy retries (botocore's own retries off): the lost answer reaches it.
NO_BOTOCORE_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


def state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    frozen = torch.randn(96, 64, generator=g)  # 24 KiB, the larger file: written at step 1 only
    train = torch.randn(8, 64, generator=g).to(torch.bfloat16)
    return {"model": {"frozen": frozen, "train": train + step}, "step": step}


def blank() -> dict[str, Any]:
    return {"model": {"frozen": torch.zeros(96, 64), "train": torch.zeros(8, 64, dtype=torch.bfloat16)}, "step": -1}


def assert_bitwise(got: dict[str, Any], step: int) -> None:
    want = state(step)
    for k, v in want["model"].items():
        assert got["model"][k].dtype == v.dtype and torch.equal(got["model"][k].view(torch.uint8), v.view(torch.uint8))
    assert got["step"] == step


def objects(admin: Any, prefix: str) -> list[str]:
    """Object keys under ``prefix`` (``bucket/a/b``), relative to it."""
    return sorted(k[len(prefix) + 1 :] for k in admin.find(prefix, refresh=True))


def test_manager_incremental_retention_keeps_shared_objects_until_unread(s3: S3Server) -> None:
    bucket = s3.create_bucket()
    root, prefix = f"s3://{bucket}/runs/inc", f"{bucket}/runs/inc"
    options = s3.storage_options()
    admin = s3.admin()
    step1 = layout.step_dir_name(1)
    # Two files per save: the frozen tensor in one, the trained one in the other.
    with shardckpt.CheckpointManager(
        root, incremental=True, keep_last=1, full_every=4, num_io_threads=2, storage_options=options
    ) as mgr:
        for step in range(1, 6):
            assert mgr.save(step, state(step))
            got = blank()
            assert mgr.restore(got) == step
            assert_bitwise(got, step)
            assert mgr.steps() == [step]
            assert verify_checkpoint(mgr.path(step), storage_options=options).ok
            m = mgr.manifest(step)
            own = sorted(f for f in objects(admin, f"{prefix}/{layout.step_dir_name(step)}") if f.startswith("data/"))
            if step in (1, 5):  # full saves: 1 is the first, 5 the full_every-th
                assert m.bases == () and len(own) == 2
                continue
            # Only the trained tensor's object is new; the frozen one is step 1's.
            assert m.bases == (step1,), m.bases
            assert own == [m.tensors["model.train"].chunks[0].file]
            assert m.files[m.tensors["model.frozen"].chunks[0].file].checkpoint == step1
            # Step 1 is retired (no manifest); its frozen object and the markers survive; the
            # object of its trained tensor, which no kept step reads, was swept.
            frozen_file = m.tensors["model.frozen"].chunks[0].file
            kept = sorted([layout.REFERENCED_NAME, layout.SAVE_MARKER_NAME, frozen_file])
            assert objects(admin, f"{prefix}/{step1}") == kept
            # Retired steps nobody points at (2, 3) are gone entirely.
            folders = {k.split("/", 1)[0] for k in objects(admin, prefix)}
            assert folders == {step1, layout.step_dir_name(step), layout.OWNER_NAME}, folders
    # Step 5 was a full save: nothing reads step 1 any more, so its objects went with step 4.
    assert {k.split("/", 1)[0] for k in objects(admin, prefix)} == {layout.step_dir_name(5)}


def test_save_with_a_base_on_s3(s3: S3Server) -> None:
    bucket = s3.create_bucket()
    options = s3.storage_options()
    admin = s3.admin()
    a, b = f"s3://{bucket}/plain/a", f"s3://{bucket}/plain/b"
    shardckpt.save(state(1), a, incremental=True, num_io_threads=2, storage_options=options)
    m = shardckpt.save(state(2), b, base=a, num_io_threads=2, storage_options=options)
    assert m is not None and m.format_version == 2 and m.bases == ("a",)
    own = [f for f in objects(admin, f"{bucket}/plain/b") if f.startswith("data/")]
    assert own == [m.tensors["model.train"].chunks[0].file]
    assert admin.exists(f"{bucket}/plain/a/{layout.REFERENCED_NAME}")
    got = blank()
    shardckpt.load(got, b, storage_options=options)
    assert_bitwise(got, 2)
    report = verify_checkpoint(b, storage_options=options)
    assert report.ok and report.files_checked == 2
    with pytest.raises(CheckpointExistsError, match="incremental checkpoints beside this one"):
        shardckpt.save(state(3), a, overwrite=True, storage_options=options)
    got = blank()
    shardckpt.load(got, b, storage_options=options)  # a was left as it was
    assert_bitwise(got, 2)


def test_a_lost_answer_to_the_referenced_marker_is_recognised(s3: S3Server) -> None:
    """The store created the base's marker but its answer was lost (500 after the work): the
    retried exclusive create finds the marker there, which is what the save wanted."""
    bucket = s3.create_bucket()
    proxy = FaultProxy(s3.port, status=500, code="InternalError", forward_failed=True)
    proxy.fail = lambda n, method, path: method == "PUT" and layout.REFERENCED_NAME in path and proxy.faults == 0
    try:
        options = s3.storage_options(endpoint_url=proxy.endpoint_url, **NO_BOTOCORE_RETRIES)
        a, b = f"s3://{bucket}/lost/a", f"s3://{bucket}/lost/b"
        shardckpt.save(state(1), a, incremental=True, storage_options=options)
        m = shardckpt.save(state(2), b, base=a, storage_options=options)
        assert m is not None and m.bases == ("a",)
    finally:
        proxy.stop()
    assert proxy.faults == 1
    assert s3.admin().exists(f"{bucket}/lost/a/{layout.REFERENCED_NAME}")
    got = blank()
    shardckpt.load(got, b, storage_options=s3.storage_options())
    assert_bitwise(got, 2)


def test_start_up_finishes_what_a_crash_left_on_s3(s3: S3Server) -> None:
    """A crash after a full step committed, before retention ran (step 2's manifest gone,
    its objects not): the next manager start removes step 2 and sweeps step 1, which only
    step 2 read."""
    bucket = s3.create_bucket()
    root, prefix = f"s3://{bucket}/runs/crash", f"{bucket}/runs/crash"
    options = s3.storage_options()
    admin = s3.admin()
    with shardckpt.CheckpointManager(root, incremental=True, keep_last=1, storage_options=options) as mgr:
        mgr.save(1, state(1))
        mgr.save(2, state(2))  # step 1 retired: step 2 reads its frozen object
    shardckpt.save(state(3), f"{root}/{layout.step_dir_name(3)}", incremental=True, storage_options=options)
    admin.rm(f"{prefix}/{layout.step_dir_name(2)}/{layout.MANIFEST_NAME}")
    assert admin.exists(f"{prefix}/{layout.step_dir_name(1)}/{layout.REFERENCED_NAME}")
    with shardckpt.CheckpointManager(root, incremental=True, keep_last=1, storage_options=options) as mgr:
        assert sorted(mgr.cleaned_up) == [layout.step_dir_name(1), layout.step_dir_name(2)]
        got = blank()
        assert mgr.restore(got) == 3
        assert_bitwise(got, 3)
    assert {k.split("/", 1)[0] for k in objects(admin, prefix)} == {layout.step_dir_name(3)}
