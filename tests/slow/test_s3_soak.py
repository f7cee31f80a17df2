"""S3 soak: many manager saves and restores through a proxy that injects transient faults.

A CheckpointManager (keep_last=2) saves step after step to a bucket on the local S3
server (moto over HTTP) through tests/support/s3server.py's FaultProxy, which answers a
random share of requests with 503 SlowDown or 500 InternalError, or drops the
connection without an answer (before or after the server did the work). After every
save a fresh manager restores the newest step and must get it back bitwise; every
few cycles every listed step is loaded and audited; at the end, over a fault-free
connection, exactly the retained steps are listed and every one is whole. Sync and
async saves alternate. Nothing committed may be lost and nothing uncommitted listed.

Uploads use 5 MiB parts (S3's smallest), so the stress run's 12 MiB tensor goes up as
a multipart upload whose parts, completion and abort meet faults too.
CI: a few cycles at a 10% fault rate. ``SHARDCKPT_STRESS=1``: many more cycles, the
larger state, ``SHARDCKPT_SEED`` picks the seed.
"""

from __future__ import annotations

import collections
import os
import random
import time

import torch
from s3server import FaultProxy, S3Server

import shardckpt
import shardckpt.engine.loading
import shardckpt.engine.saving
import shardckpt.manager.checkpoint_manager
from shardckpt.convert.audit import verify_checkpoint
from shardckpt.storage import open_storage
from shardckpt.storage.fsspec_storage import TransferOptions

STRESS = os.environ.get("SHARDCKPT_STRESS") == "1"
CYCLES = 60 if STRESS else 6
ROWS = 12 * 2**20 // (4 * 256) if STRESS else 256  # stress: a 12 MiB tensor -> 3-part uploads
SMALL_PARTS = TransferOptions(part_bytes=5 * 2**20, single_put_bytes=5 * 2**20)
FAULT_RATE = 0.10
FAULTS = [(503, "SlowDown"), (500, "InternalError"), "drop", "drop-after"]


def state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(ROWS, 256, generator=g), "b": torch.randn(256, generator=g).to(torch.bfloat16)},
        "opt": {"m": torch.randint(-9, 9, (ROWS // 4, 3), generator=g)},
        "step": step,
    }


def blank() -> dict:
    return {
        "model": {"w": torch.zeros(ROWS, 256), "b": torch.zeros(256, dtype=torch.bfloat16)},
        "opt": {"m": torch.zeros(ROWS // 4, 3, dtype=torch.int64)},
        "step": -1,
    }


def assert_bitwise(got: dict, want: dict, where: str) -> None:
    for part, key in (("model", "w"), ("model", "b"), ("opt", "m")):
        a, b = got[part][key], want[part][key]
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{where}: {part}.{key}"
    assert got["step"] == want["step"], where


def random_faults(rng: random.Random, tally: collections.Counter):
    def fail(n: int, method: str, path: str):
        if rng.random() >= FAULT_RATE:
            return False
        fault = rng.choice(FAULTS)
        tally[fault if isinstance(fault, str) else f"{fault[0]} {fault[1]}"] += 1
        tally[f"on {method}"] += 1
        return fault

    return fail


def small_parts(url: str, options: dict | None = None):
    return open_storage(url, options, SMALL_PARTS if url.startswith("s3://") else None)


def test_many_saves_and_restores_through_transient_faults_lose_nothing(s3: S3Server, monkeypatch) -> None:
    for mod in (shardckpt.engine.checkpointer,):  # the one lookup: managers open storage through their Checkpointer
        monkeypatch.setattr(mod, "open_storage", small_parts)
    bucket = s3.create_bucket()
    url = f"s3://{bucket}/soak"
    seed = int(os.environ.get("SHARDCKPT_SEED", "9"))
    rng, tally = random.Random(seed), collections.Counter()
    proxy = FaultProxy(s3.port, fail=random_faults(rng, tally))
    options = s3.storage_options(endpoint_url=proxy.endpoint_url)
    kept: list[int] = []
    t0 = time.monotonic()
    try:
        for step in range(1, CYCLES + 1):
            with shardckpt.CheckpointManager(
                url, keep_last=2, async_save=step % 2 == 0, storage_options=options
            ) as mgr:
                mgr.save(step, state(step))
                kept = [*kept, step][-2:]
            # a fresh manager, as a restarted job would open it
            with shardckpt.CheckpointManager(url, storage_options=options, read_only=True) as reader:
                assert reader.steps() == kept, (step, reader.steps(), kept)
                got = blank()
                assert reader.restore(got) == step
                assert_bitwise(got, state(step), f"restore after save {step}")
                if step % 4 == 0:
                    for s in kept:
                        older = blank()
                        assert reader.restore(older, step=s) == s
                        assert_bitwise(older, state(s), f"step {s} after save {step}")
                        assert verify_checkpoint(reader.path(s), storage_options=options).problems == []
    finally:
        proxy.stop()
    clean = s3.storage_options()
    with shardckpt.CheckpointManager(url, storage_options=clean, read_only=True) as final:
        assert final.steps() == kept
        for s in kept:
            got = blank()
            final.restore(got, step=s)
            assert_bitwise(got, state(s), f"final step {s}")
            assert verify_checkpoint(final.path(s), storage_options=clean).problems == []
    names = {p.rsplit("/", 1)[-1] for p in s3.admin().ls(f"{bucket}/soak", refresh=True)}
    assert names == {f"step_{s:010d}" for s in kept}, names  # no leftovers, owner record released
    assert s3.admin().list_multipart_uploads(bucket) == []
    parts = sum(1 for _, path, _ in proxy.log if "partNumber=" in path)
    assert parts >= (CYCLES * 3 if STRESS else 0), parts
    print(
        f"\ns3 soak (seed {seed}): {CYCLES} saves, {proxy.requests} requests ({parts} part uploads), "
        f"{proxy.faults} faults injected "
        f"{dict(tally)}, {time.monotonic() - t0:.0f} s, 0 lost"
    )
    assert proxy.faults >= CYCLES, (proxy.faults, tally)


def test_a_lost_answer_to_starting_a_multipart_upload_leaves_no_stray_upload(s3: S3Server) -> None:
    """The server starts the upload, the answer is lost, the client retries and gets a
    second upload id. Before: the first upload stayed open forever (found by the soak)."""
    from shardckpt.storage.fsspec_storage import FsspecStorage

    bucket = s3.create_bucket()
    creates: list[str] = []

    def lose_first_create(n: int, method: str, path: str):
        if method == "POST" and path.endswith("?uploads"):
            creates.append(path)
            return "drop-after" if len(creates) == 1 else False
        return False

    proxy = FaultProxy(s3.port, fail=lose_first_create)
    try:
        storage = FsspecStorage(f"s3://{bucket}/x", s3.storage_options(endpoint_url=proxy.endpoint_url), SMALL_PARTS)
        data = bytes(range(256)) * (2 * SMALL_PARTS.part_bytes // 256 + 3)  # 3 parts
        stream = storage.open_write("big.bin")
        stream.write(data)
        stream.finish()
    finally:
        proxy.stop()
    assert len(creates) == 2 and proxy.faults == 1, (creates, proxy.log)
    assert s3.admin().cat_file(f"{bucket}/x/big.bin") == data
    assert s3.admin().list_multipart_uploads(bucket) == []
