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

import numpy as np
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

# Limits on any JSON that shardckpt parses (manifests and data-file headers), checked by
# json_limits_problem() on the raw bytes before json.loads builds a single object.
# Depth: shardckpt's own JSON nests at most ~7 levels plus the nesting of a saved value.
MAX_JSON_DEPTH = 64
# Arrays and objects are the values that cost most memory per input byte (a 3-byte "[],"
# becomes a ~70-byte list, a 9-byte '{"a":{}},' ~260 bytes: 20-30x), so their number is
# capped relative to the size. What shardckpt writes has one per 17 bytes or more (a header
# entry: 3 per >= 51 bytes; a manifest's chunk record: 4 per ~140 bytes); the slack admits
# small documents dense in tuple values ({"$tuple": [...]}: one per ~11 bytes).
JSON_CONTAINERS_SLACK = 2048
JSON_BYTES_PER_CONTAINER = 16
_SCAN_BLOCK = 1 << 16  # bytes scanned per numpy pass: bounds the scan's own memory (< 4 MB)
_QUOTE, _BACKSLASH = 0x22, 0x5C


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


def is_dtype_name(name: str) -> bool:
    """Whether ``name`` is a safetensors dtype name that shardckpt stores (``torch_dtype`` accepts it)."""
    return name in _DTYPES


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
    """Length prefix + JSON header, padded to a multiple of 8 bytes.

    The bytes are those of ``json.dumps`` of ``{"__metadata__": metadata, name: {"dtype",
    "shape", "data_offsets"}, ...}`` (compact separators, ASCII): :func:`build_header_columns`
    of the entries' fields."""
    return build_header_columns(
        HeaderColumns(
            [e.name for e in entries],
            [e.dtype for e in entries],
            [e.shape for e in entries],
            [e.begin for e in entries],
            [e.end for e in entries],
        ),
        metadata,
    )


@dataclass(frozen=True)
class HeaderColumns:
    """The fields of a header's entries, one list per field, in the entries' order: what a
    writer of thousands of small chunks builds instead of one HeaderEntry per chunk (#18)."""

    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    begins: list[int]  # byte offsets relative to the start of the data section
    ends: list[int]


def build_header_columns(columns: HeaderColumns, metadata: dict[str, str]) -> bytes:
    """:func:`build_header` of the entries whose fields are ``columns``, formatted entry by
    entry from a template: a data file of thousands of small chunks builds its header every
    save (issue #18). Names JSON would escape, and repeated names, take ``json.dumps`` itself."""
    names = columns.names
    # One check of all names at once: each property holds for the whole iff for every name.
    plain = _plain_json_string("".join(names)) and _plain_json_string("".join(set(columns.dtypes)))
    if not plain or len(set(names)) != len(names) or "__metadata__" in names:
        return _frame(_header_json(columns, metadata))
    parts = [json.dumps({"__metadata__": dict(metadata)}, separators=(",", ":"))[:-1]]
    parts += [
        f'"{name}":{{"dtype":"{dtype}","shape":[{",".join(map(str, shape))}],"data_offsets":[{begin},{end}]}}'
        for name, dtype, shape, begin, end in zip(
            names, columns.dtypes, columns.shapes, columns.begins, columns.ends, strict=True
        )
    ]
    return _frame((",".join(parts) + "}").encode())


