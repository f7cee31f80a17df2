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

Source files. Every file this module opens itself (safetensors files, the HF index,
the first bytes read to detect a format) is checked with ``os.stat`` to be a regular
file, then opened with ``O_NONBLOCK`` and checked again with ``fstat`` on the opened
descriptor, so what is read is what was checked: a FIFO in a file's place would block
the import forever, a device (``/dev/zero``) would never end, and both are refused with
a StorageError naming the file. Symlinks are followed wherever they point, because the
user names the source and Hugging Face caches are made of them (a snapshot folder's
files link into ``../../blobs/``); the target must be a regular file, and an error
about a linked file names the link and its target. The contents stay hostile input,
so a link to an unrelated host file is refused by the header checks, and nothing of
it is echoed. ``torch.load`` and DCP open their files by path themselves: those are
checked by ``os.stat`` first (every file of a DCP folder), which catches a file
planted before the import, not one swapped during it.

Memory. safetensors shards and zip-format ``torch.save`` files are memory-mapped, so
the import holds no full copy of the model in anonymous memory. A DCP import
materializes every tensor at once.

Sources are local paths. Call from one process (with torch.distributed initialized,
every rank must call it with the same arguments: the save is collective).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import pickle  # only for pickle.UnpicklingError: torch.load(weights_only=True) refusals
import stat
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch

from shardckpt.convert.progress import byte_bar
from shardckpt.convert.ties import check_tied, config_ties_word_embeddings, hf_tied_weights
from shardckpt.engine.collective import translated_failures
from shardckpt.engine.default import save
from shardckpt.engine.state import nest
from shardckpt.errors import (
    ManifestError,
    MissingDependencyError,
    ShardckptError,
    StorageError,
    UnsupportedValueError,
)
from shardckpt.format import datafile, layout
from shardckpt.storage import as_url, open_storage

SOURCE_FORMATS = ("safetensors", "hf", "torch", "dcp")
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
    state = _READERS[fmt](source)
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


def detect_format(source: str) -> str:
    """``"safetensors" | "hf" | "torch" | "dcp"`` from the contents of ``source``."""
    if os.path.isdir(source):
        names = set(os.listdir(source))
        if layout.MANIFEST_NAME in names:
            raise ValueError(f"{source} is already a shardckpt checkpoint (it has {layout.MANIFEST_NAME})")
        if ".metadata" in names:
            return "dcp"
        if any(n.endswith(".safetensors.index.json") or n.endswith(".safetensors") for n in names):
            return "hf"
        raise ValueError(
            f"{source}: cannot tell the format of this folder: no .metadata (DCP) and no "
            "*.safetensors.index.json or *.safetensors (Hugging Face); pass source_format"
        )
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such file or folder")
    with _open_regular(source) as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "torch"  # zip (torch >= 1.6) or legacy pickle protocol 2+
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    raise ValueError(f"{source}: neither a safetensors file nor a torch.save file; pass source_format")


# ---------------------------------------------------------------- safetensors and HF


