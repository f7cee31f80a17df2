"""Every reader is linear in its input and bounded in memory (issue #13, items 7 and 8).

Hostile manifests here are *validly sealed*: their checksum is right, so only the parser's
own bounds stand between them and the machine. Each test states the bound it checks: CPU
time (time.process_time, so other processes on the machine do not count) under
CPU_BOUND_S for a ~3 MB input, which linear code parses in well under a second;
tracemalloc peak under 10x the input when the JSON limits refuse it before parsing, and
under 20x (plus 1 MiB) when it is parsed: that is the documented worst case of
input within the limits (datafile.json_limits_problem), where unlimited JSON reaches 20-30x.
``SHARDCKPT_STRESS=1`` runs the fuzz tests with many more examples.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import shardckpt
from shardckpt.errors import ManifestError
from shardckpt.format import datafile, overlap
from shardckpt.format.manifest import (
    ChunkRecord,
    FileRecord,
    Manifest,
    TensorRecord,
    check_manifest_limits,
    manifest_to_json,
    parse_manifest,
    seal,
    unseal,
)
from shardckpt.format.overlap import first_overlap

STRESS = os.environ.get("SHARDCKPT_STRESS") == "1"
_EXAMPLES = 2000 if STRESS else 120
FILE = "data/0123456789ab-r00000-00.safetensors"
HASH = "0123456789abcdef"
BLOCK = 4096
MEMORY_FACTOR = 10  # tracemalloc peak allowed per input byte, for input refused before parsing
PARSED_MEMORY_FACTOR = 20  # ... for input within the JSON limits, which json.loads then builds
MEMORY_SLACK = 1 << 20  # ... plus this, for the parser's fixed costs
REFUSED_BEFORE_PARSING = ("arrays and objects", "nests deeper than", "more than the limit of")
# CPU seconds allowed for a ~3 MB input. Linear code takes 0.1-0.5 s here; the quadratic
# code of the issue took 59 s. The bound sits between with room for a loaded 2-core
# machine, where cache and frequency contention stretch even CPU time.
CPU_BOUND_S = 5.0

Box = tuple[tuple[int, ...], tuple[int, ...]]

# ---------------------------------------------------------------- building manifests


def _tensor(shape: tuple[int, ...], boxes: list[Box]) -> TensorRecord:
    """An F32 tensor whose chunks are ``boxes``, packed one after another in FILE."""
    chunks, at = [], 0
    for offsets, sizes in boxes:
        length = math.prod(sizes) * 4
        hashes = (HASH,) * -(-length // BLOCK)
        chunks.append(ChunkRecord(tuple(offsets), tuple(sizes), FILE, at, length, hashes))
        at += length
    return TensorRecord("F32", shape, tuple(chunks))


def _manifest(tensors: dict[str, TensorRecord], metadata: dict[str, Any] | None = None) -> Manifest:
    size = sum(c.byte_offset + c.byte_length for t in tensors.values() for c in t.chunks) + 8
    return Manifest(
        world_size=1,
        process_layout=({"rank": 0, "host": "h", "local_rank": 0},),
        tensors=tensors,
        values={},
        files={FILE: FileRecord(size, HASH, 0)},
        hash_block_bytes=BLOCK,
        created_at="2026-01-01T00:00:00+00:00",
        shardckpt_version="0.1",
        torch_version="2.13",
        paths={k: [k] for k in tensors},
        metadata=metadata or {},
    )


def _unit_boxes(k: int) -> list[Box]:
    """The 2**k one-element boxes of a [2]*k tensor: the layout that made the old check quadratic."""
    return [(tuple(idx), (1,) * k) for idx in itertools.product((0, 1), repeat=k)]


def _staircase_boxes(rows: int, cols: int, width: int) -> list[Box]:
    """An exact tiling that is no grid: row r is cut at r % width + j * width (like bricks)."""
    boxes: list[Box] = []
    for r in range(rows):
        cuts = sorted({0, cols} | set(range(r % width, cols, width)))
        boxes += [((r, a), (1, b - a)) for a, b in itertools.pairwise(cuts)]
    return boxes


def _sealed_with_metadata(metadata_json: bytes) -> bytes:
    """A sealed, otherwise valid manifest whose "metadata" field is ``metadata_json`` verbatim."""
    doc = json.loads(unseal(manifest_to_json(_manifest({})), source="template") + b"\n}")
    doc["metadata"] = "@@METADATA@@"
    return seal(json.dumps(doc).encode().replace(b'"@@METADATA@@"', metadata_json))


def _header_with(extra_json: bytes) -> bytes:
    """A safetensors header (no length prefix): one valid entry, then ``extra_json`` as another."""
    good = b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    return b'{"__metadata__":{},' + good + b',"x":' + extra_json + b"}"


# ---------------------------------------------------------------- measuring


def _run(fn: Callable[[], object]) -> BaseException | None:
    try:
        fn()
    except ManifestError as e:
        return e
    return None


def _timed(fn: Callable[[], object]) -> tuple[float, BaseException | None]:
    start = time.process_time()
    error = _run(fn)
    return time.process_time() - start, error


def _peak_bytes(fn: Callable[[], object]) -> tuple[int, BaseException | None]:
    """tracemalloc peak of ``fn`` (counts every Python and numpy allocation while it runs)."""
    tracemalloc.start()
    try:
        error = _run(fn)
        return tracemalloc.get_traced_memory()[1], error
    finally:
        tracemalloc.stop()


def _read_manifest(raw: bytes) -> None:
    """What loading does with a manifest's bytes: check the seal, then parse."""
    unseal(raw, source="hostile")
    parse_manifest(raw, source="hostile")


