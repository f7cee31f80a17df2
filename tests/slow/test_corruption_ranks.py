"""Damaged multi-rank checkpoints: every damage is refused naming the file, or is harmless.

tests/slow/test_corruption.py damages a single-process checkpoint. Here the template is
saved by 2 gloo ranks (a row-sharded DTensor, a sharded bf16 DTensor, a replicated
plain tensor written by one of them, inline values; ``hash_block_bytes=4096``, two
files per rank). Each trial copies it, damages one data file of either rank (bit
flips anywhere, truncation, deletion) or swaps a rank-0 file with a rank-1 file, then
loads it resharded onto one process with ``verify=True``. The load must raise a
ShardckptError naming a damaged file, or return values bitwise equal to the originals
(only for flips in a safetensors header, which no load reads); ``verify_checkpoint``
must report every damaged file. One more damaged copy is loaded by 2 ranks: every
rank raises IntegrityError, also the rank that did not read the damaged bytes.

``SHARDCKPT_STRESS=1`` runs 2000 trials instead of 60.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections import Counter

import pytest
import torch
from damage import flip_byte
from distributed import run_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import shardckpt
from shardckpt.convert.audit import verify_checkpoint

STRESS = os.environ.get("SHARDCKPT_STRESS") == "1"
TRIALS = 2000 if STRESS else 60
SEED = int(os.environ.get("SHARDCKPT_SEED", "20261126"))


def global_state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(64, 130, generator=g),  # 32 rows per rank: 16640 bytes, 5 blocks each
        "e": torch.randn(96, 40, generator=g).to(torch.bfloat16),
        "r": torch.randint(-(2**40), 2**40, (1500,), generator=g),  # replicated: one rank writes it
        "step": 77,
    }


def _save(rank: int, world: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    full = global_state()
    sd = {
        k: DTensor.from_local(full[k].chunk(world)[rank].clone(), mesh, [Shard(0)], run_check=False) for k in ("w", "e")
    }
    sd.update(r=full["r"], step=full["step"])
    shardckpt.save(sd, path, num_io_threads=2, hash_block_bytes=4096, timeout_s=30)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("corrupt") / "template")
    run_ranks(_save, 2, path)
    return path


def blank() -> dict:
    return {
        "w": torch.zeros(64, 130),
        "e": torch.zeros(96, 40, dtype=torch.bfloat16),
        "r": torch.zeros(1500, dtype=torch.int64),
        "step": -1,
    }


def data_files(path: str) -> dict[str, int]:
    """data file name (as the manifest names it) -> the rank that wrote it."""
    manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
    return {name: rec["rank"] for name, rec in manifest["files"].items()}


def header_end(file_path: str) -> int:
    with open(file_path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def damage(rng: random.Random, path: str) -> tuple[str, list[str], bool]:
    """Damage the copy at ``path``; returns (kind, damaged file names, header bytes only)."""
    files = data_files(path)
    name = rng.choice(sorted(files))
    full = os.path.join(path, name)
    kind = rng.choice(["flip", "flip", "flip", "truncate", "delete", "swap"])
    if kind == "flip":
        size, end = os.path.getsize(full), header_end(full)
        offsets = {rng.randrange(size) for _ in range(rng.randint(1, 3))}
        for off in offsets:
            flip_byte(full, off, 1 << rng.randrange(8))
        return kind, [name], all(off < end for off in offsets)
    if kind == "truncate":
        with open(full, "r+b") as f:
            f.truncate(rng.randrange(os.path.getsize(full)))
        return kind, [name], False
    if kind == "delete":
        os.unlink(full)
        return kind, [name], False
    other = rng.choice(sorted(n for n, r in files.items() if r != files[name]))  # a file of the other rank
    tmp = full + ".swap"
    os.replace(full, tmp)
    os.replace(os.path.join(path, other), full)
    os.replace(tmp, os.path.join(path, other))
    return kind, [name, other], False


def test_random_damage_to_a_2_rank_checkpoint_never_loads_silently(template, tmp_path):
    assert sorted(set(data_files(template).values())) == [0, 1] and len(data_files(template)) == 4
    want = global_state()
    rng = random.Random(SEED)
    tally: Counter = Counter()
    for trial in range(TRIALS):
        copy = str(tmp_path / f"c{trial}")
        shutil.copytree(template, copy)
        kind, damaged, header_only = damage(rng, copy)
        where = f"trial {trial}: {kind} of {damaged}"
        got = blank()
        try:
            shardckpt.load(got, copy, verify=True)
        except shardckpt.ShardckptError as e:
            assert any(os.path.basename(d) in str(e) for d in damaged), f"{where}: error names no damaged file: {e}"
            tally[f"load raised {type(e).__name__}"] += 1
        else:
            assert header_only, f"{where}: loaded without an error"
            for k in ("w", "e", "r"):
                assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), f"{where}: silent wrong {k}"
            tally["harmless header flip"] += 1
        report = verify_checkpoint(copy)
        named = {os.path.basename(p.file) for p in report.problems}
        assert {os.path.basename(d) for d in damaged} <= named, f"{where}: verify reported {report.problems}"
        tally[kind] += 1
        shutil.rmtree(copy)
    print(f"\n2-rank corruption (seed {SEED}): {TRIALS} trials {dict(tally)}, 0 silent wrong loads")


def _load_damaged(rank: int, world: int, path: str, damaged: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    full = blank()
    target = {
        k: DTensor.from_local(full[k].chunk(world)[rank].clone(), mesh, [Shard(0)], run_check=False) for k in ("w", "e")
    }
    target.update(r=full["r"], step=-1)
    with pytest.raises(shardckpt.IntegrityError) as info:
        shardckpt.load(target, path, timeout_s=30)
    assert damaged in str(info.value), str(info.value)


def test_damage_read_by_one_rank_raises_on_both(template, tmp_path):
    copy = str(tmp_path / "c")
    shutil.copytree(template, copy)
    manifest = json.loads(open(os.path.join(copy, "manifest.json")).read())
    chunk = next(c for c in manifest["tensors"]["w"]["chunks"] if c["offsets"][0] == 32)  # rank 1's rows
    flip_byte(os.path.join(copy, chunk["file"]), chunk["byte_offset"] + 5)
    run_ranks(_load_damaged, 2, copy, os.path.basename(chunk["file"]))
