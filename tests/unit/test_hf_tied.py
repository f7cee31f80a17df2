"""Hugging Face round trips with tied weights (issue #20): a tiny GPT-2, built locally.

GPT-2's ``lm_head.weight`` is the same tensor as ``transformer.wte.weight``. transformers'
``save_pretrained`` stores it once and its index does not list ``lm_head.weight``;
``from_pretrained`` ties it back. Export must write what ``save_pretrained`` writes, and
import must fill the name a ``save_pretrained`` folder lacks. One process, small tensors.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open

import shardckpt
from shardckpt import convert
from shardckpt.cli.app import EXIT_OK, EXIT_UNUSABLE, main
from shardckpt.errors import MissingDependencyError, ShardckptError

transformers = pytest.importorskip("transformers")

TIE = {"lm_head.weight": "transformer.wte.weight"}


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()  # its progress bars and config notes are not what is tested


def tiny_gpt2(seed: int) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        architectures=["GPT2LMHeadModel"],  # what a config.json from the hub names
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12).reshape(2, 6) % 100).logits


def stored_names(folder: str) -> list[str]:
    """Every tensor name in every safetensors file of ``folder``, duplicates kept."""
    names = []
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(folder, file), "pt") as f:
                names += list(f.keys())
    return names


def test_hf_export_writes_a_tied_weight_once_and_from_pretrained_ties_it_back(tmp_path):
    model = tiny_gpt2(seed=0)
    ckpt, out, theirs = str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(tmp_path / "theirs")
    shardckpt.save({"model": model.state_dict(), "step": 3}, ckpt)
    model.config.save_pretrained(out)
    model.save_pretrained(theirs)

    tied = convert.hf_tied_weights(out)
    assert tied == TIE
    report = convert.export_checkpoint(
        ckpt, out, format="hf", keys=["model"], strip_prefix="model.", max_shard_bytes="20KB", tied=tied
    )

    assert report.dropped_tied == TIE
    names = stored_names(out)
    assert len(names) == len(set(names)) and "lm_head.weight" not in names
    assert sorted(names) == sorted(stored_names(theirs))  # what save_pretrained itself stores
    with open(os.path.join(out, convert.HF_INDEX_NAME)) as f:
        index = json.load(f)
    assert sorted(index["weight_map"]) == sorted(names)
    assert (
        index["metadata"]["total_size"]
        == report.tensor_bytes
        == sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k != "lm_head.weight")
    )
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert torch.equal(logits(loaded.eval()), logits(model))


def test_save_pretrained_folder_imports_with_the_dropped_tied_weight_filled(tmp_path):
    model = tiny_gpt2(seed=1)
    folder, out = str(tmp_path / "hf"), str(tmp_path / "imported")
    model.save_pretrained(folder)
    assert "lm_head.weight" not in stored_names(folder)

    # The reported defect: stored as is, the checkpoint lacks lm_head.weight and a strict load refuses.
    convert.import_checkpoint(folder, str(tmp_path / "as_stored"), under="model", tied={})
    with pytest.raises(ShardckptError, match=r"lm_head\.weight"):
        shardckpt.load({"model": tiny_gpt2(seed=2).state_dict()}, str(tmp_path / "as_stored"))

    report = convert.import_checkpoint(folder, out, under="model")
    assert report.filled_tied == TIE
    fresh = tiny_gpt2(seed=2)
    assert not torch.equal(logits(fresh), logits(model))
    shardckpt.load({"model": fresh.state_dict()}, out)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    assert torch.equal(logits(fresh), logits(model))


def test_equal_tensors_are_only_dropped_when_declared_tied_and_a_declared_tie_must_be_equal(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(10, 4, generator=g)
    state = {
        "emb": emb,
        "head": emb.clone(),  # bitwise equal, but its own parameter: an untied head initialised as a copy
        "zeros_a": torch.zeros(3),
        "zeros_b": torch.zeros(3),
        "other": torch.randn(10, 4, generator=g),
    }
    ckpt = str(tmp_path / "ckpt")
    shardckpt.save(state, ckpt)

    undeclared = convert.export_checkpoint(ckpt, str(tmp_path / "all"), format="hf")
    assert undeclared.dropped_tied == {} and sorted(stored_names(str(tmp_path / "all"))) == sorted(state)

    declared = convert.export_checkpoint(
        ckpt, str(tmp_path / "one.safetensors"), format="safetensors", tied={"head": "emb"}
    )
    assert declared.dropped_tied == {"head": "emb"} and declared.num_tensors == 4

    refused = tmp_path / "refused"
    with pytest.raises(ShardckptError, match="'other' is declared tied to 'emb' but they differ"):
        convert.export_checkpoint(ckpt, str(refused), format="hf", tied={"other": "emb"})
    assert not refused.exists() or not any(refused.iterdir())  # refused before anything was written
    with pytest.raises(ShardckptError, match="not among the exported tensors"):
        convert.export_checkpoint(ckpt, str(refused), format="hf", keys=["head"], tied={"head": "emb"})
    with pytest.raises(ValueError, match="tie both to the weight that is kept"):
        convert.export_checkpoint(ckpt, str(refused), format="hf", tied={"head": "emb", "emb": "other"})


def test_import_without_transformers_refuses_a_config_that_declares_ties(tmp_path, monkeypatch):
    folder = str(tmp_path / "hf")
    tiny_gpt2(seed=0).save_pretrained(folder)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install transformers.*tie_word_embeddings: true"):
        convert.import_checkpoint(folder, str(tmp_path / "out"))
    report = convert.import_checkpoint(folder, str(tmp_path / "out"), tied=TIE)
    assert report.filled_tied == TIE


def test_cli_tied_export_and_import(tmp_path, capsys):
    model = tiny_gpt2(seed=0)
    ckpt, out, back = str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(tmp_path / "back")
    shardckpt.save({"model": model.state_dict()}, ckpt)
    model.config.save_pretrained(out)
    args = ["export", ckpt, out, "--format", "hf", "--keys", "model", "--strip-prefix", "model.", "--no-progress"]
    assert main([*args, "--tied-from", out]) == EXIT_OK
    assert "tied: lm_head.weight not written, it is transformer.wte.weight" in capsys.readouterr().out
    assert main(["import", out, back, "--under", "model", "--no-progress"]) == EXIT_OK
    assert "tied: lm_head.weight filled from transformer.wte.weight" in capsys.readouterr().out
    assert main([*args, "--overwrite", "--tied", "lm_head.weight"]) == EXIT_UNUSABLE
    assert "expected TIED=KEPT" in capsys.readouterr().err


def test_hf_tied_weights_follows_the_config_and_names_only_transformers_models(tmp_path):
    config = tiny_gpt2(seed=0).config
    config.tie_word_embeddings = False
    config.save_pretrained(str(tmp_path / "untied"))
    assert convert.hf_tied_weights(str(tmp_path / "untied" / "config.json")) == {}
    config.architectures = ["GPT2Config"]  # a transformers class, but not a model
    config.save_pretrained(str(tmp_path / "odd"))
    with pytest.raises(ShardckptError, match="not a model class of transformers"):
        convert.hf_tied_weights(str(tmp_path / "odd"))
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        convert.hf_tied_weights(str(tmp_path))


def test_declared_ties_that_match_no_exported_name_are_reported(tmp_path, caplog):
    """A tie declared with HF's names, while the exported names kept a prefix
    (``--strip-prefix`` forgotten), changes nothing: the export says so instead of
    silently writing the tied weight twice."""
    model = tiny_gpt2(seed=0)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out.safetensors")
    shardckpt.save({"model": model.state_dict()}, ckpt)
    with caplog.at_level("WARNING", logger="shardckpt"):
        report = convert.export_checkpoint(ckpt, out, format="safetensors", keys=["model"], tied=TIE)
    assert report.dropped_tied == {}
    assert "none of the 1 declared tied name(s)" in caplog.text and "model." in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="shardckpt"):
        convert.export_checkpoint(
            ckpt,
            str(tmp_path / "ok.safetensors"),
            format="safetensors",
            keys=["model"],
            strip_prefix="model.",
            tied=TIE,
        )
    assert "declared tied" not in caplog.text
