"""Damaged checkpoints: every corruption is refused with an error naming the file, or is harmless.

One real checkpoint (single process, ``hash_block_bytes=4096``, four tensors of a few
blocks each in four data files, two of them the same size, plus inline values) is the
template. Each trial copies it, damages the copy with a seeded RNG, then

* loads it with ``verify=True`` into a fresh target: the load must raise a
  ShardckptError whose message names the damaged file (and the key, for a flipped data
  byte), or load values bitwise equal to the originals - the latter only where the
  damage lies in bytes no load reads (a data file's safetensors header) or in manifest
  fields a load does not use (``created_at``, ``metadata``...);
* runs ``shardckpt.convert.audit.verify_checkpoint``: it must raise or report a problem for
  every damage to a data file, header bytes included (the whole-file hash).

``manifest.json`` carries its own checksum (``manifest_hash``, its last field), so every
damage to the manifest - even a flip that turns an inline value into another valid JSON
value (``7`` -> ``5``) - is refused before the manifest is trusted.

``SHARDCKPT_STRESS=1`` runs 5000 trials instead of ~150. Counts are printed (``-s``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import shardckpt
from shardckpt.convert.audit import verify_checkpoint
from shardckpt.errors import ShardckptError

STRESS = os.environ.get("SHARDCKPT_STRESS") == "1"
TRIALS = 5000 if STRESS else 150
SEED = int(os.environ.get("SHARDCKPT_SEED", "20261124"))

# kind -> relative weight in the random mix
KINDS = {
    "data_flip": 30,
    "data_truncate": 12,
    "data_delete": 6,
    "data_swap": 12,
    "manifest_flip": 30,
    "manifest_truncate": 10,
}


def source_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "w1": torch.randn(3000, generator=g),  # 12000 bytes: 3 blocks (last one partial)
        "w2": torch.randn(3000, generator=g),  # same dtype/shape/name length: a same-size file
        "emb": torch.randn(40, 130, generator=g).to(torch.bfloat16),  # 10400 bytes
        "ids": torch.randint(-(2**40), 2**40, (1100,), generator=g),  # int64, 8800 bytes
        "step": 7,
        "lr": 0.001,
        "opt": {"betas": [0.9, 0.95], "name": "adamw"},
    }


def fresh_target() -> dict[str, Any]:
    return {
        "w1": torch.zeros(3000),
        "w2": torch.zeros(3000),
        "emb": torch.zeros(40, 130, dtype=torch.bfloat16),
        "ids": torch.zeros(1100, dtype=torch.int64),
        "step": 0,
        "lr": 0.0,
        "opt": {"betas": None, "name": None},
    }


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def bitwise_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    for k in ("w1", "w2", "emb", "ids"):
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(_raw(a[k]), _raw(b[k])):
            return False
    return (a["step"], a["lr"], list(a["opt"]["betas"]), a["opt"]["name"]) == (
        b["step"],
        b["lr"],
        list(b["opt"]["betas"]),
        b["opt"]["name"],
    )


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corruption") / "template"
    shardckpt.save(source_state(), str(folder), hash_block_bytes=4096, num_io_threads=4)
    doc = json.loads((folder / "manifest.json").read_text())
    assert len(doc["files"]) == 4, "one data file per tensor"
    sizes = [f["size"] for f in doc["files"].values()]
    assert len(sizes) != len(set(sizes)), "w1 and w2 files must be the same size (same-size swap)"
    for t in doc["tensors"].values():
        assert all(len(c["block_hashes"]) >= 3 for c in t["chunks"])
    check = fresh_target()
    shardckpt.load(check, str(folder))
    assert bitwise_equal(check, source_state())
    return folder


class Damage:
    """What a trial did: kind, files damaged, and whether harmless bytes were hit."""

    def __init__(self, kind: str, files: list[str], *, data_offset: int | None = None, key: str | None = None) -> None:
        self.kind = kind
        self.files = files
        self.key = key  # the key whose bytes were flipped; None when the flip hit a header
        self.data_offset = data_offset

    def __repr__(self) -> str:
        return f"Damage({self.kind}, {self.files}, offset={self.data_offset}, key={self.key})"


def _flip(path: Path, offset: int, bit: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def _owner_of(doc: dict[str, Any], name: str, offset: int) -> str | None:
    """The key whose chunk bytes cover ``offset`` of data file ``name``; None for header bytes."""
    for key, t in doc["tensors"].items():
        for c in t["chunks"]:
            if c["file"] == name and c["byte_offset"] <= offset < c["byte_offset"] + c["byte_length"]:
                return key
    return None


def damage(folder: Path, kind: str, rng: random.Random) -> Damage:
    doc = json.loads((folder / "manifest.json").read_text())
    names = sorted(doc["files"])
    if kind == "data_flip":
        name = rng.choice(names)
        size = doc["files"][name]["size"]
        offset = rng.randrange(size)
        _flip(folder / name, offset, rng.randrange(8))
        return Damage(kind, [name], data_offset=offset, key=_owner_of(doc, name, offset))
    if kind == "data_truncate":
        name = rng.choice(names)
        size = doc["files"][name]["size"]
        cut = rng.randrange(size)  # 0 .. size-1: header, or data, or empty
        os.truncate(folder / name, cut)
        return Damage(kind, [name])
    if kind == "data_delete":
        name = rng.choice(names)
        (folder / name).unlink()
        return Damage(kind, [name])
    if kind == "data_swap":
        by_size: dict[int, list[str]] = {}
        for n in names:
            by_size.setdefault(doc["files"][n]["size"], []).append(n)
        same = [v for v in by_size.values() if len(v) >= 2]
        a, b = rng.sample(same[0], 2) if rng.random() < 0.5 else rng.sample(names, 2)
        tmp = folder / "swap.tmp"
        os.replace(folder / a, tmp)
        os.replace(folder / b, folder / a)
        os.replace(tmp, folder / b)
        return Damage(kind, sorted([a, b]))
    if kind == "manifest_flip":
        size = (folder / "manifest.json").stat().st_size
        _flip(folder / "manifest.json", rng.randrange(size), rng.randrange(8))
        return Damage(kind, ["manifest.json"])
    if kind == "manifest_truncate":
        size = (folder / "manifest.json").stat().st_size
        os.truncate(folder / "manifest.json", rng.randrange(size))
        return Damage(kind, ["manifest.json"])
    raise AssertionError(kind)


def run_trial(template: Path, work: Path, kind: str, rng: random.Random, counts: Counter) -> None:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(template, work)
    d = damage(work, kind, rng)
    counts["trials"] += 1
    counts[f"trials:{kind}"] += 1

    target = fresh_target()
    try:
        shardckpt.load(target, str(work), verify=True)
    except ShardckptError as e:
        msg = str(e)
        counts["detected_by_load"] += 1
        counts[f"error:{type(e).__name__}"] += 1
        if kind.startswith("manifest"):
            assert str(work) in msg, (d, msg)
            if kind == "manifest_truncate" or "JSON" in msg:
                assert "manifest.json" in msg, (d, msg)
        else:
            assert any(f in msg for f in d.files), (d, msg)
            if kind == "data_flip" and d.key is not None:
                assert repr(d.key) in msg, (d, msg)
    except Exception as e:
        raise AssertionError(f"{d}: untyped {type(e).__name__}: {e}") from e
    else:
        equal = bitwise_equal(target, source_state())
        if kind == "data_flip" and d.key is None:
            assert equal, d  # header bytes: no load reads them, values must be the originals
            counts["harmless:data_header_flip"] += 1
        else:
            counts["SILENT_WRONG_LOAD"] += 1
            raise AssertionError(f"{d}: load succeeded without error, values equal={equal}")

    try:
        report = verify_checkpoint(str(work))
    except ShardckptError:
        counts["detected_by_verify"] += 1
        return
    assert not report.ok, f"{d}: verify_checkpoint reported no problem"
    counts["detected_by_verify"] += 1
    assert all(p.file in d.files for p in report.problems) or kind == "manifest_flip", (d, report.problems)


def test_random_corruption_is_detected_or_harmless(template, tmp_path):
    rng = random.Random(SEED)
    kinds, weights = list(KINDS), list(KINDS.values())
    counts: Counter = Counter()
    # every kind at least a few times, then the weighted mix
    plan = [k for k in kinds for _ in range(3)]
    plan += rng.choices(kinds, weights, k=TRIALS - len(plan))
    for kind in plan:
        run_trial(template, tmp_path / "work", kind, rng, counts)
    report = {k: counts[k] for k in sorted(counts)}
    print(f"\ncorruption trials (seed {SEED}, stress={STRESS}): {json.dumps(report, indent=1)}")
    assert counts["trials"] == TRIALS
    assert counts["SILENT_WRONG_LOAD"] == 0
    data_trials = sum(counts[f"trials:{k}"] for k in kinds if k.startswith("data"))
    assert counts["detected_by_verify"] >= data_trials
    for k in kinds:
        assert counts[f"trials:{k}"] >= 3


@pytest.mark.parametrize("offset", [0, 3, 7, 8, 20])
def test_header_flip_is_caught_by_verify_and_harmless_to_load(template, tmp_path, offset):
    work = tmp_path / "c"
    shutil.copytree(template, work)
    doc = json.loads((work / "manifest.json").read_text())
    name = sorted(doc["files"])[0]
    assert _owner_of(doc, name, offset) is None
    _flip(work / name, offset, 0)
    target = fresh_target()
    shardckpt.load(target, str(work))
    assert bitwise_equal(target, source_state())
    report = verify_checkpoint(str(work))
    assert not report.ok and {p.file for p in report.problems} == {name}


def test_same_size_swap_names_file_and_key(template, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(template, work)
    doc = json.loads((work / "manifest.json").read_text())
    w1 = doc["tensors"]["w1"]["chunks"][0]["file"]
    w2 = doc["tensors"]["w2"]["chunks"][0]["file"]
    assert doc["files"][w1]["size"] == doc["files"][w2]["size"]
    tmp = work / "t"
    os.replace(work / w1, tmp)
    os.replace(work / w2, work / w1)
    os.replace(tmp, work / w2)
    with pytest.raises(ShardckptError, match="checksum mismatch") as ei:
        shardckpt.load(fresh_target(), str(work))
    msg = str(ei.value)
    assert (w1 in msg and "'w1'" in msg) or (w2 in msg and "'w2'" in msg), msg


def verify_checkpoint_ok(path: Path) -> bool:
    try:
        return verify_checkpoint(str(path)).ok
    except ShardckptError:
        return False


def test_manifest_value_flip_is_detected(template, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(template, work)
    raw = (work / "manifest.json").read_bytes()
    i = raw.index(b'"step": 7') + 1
    damaged = bytearray(raw)
    damaged[i + len('"step": ') - 1] ^= 0b10  # '7' (0x37) -> '5' (0x35): still valid JSON
    (work / "manifest.json").write_bytes(bytes(damaged))
    assert json.loads(bytes(damaged))["values"]["step"] == 5  # a valid manifest, wrong value
    target = fresh_target()
    with pytest.raises(ShardckptError, match="manifest checksum mismatch"):
        shardckpt.load(target, str(work))
    assert not verify_checkpoint_ok(work)