def _assert_bounded(raw: bytes, fn: Callable[[], object], *, seconds: float = CPU_BOUND_S) -> BaseException | None:
    elapsed, error = _timed(fn)
    assert elapsed < seconds, f"{elapsed:.2f} s for {len(raw)} bytes"
    peak, _ = _peak_bytes(fn)
    refused = error is not None and any(words in str(error) for words in REFUSED_BEFORE_PARSING)
    factor = MEMORY_FACTOR if refused else PARSED_MEMORY_FACTOR
    assert peak < factor * len(raw) + MEMORY_SLACK, f"peak {peak} bytes for {len(raw)} input bytes ({error})"
    return error


# ---------------------------------------------------------------- item 7: the overlap check


@pytest.fixture(scope="module")
def unit_chunk_manifest() -> bytes:
    raw = manifest_to_json(_manifest({"t": _tensor((2,) * 14, _unit_boxes(14))}))
    assert len(raw) > 3_000_000  # the 3.3 MB manifest of the issue, which took 59 s
    return raw


def test_one_element_chunks_of_a_14_dim_tensor_parse_in_under_a_second(unit_chunk_manifest):
    elapsed, error = _timed(lambda: _read_manifest(unit_chunk_manifest))
    assert error is None and elapsed < CPU_BOUND_S
    assert len(parse_manifest(unit_chunk_manifest, source="unit chunks").tensors["t"].chunks) == 2**14


def test_one_element_chunks_with_one_doubled_are_refused_in_under_a_second():
    boxes = _unit_boxes(14)
    boxes[9_000] = boxes[4_000]  # same element count, one element twice and one never
    raw = manifest_to_json(_manifest({"t": _tensor((2,) * 14, boxes)}))
    elapsed, error = _timed(lambda: _read_manifest(raw))
    assert elapsed < CPU_BOUND_S
    assert isinstance(error, ManifestError) and "overlap" in str(error)
    assert "tensors['t']" in str(error)


def test_irregular_tiling_is_decided_in_under_a_second():
    """Bricks: no grid, and a sweep along either dimension keeps ~rows boxes active."""
    boxes = _staircase_boxes(rows=200, cols=20_000, width=200)
    raw = manifest_to_json(_manifest({"t": _tensor((200, 20_000), boxes)}))
    assert len(raw) > 3_000_000
    elapsed, error = _timed(lambda: _read_manifest(raw))
    assert elapsed < CPU_BOUND_S
    # shardckpt never writes such a layout; refusing it within the bound is the contract
    assert error is None or "work bound" in str(error)


def test_first_overlap_on_one_element_boxes_is_fast_and_exact():
    boxes = _unit_boxes(16)
    start = time.process_time()
    assert first_overlap(boxes) is None
    boxes[50_000] = boxes[123]
    assert first_overlap(boxes) == (123, 50_000)
    assert time.process_time() - start < 2 * CPU_BOUND_S  # 2**16 boxes, two scans


@st.composite
def _small_layouts(draw: st.DrawFn) -> list[Box]:
    dims = draw(st.integers(1, 3))
    coord, size = st.integers(0, 7), st.integers(0, 4)
    box = st.tuples(st.tuples(*[coord] * dims), st.tuples(*[size] * dims))
    return draw(st.lists(box, min_size=0, max_size=14))


