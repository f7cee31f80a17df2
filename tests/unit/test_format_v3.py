"""Format 3 (DRAFT, docs/format.md section 12): the compact file table, its pages and index
records (format/file_table.py) and the whole-manifest parser (format/manifest_v3.py).

The golden example, ``tests/unit/golden/manifest_v3_draft.json`` with the records it points
to in ``records_v3_draft.json`` (name -> exact text), is built here from records, so the
chain of checksums is real: manifest -> pages -> index records (the data files' own hashes
are illustrative; there are no data files). If the pin fails, the draft format changed:
update docs/format.md section 12 and the schema, then::

    SHARDCKPT_REGEN_GOLDEN=1 python -m pytest -q tests/unit/test_format_v3.py

The hostile suite changes one thing at a time in the golden manifest, seals it again, and
expects a ManifestError naming the field. Every parser is bounded: a memory test per record.
"""

from __future__ import annotations

import copy
import json
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardckpt.errors import ManifestError, UnsupportedFormatVersionError
from shardckpt.format import integrity, layout, rules
from shardckpt.format.file_table import (
    FileGroup,
    FileTable,
    Page,
    RankEntry,
    page_to_json,
    parse_file_table,
    parse_page,
)
from shardckpt.format.manifest import seal
from shardckpt.format.manifest_v3 import Chunk, InlineIndex, ManifestV3, Tensor, manifest_v3_to_json
from shardckpt.format.manifest_v3_parser import parse_manifest_v3
from shardckpt.format.rank_index import FileIndex, IndexEntry, parse_rank_index, rank_index_to_json

ROOT = Path(__file__).parents[2]
GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN_MANIFEST = GOLDEN_DIR / "manifest_v3_draft.json"
GOLDEN_RECORDS = GOLDEN_DIR / "records_v3_draft.json"
SCHEMA = json.loads((ROOT / "shardckpt" / "format" / "manifest_v3.schema.json").read_text("utf-8"))
REGEN = os.environ.get("SHARDCKPT_REGEN_GOLDEN") == "1"
OWN, BASE, BASE_DIR = "0123456789ab", "fedcba987654", "step_0000000100"
BLOCK = 4096


def fake_hash(text: str) -> str:
    """An illustrative data-file hash (the example has no data files)."""
    return integrity.hash_hex(text.encode())


