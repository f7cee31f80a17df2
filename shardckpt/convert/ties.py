"""Tied weights in Hugging Face round trips: which names hold one shared tensor.

transformers' ``save_pretrained`` stores a tied weight once (GPT-2's ``lm_head.weight``
is the same tensor as ``transformer.wte.weight``, only the latter is written and the
index does not list the former); ``from_pretrained`` ties it back from the model's
declaration. A shardckpt checkpoint holds every key of the saved state_dict, tied or
not, because sharing is a property of live tensors that a sharded save does not keep.

How a tie is known. Only a declaration says that two names are one tensor: a mapping
``{target: source}`` (the name dropped on export or filled on import -> the name that
is kept), given explicitly or read from a Hugging Face ``config.json`` through
transformers (:func:`hf_tied_weights`, which asks the architecture itself, as
``from_pretrained`` does). Equal bytes are not enough: two separate parameters can be
bitwise equal at some moment (zero-initialised biases, an untied head initialised as a
copy of the embeddings before fine-tuning moves them apart), and dropping one of them
would make the loader tie them, or initialise the missing one at random. So equality
is necessary, not sufficient: :func:`drop_tied` drops a declared target only after
checking that it has the source's dtype, shape and bytes, and refuses a declared tie
whose tensors differ (the declaration is wrong for this checkpoint). Nothing that is
not declared is ever dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from shardckpt.errors import MissingDependencyError, ShardckptError

CONFIG_NAME = "config.json"  # what transformers writes next to the weights
_MAX_CONFIG_BYTES = 16 * 2**20


def check_tied(tied: Mapping[str, str], where: str = "tied") -> dict[str, str]:
    """``tied`` as a plain dict, refused unless it is ``{target: source}`` of distinct
    str names where no source is itself a target (say ``{a: c, b: c}``, not ``{a: b, b: c}``)."""
    if not isinstance(tied, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise TypeError(f"{where}: expected a mapping of tied name -> kept name (str -> str), got {tied!r}")
    for target, source in tied.items():
        if target == source:
            raise ValueError(f"{where}: {target!r} is declared tied to itself; name the weight that is kept")
        if source in tied:
            raise ValueError(
                f"{where}: {target!r} is tied to {source!r}, which is itself tied to {tied[source]!r}; "
                f"tie both to the weight that is kept: {{{target!r}: {tied[source]!r}, {source!r}: {tied[source]!r}}}"
            )
    return dict(tied)


def parse_tied(pairs: Iterable[str]) -> dict[str, str]:
    """``["lm_head.weight=transformer.wte.weight", ...]`` (the CLI's ``--tied``) -> ``{target: source}``."""
    tied: dict[str, str] = {}
    for pair in pairs:
        target, eq, source = pair.partition("=")
        if not eq or not target.strip() or not source.strip():
            raise ValueError(f"--tied {pair!r}: expected TIED=KEPT, e.g. lm_head.weight=transformer.wte.weight")
        tied[target.strip()] = source.strip()
    return check_tied(tied, "--tied")


def read_hf_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object of ``path`` (a ``config.json`` or a folder holding one); None if the folder has none."""
    path = os.fspath(path)
    file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
    if not os.path.exists(file) and file != path:
        return None
    with open(file, "rb") as f:
        raw = f.read(_MAX_CONFIG_BYTES + 1)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ShardckptError(f"{file}: over {_MAX_CONFIG_BYTES >> 20} MiB, too large for a model config")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ShardckptError(f"{file}: not valid JSON ({e}); expected a Hugging Face config.json") from e
    if not isinstance(doc, dict):
        raise ShardckptError(f"{file}: expected a JSON object (a Hugging Face config.json), got {type(doc).__name__}")
    return doc


def hf_tied_weights(config: str | os.PathLike[str]) -> dict[str, str]:
    """``{target: source}`` of the weights the architecture in ``config`` ties, as transformers
    ties them on ``from_pretrained`` (empty when ``tie_word_embeddings`` is false).

    ``config``: a ``config.json`` or a folder holding one. Needs transformers; builds the
    model named by ``architectures[0]`` on the meta device (no memory, no weights read,
    no code from the folder: only classes transformers itself ships).
    """
    shown = os.fspath(config)
    doc = read_hf_config(config)
    if doc is None:
        raise FileNotFoundError(f"{shown}: no {CONFIG_NAME}; pass the model's config.json or the folder holding it")
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError(
            f"{shown}: reading which weights the model ties needs transformers (pip install transformers); "
            "or name them yourself: tied={'lm_head.weight': 'transformer.wte.weight'} (CLI: --tied TIED=KEPT)"
        ) from e
    architectures = doc.get("architectures")
    arch = architectures[0] if isinstance(architectures, list) and architectures else None
    model_class = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ShardckptError(
            f"{shown}: architectures is {architectures!r}, not a model class of transformers "
            f"{transformers.__version__}; name the tied weights yourself (tied=..., CLI: --tied TIED=KEPT)"
        )
    try:
        model_config = transformers.AutoConfig.for_model(**doc)
        with torch.device("meta"):
            model = model_class(model_config)
    except Exception as e:  # transformers' errors for a config it cannot build a model from are of many kinds
        raise ShardckptError(
            f"{shown}: transformers {transformers.__version__} could not build {arch} from this config "
            f"({type(e).__name__}: {e}); name the tied weights yourself (tied=..., CLI: --tied TIED=KEPT)"
        ) from e
    declared = getattr(model, "all_tied_weights_keys", None)  # transformers >= 5: {target: source}
    if isinstance(declared, Mapping):
        return check_tied(dict(declared), f"{shown} ({arch})")
    return _shared_parameters(model)


def _shared_parameters(model: torch.nn.Module) -> dict[str, str]:
    """transformers 4.x: names that are one Parameter object; the first registered is kept."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def config_ties_word_embeddings(folder: str) -> bool | None:
    """``tie_word_embeddings`` of the folder's ``config.json`` (None: no config or no such field)."""
    doc = read_hf_config(folder)
    value = None if doc is None else doc.get("tie_word_embeddings")
    return value if isinstance(value, bool) else None


def tensors_are_tied(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape and the same bytes (bitwise: NaNs with equal bits count as equal, -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def describe_difference(target: str, a: torch.Tensor, source: str, b: torch.Tensor) -> str:
    """Why ``a`` (named ``target``) cannot be a tie of ``b`` (named ``source``)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{target!r} is {a.dtype} {list(a.shape)} but {source!r} is {b.dtype} {list(b.shape)}"
    differ = int((a.reshape(-1).view(torch.uint8) != b.reshape(-1).view(torch.uint8)).sum())
    return f"{target!r} and {source!r} have the same dtype and shape but {differ} differing byte(s)"