def _all_pairs(boxes: list[Box]) -> list[tuple[int, int]]:
    def meet(a: Box, b: Box) -> bool:
        return all(x < y + ys and y < x + xs for x, xs, y, ys in zip(a[0], a[1], b[0], b[1], strict=True))

    live = [i for i, (_, sizes) in enumerate(boxes) if math.prod(sizes) > 0]
    return [(i, j) for i, j in itertools.combinations(live, 2) if meet(boxes[i], boxes[j])]


@settings(max_examples=_EXAMPLES * 3, deadline=None, database=None)
@given(boxes=_small_layouts(), grid=st.booleans())
def test_first_overlap_agrees_with_comparing_all_pairs(boxes, grid):
    """Both methods (grid painting; the sweep, forced by a zero cell budget) are exact."""
    saved = overlap.SMALL_LAYOUT, overlap.GRID_CELLS_PER_BOX, overlap.GRID_CELLS_SLACK
    overlap.SMALL_LAYOUT = 0
    if not grid:
        overlap.GRID_CELLS_PER_BOX = overlap.GRID_CELLS_SLACK = 0
    try:
        found = first_overlap(boxes)
    finally:
        overlap.SMALL_LAYOUT, overlap.GRID_CELLS_PER_BOX, overlap.GRID_CELLS_SLACK = saved
    pairs = _all_pairs(boxes)
    assert (found is None) == (not pairs)
    if found is not None:
        assert found in pairs
        if grid:  # painting in index order finds the first box that meets an earlier one
            assert found[1] == min(j for _, j in pairs)


# ---------------------------------------------------------------- item 8: memory bombs


BOMBS = {
    "wide empty lists": b"[" + b"[]," * 1_400_000 + b"[]]",
    "nested empty lists": b"[" + b"[[]]," * 800_000 + b"[]]",
    "one-key objects": b"[" + b'{"a":{}},' * 450_000 + b"{}]",
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_manifest_memory_bomb_is_refused_before_it_is_built(name):
    raw = _sealed_with_metadata(b'{"history":' + BOMBS[name] + b"}")  # metadata is any JSON object
    assert len(raw) > 4_000_000
    peak, error = _peak_bytes(lambda: _read_manifest(raw))
    assert peak < MEMORY_FACTOR * len(raw), f"{name}: peak {peak / len(raw):.1f}x the input"
    assert isinstance(error, ManifestError), f"{name}: accepted"
    assert "arrays and objects" in str(error) and "hostile" in str(error) and str(error).startswith("hostile:")


def test_deep_nesting_is_refused_by_the_depth_limit():
    raw = _sealed_with_metadata(b'{"a":' * 100 + b"0" + b"}" * 100)
    with pytest.raises(ManifestError, match=f"deeper than {datafile.MAX_JSON_DEPTH}"):
        _read_manifest(raw)
    shallow = _sealed_with_metadata(b'{"a":' * 40 + b"0" + b"}" * 40)
    assert parse_manifest(shallow, source="shallow").metadata["a"]["a"]["a"]


def test_brackets_inside_strings_are_not_counted():
    text = json.dumps("[" * 10_000 + '\\"{' * 10_000).encode()  # escaped quotes keep it one string
    raw = _sealed_with_metadata(b'{"s":' + text + b"}")
    assert parse_manifest(raw, source="strings").metadata["s"].startswith("[[[")


def _reference_shape(raw: bytes) -> tuple[int, int, int]:
    """Containers, deepest nesting and the end of the part JSON could tokenize, byte by byte."""
    inside = escaped = False
    containers = depth = deepest = 0
    for at, byte in enumerate(raw):
        if inside:
            escaped, inside = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x5C:
            return containers, deepest, at  # outside a string: json.loads stops here
        elif byte == 0x22:
            inside = True
        elif byte in b"[{":
            containers, depth = containers + 1, depth + 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return containers, deepest, len(raw)


@settings(max_examples=_EXAMPLES * 3, deadline=None, database=None)
@given(
    parts=st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b",", b'"\\\\"']), max_size=60),
    block=st.sampled_from([1, 2, 3, 7, 1 << 14]),
)
def test_scan_counts_what_a_byte_by_byte_tokenizer_counts(parts, block):
    """Quotes, escapes and block boundaries: the vectorized scan agrees on what JSON could parse."""
    raw = b"".join(parts)
    containers, deepest, end = _reference_shape(raw)
    raw = raw[:end]
    saved = datafile._SCAN_BLOCK, datafile.MAX_JSON_DEPTH
    datafile._SCAN_BLOCK, datafile.MAX_JSON_DEPTH = block, 3
    try:
        problem = datafile.json_limits_problem(raw, max_bytes=len(raw))
        scan = datafile._JsonScan(len(raw))
        scan.max_containers, datafile.MAX_JSON_DEPTH = len(raw), len(raw)
        for start in range(0, len(raw), block):
            scan.block(np.frombuffer(raw, dtype=np.uint8)[start : start + block], start)
    finally:
        datafile._SCAN_BLOCK, datafile.MAX_JSON_DEPTH = saved
    assert (problem is not None) == (deepest > 3)
    assert scan.containers == containers


