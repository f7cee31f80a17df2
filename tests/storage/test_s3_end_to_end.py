"""End to end on S3 (moto over HTTP): 4 gloo ranks save, 2 and 3 load; the manager's
retention, restore and cleanup on a bucket prefix; ``shardckpt ls s3://...``; an incremental
checkpoint read, verified, exported and materialized through its base on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from distributed import run_ranks
from s3server import FaultProxy, S3Server
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import shardckpt


def global_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(301, 129, generator=g),  # 301 rows: uneven shards on 3 and 4 ranks
        "b": torch.randn(1000, generator=g).to(torch.bfloat16),
        "e": torch.randint(-50, 50, (33, 5), generator=g),
        "adam_m": torch.randn(301, 129, generator=g),
    }


def _save(rank: int, world: int, url: str, options: dict) -> None:
    mesh = init_device_mesh("cpu", (world,))
    sd = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in global_state().items()}
    shardckpt.save({"model": sd, "step": 1234}, url, storage_options=options)


def _load(rank: int, world: int, url: str, options: dict, placement: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    p = [Shard(0)] if placement == "shard0" else [Replicate()]
    target = {k: distribute_tensor(torch.zeros_like(v), mesh, p) for k, v in global_state().items()}
    full = {"model": target, "step": -1}
    shardckpt.load(full, url, storage_options=options)
    ref = global_state()
    for k, v in target.items():
        got = v.full_tensor()
        assert got.dtype == ref[k].dtype and torch.equal(got.view(torch.uint8), ref[k].view(torch.uint8)), k
    assert full["step"] == 1234


def test_4_ranks_save_then_2_and_3_ranks_load_bitwise(s3: S3Server) -> None:
    bucket = s3.create_bucket()
    proxy = FaultProxy(s3.port)  # forwards everything; records what the ranks sent
    try:
        url = f"s3://{bucket}/runs/exp1/ckpt"
        run_ranks(_save, 4, url, s3.storage_options(endpoint_url=proxy.endpoint_url))
    finally:
        proxy.stop()
    admin = s3.admin()
    manifest = json.loads(admin.cat_file(f"{bucket}/runs/exp1/ckpt/manifest.json"))
    assert manifest["world_size"] == 4
    assert sorted({f["rank"] for f in manifest["files"].values()}) == [0, 1, 2, 3]
    assert admin.list_multipart_uploads(bucket) == []
    # The commit is one PUT of the manifest; nothing is ever copied or renamed.
    manifest_puts = [p for m, p, _ in proxy.log if m == "PUT" and p.split("?")[0].endswith("/manifest.json")]
    assert manifest_puts == [f"/{bucket}/runs/exp1/ckpt/manifest.json"]
    assert not any(copied for copied in proxy.copies)
    run_ranks(_load, 2, url, s3.storage_options(), "shard0")
    run_ranks(_load, 3, url, s3.storage_options(), "replicate")


def state(v: float) -> dict:
    return {"model": {"w": torch.full((64, 33), float(v))}, "step": int(v)}


def blank() -> dict:
    return {"model": {"w": torch.zeros(64, 33)}, "step": -1}


def test_manager_retention_restore_and_cleanup_on_s3(s3: S3Server) -> None:
    bucket = s3.create_bucket()
    root = f"s3://{bucket}/runs/exp2"
    options = s3.storage_options()
    admin = s3.admin()
    with shardckpt.CheckpointManager(root, keep_last=2, storage_options=options) as mgr:
        assert mgr.restore(blank()) is None
        for step in (1, 2, 3, 4):
            assert mgr.save(step, state(step), metrics={"loss": 1.0 / step})
        assert mgr.steps() == [3, 4]
    keys = sorted(k.split("/runs/exp2/", 1)[1] for k in admin.find(f"{bucket}/runs/exp2", refresh=True))
    assert {k.split("/")[0] for k in keys} == {"step_0000000003", "step_0000000004"}  # retention deleted 1, 2
    # An interrupted save: its marker and data objects, no manifest.
    admin.pipe_file(f"{bucket}/runs/exp2/step_0000000005/.shardckpt-save.json", b'{"save_id": "0123456789ab"}')
    admin.pipe_file(f"{bucket}/runs/exp2/step_0000000005/data/0123456789ab-r00000-00.safetensors", b"partial")
    reader = shardckpt.CheckpointManager(root, read_only=True, storage_options=options)
    assert reader.steps() == [3, 4]
    sd = blank()
    assert reader.restore(sd) == 4 and sd["step"] == 4 and torch.equal(sd["model"]["w"], state(4)["model"]["w"])

    env = {**os.environ, **s3.env()}
    proc = subprocess.run(
        [sys.executable, "-m", "shardckpt", "ls", root, "--json"], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    assert [(s["step"], s["committed"]) for s in listed["steps"]] == [(3, True), (4, True), (5, False)]
    assert listed["latest"] == 4

    with shardckpt.CheckpointManager(root, storage_options=options) as mgr:
        assert mgr.cleaned_up == ["step_0000000005"]
        assert mgr.restore(sd, step=3) == 3 and sd["step"] == 3
    assert admin.find(f"{bucket}/runs/exp2/step_0000000005", refresh=True) == []


def test_credentials_and_endpoint_from_the_environment(s3: S3Server, monkeypatch) -> None:
    """No storage_options at all: s3fs finds AWS_ENDPOINT_URL and the keys in the environment."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3.create_bucket()
    url = f"s3://{bucket}/envckpt"
    shardckpt.save(state(9), url)
    sd = blank()
    shardckpt.load(sd, url)
    assert sd["step"] == 9 and torch.equal(sd["model"]["w"], state(9)["model"]["w"])
    handle = shardckpt.async_save(state(10), f"{url}-async")
    handle.wait(timeout_s=60)
    shardckpt.load(sd, f"{url}-async")
    assert sd["step"] == 10 and torch.equal(sd["model"]["w"], state(10)["model"]["w"])


