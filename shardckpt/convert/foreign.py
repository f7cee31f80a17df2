"""Reading the formats an import accepts: a safetensors file, a Hugging Face folder, a
torch.save file, a DCP folder (:data:`SOURCE_FORMATS`; :func:`detect_format` tells them
apart). :data:`READERS` maps each to its reader, which returns the state as a dict.

safetensors files and index.json are parsed as hostile input (header sizes and offsets
are checked before anything is mapped; shard names must stay inside the folder);
safetensors shards and zip-format ``torch.save`` files are memory-mapped. ``torch.save``
files are read with ``torch.load(weights_only=True)`` only. A DCP folder's ``.metadata``
is read with DCP's bare ``pickle.load``: :func:`~shardckpt.convert.importer.import_checkpoint`
calls its reader only with ``trust_pickle=True``, and DCP's non-tensor values are read
with ``weights_only=True``.
"""

from __future__ import annotations

import json
import mmap
import os
import pickle  # only for pickle.UnpicklingError: torch.load(weights_only=True) refusals
import sys
from collections.abc import Callable
from typing import Any

import torch

from shardckpt.convert.regular_files import check_folder_files, check_regular, display_path, open_regular
from shardckpt.engine.collective import translated_failures
from shardckpt.engine.state import nest
from shardckpt.errors import ManifestError, ShardckptError, UnsupportedValueError
from shardckpt.format import datafile, layout

SOURCE_FORMATS = ("safetensors", "hf", "torch", "dcp")


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
    with open_regular(source) as f:
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
    shown = display_path(path)
    with open_regular(path) as f:
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
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > 100 * 2**20:
            raise ManifestError(f"{display_path(path)}: over 100 MiB, too large for an index")
        raw = f.read()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"{display_path(path)}: not valid JSON ({e})") from e
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
    check_regular(path)  # torch.load opens the path itself, from C++, holding the GIL
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

    check_folder_files(folder)  # before DCP opens any of them by path
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


READERS: dict[str, Callable[[str], Any]] = {
    "safetensors": _read_safetensors_state,
    "hf": _read_hf,
    "torch": _read_torch,
    "dcp": _read_dcp,
}


def _unpickler_reason(e: Exception) -> str:
    """The line of torch's long weights_only message that names the refused object."""
    lines = [ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln]
    return lines[0].split(" was not an allowed")[0] if lines else str(e).splitlines()[0]