def build_example() -> dict[str, bytes]:
    """The golden checkpoint's metadata: a 2-rank save reading one file of a base.

    Own data files: rank 0 and rank 1 wrote one each; the base's rank 0 wrote one, its rank
    1 none. ``model.weight`` is FSDP Shard(0) (a rule over both ranks), ``model.bias``
    replicated (one cell), ``model.short`` has 1 row over 2 ranks (rank 1's empty box listed
    beside the rule), ``model.emb`` an irregular split (listed), ``model.empty`` no element,
    ``model.frozen`` lives in the base, ``optim.step`` is 0-d. The manifest carries the
    inline copy of rank 0's file's index (12.8).
    """
    own_files = [
        FileIndex(
            232,
            fake_hash("r0"),
            (
                IndexEntry(128, 64, fake_hash("w0")),
                IndexEntry(192, 16, fake_hash("b")),
                IndexEntry(208, 16, fake_hash("s")),
                IndexEntry(224, 4, fake_hash("e0")),
                IndexEntry(228, 4, fake_hash("t")),
            ),
        ),
        FileIndex(200, fake_hash("r1"), (IndexEntry(120, 64, fake_hash("w1")), IndexEntry(184, 16, fake_hash("e1")))),
    ]
    base_file = FileIndex(144, fake_hash("base"), (IndexEntry(128, 16, fake_hash("f"), integrity.digest_hex(b"f")),))
    records: dict[str, bytes] = {
        layout.rank_index_name(OWN, 0): rank_index_to_json(OWN, 0, BLOCK, own_files[:1]),
        layout.rank_index_name(OWN, 1): rank_index_to_json(OWN, 1, BLOCK, own_files[1:]),
        f"{BASE_DIR}/{layout.rank_index_name(BASE, 0)}": rank_index_to_json(BASE, 0, BLOCK, [base_file]),
        f"{BASE_DIR}/{layout.rank_index_name(BASE, 1)}": rank_index_to_json(BASE, 1, BLOCK, []),
    }

    def page(save_id: str, folder: str, hosts: list[str]) -> Page:
        index = [records[folder + layout.rank_index_name(save_id, r)] for r in range(len(hosts))]
        entries = [
            RankEntry(len(raw), integrity.hash_hex(raw), host, r)
            for r, (raw, host) in enumerate(zip(index, hosts, strict=True))
        ]
        raw = page_to_json(save_id, 0, entries)
        records[folder + layout.rank_page_name(save_id, 0)] = raw
        return Page(len(raw), integrity.hash_hex(raw))

    own = FileGroup(OWN, None, 2, ((2, 1),), 1024, (page(OWN, "", ["node0", "node0"]),))
    base = FileGroup(BASE, BASE_DIR, 2, ((1, 1), (1, 0)), 1024, (page(BASE, BASE_DIR + "/", ["node0", "node1"]),))
    table = FileTable((own, base))

    def rule(shape: tuple[int, ...], chunks: list[rules.Chunk]) -> rules.Rule:
        r, rest = rules.compress(shape, chunks)
        assert r is not None and rest == ()
        return r

    tensors = {
        "model.weight": Tensor(
            "F32", (8, 4), rule((8, 4), [rules.Chunk((0, 0), (4, 4), 0, 128), rules.Chunk((4, 0), (4, 4), 1, 120)]), ()
        ),
        "model.bias": Tensor("F32", (4,), rule((4,), [rules.Chunk((0,), (4,), 0, 192)]), ()),
        "model.short": Tensor(
            "F32", (1, 4), rule((1, 4), [rules.Chunk((0, 0), (1, 4), 0, 208)]), (Chunk((1, 0), (0, 4), 1, 184, 0),)
        ),
        "model.emb": Tensor("F16", (5, 2), None, (Chunk((0, 0), (1, 2), 0, 224, 4), Chunk((1, 0), (4, 2), 1, 184, 16))),
        "model.empty": Tensor("BF16", (0, 3), None, ()),
        "model.frozen": Tensor("F32", (4,), rule((4,), [rules.Chunk((0,), (4,), 2, 128)]), ()),
        "optim.step": Tensor("F32", (), rule((), [rules.Chunk((), (), 0, 228)]), ()),
    }
    keys = [*tensors, "optim.lr", "step"]
    m = ManifestV3(
        world_size=2,
        hash_block_bytes=BLOCK,
        bases=(BASE_DIR,),
        file_table=table,
        tensors=tensors,
        values={"optim.lr": 0.001, "step": {"$tuple": [100, {"$float": "inf"}]}},
        paths={k: k.split(".") for k in keys},
        created_at="2026-11-30T20:00:00+00:00",
        shardckpt_version="0.4.0",
        torch_version="2.13.0",
        metadata={"draft": True},
        inline_index=InlineIndex(0, own_files[0]),  # rank 0's file, as 12.8 allows (a save: its last)
    )
    return {layout.MANIFEST_NAME: manifest_v3_to_json(m), **records}


def golden() -> dict[str, bytes]:
    built = build_example()
    records = {k: v.decode() for k, v in built.items() if k != layout.MANIFEST_NAME}
    text = json.dumps(records, indent=1, sort_keys=True) + "\n"
    if REGEN:
        GOLDEN_MANIFEST.write_bytes(built[layout.MANIFEST_NAME])
        GOLDEN_RECORDS.write_text(text, "utf-8")
    return built


# ---------------------------------------------------------------- the golden example


