"""Export, import and diff: shardckpt <-> safetensors / Hugging Face / torch.save / DCP.

The main checkpoint is saved by 2 gloo ranks with DTensor sharding (uneven rows, column
shards, replicated), then exported from a process with no process group; every tensor
must come back bitwise equal to the global original.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from distributed import run_ranks
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import shardckpt
from shardckpt import convert
from shardckpt.cli.app import EXIT_DAMAGED, EXIT_OK, EXIT_UNUSABLE, main
from shardckpt.cli.convert import EXIT_DIFFERENT
from shardckpt.convert.source import CheckpointSource
from shardckpt.errors import IntegrityError, ManifestError, UnsupportedValueError

BLOCK = 4096  # small checksum blocks, so partial reads round to block edges


def global_model() -> dict[str, torch.Tensor]:
    """Flat key -> global tensor, as saved under "model" (the dotted name is on purpose)."""
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(7, 6, generator=g),  # Shard(0), uneven: 4 + 3 rows
        "layers.0.w": torch.randn(6, 10, generator=g),  # Shard(1): column chunks
        "layers.1.w": torch.randn(6, 10, generator=g),
        "big": torch.randn(64, 40, generator=g),  # 10 KiB: several checksum blocks per chunk
        "norm": torch.randn(6, generator=g).to(torch.bfloat16),  # replicated
        "steps": torch.arange(5, dtype=torch.int32),  # replicated, not floating
        "scale": torch.tensor(0.5, dtype=torch.float64),  # 0-d
    }


PLACEMENT = {"embed.weight": Shard(0), "layers.0.w": Shard(1), "layers.1.w": Shard(1), "big": Shard(0)}
VALUES = {"step": 7, "opt.lr": 0.001, "opt.betas": (0.9, 0.95)}


def flat_original() -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in global_model().items()}


def nested_state(model: dict[str, torch.Tensor]) -> dict:
    layers = [{"w": model["layers.0.w"]}, {"w": model["layers.1.w"]}]
    rest = {k: v for k, v in model.items() if not k.startswith("layers.")}
    return {"model": {**rest, "layers": layers}, "step": 7, "opt": {"lr": 0.001, "betas": (0.9, 0.95)}}


def _save_on_two_ranks(rank: int, world: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    model = {k: distribute_tensor(v, mesh, [PLACEMENT.get(k, Replicate())]) for k, v in global_model().items()}
    shardckpt.save(nested_state(model), path, hash_block_bytes=BLOCK)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("convert") / "ckpt")
    run_ranks(_save_on_two_ranks, 2, path)
    return path


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


# ---------------------------------------------------------------- export


def test_checkpoint_really_is_sharded_over_two_ranks(ckpt):
    m = CheckpointSource(ckpt).manifest
    assert m.world_size == 2
    assert len(m.tensors["model.embed.weight"].chunks) == 2
    assert [c.sizes for c in m.tensors["model.layers.0.w"].chunks] == [(6, 5), (6, 5)]


def test_safetensors_export_is_bitwise_and_skips_values(ckpt, tmp_path):
    out = str(tmp_path / "model.safetensors")
    report = convert.export_checkpoint(ckpt, out, format="safetensors")
    assert_bitwise(load_file(out), flat_original())
    assert report.skipped_values == ["opt.betas", "opt.lr", "step"]
    assert report.largest_tensor_bytes == 64 * 40 * 4
    with safe_open(out, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_safetensors_export_is_byte_identical_to_save_file(tmp_path):
    tensors = {
        "b": torch.arange(4),
        "a": torch.randn(3, 2),
        "h": torch.ones(3, dtype=torch.float16),
        "z": torch.empty(0, 2),
        "s": torch.tensor(True),
    }
    shardckpt.save(tensors, str(tmp_path / "ck"))
    convert.export_checkpoint(str(tmp_path / "ck"), str(tmp_path / "ours.safetensors"), format="safetensors")
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()


def test_hf_export_index_names_shapes_and_shard_sizes(ckpt, tmp_path):
    out = tmp_path / "hf"
    max_bytes = 3000
    convert.export_checkpoint(ckpt, str(out), format="hf", max_shard_bytes=max_bytes)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    want = flat_original()
    assert sorted(index["weight_map"]) == sorted(want)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in want.values())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*shards, "model.safetensors.index.json"])
    got = {}
    for shard in shards:
        tensors = load_file(str(out / shard))
        assert {k for k, f in index["weight_map"].items() if f == shard} == set(tensors)
        data = sum(t.numel() * t.element_size() for t in tensors.values())
        assert data <= max_bytes or len(tensors) == 1  # only a tensor bigger than the limit gets a shard alone
        got.update(tensors)
    assert_bitwise(got, want)


def test_hf_export_refuses_existing_then_overwrites_and_drops_stale_shards(ckpt, tmp_path):
    out = str(tmp_path / "hf")
    convert.export_checkpoint(ckpt, out, format="hf", max_shard_bytes=3000)
    many = len(os.listdir(out))
    with pytest.raises(FileExistsError, match="overwrite"):
        convert.export_checkpoint(ckpt, out, format="hf")
    convert.export_checkpoint(ckpt, out, format="hf", max_shard_bytes="5GB", overwrite=True)
    assert many > 2
    assert sorted(os.listdir(out)) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]


def test_select_strip_and_cast(ckpt, tmp_path):
    out = str(tmp_path / "m.safetensors")
    report = convert.export_checkpoint(
        ckpt, out, format="safetensors", keys=["model.layers.*", "model.steps"], strip_prefix="model.", dtype="bf16"
    )
    got = load_file(out)
    want = {k: v.to(torch.bfloat16) for k, v in global_model().items() if k.startswith("layers.")}
    want["steps"] = global_model()["steps"]  # integer tensors are never cast
    assert_bitwise(got, want)
    assert report.skipped_values == []


def test_prefix_pattern_takes_whole_components_only(ckpt, tmp_path):
    names = CheckpointSource(ckpt).select(convert.Selection(keys=("model.layers",)))
    assert list(names) == ["model.layers.0.w", "model.layers.1.w"]
    with pytest.raises(ValueError, match="no key matches"):
        CheckpointSource(ckpt).select(convert.Selection(keys=("model.lay",)))


def test_strip_prefix_collision_is_refused(tmp_path):
    shardckpt.save({"a": {"w": torch.ones(1)}, "w": torch.zeros(1)}, str(tmp_path / "ck"))
    with pytest.raises(ValueError, match="same name 'w'"):
        convert.export_checkpoint(
            str(tmp_path / "ck"), str(tmp_path / "o.safetensors"), format="safetensors", strip_prefix="a."
        )


def test_torch_export_loads_with_weights_only_nested_with_values(ckpt, tmp_path):
    out = str(tmp_path / "w.pt")
    convert.export_checkpoint(ckpt, out, format="torch")
    obj = torch.load(out, weights_only=True)
    want = nested_state(global_model())
    assert obj["step"] == 7 and obj["opt"] == {"lr": 0.001, "betas": (0.9, 0.95)}
    assert sorted(obj["model"]) == sorted(want["model"])
    assert [sorted(layer) for layer in obj["model"]["layers"]] == [["w"], ["w"]]
    flat = {f"model.{k}": v for k, v in obj["model"].items() if k != "layers"}
    flat.update({f"model.layers.{i}.w": layer["w"] for i, layer in enumerate(obj["model"]["layers"])})
    assert_bitwise(flat, flat_original())


def test_torch_export_strip_into_nested_and_flat(ckpt, tmp_path):
    nested = str(tmp_path / "n.pt")
    convert.export_checkpoint(ckpt, nested, format="torch", keys=["model"], strip_prefix="model.")
    obj = torch.load(nested, weights_only=True)
    assert sorted(obj) == ["big", "embed.weight", "layers", "norm", "scale", "steps"]
    flat = str(tmp_path / "f.pt")
    convert.export_checkpoint(ckpt, flat, format="torch", keys=["model"], strip_prefix="model.", flat=True)
    assert_bitwise(torch.load(flat, weights_only=True), global_model())


def test_torch_export_refuses_when_memory_would_not_fit(ckpt, tmp_path, monkeypatch):
    from shardckpt.convert import export as convert_export

    monkeypatch.setattr(convert_export, "_available_memory_bytes", lambda: 1000)
    with pytest.raises(shardckpt.ShardckptError, match="Export to safetensors or hf instead"):
        convert.export_checkpoint(ckpt, str(tmp_path / "w.pt"), format="torch")
    assert not (tmp_path / "w.pt").exists()


def test_export_detects_corruption(tmp_path):
    ck = str(tmp_path / "ck")
    shardckpt.save({"w": torch.randn(64, 64)}, ck, hash_block_bytes=BLOCK)
    chunk = CheckpointSource(ck).manifest.tensors["w"].chunks[0]
    with open(os.path.join(ck, chunk.file), "r+b") as f:
        f.seek(chunk.byte_offset + 5000)
        b = f.read(1)
        f.seek(chunk.byte_offset + 5000)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(IntegrityError, match="block 1"):
        convert.export_checkpoint(ck, str(tmp_path / "o.safetensors"), format="safetensors")
    assert main(["export", ck, str(tmp_path / "o2.safetensors"), "--format", "safetensors"]) == EXIT_DAMAGED


def test_read_box_reads_the_box_and_refuses_sizes_of_another_rank(tmp_path):
    ck = str(tmp_path / "ck")
    w = torch.arange(48.0).reshape(6, 8)
    shardckpt.save({"w": w}, ck)
    source = CheckpointSource(ck)
    assert torch.equal(source.read_box("w", (1, 2), (3, 4)), w[1:4, 2:6])
    with pytest.raises(ValueError, match="lies outside shape"):  # was a RuntimeError from torch, deep inside
        source.read_box("w", (1, 2), (3,))


# ---------------------------------------------------------------- import


def test_safetensors_round_trip_is_bitwise(ckpt, tmp_path):
    st = str(tmp_path / "m.safetensors")
    convert.export_checkpoint(ckpt, st, format="safetensors")
    back = str(tmp_path / "back")
    report = convert.import_checkpoint(st, back)
    assert report.format == "safetensors" and report.num_tensors == 7
    target = {k: torch.zeros_like(v) for k, v in flat_original().items()}
    shardckpt.load(target, back)
    assert_bitwise(target, flat_original())


def test_hf_folder_written_by_hand_imports_under_model(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    a, b = {"x.weight": torch.randn(3, 4)}, {"y.bias": torch.arange(3.0), "y.scale": torch.ones(2, dtype=torch.float16)}
    save_file(a, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(b, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    weight_map = {
        "x.weight": "model-00001-of-00002.safetensors",
        "y.bias": "model-00002-of-00002.safetensors",
        "y.scale": "model-00002-of-00002.safetensors",
    }
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 64}, "weight_map": weight_map})
    )
    out = str(tmp_path / "ck")
    assert convert.import_checkpoint(str(folder), out, under="model").format == "hf"
    target = {"model": {k: torch.zeros_like(v) for k, v in {**a, **b}.items()}}
    shardckpt.load(target, out)
    assert_bitwise(target["model"], {**a, **b})


def test_hf_export_import_round_trip(ckpt, tmp_path):
    convert.export_checkpoint(ckpt, str(tmp_path / "hf"), format="hf", max_shard_bytes=3000)
    convert.import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "back"))
    assert_bitwise(convert.read_state_dict(str(tmp_path / "back"), flat=True), flat_original())


def test_hostile_hf_index_is_refused(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(ManifestError, match="not a plain relative name"):
        convert.import_checkpoint(str(folder), str(tmp_path / "ck"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "pytorch_model.bin"}}))
    with pytest.raises(ManifestError, match=r"pickled \.bin shards are not read"):
        convert.import_checkpoint(str(folder), str(tmp_path / "ck"))


def test_truncated_safetensors_is_refused_before_mapping(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ManifestError, match="outside the"):
        convert.import_checkpoint(str(path), str(tmp_path / "ck"))


def test_torch_round_trip_and_weights_only_refusal(ckpt, tmp_path):
    pt = str(tmp_path / "w.pt")
    convert.export_checkpoint(ckpt, pt, format="torch")
    back = str(tmp_path / "back")
    assert convert.import_checkpoint(pt, back).format == "torch"
    assert convert.diff_checkpoints(ckpt, back).identical
    evil = str(tmp_path / "evil.pt")
    torch.save({"w": torch.ones(1), "obj": _Custom()}, evil)
    with pytest.raises(UnsupportedValueError, match="weights_only=True"):
        convert.import_checkpoint(evil, str(tmp_path / "ck2"))
    assert not os.path.exists(str(tmp_path / "ck2"))


class _Custom:
    pass


def _dcp_state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "model": {"w": torch.randn(9, 4, generator=g), "b": torch.randn(4, generator=g)},
        "step": 11,
        "sched": {"milestones": [1, 2], "gamma": 0.5},
    }


def _load_dcp_import(rank: int, world: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    want = _dcp_state()
    target = {
        "model": {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) for k, v in want["model"].items()},
        "step": 0,
        "sched": {"milestones": [], "gamma": 0.0},
    }
    shardckpt.load(target, path)
    for k, v in want["model"].items():
        assert torch.equal(target["model"][k].full_tensor(), v), k
    assert target["step"] == 11 and target["sched"] == {"milestones": [1, 2], "gamma": 0.5}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.save of the fixture, one process
def test_dcp_import_needs_trust_and_then_loads_on_one_and_two_ranks(tmp_path):
    src = str(tmp_path / "dcp")
    dcp.save(_dcp_state(), checkpoint_id=src, no_dist=True)
    out = str(tmp_path / "ck")
    with pytest.raises(PermissionError) as refused:
        convert.import_checkpoint(src, out)
    assert "pickle" in str(refused.value) and "trust_pickle=True" in str(refused.value)
    assert not os.path.exists(out)
    assert main(["import", src, out]) == EXIT_UNUSABLE
    assert main(["import", src, out, "--trust-pickle", "--no-progress"]) == EXIT_OK
    one = {"model": {k: torch.zeros_like(v) for k, v in _dcp_state()["model"].items()}, "step": 0, "sched": {}}
    shardckpt.load(one, out, strict=False)
    assert all(torch.equal(one["model"][k], v) for k, v in _dcp_state()["model"].items())
    run_ranks(_load_dcp_import, 2, out)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_values_are_read_weights_only_even_when_trusted(tmp_path):
    src = str(tmp_path / "dcp")
    dcp.save({"w": torch.ones(2), "obj": _Custom()}, checkpoint_id=src, no_dist=True)
    with pytest.raises(UnsupportedValueError, match="'obj' is not a plain value"):
        convert.import_checkpoint(src, str(tmp_path / "ck"), trust_pickle=True)


def test_detect_format(tmp_path, ckpt):
    save_file({"w": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    torch.save({"w": torch.ones(1)}, str(tmp_path / "a.pt"))
    assert convert.detect_format(str(tmp_path / "a.safetensors")) == "safetensors"
    assert convert.detect_format(str(tmp_path / "a.pt")) == "torch"
    with pytest.raises(ValueError, match="already a shardckpt checkpoint"):
        convert.detect_format(ckpt)


# ---------------------------------------------------------------- diff


def _save_variant(path: str, **changes) -> None:
    model = dict(global_model())
    model.update(changes.pop("model", {}))
    for k in changes.pop("drop", []):
        del model[k]
    state = nested_state(model)
    state.update(changes)
    shardckpt.save(state, path, hash_block_bytes=BLOCK)


def test_diff_across_world_sizes_streams_pieces(ckpt, tmp_path):
    same = str(tmp_path / "same")
    _save_variant(same)  # one process: different chunking from the 2-rank original
    report = convert.diff_checkpoints(ckpt, same, piece_bytes=700)  # pieces smaller than a checksum block
    assert report.identical and len(report.tensors) == 7 and report.values_compared == 3


def test_diff_reports_added_removed_changed_and_max_abs_diff(ckpt, tmp_path):
    big = global_model()["big"].clone()
    big[50, 3] += 0.25
    other = str(tmp_path / "other")
    _save_variant(
        other,
        model={"big": big, "norm": global_model()["norm"].float(), "extra": torch.ones(2)},
        drop=["scale"],
        step=8,
    )
    report = convert.diff_checkpoints(ckpt, other, piece_bytes=700)
    assert report.added == ["model.extra"] and report.removed == ["model.scale"]
    assert report.changed == ["model.big", "model.norm", "step"]
    by_key = {t.key: t for t in report.tensors}
    assert by_key["model.big"].max_abs_diff == pytest.approx(0.25, abs=1e-6)
    assert not by_key["model.big"].bitwise_equal
    assert by_key["model.norm"].dtype == ("BF16", "F32") and by_key["model.norm"].max_abs_diff == 0.0
    assert report.changed_values == {"step": (7, 8)}
    loose = convert.diff_checkpoints(ckpt, other, atol=0.5)
    assert loose.changed == ["model.norm", "step"]


def test_diff_nan_and_shape_changes(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shardckpt.save(
        {"n": torch.tensor([1.0, float("nan")]), "m": torch.tensor([float("nan"), 2.0]), "s": torch.ones(3)}, a
    )
    shardckpt.save({"n": torch.tensor([1.0, float("nan")]), "m": torch.tensor([0.0, 2.0]), "s": torch.ones(4)}, b)
    by_key = {t.key: t for t in convert.diff_checkpoints(a, b, atol=100.0).tensors}
    assert not by_key["n"].changed
    assert by_key["m"].changed and by_key["m"].to_json()["max_abs_diff"] == "nan"
    assert by_key["s"].changed and by_key["s"].max_abs_diff is None and by_key["s"].shape == ([3], [4])


def test_cli_diff_json_and_exit_code(ckpt, tmp_path, capsys):
    other = str(tmp_path / "other")
    _save_variant(other, step=9)
    assert main(["diff", ckpt, other, "--json", "--no-progress"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["changed"] == ["step"] and doc["values"] == {"step": {"a": 7, "b": 9}} and not doc["identical"]
    assert main(["diff", ckpt, other, "--exit-code", "--no-progress"]) == EXIT_DIFFERENT
    text = capsys.readouterr().out
    assert "~ step  7 -> 9" in text and "7 of 7 common tensors unchanged" in text
    assert main(["diff", ckpt, ckpt, "--exit-code", "--no-progress"]) == EXIT_OK


# ---------------------------------------------------------------- CLI


def test_cli_export_and_import_round_trip(ckpt, tmp_path, capsys):
    hf = str(tmp_path / "hf")
    code = main(
        [
            "export",
            ckpt,
            hf,
            "--format",
            "hf",
            "--keys",
            "model",
            "--strip-prefix",
            "model.",
            "--dtype",
            "bf16",
            "--max-shard-size",
            "4KB",
            "--json",
            "--no-progress",
        ]
    )
    assert code == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["num_tensors"] == 7 and len(report["files"]) > 2 and report["files"][-1].endswith("index.json")
    assert main(["import", hf, str(tmp_path / "ck"), "--under", "model", "--no-progress"]) == EXIT_OK
    assert "7 tensors" in capsys.readouterr().out
    got = convert.read_state_dict(str(tmp_path / "ck"), keys=["model"], strip_prefix="model.", flat=True)
    want = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in global_model().items()}
    assert_bitwise(got, want)


def test_cli_export_errors_are_explained(ckpt, tmp_path, capsys):
    assert main(["export", ckpt, str(tmp_path / "x"), "--format", "hf", "--max-shard-size", "lots"]) == EXIT_UNUSABLE
    assert "5GB" in capsys.readouterr().err
    assert main(["export", ckpt, str(tmp_path / "x"), "--format", "torch", "--dtype", "int8"]) == EXIT_UNUSABLE
    assert "unknown dtype" in capsys.readouterr().err


def test_help_teaches_with_examples(capsys):
    for command in ("export", "import", "diff"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"shardckpt {command} " in out


def test_parse_size():
    assert convert.parse_size("5GB") == 5 * 10**9
    assert convert.parse_size("2GiB") == 2 * 2**30
    assert convert.parse_size("512 MB") == 512 * 10**6
    assert convert.parse_size(123) == 123
