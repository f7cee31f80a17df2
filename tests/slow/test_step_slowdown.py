"""benchmarks/step_slowdown.py in its quick form: two torchrun "nodes" x 2 ranks train, every
configuration is measured, the phases of a local save are attributed, and the folders it
made are gone afterwards."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from distributed import run_command

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir)
SCRIPT = os.path.join(ROOT, "benchmarks", "step_slowdown.py")


def median(r: dict[str, Any], config: str, key: str) -> float:
    value = r["configs"][config][key]["median"]
    assert math.isfinite(value) and value >= 0, (config, key, value)
    return float(value)


def test_step_slowdown_quick_form(tmp_path: Any) -> None:
    durable, local = tmp_path / "durable", tmp_path / "local"
    durable.mkdir()
    local.mkdir()
    out = tmp_path / "r.json"
    cmd = [sys.executable, SCRIPT, "--quick", "--out", str(out), "--durable-parent", str(durable)]
    proc = run_command([*cmd, "--local-parent", str(local), "--timeout-s", "100"], timeout_s=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["configs"]) == {"none", "none_AA", "local_r1", "local_r0", "durable_async"}
    # --quick: 2 layers of 64 x 64 (+ bias), AdamW's two moments and its step per parameter, 4 ranks
    params = 2 * (64 * 64 + 64)
    assert r["world_size"] == 4
    assert r["state_bytes_total"] == 4 * (3 * 4 * params + 4 * 4)
    for config in r["configs"]:
        assert r["configs"][config]["step_s"]["n"] == 1  # one measured repetition
        assert median(r, config, "step_s") >= median(r, config, "compute_s") > 0
    for config in ("none", "none_AA"):  # nothing staged, nothing in the background
        assert median(r, config, "staging_s") == 0 and "background_s" not in r["configs"][config]
    for config in ("local_r1", "local_r0", "durable_async"):
        assert median(r, config, "staging_s") > 0
        assert median(r, config, "stall_s") >= median(r, config, "staging_s")
    # only replicas=1 sends a copy; both local configs write and hash in the background
    assert median(r, "local_r1", "background_replication_s") > 0
    assert "background_replication_s" not in r["configs"]["local_r0"]
    assert median(r, "local_r0", "background_commit_s") > 0
    assert r["staging_alone_s"] > 0 and r["image_bytes_per_rank"] > r["state_bytes_per_rank"]
    assert set(r["ratios_step_s_to_none"]) == {"none_AA", "local_r1", "local_r0", "durable_async"}
    # the benchmark removed its scratch folders (and with them every local step and durable root)
    assert list(durable.iterdir()) == [] and list(local.iterdir()) == []