def test_the_golden_example_is_pinned_and_accepted_by_schema_and_parser():
    built = golden()
    assert GOLDEN_MANIFEST.read_bytes() == built[layout.MANIFEST_NAME], "format 3 changed: see the docstring"
    records = json.loads(GOLDEN_RECORDS.read_text("utf-8"))
    assert {k: v.encode() for k, v in records.items()} == {k: v for k, v in built.items() if k != layout.MANIFEST_NAME}
    raw = GOLDEN_MANIFEST.read_bytes()
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.validate(json.loads(raw), SCHEMA)
    m = parse_manifest_v3(raw, source="golden")
    assert m.file_table.total_files == 3 and m.bases == (BASE_DIR,)
    assert {k for k, t in m.tensors.items() if t.rule is None} == {"model.emb", "model.empty"}
    own0 = json.loads(records[layout.rank_index_name(OWN, 0)])["files"][0]
    assert m.inline_index is not None and m.inline_index.file == 0
    assert json.loads(raw)["inline_index"] == {"file": 0, **own0}  # the copy equals rank 0's record
    for name, text in records.items():
        kind = "page_record" if name.endswith(".ranks.json") else "index_record"
        jsonschema.validate(json.loads(text), {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{kind}"})


def test_a_reader_walks_the_checksum_chain_to_its_own_files_only():
    """Rows 2-5 of model.weight: two cells in files 0 and 1; the reader fetches page 0 of the
    own group and the index records of ranks 0 and 1, each verified by the one before."""
    built = golden()
    m = parse_manifest_v3(built[layout.MANIFEST_NAME], source="golden")
    cells = m.tensors["model.weight"].chunks_for_box((2, 0), (4, 4))
    assert [(c.offsets, c.file, c.byte_offset, c.byte_length) for c in cells] == [
        ((0, 0), 0, 128, 64),
        ((4, 0), 1, 120, 64),
    ]
    for c in cells:
        ref = m.file_table.locate(c.file)
        group = m.file_table.groups[ref.group]
        entries = parse_page(built[ref.page_name], group=group, page=ref.page, source=ref.page_name)
        index = parse_rank_index(
            built[ref.index_name],
            entry=entries[ref.rank - ref.page * group.ranks_per_page],
            group=group,
            rank=ref.rank,
            block_bytes=m.hash_block_bytes,
            source=ref.index_name,
        )
        assert ref.name == layout.data_file_name(OWN, c.file, 0)
        entry = index[ref.number].entry(c.byte_offset, c.byte_length, where=ref.name)
        assert entry.block_hash(0) == fake_hash(f"w{c.file}")
    frozen = m.tensors["model.frozen"].chunks_for_box((0,), (4,))
    ref = m.file_table.locate(frozen[0].file)
    assert (ref.checkpoint, ref.rank, ref.name) == (BASE_DIR, 0, layout.data_file_name(BASE, 0, 0))
    # the irregular tensor answers from its listed chunks; an empty box needs nothing
    assert [c.offsets for c in m.tensors["model.emb"].chunks_for_box((0, 1), (2, 1))] == [(0, 0), (1, 0)]
    assert m.tensors["model.weight"].chunks_for_box((0, 0), (0, 4)) == []


def test_a_tampered_page_or_index_record_is_refused_before_it_is_parsed():
    built = golden()
    m = parse_manifest_v3(built[layout.MANIFEST_NAME], source="golden")
    group = m.file_table.groups[0]
    name = layout.rank_page_name(OWN, 0)
    flipped = built[name].replace(b"node0", b"node9", 1)
    with pytest.raises(ManifestError, match="checksum mismatch of the page of the rank table"):
        parse_page(flipped, group=group, page=0, source=name)
    with pytest.raises(ManifestError, match="has 10 bytes, the record that points to it says"):
        parse_page(built[name][:10], group=group, page=0, source=name)
    entries = parse_page(built[name], group=group, page=0, source=name)
    index = built[layout.rank_index_name(OWN, 0)]
    with pytest.raises(ManifestError, match="checksum mismatch of the index record"):
        parse_rank_index(
            index.replace(b"232", b"233", 1), entry=entries[0], group=group, rank=0, block_bytes=BLOCK, source="r0"
        )
    with pytest.raises(ManifestError, match="field rank is 0, expected 1"):  # rank 0's record offered as rank 1's
        parse_rank_index(index, entry=entries[0], group=group, rank=1, block_bytes=BLOCK, source="r1")
    files = parse_rank_index(index, entry=entries[0], group=group, rank=0, block_bytes=BLOCK, source="r0")
    with pytest.raises(ManifestError, match="no chunk at byte 130"):
        files[0].entry(130, 64, where="r0")
    with pytest.raises(ManifestError, match="has 64 bytes in the index record, 60 by the manifest"):
        files[0].entry(128, 60, where="r0")
    # find: the same lookup without a message, None where entry refuses
    assert files[0].find(130, 64) is None and files[0].find(128, 60) is None
    for e in files[0].entries:
        assert (
            files[0].find(e.byte_offset, e.byte_length) is e is files[0].entry(e.byte_offset, e.byte_length, where="")
        )
        blocks = len(e.block_hashes) // 16
        assert e.hashes() == tuple(e.block_hash(i) for i in range(blocks)) and "".join(e.hashes()) == e.block_hashes
    assert IndexEntry(0, 3 * BLOCK, "0123456789abcdef" * 2 + "f" * 16).hashes() == ("0123456789abcdef",) * 2 + (
        "f" * 16,
    )


def test_the_spec_examples_are_the_draft_records():
    """docs/format.md 12's examples: the rule, a page, an index record, the manifest; the
    last three follow the schema, and the manifest parses."""
    text = (ROOT / "docs" / "format.md").read_text("utf-8").split("## 12. Format 3", 1)[1]
    blocks = [b.split("```", 1)[0] for b in text.split("```json\n")[1:]]
    rule, page, index, manifest = blocks
    assert "rule" in json.loads("{" + rule + "}")["model.layers.0.attn.q.weight"]
    for doc, kind in ((page, "page_record"), (index, "index_record")):
        jsonschema.validate(json.loads(doc), {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{kind}"})
    jsonschema.validate(json.loads(manifest), SCHEMA)
    m = parse_manifest_v3(manifest.encode(), source="format.md 12.6")
    assert m.file_table.total_files == 2 and m.tensors["model.weight"].rule is not None
    index_doc, page_doc = json.loads(index), json.loads(page)
    assert index_doc["rank"] == 0 and len(page_doc["ranks"]) == 2


# ---------------------------------------------------------------- the file table


@st.composite
def groups(draw: st.DrawFn) -> FileTable:
    out = []
    for g in range(draw(st.integers(1, 3))):
        runs = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 4)), min_size=1, max_size=5))
        ranks = sum(n for n, _ in runs)
        per_page = draw(st.integers(1, 8))
        pages = (Page(10, "0" * 16),) * -(-ranks // per_page)
        out.append(FileGroup("ab", None if g == 0 else f"b{g}", ranks, tuple(runs), per_page, pages))
    return FileTable(tuple(out))


@settings(max_examples=200, deadline=None, database=None)
@given(groups())
def test_positions_enumerate_every_file_once_in_group_rank_number_order(table):
    expected = [
        (g, r, k)
        for g, group in enumerate(table.groups)
        for r in range(group.ranks)
        for k in range(group.rank_files(r)[1])
    ]
    assert table.total_files == len(expected)
    got = [table.locate(p) for p in range(table.total_files)]
    assert [(f.group, f.rank, f.number) for f in got] == expected
    assert all(table.position(g, r, k) == p for p, (g, r, k) in enumerate(expected))
    assert all(f.page == f.rank // table.groups[f.group].ranks_per_page for f in got)
    with pytest.raises(ValueError, match="outside the table"):
        table.locate(table.total_files)


def test_the_file_table_of_16384_ranks_is_a_few_hundred_bytes():
    pages = [[40000, "0" * 16]] * 16
    doc = {
        "groups": [
            {"save_id": OWN, "ranks": 16384, "files": [[8000, 4], [8384, 3]], "ranks_per_page": 1024, "pages": pages}
        ]
    }
    table = parse_file_table(doc, bases=[], world_size=16384, where="t")
    assert table.total_files == 8000 * 4 + 8384 * 3
    assert len(json.dumps(doc, separators=(",", ":"))) < 600
    last = table.locate(table.total_files - 1)
    assert (last.rank, last.number, last.page, last.page_name) == (16383, 2, 15, f"data/{OWN}-p00015.ranks.json")
    assert last.index_name == f"data/{OWN}-r16383.index.json"


# ---------------------------------------------------------------- hostile manifests

Change = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Change:
    def change(doc: dict[str, Any]) -> None:
        *head, last = path.split("/")
        target: Any = doc
        for p in head:
            target = target[int(p)] if isinstance(target, list) else target[p]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return change


def _resealed(doc: dict[str, Any]) -> bytes:
    return seal(json.dumps(doc, separators=(",", ":")).encode())


W = "tensors/model.weight"
G0, G1 = "file_table/groups/0", "file_table/groups/1"
CASES: list[tuple[str, Change, str]] = [
    ("unsorted bases", _set("bases", ["z", "a"]), "bases must be sorted"),
    ("'..' as a base", _set("bases", [".."]), r"bases entry '\.\.' is not a folder name"),
    ("'..' as a group's folder", _set(f"{G1}/checkpoint", ".."), r"checkpoint: expected a folder name"),
    ("a group for no base", _set(f"{G1}/checkpoint", "step_0000000099"), "one group per base in the order of bases"),
    ("own group not first", lambda d: d["file_table"]["groups"].reverse(), "one group per base"),
    ("own group of another world", _set("world_size", 3), r"own save's group has 2 ranks, world_size is 3"),
    ("runs short of the ranks", _set(f"{G0}/files", [[1, 1]]), "the runs cover 1 ranks, the group has 2"),
    ("a run past the ranks", _set(f"{G0}/files", [[3, 1]]), r"files\[0\]\[0\]: expected an integer in \[1, 2\]"),
    ("files per rank out of bounds", _set(f"{G0}/files", [[2, 1 << 40]]), r"files\[0\]\[1\]"),
    ("huge rank count", _set(f"{G0}/ranks", 1 << 70), r"ranks: expected an integer in \[1, 16777216\]"),
    ("pages for other ranks", _set(f"{G0}/ranks_per_page", 1), r"expected 2 pages \(2 ranks, 1 per page\)"),
    ("no ranks per page", _set(f"{G0}/ranks_per_page", 0), r"ranks_per_page: expected an integer in \[1, 65536\]"),
    ("a page hash", _set(f"{G0}/pages/0/1", "XYZ"), r"pages\[0\]: expected \[size, xxh3-64"),
    ("grid vs shape", _set(f"{W}/rule/grid", [3, 1]), r"grid\[0\] = 3, but shape 8 in blocks of 4 makes 2 pieces"),
    ("a rule past the files", _set(f"{W}/rule/runs", [[2, 2, 1, 128, 0]]), r"file positions 2..3 outside the 3 files"),
    ("a rule count out of bounds", _set(f"{W}/rule/runs", [[3, 0, 1, 128, 0]]), r"count 3 must be in \[1, 2\]"),
    (
        "a box beside a rule",
        _set(f"{W}/chunks", [{"offsets": [0, 0], "sizes": [1, 4], "file": 0, "byte_offset": 0, "byte_length": 16}]),
        "a tensor with a rule lists only empty chunks",
    ),
    (
        "overlapping listed chunks",
        _set("tensors/model.emb/chunks/1/offsets", [0, 0]),
        r"cover 10 elements|overlap",
    ),
    (
        "listed chunks that do not cover",
        lambda d: d["tensors"]["model.emb"]["chunks"][1].update(sizes=[3, 2], byte_length=12),
        "cover 8 elements of the tensor's 10",
    ),
    (
        "a chunk past the files",
        _set("tensors/model.emb/chunks/0/file", 3),
        r"file: expected a file position in \[0, 3\)",
    ),
    ("a chunk file as bool", _set("tensors/model.emb/chunks/0/file", True), "expected a file position"),
    ("a chunk length", _set("tensors/model.emb/chunks/0/byte_length", 8), "byte_length: expected 4"),
    ("a huge byte offset", _set("tensors/model.emb/chunks/0/byte_offset", 1 << 62), "byte_offset: expected an integer"),
    ("a v2 chunk", _set("tensors/model.emb/chunks/0/block_hashes", []), "expected an object with exactly"),
    ("a box outside the shape", _set("tensors/model.emb/chunks/0/offsets", [5, 0]), "lies outside shape"),
    ("a huge world", _set("world_size", 1 << 62), r"world_size must be an integer in \[1, 2\*\*62\)"),
    ("a tensor and a value", _set("values/model.bias", 1), r"keys \['model.bias'\] are both tensors and values"),
    ("an unknown tag", _set("values/step", {"$set": [1]}), r"\$set"),
    ("a missing file table", lambda d: d.pop("file_table"), r"missing fields \['file_table'\]"),
    ("a v2 file list", _set("file_table", {"data/x.safetensors": {}}), "exactly the field groups"),
    ("an unknown dtype", _set(f"{W}/dtype", "F128"), "unknown dtype 'F128'"),
    ("an inline copy of a base's file", _set("inline_index/file", 2), r"inline_index.file: expected the position"),
    ("an inline copy of no file", _set("inline_index/file", -1), r"inline_index.file: expected the position"),
    ("an inline copy as a list", _set("inline_index", [0]), "inline_index: expected an object with file"),
    ("an inline copy's extra field", _set("inline_index/rank", 0), "inline_index: expected an object with exactly"),
    (
        "an inline copy with more entries than tensors",
        _set("inline_index/entries", [[8 * i, 4, "0" * 16] for i in range(8)]),
        "8 entries, more than the manifest's 7 tensors",
    ),
    (
        "inline entries out of order",
        _set("inline_index/entries", [[192, 16, "0" * 16], [128, 64, "0" * 16]]),
        r"inline_index.entries\[1\]\[0\]: expected an integer in \[208,",
    ),
    ("inline block hashes short", _set("inline_index/entries/0/2", ""), r"entries\[0\]\[2\]: expected 1 block hashes"),
    ("an inline digest", _set("inline_index/entries/0", [128, 64, "0" * 16, "0" * 32]), r"entries\[0\]: expected \["),
]


@pytest.mark.parametrize(("what", "change", "message"), CASES, ids=[c[0] for c in CASES])
def test_hostile_manifests_are_refused_naming_the_field(what, change, message):
    raw = golden()[layout.MANIFEST_NAME]
    parse_manifest_v3(_resealed(json.loads(raw)), source="resealed")  # the unchanged document parses
    doc = copy.deepcopy(json.loads(raw))
    change(doc)
    with pytest.raises(ManifestError, match=message):
        parse_manifest_v3(_resealed(doc), source="hostile")


def test_versions_seals_and_constants():
    raw = golden()[layout.MANIFEST_NAME]
    for version in (2, 4, True, "3"):
        doc = json.loads(raw)
        doc["format_version"] = version
        with pytest.raises(UnsupportedFormatVersionError, match="reads the format-3 draft only"):
            parse_manifest_v3(_resealed(doc), source="v")
    with pytest.raises(ManifestError, match="checksum mismatch"):
        parse_manifest_v3(raw.replace(b'"step"', b'"stop"', 1), source="edited")
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest_v3(seal(raw.replace(b"0.001", b"1e999", 1)[: raw.rfind(b',\n "manifest_hash"')]), source="x")


def _index_doc(entries: list[Any], size: int = 1000, digests: bool = False) -> bytes:
    doc = {
        "format": "shardckpt-index",
        "format_version": 3,
        "save_id": OWN,
        "rank": 0,
        "hash_block_bytes": BLOCK,
        "digests": digests,
        "files": [{"size": size, "hash": "0" * 16, "entries": entries}],
    }
    return json.dumps(doc).encode()


ONE_GROUP = FileGroup(OWN, None, 1, ((1, 1),), 1024, (Page(1, "0" * 16),))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([[100, 10, "a" * 16], [50, 10, "b" * 16]], r"entries\[1\]\[0\]: expected an integer in \[110, 1000\]"),
        ([[100, 10, "a" * 16], [105, 10, "b" * 16]], r"entries\[1\]\[0\]"),
        ([[995, 10, "a" * 16]], r"entries\[0\]\[1\]: expected an integer in \[0, 5\]"),
        ([[0, 500, ""]], "expected 1 block hashes"),
        ([[0, 10, "A" * 16]], "expected 1 block hashes"),
        ([[0, 10]], r"expected \[byte_offset, byte_length, block_hashes\]"),
    ],
)
def test_hostile_index_records_are_refused(entries, message):
    raw = _index_doc(entries, size=1000)
    entry = RankEntry(len(raw), integrity.hash_hex(raw), "h", 0)
    with pytest.raises(ManifestError, match=message):
        parse_rank_index(raw, entry=entry, group=ONE_GROUP, rank=0, block_bytes=BLOCK, source="idx")


