"""Format 3 (draft) sharding rules: format/rules.py is exact, computes boxes from the rule,
and refuses hostile records with ManifestError (docs/format.md section 12)."""

from __future__ import annotations

import functools
import itertools
import json
import math
import tracemalloc
from pathlib import Path

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardckpt.errors import ManifestError
from shardckpt.format import manifest_v3 as mv3
from shardckpt.format import rules
from shardckpt.format.manifest import ChunkRecord, FileRecord, Manifest, TensorRecord, manifest_to_json
from shardckpt.format.rank_index import FileIndex, IndexEntry, rank_index_to_json
from shardckpt.format.rules import Chunk, Rule, Run, chunks_for_box, compress, expand, parse_rule, rule_to_json


@functools.cache
def chunk_pieces(n: int, parts: int) -> list[tuple[int, int]]:
    """(offset, size) of each of ``parts`` pieces of ``n``, as torch.chunk / DTensor Shard cut
    them, empty pieces included (at offset n)."""
    out, at = [], 0
    for piece in torch.arange(n).chunk(parts) if n else ():
        out.append((at, len(piece)))
        at += len(piece)
    return out + [(n, 0)] * (parts - len(out))


def sharded(
    shape: tuple[int, ...], mesh: tuple[int, ...], dims: tuple[int, ...], files_per_rank: int = 1
) -> list[Chunk]:
    """The chunks a DTensor on ``mesh`` with ``Shard(dims[k])`` on mesh dim k writes (one box
    per rank, the rank's first file, every tensor at byte 64)."""
    out = []
    for rank, coord in enumerate(itertools.product(*(range(m) for m in mesh))):
        offsets, sizes = [0] * len(shape), list(shape)
        for k, d in enumerate(dims):  # each mesh dim shards its own tensor dim
            offsets[d], sizes[d] = chunk_pieces(shape[d], mesh[k])[coord[k]]
        out.append(Chunk(tuple(offsets), tuple(sizes), rank * files_per_rank, 64))
    return out


def roundtrip(shape: tuple[int, ...], chunks: list[Chunk]) -> tuple[Rule | None, tuple[Chunk, ...]]:
    rule, rest = compress(shape, chunks)
    got = ([*expand(rule)] if rule else []) + list(rest)
    assert sorted(got) == sorted(chunks)
    return rule, rest


# ---------------------------------------------------------------- what regular layouts become


def test_fsdp_shard0_over_4096_ranks_is_one_run():
    chunks = sharded((4096, 4096), (4096,), (0,), files_per_rank=4)
    rule, rest = roundtrip((4096, 4096), chunks)
    assert rule is not None and rest == ()
    assert rule.grid == (4096, 1) and rule.block == (1, 4096)
    assert rule.runs == (Run(4096, 0, 4, 64, 0),)
    assert len(json.dumps(rule_to_json(rule))) < 100  # against ~4096 chunk records


def test_uneven_shards_and_empty_ranks_of_torch_chunk():
    # 10 rows over 8 ranks: torch.chunk gives 5 pieces of 2; ranks 5..7 hold empty boxes
    chunks = sharded((10, 3), (8,), (0,))
    rule, rest = roundtrip((10, 3), chunks)
    assert rule is not None and rule.grid == (5, 1) and rule.block == (2, 3)
    assert [c.sizes for c in rest] == [(0, 3)] * 3
    # 11 rows over 4 ranks: 3, 3, 3, 2 (the last piece shorter)
    rule, rest = roundtrip((11, 5), sharded((11, 5), (4,), (0,)))
    assert rule is not None and [c.sizes[0] for c in expand(rule)] == [3, 3, 3, 2] and rest == ()