def _reference_colons(raw: bytes) -> int:
    """The ":" outside strings, byte by byte (``raw`` is what JSON could tokenize)."""
    inside = escaped = False
    count = 0
    for byte in raw:
        if inside:
            escaped, inside = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            inside = True
        elif byte == 0x3A:
            count += 1
    return count


@settings(max_examples=_EXAMPLES * 3, deadline=None, database=None)
@given(
    parts=st.lists(st.sampled_from([b":", b'"', b"\\", b"a", b",", b'"\\"', b"\\\\", b"{"]), max_size=60),
    block=st.sampled_from([1, 2, 3, 7, 1 << 14]),
)
def test_colons_outside_strings_are_what_a_byte_by_byte_tokenizer_counts(parts, block):
    """The manifest's quick path counts object members so (manifest_bulk.check_members)."""
    raw = b"".join(parts)
    raw = raw[: _reference_shape(raw)[2]]
    saved = datafile._SCAN_BLOCK
    datafile._SCAN_BLOCK = block
    try:
        found = datafile.count_outside_strings(raw, ord(":"))
    finally:
        datafile._SCAN_BLOCK = saved
    assert found == _reference_colons(raw)


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_data_file_header_memory_bomb_is_refused_before_it_is_built(name):
    raw = _header_with(BOMBS[name])
    peak, error = _peak_bytes(lambda: datafile.parse_header(raw, file="data/x.safetensors", file_size=len(raw) + 12))
    assert peak < MEMORY_FACTOR * len(raw), f"{name}: peak {peak / len(raw):.1f}x the input"
    assert isinstance(error, ManifestError) and "'data/x.safetensors'" in str(error)
    assert "arrays and objects" in str(error)


def test_load_refuses_a_sealed_bomb_with_a_manifest_error(tmp_path):
    folder = tmp_path / "c"
    shardckpt.save({"w": torch.arange(4.0)}, str(folder), hash_block_bytes=BLOCK, num_io_threads=1)
    (folder / "manifest.json").write_bytes(_sealed_with_metadata(b'{"x":' + BOMBS["wide empty lists"] + b"}"))
    shutil.rmtree(folder / "data")  # a ManifestError, not a missing file, proves the early refusal
    with pytest.raises(ManifestError, match="arrays and objects"):
        shardckpt.load({"w": torch.zeros(4)}, str(folder))


# ---------------------------------------------------------------- the writer applies the same limits


def test_writer_refuses_a_manifest_the_reader_would_refuse():
    bomb = _manifest({}, metadata={"history": [[] for _ in range(300_000)]})
    with pytest.raises(ManifestError, match="arrays and objects") as info:
        manifest_to_json(bomb)
    assert "metadata" in str(info.value)  # the hint names what to make smaller
    with pytest.raises(ManifestError, match="deeper than"):
        manifest_to_json(_manifest({}, metadata=_nested(80)))


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def test_limits_admit_large_manifests_that_shardckpt_writes():
    """2**16 chunks of a 2-D grid, 64 tuple values: far inside every limit, checked quickly."""
    boxes = [((r * 16, c * 16), (16, 16)) for r in range(256) for c in range(256)]
    m = _manifest({"t": _tensor((4096, 4096), boxes)})
    raw = manifest_to_json(m)
    start = time.process_time()
    check_manifest_limits(raw, source="big")
    assert time.process_time() - start < CPU_BOUND_S
    if STRESS:
        assert len(parse_manifest(raw, source="big").tensors["t"].chunks) == 2**16


def test_a_real_save_passes_the_limits(tmp_path):
    state = {"w": torch.arange(2000.0).reshape(40, 50), "opt": {"betas": (0.9, 0.95), "lr": 0.1}}
    shardckpt.save(state, str(tmp_path / "c"), hash_block_bytes=BLOCK, num_io_threads=1)
    raw = (tmp_path / "c" / "manifest.json").read_bytes()
    check_manifest_limits(raw, source="real")