def read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors of a safetensors file, memory-mapped (copy-on-write, never written), and its metadata."""
    if sys.byteorder != "little":
        raise ShardckptError("importing safetensors needs a little-endian machine")
    shown = _shown(path)
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size  # of what was opened, not of what the path names now
        n = datafile.header_length(f.read(datafile.HEADER_LEN_BYTES), file=shown, file_size=size)
        entries, meta = datafile.parse_header(f.read(n), file=shown, file_size=size)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    start = datafile.HEADER_LEN_BYTES + n
    tensors = {}
    for e in entries:
        dtype = datafile.torch_dtype(e.dtype, where=f"{shown}, tensor {e.name!r}")
        count, offset = (e.end - e.begin) // dtype.itemsize, start + e.begin
        if count == 0:
            tensors[e.name] = torch.empty(e.shape, dtype=dtype)
        elif offset % dtype.itemsize == 0:
            tensors[e.name] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(e.shape)
        else:  # misaligned for its dtype: copy rather than hand torch an unaligned pointer
            raw = torch.frombuffer(mapped, dtype=torch.uint8, count=e.end - e.begin, offset=offset)
            tensors[e.name] = raw.clone().view(dtype).reshape(e.shape)
    return tensors, meta


def _read_safetensors_state(path: str) -> dict[str, Any]:
    return dict(read_safetensors(path)[0])


def _read_hf(folder: str) -> dict[str, Any]:
    if not os.path.isdir(folder):
        return _read_safetensors_state(folder)
    names = sorted(os.listdir(folder))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if not indexes:
        files = [n for n in names if n.endswith(".safetensors")]
        if len(files) != 1:
            raise ValueError(
                f"{folder}: no *.safetensors.index.json and {len(files)} safetensors files; "
                "a Hugging Face folder has either an index or exactly one model.safetensors"
            )
        return _read_safetensors_state(os.path.join(folder, files[0]))
    if len(indexes) > 1:
        raise ValueError(f"{folder}: several index files {indexes}; import one model at a time (move the others away)")
    weight_map = _read_index(os.path.join(folder, indexes[0]))
    shards = {f: read_safetensors(os.path.join(folder, f))[0] for f in sorted(set(weight_map.values()))}
    state = {}
    for key, file in weight_map.items():
        if key not in shards[file]:
            raise ManifestError(f"{folder}/{indexes[0]}: weight_map puts {key!r} in {file!r}, which has no such tensor")
        state[key] = shards[file][key]
    return state


def _read_index(path: str) -> dict[str, str]:
    """The ``weight_map`` of an untrusted Hugging Face index, with every shard name checked."""
    with _open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > 100 * 2**20:
            raise ManifestError(f"{_shown(path)}: over 100 MiB, too large for an index")
        raw = f.read()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"{_shown(path)}: not valid JSON ({e})") from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ManifestError(f"{path}: expected an object with a 'weight_map' object of tensor name -> shard file")
    for file in set(weight_map.values()):
        layout.check_relative_name(file, where=f"{path}, weight_map")
        if not file.endswith(".safetensors"):
            raise ManifestError(f"{path}: shard {file!r} is not a .safetensors file (pickled .bin shards are not read)")
    return weight_map


# ---------------------------------------------------------------- torch.save


def _read_torch(path: str) -> Any:
    _check_regular(path)  # torch.load opens the path itself, from C++, holding the GIL
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) files cannot be mapped
    except pickle.UnpicklingError as e:
        raise UnsupportedValueError(
            f"{path}: torch.load(weights_only=True) refused the file: it holds objects other than tensors and plain "
            f"containers ({_unpickler_reason(e)}). shardckpt never loads with weights_only=False. If you trust the "
            "file, load it yourself, keep only tensors and plain values, and torch.save that."
        ) from e


# ---------------------------------------------------------------- DCP


def _read_dcp(folder: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    class ValuesWeightsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            fqn = read_item.dest_index.fqn
            try:
                self.original_state_dict[fqn] = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise UnsupportedValueError(
                    f"{folder}: DCP value {fqn!r} is not a plain value: "
                    f"torch.load(weights_only=True) refused it ({_unpickler_reason(e)})"
                ) from e

    _check_folder_files(folder)  # before DCP opens any of them by path
    reader = dcp.FileSystemReader(folder)
    metadata = reader.read_metadata()  # pickle.load: allowed by trust_pickle
    flat: dict[str, Any] = {
        fqn: torch.empty(md.size, dtype=md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
        for fqn, md in metadata.state_dict_metadata.items()
    }
    with translated_failures(f"import of DCP checkpoint {folder}"):  # also quiets DCP's single-process warning
        dcp.load(flat, storage_reader=reader, planner=ValuesWeightsOnly(flatten_state_dict=False), no_dist=True)
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    return nest((_dcp_path(paths.get(fqn), fqn), v) for fqn, v in flat.items())


def _dcp_path(path: Any, fqn: str) -> list[str | int]:
    ok = isinstance(path, (tuple, list)) and path and all(isinstance(p, (str, int)) for p in path)
    return list(path) if ok else [fqn]


_READERS = {"safetensors": _read_safetensors_state, "hf": _read_hf, "torch": _read_torch, "dcp": _read_dcp}


# ---------------------------------------------------------------- source files


def _check_regular(path: str) -> os.stat_result:
    """``os.stat(path)`` (symlinks followed) if it is a regular file; StorageError naming
    it (and a link's target) if it is a FIFO, a device, a socket or a folder.
    FileNotFoundError, PermissionError... pass through as raised."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st)
    return st


def _open_regular(path: str) -> BinaryIO:
    """``path`` opened for reading, provided it is a regular file (see the module docstring).

    Checked twice: ``os.stat`` before opening, so that opening a device has no side
    effect; ``fstat`` on the descriptor opened with ``O_NONBLOCK``, so that a FIFO
    swapped in between cannot block the open and cannot be read. O_NONBLOCK changes
    nothing for a regular file."""
    _check_regular(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_folder_files(folder: str) -> None:
    """Every file under ``folder`` (file links followed) is a regular file. Sub-folders
    are entered, symlinked ones are not: DCP reads the files its metadata names, which
    FileSystemWriter puts at the top level."""
    for parent, _dirs, files in os.walk(folder, onerror=_raise):
        for name in files:
            _check_regular(os.path.join(parent, name))


def _raise(e: OSError) -> None:
    raise e


def _not_regular(path: str, st: os.stat_result) -> StorageError:
    mode = st.st_mode
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a folder"
        if stat.S_ISDIR(mode)
        else "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a special file"
    )
    return StorageError(
        f"{_shown(path)}: is {kind}, not a regular file; import reads regular files only (a FIFO or a device "
        "would block it or never end). Replace it with the file it stands for, or remove it from the source."
    )


def _shown(path: str) -> str:
    """``path``, and where it leads when a symlink on the way changes it."""
    real = os.path.realpath(path)
    return path if real == os.path.abspath(path) else f"{path} (a symlink to {real})"


# ---------------------------------------------------------------- helpers


def _unpickler_reason(e: Exception) -> str:
    """The line of torch's long weights_only message that names the refused object."""
    lines = [ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln]
    return lines[0].split(" was not an allowed")[0] if lines else str(e).splitlines()[0]


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