def test_tp_shard1_and_a_2d_mesh_and_replicated():
    rule, _ = roundtrip((6, 10), sharded((6, 10), (4,), (1,)))
    assert rule is not None and rule.grid == (1, 4) and rule.block == (6, 3)
    rule, rest = roundtrip((7, 9), sharded((7, 9), (2, 3), (0, 1)))
    assert rule is not None and rule.grid == (2, 3) and rule.block == (4, 3) and rest == ()
    assert rule.runs == (Run(6, 0, 1, 64, 0),)  # rank r holds cell r: row-major mesh order
    rule, _ = roundtrip((5, 5), [Chunk((0, 0), (5, 5), 3, 128)])
    assert rule is not None and rule.grid == (1, 1) and rule.runs == (Run(1, 3, 0, 128, 0),)
    rule, _ = roundtrip((), [Chunk((), (), 2, 8)])
    assert rule is not None and rule.cells == 1 and expand(rule) == [Chunk((), (), 2, 8)]


def test_hsdp_replicas_deduplicated_to_balanced_owners():
    # a 2x2 mesh (Replicate, Shard(0)) on a 9-row tensor: rank 2*i + j holds rows piece j; the
    # save keeps one copy of each piece, owned by whichever replica balances the bytes (ranks 0, 3)
    pieces = chunk_pieces(9, 2)
    held = {2 * i + j: Chunk((pieces[j][0], 0), (pieces[j][1], 4), 2 * i + j, 64) for i in range(2) for j in range(2)}
    assert held[0].offsets == held[2].offsets and held[1].offsets == held[3].offsets
    rule, rest = roundtrip((9, 4), [held[0], held[3]])
    assert rule is not None and rule.grid == (2, 1) and rule.block == (5, 4) and rest == ()
    assert rule.runs == (Run(2, 0, 3, 64, 0),)


def test_a_changed_offset_pattern_starts_a_new_run():
    chunks = [Chunk((i,), (1,), i, 64 if i < 5 else 96) for i in range(8)]
    rule, _ = roundtrip((8,), chunks)
    assert rule is not None and rule.runs == (Run(5, 0, 1, 64, 0), Run(3, 5, 1, 96, 0))


def test_irregular_layouts_stay_explicit():
    # numpy.array_split's sizes (first pieces longer: 3, 3, 2, 2) are not a block grid
    split = [Chunk((0,), (3,), 0, 0), Chunk((3,), (3,), 1, 0), Chunk((6,), (2,), 2, 0), Chunk((8,), (2,), 3, 0)]
    assert roundtrip((10,), split) == (None, tuple(split))
    # an L-shaped tiling of a 2x2 tensor
    tiles = [Chunk((0, 0), (1, 2), 0, 0), Chunk((1, 0), (1, 1), 0, 8), Chunk((1, 1), (1, 1), 0, 12)]
    assert roundtrip((2, 2), tiles) == (None, tuple(tiles))
    # the same block twice (a duplicate is not a second cell)
    dup = [Chunk((0,), (2,), 0, 0), Chunk((0,), (2,), 1, 0)]
    assert roundtrip((4,), dup) == (None, tuple(dup))
    # a box before the tensor's start is no cell (-2 // 2 would number it -1)
    outside = [Chunk((-2,), (2,), 0, 0), Chunk((2,), (2,), 1, 0)]
    assert compress((4,), outside) == (None, tuple(outside))


# ---------------------------------------------------------------- exactness, properties


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Chunk]]:
    """A tensor and chunks: torch.chunk grids (empty pieces kept or dropped) or arbitrary
    splits per dimension; files and offsets regular, random, or in runs; any order."""
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    pieces = []
    for n in shape:
        if draw(st.booleans()):
            pieces.append(chunk_pieces(n, draw(st.integers(1, 9))))
        else:
            cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=4))) if n > 1 else []
            edges = [0, *cuts, n]
            pieces.append([(a, b - a) for a, b in itertools.pairwise(edges)])
    keep_empty = draw(st.booleans())
    placement = draw(st.sampled_from(["affine", "random", "steps"]))
    chunks = []
    for i, cell in enumerate(itertools.product(*pieces)):
        sizes = tuple(s for _, s in cell)
        if math.prod(sizes) == 0 and not keep_empty:
            continue
        if placement == "affine":
            file, at = 2 * i + 1, 4096
        elif placement == "random":
            file, at = draw(st.integers(0, 50)), draw(st.integers(0, 1 << 40))
        else:
            file, at = i // 3, 64 * (i % 3)
        chunks.append(Chunk(tuple(o for o, _ in cell), sizes, file, at))
    return shape, draw(st.permutations(chunks))


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_expand_of_compress_is_exact(layout):
    shape, chunks = layout
    rule, rest = roundtrip(shape, chunks)
    if rule is not None:
        assert all(math.prod(c.sizes) == 0 for c in rest)
        assert sum(math.prod(c.sizes) for c in expand(rule)) == math.prod(shape)
        assert (
            parse_rule(
                json.loads(json.dumps(rule_to_json(rule))),
                shape=shape,
                files=1 + max(c.file for c in chunks),
                where="t",
            )
            == rule
        )


