"""Format 3's JSON container limit (docs/format.md 12.5 item 1): dense rule records of
short keys save and load, and the limit still bounds what parsing a hostile manifest costs."""

from __future__ import annotations

import dataclasses
import json
import tracemalloc

import pytest
import torch
from manifest_oracle import empty_v3

import shardckpt
from shardckpt.errors import ManifestError
from shardckpt.format import datafile, manifest, manifest_v3_parser
from shardckpt.format import manifest_v3 as mv3


def test_thousands_of_short_keys_save_and_load_in_format_3(tmp_path):
    # 3000 tensors "t0".."t2999" of 8 floats: one rule record of 8 containers in ~110 bytes
    # each, which the 16-byte container limit of versions 1 and 2 refused at save
    state = {f"t{i}": torch.full((8,), float(i)) for i in range(3000)}
    path = str(tmp_path / "c")
    shardckpt.save(state, path, format_version=3)
    raw = (tmp_path / "c" / "manifest.json").read_bytes()
    assert datafile.json_limits_problem(raw, max_bytes=manifest.MAX_MANIFEST_BYTES) is not None  # over 1 per 16
    out = {f"t{i}": torch.zeros(8) for i in range(3000)}
    shardckpt.load(out, path)
    assert all(torch.equal(out[k], state[k]) for k in ("t0", "t1234", "t2999"))


def _dense(n: int) -> bytes:
    """A sealed format-3 manifest whose metadata holds ``n`` one-key objects, 8 bytes each
    with the comma: the densest containers per byte the limit lets through."""
    return mv3.manifest_v3_to_json(dataclasses.replace(empty_v3(), metadata={"x": [{"a": 0}] * n}))


def test_a_manifest_over_one_container_per_8_bytes_is_refused_before_json(monkeypatch):
    raw = _dense(200_000)  # 1.6 MB of '{"a":0},'; within the limit (the next test)
    over = manifest.seal(manifest.unseal(raw, source="t").replace(b'{"a":0}', b"[[],[]]"))  # 3 per 8 bytes
    calls = []
    monkeypatch.setattr(json, "loads", lambda *a, **k: calls.append(1))  # any JSON parse, anywhere
    with pytest.raises(ManifestError, match="one per 8 bytes"):
        manifest_v3_parser.parse_manifest_v3(over, source="hostile")
    with pytest.raises(ManifestError, match="one per 8 bytes"):
        manifest_v3_parser.parse_any_manifest(over, source="hostile")
    assert calls == []  # refused on the bytes, nothing parsed


def test_at_the_format_3_limit_parsing_stays_within_30x_the_bytes():
    raw = _dense(200_000)
    assert datafile.json_limits_problem(raw, max_bytes=manifest.MAX_MANIFEST_BYTES, bytes_per_container=8) is None
    assert datafile.json_limits_problem(raw, max_bytes=manifest.MAX_MANIFEST_BYTES) is not None  # v1 would refuse
    tracemalloc.start()
    try:
        m = manifest_v3_parser.parse_any_manifest(raw, source="dense")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(m, mv3.ManifestV3) and len(m.metadata["x"]) == 200_000
    # json.loads ~24x (datafile: ~20x at one per 16 bytes), plus the decoded text
    assert peak < 30 * len(raw), (peak, len(raw))


def test_versions_1_and_2_keep_one_container_per_16_bytes():
    doc = b'{"format":"shardckpt","format_version":1,"x":[' + b",".join([b'{"a":0}'] * 10_000) + b"]}"
    with pytest.raises(ManifestError, match="one per 16 bytes"):
        manifest_v3_parser.parse_any_manifest(doc, source="v1")
