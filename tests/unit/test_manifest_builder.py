"""The coordinator's manifests of a reused plan (issue #18): a Checkpointer keeps one
ManifestBuilder per global plan, whose fixed half (tensors, chunk boxes, paths and their
JSON template) the plan's later saves reuse. Every manifest written must still be what the
general writer, manifest_to_json, writes for the manifest returned, and parse back to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.metadata import Metadata

from shardckpt import Checkpointer
from shardckpt.engine.manifest_builder import ManifestBuilder
from shardckpt.engine.writer import Writer, WriterOptions
from shardckpt.format.manifest import Manifest, manifest_to_json, parse_manifest
from shardckpt.format.manifest_text import ChunkFields, PlanText, json_encoder
from shardckpt.storage.local import LocalStorage


def _state(step: int, *, extra: bool = False) -> dict[str, Any]:
    odd_keys = {
        "100%": torch.arange(6, dtype=torch.float32) + step,  # a '%' in a key: doubled in the template
        "%s%d": torch.ones(2, 3, dtype=torch.bfloat16) * step,
        'q"uote\\é': torch.full((5,), step, dtype=torch.int64),
    }
    state: dict[str, Any] = {
        "model": {f"layer{i}.w": torch.randn(3, 4) + step for i in range(40)},
        "odd": odd_keys,
        "scalar": torch.tensor(float(step)),  # no dimension: a chunk without offsets
        "empty": torch.zeros(0, 7),
        "step": step,
        "tags": {"run": f"r{step}"},
    }
    if extra:
        state["model"]["new"] = torch.ones(9)
    return state


def _written(path: Path, returned: Manifest | Any) -> Manifest:
    """The manifest file at ``path``: what manifest_to_json writes for the manifest the save
    returned, and that manifest when parsed."""
    raw = (path / "manifest.json").read_bytes()
    assert isinstance(returned, Manifest)
    assert raw == manifest_to_json(returned)
    parsed = parse_manifest(raw, source=str(path))
    assert parsed == returned
    return parsed


def test_a_reused_plan_keeps_its_builder_and_writes_what_manifest_to_json_writes(tmp_path: Path) -> None:
    with Checkpointer() as ckpt:
        first = _written(tmp_path / "a", ckpt.save(_state(1), str(tmp_path / "a"), metadata={"step": 1}))
        cache = ckpt._rounds.over(None)[1]
        builder = cache.manifests
        assert builder is not None and builder._fixed is not None
        fixed = builder._fixed
        second = _written(tmp_path / "b", ckpt.save(_state(2), str(tmp_path / "b"), metadata={"step": 2}))
        assert cache.manifests is builder and builder._fixed is fixed, "the plan's fixed half was made once"
        # Only what the save decides changed: the chunks' files and hashes, the values, the metadata.
        assert second.tensors.keys() == first.tensors.keys()
        for key, t in second.tensors.items():
            was = first.tensors[key]
            assert (t.dtype, t.shape, [(c.offsets, c.sizes) for c in t.chunks]) == (
                was.dtype,
                was.shape,
                [(c.offsets, c.sizes) for c in was.chunks],
            )
        assert {c.file for t in second.tensors.values() for c in t.chunks}.isdisjoint(
            {c.file for t in first.tensors.values() for c in t.chunks}
        )
        assert second.values["step"] == 2 and second.values["tags.run"] == "r2" and second.metadata == {"step": 2}
        assert second.tensors["odd.100%"].chunks[0].block_hashes != first.tensors["odd.100%"].chunks[0].block_hashes
        # A new key is a new layout: a new plan, a new builder, the same bytes as the general writer.
        third = _written(tmp_path / "c", ckpt.save(_state(3, extra=True), str(tmp_path / "c")))
        assert cache.manifests is not builder and "model.new" in third.tensors
        target = _state(0)
        ckpt.load(target, str(tmp_path / "b"))
    assert torch.equal(target["odd"]["100%"], torch.arange(6, dtype=torch.float32) + 2)
    assert target["scalar"].item() == 2.0 and target["step"] == 2


def test_incremental_saves_of_one_plan_write_digests_and_bases(tmp_path: Path) -> None:
    """Format 2: every chunk's digest, and the chunks reused from a base (rows located
    one by one, not packed), through the same builder."""
    state = _state(1)
    with Checkpointer() as ckpt:
        _written(tmp_path / "a", ckpt.save(state, str(tmp_path / "a"), incremental=True))
        state["model"]["layer0.w"].add_(1.0)
        b = _written(tmp_path / "b", ckpt.save(state, str(tmp_path / "b"), base=str(tmp_path / "a")))
        assert ckpt._rounds.over(None)[1].manifests is not None
    assert b.format_version == 2 and b.bases == ("a",)
    assert all(c.digest is not None for t in b.tensors.values() for c in t.chunks)
    from_base = [k for k, t in b.tensors.items() if b.files[t.chunks[0].file].checkpoint == "a"] if b.tensors else []
    assert "model.layer1.w" in from_base and "model.layer0.w" not in from_base


def test_a_builder_of_another_plan_is_not_used(tmp_path: Path) -> None:
    """A new global plan gets a new builder (the plan cache's old one is for other
    metadata), and Writer.finish refuses a builder of another plan."""
    with Checkpointer() as ckpt:
        ckpt.save(_state(1), str(tmp_path / "a"))
        cache = ckpt._rounds.over(None)[1]
        stale = ManifestBuilder(cache.metadata)  # type: ignore[arg-type]
        cache.manifests = stale
        cache.metadata = type(cache.metadata)(state_dict_metadata={})  # type: ignore[misc]
        cache.global_id = None  # the coordinator plans again
        m = ckpt.save(_state(2), str(tmp_path / "b"))
        assert cache.manifests is not stale and cache.manifests is not None
    assert isinstance(m, Manifest) and "model.layer3.w" in _written(tmp_path / "b", m).tensors
    writer = Writer(LocalStorage(str(tmp_path / "c")), WriterOptions())
    with pytest.raises(ValueError, match="made for another global plan"):
        writer.finish(Metadata(state_dict_metadata={}), [], stale)


def test_the_template_refuses_fields_a_save_got_wrong() -> None:
    text = PlanText.of(["t"], ["F32"], [(4,)], [1], [(0,)], [(4,)], [], json_encoder())
    assert text is not None
    fields = ChunkFields(["data/f"], [0], [16], [("0123456789abcdef",)])
    assert text.tensors(fields, None) == (
        '  "t": {"dtype":"F32","shape":[4],"chunks":[{"offsets":[0],"sizes":[4],"file":"data/f",'
        '"byte_offset":0,"byte_length":16,"block_hashes":["0123456789abcdef"]}]}'
    )
    with pytest.raises(ValueError, match="a template of 1 chunks was given 2"):
        text.tensors(ChunkFields(["f", "g"], [0, 1], [1, 1], [(), ()]), None)
    assert text.tensors(ChunkFields(["data/f"], [True], [16], [("00",)]), None) is None  # a bool is not JSON's 1
    assert PlanText.of(["t"], ["F32"], [(4.0,)], [1], [(0,)], [(4,)], [], json_encoder()) is None  # type: ignore[list-item]


def test_a_state_of_values_only_has_a_manifest_without_tensors(tmp_path: Path) -> None:
    with Checkpointer() as ckpt:
        for step in range(2):  # the second save reuses the plan and its builder
            m = _written(
                tmp_path / f"v{step}", ckpt.save({"step": step, "cfg": {"lr": 0.1}}, str(tmp_path / f"v{step}"))
            )
            assert m.tensors == {} and m.values == {"step": step, "cfg.lr": 0.1}