@settings(max_examples=300, deadline=None, database=None)
@given(st.data())
def test_torch_chunk_grids_always_compress(data):
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.lists(st.integers(1, 20), min_size=ndim, max_size=ndim)))
    mesh = tuple(data.draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    chunks = sharded(shape, mesh, tuple(range(ndim)), files_per_rank=data.draw(st.integers(1, 4)))
    rule, rest = roundtrip(shape, chunks)
    assert rule is not None
    # one run; empty ranks inside a row of a mesh break the rank pattern once per row
    assert len(rule.runs) == 1 if not rest else len(rule.runs) <= math.prod(rule.grid[:-1])
    assert len(rest) == sum(1 for c in chunks if math.prod(c.sizes) == 0)


def _overlaps(c: Chunk, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> bool:
    return (
        all(o < bo + bs and bo < o + s for o, s, bo, bs in zip(c.offsets, c.sizes, offsets, sizes, strict=True))
        and math.prod(sizes) > 0
    )


@settings(max_examples=300, deadline=None, database=None)
@given(st.data())
def test_chunks_for_box_is_what_filtering_every_chunk_gives(data):
    ndim = data.draw(st.integers(0, 3))
    shape = tuple(data.draw(st.lists(st.integers(1, 15), min_size=ndim, max_size=ndim)))
    mesh = tuple(data.draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    rule, _ = compress(shape, sharded(shape, mesh, tuple(range(ndim))))
    assert rule is not None
    offsets = tuple(data.draw(st.integers(0, n)) for n in shape)
    sizes = tuple(data.draw(st.integers(0, n - o)) for n, o in zip(shape, offsets, strict=True))
    assert chunks_for_box(rule, offsets, sizes) == [c for c in expand(rule) if _overlaps(c, offsets, sizes)]


@settings(max_examples=300, deadline=None, database=None)
@given(st.data())
def test_a_tensors_chunks_for_a_box_of_one_cell_are_what_filtering_every_chunk_gives(data):
    """Tensor.chunks_for_box answers a box that is exactly one cell (a load in the save's
    layout) without ranges; the answer is still the one cell, with its byte length."""
    ndim = data.draw(st.integers(0, 3))
    shape = tuple(data.draw(st.lists(st.integers(1, 15), min_size=ndim, max_size=ndim)))
    mesh = tuple(data.draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    rule, _ = compress(shape, sharded(shape, mesh, tuple(range(ndim)), files_per_rank=2))
    assert rule is not None
    tensor = mv3.Tensor("BF16", shape, rule, ())
    cells = expand(rule)
    picked = data.draw(st.sampled_from(cells))
    near = [picked.offsets, tuple(max(0, o - 1) for o in picked.offsets)]
    for offsets in near:
        for sizes in (picked.sizes, tuple(s + 1 for s in picked.sizes), tuple(max(0, s - 1) for s in picked.sizes)):
            if any(o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)):
                continue
            want = [c for c in cells if _overlaps(c, offsets, sizes)]
            got = tensor.chunks_for_box(offsets, sizes)
            assert [(c.offsets, c.sizes, c.file, c.byte_offset) for c in got] == [
                (c.offsets, c.sizes, c.file, c.byte_offset) for c in want
            ], (offsets, sizes)
            assert all(c.byte_length == 2 * math.prod(c.sizes) for c in got)


@settings(max_examples=200, deadline=None, database=None)
@given(st.data())
def test_cell_at_finds_exactly_the_cell_starting_at_a_point(data):
    # every point of a small tensor, one step beyond each end, and a wrong number of dims
    ndim = data.draw(st.integers(0, 3))
    shape = tuple(data.draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim)))
    mesh = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    rule, _ = compress(shape, sharded(shape, mesh, tuple(range(ndim)), files_per_rank=2))
    assert rule is not None
    starts = {c.offsets: c for c in expand(rule)}
    for point in itertools.product(*(range(-1, n + 1) for n in shape)):
        assert rule.cell_at(point) == starts.get(point), point
    assert rule.cell_at((0,) * (ndim + 1)) is None


def test_chunks_for_box_does_not_expand_the_rule():
    # 2**26 cells; expanding them would take minutes and gigabytes, the answer is 2 chunks
    rule = Rule((1 << 13, 1 << 13, 4), (1, 1, 4), (Run(1 << 26, 0, 1, 0, 0),))
    assert rule.cells == rules.MAX_RULE_CELLS
    got = chunks_for_box(rule, (5, 7, 1), (1, 2, 2))
    assert got == [Chunk((5, 7, 0), (1, 1, 4), 5 * 8192 + 7, 0), Chunk((5, 8, 0), (1, 1, 4), 5 * 8192 + 8, 0)]
    with pytest.raises(ValueError, match="outside shape"):
        chunks_for_box(rule, (8192, 0, 0), (1, 1, 1))


# ---------------------------------------------------------------- hostile records


GOOD = {"grid": [4, 1], "block": [3, 5], "runs": [[4, 0, 1, 64, 0]]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"grid": [3, 1]}, r"grid\[0\] = 3, but shape 11 in blocks of 3 makes 4 pieces"),
        ({"block": [0, 5]}, r"block\[0\] = 0 must be in \[1, shape\[0\] = 11\]"),
        ({"block": [3, 6]}, r"block\[1\] = 6 must be in \[1, shape\[1\] = 5\]"),
        ({"block": [3, True]}, "expected a list of 2 integers"),
        ({"block": [3]}, "expected a list of 2 integers"),
        ({"runs": []}, "expected a list of 1 to 4 runs"),
        ({"runs": [[3, 0, 1, 64, 0]]}, "the runs place 3 cells, the grid has 4"),
        ({"runs": [[5, 0, 1, 64, 0]]}, r"count 5 must be in \[1, 4\]"),
        ({"runs": [[4, 0, 3, 64, 0]]}, r"file positions 0..9 outside the 8 files"),
        ({"runs": [[4, 0, 1, 64, -30]]}, r"byte offsets 64..-26 outside \[0, 2\*\*62\)"),
        ({"runs": [[4, 0, 1, 2**62, 0]]}, "expected a list of 5 integers"),
        ({"runs": [[4, 0, 1, 64]]}, "expected a list of 5 integers"),
        ({"extra": 1}, "exactly the fields grid, block, runs"),
    ],
)
def test_hostile_rules_are_refused_with_the_field(change, message):
    assert parse_rule(GOOD, shape=(11, 5), files=8, where="t") == Rule((11, 5), (3, 5), (Run(4, 0, 1, 64, 0),))
    with pytest.raises(ManifestError, match=message):
        parse_rule({**GOOD, **change}, shape=(11, 5), files=8, where="tensors['w'].rule")


