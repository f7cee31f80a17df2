"""Import into shardckpt: a safetensors file, a Hugging Face folder, a torch.save file, a DCP folder.

The result is written by :func:`shardckpt.save` from one process, so it is an ordinary
checkpoint: it loads on any world size, resharded like a native one.

Safety. safetensors files and index.json are parsed as hostile input (header sizes and
offsets are checked before anything is mapped; shard names must stay inside the
folder). ``torch.save`` files are read with ``torch.load(weights_only=True)`` only.
A DCP folder's ``.metadata`` is a pickle that DCP reads with a bare ``pickle.load``, so
loading one can run code planted in it: :func:`import_checkpoint` refuses unless the
caller passes ``trust_pickle=True``; even then DCP's non-tensor values are read with
``weights_only=True``.

Source files are opened as regular files only (:mod:`~shardckpt.convert.regular_files`);
what each format's reader does is in :mod:`~shardckpt.convert.foreign`.

Memory. safetensors shards and zip-format ``torch.save`` files are memory-mapped, so
the import holds no full copy of the model in anonymous memory. A DCP import
materializes every tensor at once.

Sources are local paths. Call from one process (with torch.distributed initialized,
every rank must call it with the same arguments: the save is collective).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from shardckpt.convert.foreign import READERS, SOURCE_FORMATS, detect_format
from shardckpt.convert.progress import byte_bar
from shardckpt.convert.ties import check_tied, config_ties_word_embeddings, hf_tied_weights
from shardckpt.engine.default import save
from shardckpt.errors import MissingDependencyError, ShardckptError, UnsupportedValueError
from shardckpt.format import layout
from shardckpt.storage import as_url, open_storage

_TRUST_HINT = (
    "A DCP checkpoint's .metadata file is a Python pickle, and DCP reads it with a bare pickle.load: "
    "a crafted file runs arbitrary code on this machine as soon as it is read. Import it only if you "
    "trust whoever wrote it, by passing trust_pickle=True (CLI: --trust-pickle). Once imported, the "
    "shardckpt checkpoint holds no pickle."
)


class PickleNotTrustedError(ShardckptError, PermissionError):
    """Reading the source would unpickle untrusted data and the caller did not allow it."""


@dataclass(frozen=True)
class ImportReport:
    """What an import wrote. ``num_values`` is -1 on ranks other than the coordinator.
    ``filled_tied``: names the source did not store, each -> the tied name it was filled from."""

    format: str
    source: str
    path: str
    num_tensors: int
    num_values: int
    tensor_bytes: int
    filled_tied: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def import_checkpoint(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    source_format: str = "auto",
    trust_pickle: bool = False,
    under: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    num_io_threads: int = 2,
    tied: Mapping[str, str] | None = None,
) -> ImportReport:
    """Write the state held at ``source`` as a shardckpt checkpoint at ``out``.

    ``source_format``: ``"auto"`` (detected from the path) or one of
    :data:`SOURCE_FORMATS`. ``under``: nest everything under this key, e.g. ``"model"``
    so that ``shardckpt.load({"model": model.state_dict()}, out)`` fills a model.
    Safetensors and Hugging Face tensors keep their names as flat keys.

    ``tied`` (safetensors and hf): ``{tied name: kept name}``; when the source stores only
    one name of a pair (``save_pretrained`` drops GPT-2's ``lm_head.weight``), the other is
    filled from it and listed in :attr:`ImportReport.filled_tied`. None (the default): for
    a Hugging Face folder with a ``config.json``, the ties its architecture declares
    (:func:`~shardckpt.convert.ties.hf_tied_weights`, needs transformers when the config
    says ``tie_word_embeddings: true``); otherwise none. ``{}``: fill nothing.
    """
    source, out = as_url(source, "import source"), as_url(out)
    fmt = detect_format(source) if source_format == "auto" else source_format
    if fmt not in SOURCE_FORMATS:
        raise ValueError(f"source_format must be 'auto' or one of {SOURCE_FORMATS}, got {source_format!r}")
    if fmt == "dcp" and not trust_pickle:
        raise PickleNotTrustedError(
            f"{source}: refusing to import a DCP checkpoint without trust_pickle=True. {_TRUST_HINT}"
        )
    if tied is not None and fmt not in ("safetensors", "hf"):
        raise ValueError(f"tied applies to safetensors and hf sources, whose names are flat; {source} is {fmt}")
    state = READERS[fmt](source)
    if not isinstance(state, dict):
        raise UnsupportedValueError(
            f"{source}: the top-level object is a {type(state).__name__}; a checkpoint holds a dict. Load it, wrap "
            "it in a dict (e.g. {'model': obj}), torch.save that and import the new file."
        )
    filled = fill_tied(state, _import_ties(fmt, source, tied)) if fmt in ("safetensors", "hf") else {}
    if under:
        state = {under: state}
    tensors = _tensors(state)
    total = sum(t.numel() * t.element_size() for t in tensors)
    meta = {"imported_from": {"format": fmt, "source": os.path.abspath(source)}}
    with _write_progress(progress, out, total):
        manifest = save(state, out, overwrite=overwrite, metadata=meta, num_io_threads=num_io_threads)
    if manifest is None:  # not the coordinator of a distributed call
        return ImportReport(fmt, source, out, len(tensors), -1, total, filled)
    return ImportReport(
        fmt, source, out, len(manifest.tensors), len(manifest.values), manifest.total_tensor_bytes, filled
    )


def fill_tied(state: dict[str, Any], tied: Mapping[str, str]) -> dict[str, str]:
    """Add to the flat ``state`` each name of a ``{tied: kept}`` pair that it lacks while
    holding the other (both ways, as ``from_pretrained`` ties); ``{filled name: from name}``."""
    filled: dict[str, str] = {}
    for target, kept in sorted(tied.items()):
        if target not in state and kept in state:
            state[target], filled[target] = state[kept], kept
        elif kept not in state and target in state:
            state[kept], filled[kept] = state[target], target
    return filled


def _import_ties(fmt: str, source: str, tied: Mapping[str, str] | None) -> dict[str, str]:
    """The ties to fill: explicit, or those of a Hugging Face folder's config.json."""
    if tied is not None:
        return check_tied(tied)
    if fmt != "hf" or not os.path.isdir(source):
        return {}
    declared = config_ties_word_embeddings(source)
    if declared is False:
        return {}
    try:
        return hf_tied_weights(source)
    except FileNotFoundError:
        return {}  # no config.json: nothing declares a tie
    except ShardckptError as e:
        if declared is None:
            return {}  # the config does not say the model ties weights, nor can transformers tell
        error = MissingDependencyError if isinstance(e, MissingDependencyError) else ShardckptError
        raise error(
            f"{e}. The config says tie_word_embeddings: true, so the folder may lack a tied weight that a model "
            "needs; pass tied={...} (CLI: --tied TIED=KEPT) to name the pairs, or tied={} to import as stored"
        ) from e


# ---------------------------------------------------------------- helpers


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


@contextlib.contextmanager
def _write_progress(enabled: bool, out: str, total: int) -> Iterator[None]:
    """A byte bar fed by watching the data files grow (save() itself has no progress hook)."""
    if not enabled:
        yield
        return
    bar = byte_bar(total, "import")
    stop = threading.Event()

    def poll() -> None:
        storage = open_storage(out)
        while not stop.wait(0.5):
            with contextlib.suppress(OSError):  # files appear and are renamed under us; the next poll catches up
                bar.n = min(total, sum(storage.size(n) for n in storage.list_files(layout.DATA_DIR)))
                bar.refresh()

    watcher = threading.Thread(target=poll, name="shardckpt-import-progress", daemon=True)
    watcher.start()
    try:
        yield
        bar.n = total
    finally:
        stop.set()
        watcher.join()
        bar.close()