def test_incremental_checkpoint_read_verified_exported_and_materialized_on_s3(s3: S3Server, tmp_path) -> None:
    from safetensors.torch import load_file

    from shardckpt.convert import export_checkpoint, materialize_checkpoint
    from shardckpt.convert.audit import verify_checkpoint

    bucket, options = s3.create_bucket(), s3.storage_options()
    root = f"s3://{bucket}/runs/inc"
    state = {"w": torch.randn(64, 32), "adapter": torch.randn(4, 32), "step": 0}
    shardckpt.save(state, f"{root}/s0", incremental=True, storage_options=options)
    state["adapter"] = state["adapter"] + 1
    state["step"] = 1
    m = shardckpt.save(state, f"{root}/s1", base=f"{root}/s0", storage_options=options)
    assert m is not None and m.bases == ("s0",)
    report = verify_checkpoint(f"{root}/s1", storage_options=options)
    assert report.ok and [(f.folder, f.tensor_bytes) for f in report.folders] == [
        ("s1", 4 * 32 * 4),
        ("s0", 64 * 32 * 4),
    ]
    export_checkpoint(f"{root}/s1", tmp_path / "w.safetensors", format="safetensors", storage_options=options)
    exported = load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(exported["w"], state["w"]) and torch.equal(exported["adapter"], state["adapter"])
    copy = f"s3://{bucket}/keep/s1"
    assert materialize_checkpoint(f"{root}/s1", copy, storage_options=options).format_version == 2
    s3.admin().rm(f"{bucket}/runs/inc", recursive=True)  # the bases are gone: the copy needs none
    got = {"w": torch.zeros(64, 32), "adapter": torch.zeros(4, 32), "step": -1}
    shardckpt.load(got, copy, storage_options=options)
    assert torch.equal(got["w"], state["w"]) and torch.equal(got["adapter"], state["adapter"]) and got["step"] == 1
