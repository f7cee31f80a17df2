"""The manifest writers' oracle: json.dumps alone, as the writers were before their fast paths.

``two_levels(doc)`` writes a manifest document the way every format lays it out (one line
per top-level field, one per entry of its big maps) with nothing but ``json.dumps``, and
seals it; the tests of the templated writers compare their bytes with it. ``empty_v3()``
is a version-3 manifest with no tensors, for tests that fill in one field.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from shardckpt.format import file_table
from shardckpt.format import manifest_v3 as mv3
from shardckpt.format.manifest import seal


def dump(v: Any) -> str:
    return json.dumps(v, allow_nan=False, separators=(",", ":"))


def two_levels(doc: dict[str, Any], maps: Collection[str] | None = None) -> bytes:
    """``doc`` as sealed manifest bytes: each non-empty dict among ``maps`` (None: every
    dict) one entry per line, every other field on its own line."""
    lines = []
    for k, v in doc.items():
        if isinstance(v, dict) and v and (maps is None or k in maps):
            inner = ",\n".join(f"  {dump(ik)}: {dump(iv)}" for ik, iv in v.items())
            lines.append(f" {dump(k)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {dump(k)}: {dump(v)}")
    return seal(("{\n" + ",\n".join(lines) + "\n}\n").encode())


def empty_v3(created_at: str = "2026-11-30T00:00:00+00:00") -> mv3.ManifestV3:
    """A version-3 manifest of one rank with one data file, and no tensor, value or path."""
    group = file_table.FileGroup("0123456789ab", None, 1, ((1, 0),), 1024, (file_table.Page(10, "f" * 16),))
    return mv3.ManifestV3(
        world_size=1,
        hash_block_bytes=1 << 20,
        bases=(),
        file_table=file_table.FileTable((group,)),
        tensors={},
        values={},
        paths={},
        created_at=created_at,
        shardckpt_version="0.0.0",
        torch_version="2",
        metadata={},
    )