def test_an_index_record_with_digests_needs_one_per_entry():
    raw = _index_doc([[0, 10, "a" * 16]], digests=True)
    entry = RankEntry(len(raw), integrity.hash_hex(raw), "h", 0)
    with pytest.raises(ManifestError, match=r"expected \[byte_offset, byte_length, block_hashes, digest\]"):
        parse_rank_index(raw, entry=entry, group=ONE_GROUP, rank=0, block_bytes=BLOCK, source="idx")


# ---------------------------------------------------------------- bounded on large input


def _peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


PARSED_MEMORY_FACTOR, MEMORY_SLACK = 20, 1 << 20  # test_adversarial_parsers.py's bounds


def test_a_large_manifest_and_records_parse_in_bounded_memory():
    """Thousands of ruled tensors, a 16384-rank page, and a rank index of 5000 entries: each
    parser stays within 20 bytes per input byte (plus 1 MiB), the project's bound."""
    base = json.loads(golden()[layout.MANIFEST_NAME])
    rule = base["tensors"]["model.weight"]
    # keys as long as a real model's: rule records are dense in JSON containers (7 per tensor), and
    # the container limit of format.md 8.13 (one per 16 bytes) needs the ~40-byte keys they come with
    base["tensors"] = {f"model.layers.{i:05d}.attention.wq.weight": rule for i in range(5000)}
    base["paths"] = {}
    raw = _resealed(base)
    assert len(raw) > 500_000
    m, peak = _peak(lambda: parse_manifest_v3(raw, source="big"))
    assert len(m.tensors) == 5000 and peak < PARSED_MEMORY_FACTOR * len(raw) + MEMORY_SLACK

    ranks = 16384
    entries = [RankEntry(100 + r, "0123456789abcdef", f"node{r // 8:05d}", r % 8) for r in range(ranks)]
    page = page_to_json(OWN, 0, entries)
    group = FileGroup(OWN, None, ranks, ((ranks, 4),), ranks, (Page(len(page), integrity.hash_hex(page)),))
    got, peak = _peak(lambda: parse_page(page, group=group, page=0, source="page"))
    assert got[-1] == entries[-1] and peak < PARSED_MEMORY_FACTOR * len(page) + MEMORY_SLACK

    index = rank_index_to_json(
        OWN, 0, BLOCK, [FileIndex(10**9, "0" * 16, tuple(IndexEntry(64 * i, 64, "1" * 16) for i in range(5000)))]
    )
    one = FileGroup(OWN, None, 1, ((1, 1),), 1, (Page(1, "0" * 16),))
    entry = RankEntry(len(index), integrity.hash_hex(index), "h", 0)
    files, peak = _peak(lambda: parse_rank_index(index, entry=entry, group=one, rank=0, block_bytes=BLOCK, source="i"))
    assert files[0].entry(64 * 4999, 64, where="i").byte_offset == 64 * 4999
    assert peak < PARSED_MEMORY_FACTOR * len(index) + MEMORY_SLACK


