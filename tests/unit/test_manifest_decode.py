"""The version 1-2 manifest parser decodes "tensors" with msgspec and the other fields with
``json`` (format/manifest_bulk.py, issue #18). Whatever the text, it must give what parsing
the whole document with ``json`` alone and checking every record gives: the same Manifest,
or the same error (type and message). Damage here is at the JSON level (any value replaced,
removed) and at the text level ``json.dumps`` never writes (duplicate keys, a byte-order
mark, lone surrogates, NaN, integers beyond 64 bits and beyond 4,300 digits, a digest in a
format-1 chunk)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import string
import tracemalloc
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardckpt.errors import ManifestError, UnsupportedFormatVersionError
from shardckpt.format import datafile, manifest_parser
from shardckpt.format.manifest import (
    ChunkRecord,
    FileRecord,
    Manifest,
    Share,
    TensorRecord,
    check_manifest_limits,
    manifest_to_json,
    parse_manifest,
)
from shardckpt.format.manifest_bulk import bulk_tensors, top_fields
from shardckpt.format.record_json import parse_document
from tests.support.damage import DELETE, value_paths

FILES = ("data/0123456789ab-r00000-00.safetensors", "data/0123456789ab-r00001-00.safetensors")
BLOCK = 4096


def _chunk(offsets: tuple[int, ...], sizes: tuple[int, ...], file: int, at: int, digest: bool) -> ChunkRecord:
    n = 4
    for s in sizes:
        n *= s
    hashes = tuple(f"{at + i:016x}" for i in range(-(-n // BLOCK)))
    return ChunkRecord(offsets, sizes, FILES[file], at, n, hashes, f"{at:032x}" if digest else None)


def _valid(version: int) -> bytes:
    """A manifest of ``version`` (2: digests on every chunk): a row-split tensor, a 2x2 grid
    (the exact overlap check), a 0-d and an empty tensor, values with an int beyond 64 bits."""
    d = version == 2
    tensors = {
        "w": TensorRecord("F32", (64, 26), (_chunk((0, 0), (40, 26), 0, 0, d), _chunk((40, 0), (24, 26), 1, 0, d))),
        "g": TensorRecord(
            "F32",
            (4, 4),
            tuple(_chunk((r, c), (2, 2), 0, 8192 + 16 * (2 * r + c), d) for r in (0, 2) for c in (0, 2)),
        ),
        "step": TensorRecord("F32", (), (_chunk((), (), 1, 16384, d),)),
        "empty": TensorRecord("F32", (0, 3), (_chunk((0, 0), (0, 3), 1, 0, d),)),
    }
    m = Manifest(
        world_size=2,
        process_layout=({"rank": 0}, {"rank": 1}),
        tensors=tensors,
        values={"epoch": {"int": 123456789012345678901234567890}, "name": "run"},
        files={f: FileRecord(1 << 20, "0" * 16, rank) for rank, f in enumerate(FILES)},
        hash_block_bytes=BLOCK,
        created_at="2026-12-02T00:00:00+00:00",
        shardckpt_version="0.1",
        torch_version="2.13",
        paths={k: ["model", k] for k in (*tensors, "epoch", "name")},
        metadata={"step": 7},
    )
    raw = manifest_to_json(m)
    assert json.loads(raw)["format_version"] == version
    return raw


def _outcome(parse: Any, raw: bytes) -> Any:
    try:
        return parse(raw)
    except (ManifestError, UnsupportedFormatVersionError) as e:
        return (type(e), str(e))


def _json_alone(raw: bytes) -> Any:
    check_manifest_limits(raw, source="src")
    return parse_document(raw, "src", manifest_parser._parse_document)


def _agree(raw: bytes) -> Any:
    got = _outcome(lambda r: parse_manifest(r, source="src"), raw)
    expected = _outcome(_json_alone, raw)
    assert got == expected
    _shares_agree(raw, expected)
    if isinstance(got, Manifest):  # the same records, field for field, in the same order
        assert list(got.tensors) == list(expected.tensors)
        assert [msgspec.structs.astuple(c) for t in got.tensors.values() for c in t.chunks] == [
            msgspec.structs.astuple(c) for t in expected.tensors.values() for c in t.chunks
        ]
        assert {type(c) for t in got.tensors.values() for c in t.chunks} <= {ChunkRecord}
        assert dataclasses.asdict(got) == dataclasses.asdict(expected)
    return got


def _share_outcome(raw: bytes, share: Share) -> Any:
    return _outcome(lambda r: parse_manifest(r, source="src", share=share), raw)


def _shares_agree(raw: bytes, expected: Any) -> None:
    """Parsed in shares (each checks the chunks of its part of the tensors), every share
    gives the full parse's outcome or the Manifest (its damage is in another share); and
    where the full parse fails, some share fails with exactly its error: together the
    shares check what the full parse checks."""
    for parts in (2, 3):
        outcomes = [_share_outcome(raw, Share(k, parts)) for k in range(parts)]
        if isinstance(expected, Manifest):
            assert outcomes == [expected] * parts
        else:
            assert all(o == expected or isinstance(o, Manifest) for o in outcomes), outcomes
            assert expected in outcomes


def test_valid_manifests_of_both_versions_parse_to_the_records_of_the_full_checks() -> None:
    for version in (1, 2):
        raw = _valid(version)
        m = _agree(raw)
        assert isinstance(m, Manifest) and m.format_version == version
        assert m.values["epoch"] == {"int": 123456789012345678901234567890}  # exact, not a float
        assert m.tensors["g"].chunks[3].offsets == (2, 2)
        assert (m.tensors["w"].chunks[1].digest is None) == (version == 1)
        fields = top_fields(raw)
        assert fields is not None and set(fields) >= {"tensors", "files", "values"}
        assert manifest_parser._parse_quick(raw, "src") == m  # taken by the quick path, not the full one


_ODD = st.one_of(
    st.sampled_from(
        [None, True, False, 1.0, -1, 0, 1, 2, 2**62, 2**63, 2**64, 10**30, "", "x", "F32", "I64", "0" * 16, "0" * 32]
    ),
    st.sampled_from([float("nan"), float("inf"), "\ud800", "\x00", "é", FILES[0], FILES[1], "../x"]),
    st.sampled_from([[], [0], [-1], [True], [1.5], ["0" * 16], {}, {"offsets": []}]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), version=st.sampled_from([1, 2]), damage=st.integers(0, 3))
def test_json_damage_gives_what_json_alone_gives(data: Any, version: int, damage: int) -> None:
    doc = json.loads(_valid(version))
    for _ in range(damage):
        where = data.draw(st.sampled_from(value_paths(doc)[1:]))
        parent = doc
        for k in where[:-1]:
            parent = parent[k]
        value = data.draw(st.sampled_from([DELETE, "odd"]))
        if value is DELETE and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent[where[-1]] = copy.deepcopy(data.draw(_ODD))  # never a value shared between examples
    text = json.dumps(doc, ensure_ascii=data.draw(st.booleans()))
    _agree(text.encode("utf-8", "surrogatepass"))  # a lone surrogate unescaped: bytes that are not UTF-8


_TEXT_DAMAGE = [
    # (old, new): a duplicate key (the later one wins in both parsers), valid or not
    ('"dtype":"F32"', '"dtype":"I64", "dtype":"F32"'),
    ('"dtype":"F32"', '"dtype":"F32", "dtype":"BF16"'),
    ('"offsets":[', '"offsets":7, "offsets":['),
    ('"tensors": {', '"tensors": {"w": 1, '),
    ('"format": "shardckpt"', '"tensors": [], "format": "shardckpt"'),
    ('"format": "shardckpt"', '"format": "shardckpt", "format": "other"'),
    # what json.dumps never writes
    ("{", "\ufeff{"),
    ('"offsets":[', '"digest":"' + "0" * 32 + '", "offsets":['),
    ('"offsets":[', '"digest":null, "offsets":['),
    ('"offsets":[', '"note":"\\ud800", "offsets":['),
    ('"file":"', '"file":"\\ud800'),
    ('"values": {', '"values": {"nan": NaN, '),
    ('"values": {', '"values": {"big": 1e400, '),
    ('"values": {', '"values": {"long": ' + "9" * 5000 + ", "),
    ('"byte_offset":0', '"byte_offset":' + "9" * 5000),
    ('"byte_offset":0', '"byte_offset":123456789012345678901234567890'),
    ('"byte_offset":0', '"byte_offset":0.0'),
    ('"byte_offset":0', '"byte_offset":-0'),
    ('"byte_offset":0', '"byte_offset":0e0'),
    ('"shape":[', '"shape":[1E2, '),
    # members a record does not define: msgspec skips them unconverted, json converts them
    ('"offsets":[', '"note":1e400,"offsets":['),
    ('"offsets":[', '"note":' + "9" * 5000 + ',"offsets":['),
    ('"offsets":[', '"note":"\udcff","offsets":['),  # a byte that is not UTF-8 (surrogateescape)
    ('"offsets":[', '"note":{"a:b":[1e400]},"offsets":['),
    ('"format": "shardckpt"', '"format": "shardckpt\udcff"'),
    # a ":" in a tensor's key, written or escaped (with a member of its own to hide)
    ('"w": {', '"w:1": {'),
    ('"w": {', '"w\\u003a1": {"note":1e400,'),
    ('"w": {', '"w\\":": {'),
    ("}\n", "} x"),
    ("}\n", ""),
]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(("old", "new"), _TEXT_DAMAGE, ids=[f"{i}" for i in range(len(_TEXT_DAMAGE))])
def test_text_damage_gives_what_json_alone_gives(version: int, old: str, new: str) -> None:
    raw = _valid(version).decode()
    assert old in raw
    _agree(raw.replace(old, new, 1).encode("utf-8", "surrogateescape"))


def test_a_colon_in_a_tensor_key_keeps_the_quick_path() -> None:
    raw = _valid(1).replace(b'"w": {', b'"model:w": {')
    fields = top_fields(raw)
    assert fields is not None
    m = _agree(raw)
    assert isinstance(m, Manifest) and "model:w" in m.tensors
    assert bulk_tensors(fields["tensors"], m.files, BLOCK, digests=False) is not None
    hidden = raw.replace(b'"model:w": {', b'"model\\u003aw": {"note":1,')  # one ":" less, one member more
    hidden_fields = top_fields(hidden)
    assert hidden_fields is not None and bulk_tensors(hidden_fields["tensors"], m.files, BLOCK, digests=False) is None
    assert _agree(hidden) == m


@pytest.mark.parametrize("key", ["modèle.w", 'a"b:c', "a\\\\:b", "tab\there", "x\\u003ay"])
def test_a_key_json_escapes_keeps_the_quick_path(key: str) -> None:
    """A key with non-ASCII text, a quote, a backslash or a control character is written
    with escapes: the members are then counted outside strings, byte by byte."""
    raw = _valid(2).replace(b'"w": {', json.dumps(key).encode() + b": {")
    assert b"\\" in raw
    m = _agree(raw)
    assert isinstance(m, Manifest) and key in m.tensors
    fields = top_fields(raw)
    assert fields is not None and bulk_tensors(fields["tensors"], m.files, BLOCK, digests=True) is not None
    extra = raw.replace(json.dumps(key).encode() + b": {", json.dumps(key).encode() + b': {"note":"a:b",')
    extra_fields = top_fields(extra)
    assert extra_fields is not None and bulk_tensors(extra_fields["tensors"], m.files, BLOCK, digests=True) is None
    assert _agree(extra) == m


def test_a_digest_in_a_format_1_chunk_is_ignored_as_the_full_checks_ignore_it() -> None:
    raw = _valid(1).decode().replace('"offsets":[', '"digest":"' + "0" * 32 + '","offsets":[', 1)
    m = _agree(raw.encode())
    assert isinstance(m, Manifest) and all(c.digest is None for t in m.tensors.values() for c in t.chunks)


# ---------------------------------------------------------------- the JSON limits on the quick path

_KEY_CHARS = string.ascii_letters + string.digits


def _empty_tensors(n: int, pad: int = 0) -> bytes:
    """A compact format-1 manifest of ``n`` empty tensors (shape [0], no chunk: three JSON
    containers in 46 bytes, denser than the limit of one per 16 bytes once ``n`` is large),
    with ``pad`` spaces after its first brace (which move the limit, not the containers)."""
    doc = json.loads(_valid(1))
    keys = ("".join(k) for k in itertools.product(_KEY_CHARS, repeat=3))
    doc["tensors"] = {k: {"dtype": "F32", "shape": [0], "chunks": []} for k in itertools.islice(keys, n)}
    doc["paths"] = {k: doc["paths"][k] for k in ("epoch", "name")}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return b"{" + b" " * pad + raw[1:]


def test_the_container_limit_holds_exactly_where_the_tensors_are_counted_not_scanned() -> None:
    """The quick path checks the document's container limit with the tensors' containers
    counted from their records (bulk_tensors), the other fields scanned: padded to exactly
    the limit it takes the manifest, one byte short of it both paths refuse it alike."""
    base = _empty_tensors(17_000)
    containers = datafile.json_containers(base, 10**9, depth=0)
    # 3 a tensor, the tensors' object; the document, process_layout (3), values (2), files (3), paths (3), metadata
    assert containers == 3 * 17_000 + 1 + 1 + 3 + 2 + 3 + 3 + 1
    pad = 16 * (containers - datafile.JSON_CONTAINERS_SLACK) - len(base)
    assert pad > 0  # the unpadded text is over the limit
    at_limit = _empty_tensors(17_000, pad)
    assert datafile.max_json_containers(len(at_limit)) == containers
    m = _agree(at_limit)
    assert isinstance(m, Manifest) and len(m.tensors) == 17_000
    assert manifest_parser._parse_quick(at_limit, "src") == m
    over = _empty_tensors(17_000, pad - 1)
    refused = _agree(over)
    assert refused[0] is ManifestError and "arrays and objects" in refused[1]
    assert manifest_parser._parse_quick(over, "src") is None


def _peak(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_text_over_the_limits_costs_the_quick_path_what_the_limits_allow() -> None:
    """Unscanned, the tensors' text is bounded by its types: msgspec builds only records
    from it. Over the container limit, well-typed text costs under 10x its size before it
    is refused (the bound for text refused before parsing, test_adversarial_parsers.py);
    the costliest well-typed text within the limits (2-character block hashes, ~12x in
    msgspec's strings) stays under the 20x bound of text that is parsed."""
    over = _empty_tensors(120_000)
    assert len(over) > 5_000_000
    peak = _peak(lambda: _outcome(lambda r: parse_manifest(r, source="src"), over))
    assert peak < 10 * len(over), f"{peak / len(over):.1f}x"
    doc = json.loads(_valid(1))
    chunk = doc["tensors"]["step"]["chunks"][0]
    chunk["block_hashes"] = ["ab"] * 600_000
    hashes = json.dumps(doc, separators=(",", ":")).encode()
    got = _outcome(lambda r: parse_manifest(r, source="src"), hashes)
    assert got == _outcome(_json_alone, hashes) and got[0] is ManifestError
    peak = _peak(lambda: _outcome(lambda r: parse_manifest(r, source="src"), hashes))
    assert peak < 20 * len(hashes) + (1 << 20), f"{peak / len(hashes):.1f}x"


def test_a_share_leaves_the_chunks_of_the_other_shares_to_their_ranks() -> None:
    """What makes shares worth having: a damaged chunk record outside a share passes that
    share's parse (its rank agrees with the others before using it), and fails its own."""
    raw = _valid(2).decode()
    assert list(json.loads(raw)["tensors"]) == ["empty", "g", "step", "w"]  # w: in the second of two shares
    damaged = raw.replace('"offsets":[40,0]', '"offsets":[41,0]', 1).encode()  # w's second chunk now overlaps the end
    expected = _outcome(_json_alone, damaged)
    assert expected[0] is ManifestError and "tensors['w']" in expected[1]
    assert isinstance(_share_outcome(damaged, Share(0, 2)), Manifest)
    assert _share_outcome(damaged, Share(1, 2)) == expected
    with pytest.raises(ValueError, match="share 2 of 2 does not exist"):
        Share(2, 2).bounds(4)