def test_too_many_cells_are_refused_before_the_runs_are_read():
    doc = {"grid": [1 << 31, 1 << 31], "block": [1, 1], "runs": "never read"}
    with pytest.raises(ManifestError, match=f"more than {rules.MAX_RULE_CELLS} cells"):
        parse_rule(doc, shape=(1 << 31, 1 << 31), files=1, where="t")
    with pytest.raises(ManifestError, match="an empty dimension has no rule"):
        parse_rule({"grid": [0], "block": [0], "runs": []}, shape=(0,), files=1, where="t")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.sampled_from(["grid", "block", "runs"]), inner),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_rules_raise_only_manifest_errors(data):
    shape = tuple(data.draw(st.lists(st.integers(0, 9), max_size=3)))
    doc = {
        "grid": data.draw(st.lists(st.integers(-1, 10), max_size=3) | _JSON),
        "block": data.draw(st.lists(st.integers(-1, 10), max_size=3) | _JSON),
        "runs": data.draw(st.lists(st.lists(st.integers(-3, 20), min_size=5, max_size=5), max_size=4) | _JSON),
    }
    try:
        rule = parse_rule(doc, shape=shape, files=4, where="fuzz")
    except ManifestError:
        return
    # what parses tiles the tensor, and every chunk's place is in range
    got = expand(rule)
    assert sum(math.prod(c.sizes) for c in got) == math.prod(shape)
    assert all(0 <= c.file < 4 and c.byte_offset >= 0 for c in got)


