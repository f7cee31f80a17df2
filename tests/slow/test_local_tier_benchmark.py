"""benchmarks/local_tier.py at a toy size: every restore bitwise, both tiers' files evicted
before each restore (on a disk, nothing of either stays cached), the profile's rates, and a
folder with someone's files in it refused and left as it was."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from typing import Any

from distributed import run_command

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "benchmarks", "local_tier.py")


def test_local_tier_benchmark_quick(tmp_path: Any) -> None:
    out = tmp_path / "r.json"
    local, durable = tmp_path / "local", tmp_path / "durable"  # both on the test's disk: both evictable
    args = ["--mib", "8", "--repeats", "1", "--local-dir", str(local), "--durable-dir", str(durable)]
    proc = run_command([sys.executable, SCRIPT, *args, "--out", str(out)], timeout_s=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["bitwise"] is True and r["state_bytes"] > 8 * 2**20 * 0.9
    for name in ("local", "local_again", "disk_cold"):
        assert r[name]["n"] == 1 and r[name]["median"] > 0
    resident = r["resident_after_evict"]
    assert resident["local_files_bytes"] >= r["state_bytes"] and resident["durable_files_bytes"] >= r["state_bytes"]
    if shutil.which("fincore"):  # checked in the warm-up, once per restore
        assert resident["local_bytes"] == [0, 0, 0] and resident["durable_bytes"] == [0, 0, 0]
    rates = r["components"]["gb_per_s"]
    assert set(rates) == {"memcpy", "xxh3_64", "pread_local_tier", "pread_disk_warm", "pread_disk_cold"}
    assert all(math.isfinite(v["median"]) and v["median"] > 0 for v in rates.values())
    assert not local.exists() and not durable.exists()  # made by the run, removed by it


def test_local_tier_benchmark_refuses_a_folder_with_files(tmp_path: Any) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    args = ["--mib", "1", "--local-dir", str(mine), "--durable-dir", str(tmp_path / "durable")]
    proc = run_command([sys.executable, SCRIPT, *args], timeout_s=60)
    assert proc.returncode != 0 and "is not an empty folder" in proc.stderr
    assert (mine / "keep.txt").read_text() == "mine" and not (tmp_path / "durable").exists()