# ---------------------------------------------------------------- fuzz: time and memory per input

# Valid JSON values (a bomb parses, so an unbounded parser would build all of it) and raw tokens
# (splicing them anywhere tests the scan on broken JSON, escapes and strings).
_ITEMS = [b"[]", b"{}", b"[[]]", b'{"a":{}}', b'{"a":"bc"}', b'"ab"', b"257", b"1e5", b"null", b"0", b'"[{\\""']
_TOKENS = [*_ITEMS, b"[", b"]", b"{", b"}", b",", b'"\\\\"', b'{"a":', b" ", b"\\", b'"', b":"]
_MAX_BOMB = 300_000  # bytes spliced in at most: several times the 1 MiB slack / 10
_BOMB_BYTES = st.sampled_from([100, 20_000, _MAX_BOMB])  # big ones often: they show blowups
# the unsealed document: seal() makes a sealed variant of each mutation
_SEED_TENSOR = _tensor((8, 6), [((0, 0), (4, 6)), ((4, 0), (4, 6))])
_SEED = unseal(manifest_to_json(_manifest({"t": _SEED_TENSOR})), source="seed") + b"\n}\n"


@st.composite
def _bomb(draw: st.DrawFn) -> bytes:
    """A JSON array repeating 1-3 drawn values, up to _MAX_BOMB bytes."""
    run = b",".join(draw(st.lists(st.sampled_from(_ITEMS), min_size=1, max_size=3))) + b","
    return b"[" + run * (draw(_BOMB_BYTES) // len(run)) + b"0]"


@st.composite
def _hostile_json(draw: st.DrawFn, seed: bytes, slot: bytes) -> bytes:
    """``seed`` with a bomb after ``slot`` (still valid JSON) or a run of raw tokens spliced in
    anywhere, then a few bytes flipped."""
    raw = bytearray(seed)
    if draw(st.booleans()):
        at = seed.index(slot) + len(slot)
        raw[at:at] = b'"bomb":' + draw(_bomb()) + (b"" if seed[at : at + 1] == b"}" else b",")
    else:
        run = b"".join(draw(st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=4)))
        at = draw(st.integers(0, len(raw)))
        raw[at:at] = run * (draw(_BOMB_BYTES) // len(run))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] = draw(st.integers(0, 255))
    return bytes(raw)


def _with_bomb(seed: bytes, slot: bytes, item: bytes) -> bytes:
    """The explicit examples: ``item`` repeated to _MAX_BOMB bytes, after ``slot``."""
    at = seed.index(slot) + len(slot)
    bomb = b'"bomb":[' + (item + b",") * (_MAX_BOMB // (len(item) + 1)) + b"0]"
    return seed[:at] + bomb + (b"" if seed[at : at + 1] == b"}" else b",") + seed[at:]


@settings(max_examples=_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@example(raw=_with_bomb(_SEED, b'"metadata": {', b"[[]]"), sealed=True)
@example(raw=_with_bomb(_SEED, b'"metadata": {', b'{"a":"bc"},"ab"'), sealed=False)
@given(raw=_hostile_json(_SEED, b'"metadata": {'), sealed=st.booleans())
def test_fuzz_manifest_reader_is_fast_and_bounded(raw, sealed):
    if sealed:
        raw = seal(raw)
    try:
        unseal(raw, source="fuzz")
    except ManifestError:
        pass  # a reader stops here; the parser must still be safe on its own
    _assert_bounded(raw, lambda: parse_manifest(raw, source="fuzz"))


_HEADER_SEED = datafile.build_header(
    [datafile.HeaderEntry("w@0,0", "F32", (4, 6), 0, 96), datafile.HeaderEntry("b@0", "BF16", (3,), 96, 102)],
    {"format": "shardckpt"},
)[datafile.HEADER_LEN_BYTES :]


@settings(max_examples=_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@example(raw=_with_bomb(_HEADER_SEED, b"{", b'{"a":{}}'))
@example(raw=_with_bomb(_HEADER_SEED, b"{", b'{"a":"bc"},"ab"'))
@given(raw=_hostile_json(_HEADER_SEED, b"{"))
def test_fuzz_data_file_header_reader_is_fast_and_bounded(raw):
    _assert_bounded(raw, lambda: datafile.parse_header(raw, file="fuzz", file_size=len(raw) + 8 + 102))