# ---------------------------------------------------------------- the spec's example and schema

DOC = Path(__file__).parents[2] / "docs" / "format.md"
SCHEMA = Path(__file__).parents[2] / "shardckpt" / "format" / "manifest_v3.schema.json"


def _section_12_json_blocks() -> list[str]:
    text = DOC.read_text("utf-8").split("## 12. Format 3", 1)[1]
    return [b.split("```", 1)[0] for b in text.split("```json\n")[1:]]


def test_the_spec_examples_follow_the_v3_schema_and_the_rule_parser():
    schema = json.loads(SCHEMA.read_text("utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    rule_example, _page, index_example, manifest_example = _section_12_json_blocks()
    doc = json.loads(manifest_example)
    jsonschema.validate(doc, schema)
    (group,) = doc["file_table"]["groups"]
    files = sum(n * k for n, k in group["files"])
    rules_ = {k: parse_rule(t["rule"], shape=t["shape"], files=files, where=k) for k, t in doc["tensors"].items()}
    # the prose: rows 2-5 of model.weight are in cell 0 at [128, 192) of file 0 and cell 1 at [120, 184) of file 1
    assert chunks_for_box(rules_["model.weight"], (2, 0), (4, 4)) == [
        Chunk((0, 0), (4, 4), 0, 128),
        Chunk((4, 0), (4, 4), 1, 120),
    ]
    index = json.loads(index_example)
    assert index["save_id"] == group["save_id"] and index["rank"] == 0
    assert [e[:2] for e in index["files"][0]["entries"]] == [[128, 64], [192, 16]]  # weight's cell 0, then the bias
    shape, rule = (4096, 4096), json.loads("{" + rule_example + "}")["model.layers.0.attn.q.weight"]["rule"]
    assert expand(parse_rule(rule, shape=shape, files=4 * 4096, where="q"))[4095] == Chunk(
        (4095, 0), (1, 4096), 16382, 4096
    )


def test_compressed_tensors_follow_the_v3_schema():
    schema = json.loads(SCHEMA.read_text("utf-8"))
    tensor = {"$defs": schema["$defs"], "$ref": "#/$defs/tensor"}
    rule, rest = compress((10, 3), sharded((10, 3), (8,), (0,)))
    assert rule is not None
    empty = [
        {"offsets": list(c.offsets), "sizes": list(c.sizes), "file": c.file, "byte_offset": 0, "byte_length": 0}
        for c in rest
    ]
    jsonschema.validate({"dtype": "F32", "shape": [10, 3], "chunks": empty, "rule": rule_to_json(rule)}, tensor)
    with pytest.raises(jsonschema.ValidationError):  # a v2 chunk record (with block hashes) is not v3
        jsonschema.validate({"dtype": "F32", "shape": [1], "chunks": [{**empty[0], "block_hashes": []}]}, tensor)


# ---------------------------------------------------------------- the benchmark's projection


def test_the_benchmark_projection_counts_what_the_writers_would_write(monkeypatch):
    """benchmarks/rules_projection.py counts v1 and index bytes without building them; the
    counts must equal the bytes manifest_to_json and json.dumps produce."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "benchmarks"))
    import rules_projection as rp

    keys = [("model.w", (10, 3)), ("model.v", (3, 2)), ("model.x", (7,))]
    tensors, files = rp.synthetic_tensors(keys, ["step.w"], 4, 2, "0123456789ab")
    tensors = list(tensors)
    rest = {
        "shardckpt_version": "0.0.0",
        "torch_version": "2.13",
        "created_at": "2026-11-30T00:00:00+00:00",
        "world_size": 4,
        "process_layout": [{"rank": r, "host": "h", "local_rank": r} for r in range(4)],
        "values": {"step": 3},
        "paths": {"step": ["step"]},
    }
    got = rp.project(iter(tensors), files, rest, 4096, with_v1=True)
    v1 = Manifest(
        world_size=4,
        process_layout=tuple(rest["process_layout"]),
        tensors={
            k: TensorRecord(dtype, shape, tuple(_record(c) for c in chunks)) for k, dtype, shape, chunks in tensors
        },
        values=rest["values"],
        files={n: FileRecord(size, rp.FAKE_HASH, r) for n, (size, r) in files.items()},
        hash_block_bytes=4096,
        created_at=rest["created_at"],
        shardckpt_version="0.0.0",
        torch_version="2.13",
        paths=rest["paths"],
    )
    assert got.manifest_v1 == len(manifest_to_json(v1))
    # 3 rows of (3, 2) over 4 ranks: rank 3 holds nothing of model.v; every tensor is a rule
    assert (got.rules, got.listed_tensors) == (4, 0) and got.manifest_v3 < got.manifest_v1
    entry = [4096, 12345, "f" * 16 * 2]
    assert rp.index_entry_bytes(4096, 12345, 8192) == len(json.dumps(entry, separators=(",", ":")))
    # each rank's index record, counted, is the length of the record file_table would write
    stored: dict[str, list[IndexEntry]] = {n: [] for n in files}
    for _, _, _, chunks in tensors:
        for c in chunks:
            stored[c.file].append(IndexEntry(c.byte_offset, c.byte_length, "f" * 16 * -(-c.byte_length // 4096)))
    for rank in range(4):
        mine = sorted(n for n, (_, r) in files.items() if r == rank)
        records = [
            FileIndex(files[n][0], rp.FAKE_HASH, tuple(sorted(stored[n], key=lambda e: e.byte_offset))) for n in mine
        ]
        assert got.index_bytes[rank] == len(rank_index_to_json("0123456789ab", rank, 4096, records))
    # and the projected manifest is a real one: it parses, with the file table the files make
    assert got.summary()["load_metadata_max_rank_v3"] > got.manifest_v3 > got.file_table > 0


def _record(c):
    hashes = ("f" * 16,) * max(1, -(-c.byte_length // 4096))
    return ChunkRecord(c.offsets, c.sizes, c.file, c.byte_offset, c.byte_length, hashes)


def test_a_large_rule_is_checked_in_bounded_memory():
    """The trust issue's bounds (test_adversarial_parsers.py): a reader's memory stays within
    20 bytes per input byte; parse_rule builds one small Run per run and nothing per cell."""
    cells = 1 << 15
    runs = [[1, i % 7, 0, 64 * i, 0] for i in range(cells)]
    raw = json.dumps({"grid": [cells, 1], "block": [1, 4], "runs": runs}).encode()
    assert len(raw) > 600_000
    doc = json.loads(raw)
    tracemalloc.start()
    try:
        rule = parse_rule(doc, shape=(cells, 4), files=7, where="big")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rule.runs) == cells
    assert peak < 20 * len(raw)
    doc["runs"][-1][1] = 7  # the last run's file is out of range: found after one linear pass
    with pytest.raises(ManifestError, match=r"big.runs\[32767\]: file positions 7..7 outside the 7 files"):
        parse_rule(doc, shape=(cells, 4), files=7, where="big")