def test_refused_huge_counts_allocate_nothing_per_rank():
    """A group claiming 2**24 ranks and 4096 files each is ~100 bytes: parsing it builds
    nothing per rank or per file, and locating the last file is a binary search."""
    doc = {"groups": [{"save_id": OWN, "ranks": 1 << 24, "files": [[1 << 24, 4096]], "ranks_per_page": 1 << 16}]}
    doc["groups"][0]["pages"] = [[1, "0" * 16]] * 256
    table, peak = _peak(lambda: parse_file_table(doc, bases=[], world_size=1 << 24, where="t"))
    assert table.total_files == 1 << 36 and peak < MEMORY_SLACK
    assert table.locate((1 << 36) - 1).rank == (1 << 24) - 1


# ---------------------------------------------------------------- the inline index (12.8)


def test_the_inline_index_is_optional_and_round_trips():
    """A manifest without the copy (every format-3 checkpoint written before 12.8) parses with
    none; with it, parse -> write gives the same bytes."""
    raw = golden()[layout.MANIFEST_NAME]
    m = parse_manifest_v3(raw, source="golden")
    assert manifest_v3_to_json(m) == raw
    doc = json.loads(raw)
    del doc["inline_index"]
    old = parse_manifest_v3(_resealed(doc), source="old")
    assert old.inline_index is None and m.inline_index is not None
    assert m.inline_index.index.entries[1] == IndexEntry(192, 16, fake_hash("b"))
    assert b"inline_index" not in manifest_v3_to_json(old)


def test_a_huge_or_deep_inline_index_is_refused_by_the_manifest_limits():
    raw = golden()[layout.MANIFEST_NAME]
    deep = json.loads(raw)
    nested: Any = []
    for _ in range(300):
        nested = [nested]
    deep["inline_index"]["entries"] = [nested]
    with pytest.raises(ManifestError, match="nest"):
        parse_manifest_v3(_resealed(deep), source="deep")
    dense = json.loads(raw)
    dense["inline_index"]["entries"] = [[]] * 200_000  # one container per 3 bytes
    with pytest.raises(ManifestError, match="JSON arrays and objects"):
        parse_manifest_v3(_resealed(dense), source="dense")