def _plain_json_string(text: str) -> bool:
    """Whether ``json.dumps(text)`` is ``text`` in quotes: printable ASCII, no quote or backslash."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def _header_json(columns: HeaderColumns, metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    for name, dtype, shape, begin, end in zip(
        columns.names, columns.dtypes, columns.shapes, columns.begins, columns.ends, strict=True
    ):
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    return json.dumps(header, separators=(",", ":")).encode()


def _frame(raw: bytes) -> bytes:
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
    """Parse the JSON header bytes (after the length prefix) of an untrusted data file.

    Linear in ``len(raw)``; the JSON limits (:func:`json_limits_problem`) are checked
    before any object is built, so memory stays within a constant factor of the header.
    """
    problem = json_limits_problem(raw, max_bytes=MAX_HEADER_BYTES)
    if problem is not None:
        raise ManifestError(
            f"data file {file!r}: header {problem}. Headers that shardckpt or safetensors write stay far "
            "below these limits, so the file is corrupt or hostile; load an earlier checkpoint."
        )
    data_size = file_size - HEADER_LEN_BYTES - len(raw)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError, int digit limit
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


def max_json_containers(size: int, bytes_per_container: int = JSON_BYTES_PER_CONTAINER) -> int:
    """How many arrays and objects JSON text of ``size`` bytes may hold."""
    return JSON_CONTAINERS_SLACK + size // bytes_per_container


def json_limits_problem(
    raw: bytes, *, max_bytes: int, bytes_per_container: int = JSON_BYTES_PER_CONTAINER
) -> str | None:
    """What makes ``raw`` too costly to hand to ``json.loads``, or None if it is within limits.

    Limits: ``len(raw) <= max_bytes``; nesting depth <= MAX_JSON_DEPTH; arrays + objects
    <= max_json_containers(len(raw), bytes_per_container). Counted outside strings, on the bytes, in O(len(raw))
    time and O(1) memory (numpy, in blocks), so nothing is built for a refused document.
    Within the limits json.loads takes at most ~20x ``len(raw)`` plus ~0.5 MB (measured
    worst: '{"a":"bc"},"ab",' repeated, one-key objects at the container limit between
    2-character strings; such strings alone: 13x), where unlimited arrays and objects reach
    22-32x (68x in RSS); manifests that shardckpt writes take 5-6x. Refused text costs
    < 4 MB (blocks of 64 KiB). The result reads after "<document>: ", e.g. "has more ...".
    """
    if len(raw) > max_bytes:
        return f"is {len(raw)} bytes, more than the limit of {max_bytes}"
    scan = _JsonScan(len(raw), bytes_per_container)
    data = np.frombuffer(raw, dtype=np.uint8)
    for start in range(0, len(data), _SCAN_BLOCK):
        problem = scan.block(data[start : start + _SCAN_BLOCK], start)
        if problem is not None:
            return problem
    return None


def json_containers(text: bytes, budget: int, *, depth: int) -> int | None:
    """How many arrays and objects the JSON text ``text`` holds, or None if more than
    ``budget`` or if, inside ``depth`` enclosing levels, it nests deeper than
    MAX_JSON_DEPTH: :func:`json_limits_problem`'s scan of one field of a document, so that
    a document's limits are checked field by field (the quick manifest parse counts the
    containers of its "tensors" field from their records instead of scanning them)."""
    scan = _JsonScan(len(text))
    scan.max_containers, scan.depth = budget, depth
    data = np.frombuffer(text, dtype=np.uint8)
    for start in range(0, len(data), _SCAN_BLOCK):
        if scan.block(data[start : start + _SCAN_BLOCK], start) is not None:
            return None
    return scan.containers


def count_outside_strings(raw: bytes, byte: int) -> int:
    """How often ``byte`` (an ASCII character other than a quote or a backslash) occurs in
    the JSON text ``raw`` outside its strings; for ``:``, the number of object members.
    Strings are told apart as :class:`_JsonScan` tells them: O(len(raw)), blocks of 64 KiB."""
    scan = _JsonScan(len(raw))
    data = np.frombuffer(raw, dtype=np.uint8)
    count = 0
    for start in range(0, len(data), _SCAN_BLOCK):
        block = data[start : start + _SCAN_BLOCK]
        hits = np.flatnonzero(block == byte)
        count += len(hits) - int(np.count_nonzero(scan._inside_strings(block, hits)))
    return count


class _JsonScan:
    """Containers and depth of JSON text, fed block by block; strings are skipped.

    A quote delimits a string unless an odd run of backslashes precedes it. On any valid
    prefix of a JSON text this is exactly JSON's tokenization, and json.loads builds nothing
    past its first error, so the counts bound what it would build for any input. Work per
    block: a few vectorized passes plus O(k log k) for its k quotes, brackets and backslashes.
    """

    def __init__(self, size: int, bytes_per_container: int = JSON_BYTES_PER_CONTAINER) -> None:
        self.size = size
        self.bytes_per_container = bytes_per_container
        self.max_containers = max_json_containers(size, bytes_per_container)
        self.containers = 0
        self.depth = 0
        self.in_string = False
        self.backslashes = 0  # length of the backslash run that ended the previous block

    def block(self, block: np.ndarray, start: int) -> str | None:
        """Count one block (at byte ``start``); the first limit it breaks, in byte order."""
        folded = block | 0x20  # "[" -> "{" and "]" -> "}"; no other byte maps to either
        brackets = np.flatnonzero((folded == 0x7B) | (folded == 0x7D))
        brackets = brackets[~self._inside_strings(block, brackets)]
        steps = np.where(folded[brackets] == 0x7B, 1, -1).astype(np.int32)
        depth = self.depth + np.cumsum(steps)
        opens = brackets[steps == 1]
        spare = self.max_containers - self.containers
        too_many = start + int(opens[spare]) if len(opens) > spare else None
        deep = np.flatnonzero(depth > MAX_JSON_DEPTH)
        too_deep = start + int(brackets[deep[0]]) if len(deep) else None
        if too_deep is not None and (too_many is None or too_deep < too_many):
            return f"nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects (at byte {too_deep})"
        if too_many is not None:
            return self._too_many(too_many)
        self.containers += len(opens)
        self.depth = int(depth[-1]) if len(depth) else self.depth
        return None

    def _too_many(self, at: int) -> str:
        return (
            f"has more than {self.max_containers} JSON arrays and objects (one more starts at byte {at}); "
            f"the limit for {self.size} bytes is {JSON_CONTAINERS_SLACK} plus one per "
            f"{self.bytes_per_container} bytes, which bounds the memory that parsing takes"
        )

    def _inside_strings(self, block: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Which ``positions`` (not quotes themselves) of ``block`` lie inside a string."""
        quotes = np.flatnonzero(block == _QUOTE)
        backslashes = np.flatnonzero(block == _BACKSLASH)
        if len(backslashes) or self.backslashes:
            quotes = quotes[~self._escaped(quotes, backslashes, len(block))]
        inside: np.ndarray = (np.searchsorted(quotes, positions) + self.in_string) % 2 == 1
        self.in_string ^= len(quotes) % 2 == 1
        return inside

    def _escaped(self, quotes: np.ndarray, backslashes: np.ndarray, length: int) -> np.ndarray:
        """Which ``quotes`` follow an odd run of backslashes; carries a run that ends the block."""
        begin = quotes  # where the run of backslashes just before each quote begins (empty run: the quote)
        run_start = backslashes
        if len(backslashes):
            new_run = np.ones(len(backslashes), dtype=bool)
            new_run[1:] = np.diff(backslashes) != 1
            run_start = np.maximum.accumulate(np.where(new_run, backslashes, -1))
            last = np.maximum(np.searchsorted(backslashes, quotes) - 1, 0)
            touching = backslashes[last] == quotes - 1
            begin = np.where(touching, run_start[last], quotes)
        run = quotes - begin + np.where(begin == 0, self.backslashes, 0)  # a run from byte 0 continues the carried one
        ends_block = len(backslashes) > 0 and backslashes[-1] == length - 1
        if ends_block:
            tail = length - int(run_start[-1])
            self.backslashes = tail + (self.backslashes if run_start[-1] == 0 else 0)
        else:
            self.backslashes = 0
        odd: np.ndarray = run % 2 == 1
        return odd
