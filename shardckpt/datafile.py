"""The data-file format: plain safetensors. Pure, no I/O.

A data file is ``u64 little-endian header length N`` + ``N bytes of JSON header``
+ raw little-endian tensor bytes, exactly as the safetensors spec says, so
``safetensors.safe_open`` reads any shard. The header is built before the data is
streamed (sizes are known from the plan), padded with spaces to a multiple of 8
bytes so every tensor starts 8-byte aligned.

:func:`parse_header` reads untrusted headers: every size is checked against the
real file size before anything is allocated.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from shardckpt.errors import ManifestError, UnsupportedValueError

# safetensors dtype name -> torch dtype. The only dtypes a checkpoint may hold.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
_NAMES: dict[torch.dtype, str] = {v: k for k, v in _DTYPES.items()}

HEADER_LEN_BYTES = 8
# safetensors itself refuses headers above 100 MB; so do we, before allocating.
MAX_HEADER_BYTES = 100_000_000
MAX_NDIM = 64


def dtype_name(dtype: torch.dtype, *, key: str) -> str:
    """safetensors name of ``dtype``; raises a clear error for dtypes it cannot hold."""
    try:
        return _NAMES[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES.values())
        raise UnsupportedValueError(
            f"key {key!r}: dtype {dtype} cannot be stored in a safetensors data file; "
            f"supported dtypes are {supported}. Convert the tensor first "
            "(e.g. torch.view_as_real for complex tensors)."
        ) from None


def torch_dtype(name: object, *, where: str) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise ManifestError(f"{where}: unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def itemsize(name: str) -> int:
    return _DTYPES[name].itemsize


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor (a chunk of a checkpoint key) inside a data file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offset relative to the start of the data section
    end: int


def build_header(entries: list[HeaderEntry], metadata: dict[str, str]) -> bytes:
    """Length prefix + JSON header, padded to a multiple of 8 bytes."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-(len(raw) + HEADER_LEN_BYTES)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def header_length(prefix: bytes, *, file: str, file_size: int) -> int:
    """Validate the 8-byte length prefix of an untrusted data file."""
    if len(prefix) < HEADER_LEN_BYTES or file_size < HEADER_LEN_BYTES:
        raise ManifestError(f"data file {file!r}: too short ({file_size} bytes) to be safetensors")
    (n,) = struct.unpack("<Q", prefix[:HEADER_LEN_BYTES])
    if n > MAX_HEADER_BYTES or n > file_size - HEADER_LEN_BYTES:
        raise ManifestError(
            f"data file {file!r}: header length {n} is absurd for a file of {file_size} bytes "
            f"(limit {MAX_HEADER_BYTES}); the file is corrupt or hostile"
        )
    return int(n)


def parse_header(raw: bytes, *, file: str, file_size: int) -> tuple[list[HeaderEntry], dict[str, str]]:
    """Parse the JSON header bytes (after the length prefix) of an untrusted data file."""
    data_size = file_size - HEADER_LEN_BYTES - len(raw)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ManifestError(f"data file {file!r}: header is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ManifestError(f"data file {file!r}: header must be a JSON object")
    meta = obj.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ManifestError(f"data file {file!r}: __metadata__ must map str to str")
    entries = []
    for name, spec in obj.items():
        where = f"data file {file!r}, tensor {name!r}"
        if not isinstance(spec, dict):
            raise ManifestError(f"{where}: entry must be an object")
        dtype = spec.get("dtype")
        torch_dtype(dtype, where=where)
        shape = check_shape(spec.get("shape"), where=where)
        offsets = spec.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(x) is int for x in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise ManifestError(f"{where}: data_offsets {offsets!r} outside the {data_size}-byte data section")
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize(dtype):  # type: ignore[arg-type]
            raise ManifestError(f"{where}: byte length does not match shape {shape} and dtype {dtype}")
        entries.append(HeaderEntry(name, dtype, shape, offsets[0], offsets[1]))  # type: ignore[arg-type]
    return entries, meta


def check_shape(shape: object, *, where: str) -> tuple[int, ...]:
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and 0 <= d < 2**62 for d in shape)
    ):
        raise ManifestError(f"{where}: shape {shape!r} is not a list of at most {MAX_NDIM} non-negative ints")
    return tuple(shape)
