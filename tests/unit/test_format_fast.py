"""manifest_to_json's preformatted tensor lines and build_header's template (issue #18) are byte for byte json.dumps.

The oracle below is the writer as it was before the fast path: every tensor line from
``json.dumps`` of its plain document. Random manifests (hypothesis) cover odd keys and
strings (unicode, lone surrogates, quotes, backslashes, control characters), huge and
negative ints, scalars, empty tensors and tensors without chunks, formats 1 and 2.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from manifest_oracle import two_levels

from shardckpt.errors import ManifestError
from shardckpt.format import datafile
from shardckpt.format.manifest import ChunkRecord, FileRecord, Manifest, TensorRecord, manifest_to_json
from shardckpt.format.manifest_text import ChunkFields, PlanText, json_encoder


def _oracle(m: Manifest) -> bytes:
    """The manifest's bytes from json.dumps alone: one line per field and per map entry."""
    v2 = m.is_v2
    tensors = {
        k: {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "chunks": [
                {
                    "offsets": list(c.offsets),
                    "sizes": list(c.sizes),
                    "file": c.file,
                    "byte_offset": c.byte_offset,
                    "byte_length": c.byte_length,
                    "block_hashes": list(c.block_hashes),
                    **({"digest": c.digest} if v2 else {}),
                }
                for c in t.chunks
            ],
        }
        for k, t in sorted(m.tensors.items())
    }
    files = {n: {"size": f.size, "hash": f.hash, "rank": f.rank} for n, f in sorted(m.files.items())}
    doc = {
        "format": "shardckpt",
        **m.provenance(),
        "format_version": 2 if v2 else 1,
        "hash_algorithm": "xxh3_64",
        "hash_block_bytes": m.hash_block_bytes,
        **({"bases": sorted(m.bases)} if v2 else {}),
        "tensors": tensors,
        "values": dict(sorted(m.values.items())),
        "files": files,
        "paths": dict(sorted(m.paths.items())),
        "metadata": m.metadata,
    }
    return two_levels(doc)


_ODD = ['a"b', "back\\slash", "ctl\x00\x1f\x7f", "tab\tnl\n", "é中🙂", "\ud800lone", "</script>", ""]
_text = st.one_of(st.sampled_from(_ODD), st.text(max_size=12))
_int = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 2**63 - 1, 2**64, -1]))


@st.composite
def _chunk(draw: st.DrawFn, *, v2: bool) -> ChunkRecord:
    ndim = draw(st.integers(min_value=0, max_value=3))
    return ChunkRecord(
        tuple(draw(st.lists(_int, min_size=ndim, max_size=ndim))),
        tuple(draw(st.lists(_int, min_size=ndim, max_size=ndim))),
        draw(_text),
        draw(_int),
        draw(_int),
        tuple(draw(st.lists(_text, max_size=3))),
        draw(_text) if v2 else None,
    )


@st.composite
def _manifests(draw: st.DrawFn) -> Manifest:
    v2 = draw(st.booleans())
    tensor = st.builds(
        TensorRecord,
        _text,
        st.lists(_int, max_size=3).map(tuple),
        st.lists(_chunk(v2=v2), max_size=4).map(tuple),
    )
    return Manifest(
        world_size=2,
        process_layout=({"rank": 0, "host": draw(_text)},),
        tensors=draw(st.dictionaries(_text, tensor, max_size=5)),
        values=draw(st.dictionaries(_text, st.one_of(_int, _text), max_size=2)),
        files={"data/f.safetensors": FileRecord(10, "00ff", 0)},
        hash_block_bytes=1 << 22,
        created_at="2026-12-01T00:00:00+00:00",
        shardckpt_version="0",
        torch_version="2",
        paths=draw(st.dictionaries(_text, st.lists(st.one_of(_text, _int), max_size=2), max_size=2)),
        metadata=draw(st.dictionaries(_text, _text, max_size=2)),
        format_version=2 if v2 else 1,
    )


_EMPTY = Manifest(2, (), {}, {}, {}, 1 << 22, "2026-12-01T00:00:00+00:00", "0", "2")


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_manifests())
@example(_EMPTY)
@example(
    dataclasses.replace(_EMPTY, tensors={"scalar": TensorRecord("F32", (), (ChunkRecord((), (), "f", 0, 4, ("h",)),))})
)
@example(dataclasses.replace(_EMPTY, tensors={"empty": TensorRecord("F32", (0, 3), ())}))
def test_the_fast_tensor_lines_are_what_json_dumps_writes(m: Manifest) -> None:
    assert _templated(m), "well-typed records take the fast path"
    assert manifest_to_json(m) == _oracle(m)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_manifests())
@example(_EMPTY)
@example(dataclasses.replace(_EMPTY, tensors={"empty": TensorRecord("F32", (0, 3), ())}))
def test_the_written_manifests_container_limit_is_counted_as_the_scan_counts(m: Manifest) -> None:
    """Writing, the tensors' entries of the template are counted (3 containers a tensor,
    4 a chunk), not scanned: the verdict at the limit and one under it is the scan's, and a
    refusal is the scan's own message."""
    raw = manifest_to_json(m)
    scanned = datafile.json_containers(raw, 2**62, depth=0)
    assert scanned is not None
    with pytest.MonkeyPatch.context() as mp:
        slack = scanned - len(raw) // datafile.JSON_BYTES_PER_CONTAINER  # the limit: exactly what it holds
        mp.setattr(datafile, "JSON_CONTAINERS_SLACK", slack)
        full: list[int] = []
        real = datafile.json_limits_problem
        mp.setattr(datafile, "json_limits_problem", lambda raw, **kw: full.append(len(raw)) or real(raw, **kw))
        assert manifest_to_json(m) == raw
        assert full == ([] if _templated(m) else [len(raw)])  # the template's entries are not scanned
        mp.setattr(datafile, "JSON_CONTAINERS_SLACK", slack - 1)
        refused = r"more than \d+ JSON arrays and objects.*Readers refuse such manifests"
        with pytest.raises(ManifestError, match=refused):
            manifest_to_json(m)


def _templated(m: Manifest) -> bool:
    """Whether manifest_to_json writes the tensors of ``m`` through its template (both
    halves accept the records' types) rather than json.dumps."""
    tensors = sorted(m.tensors.items())
    chunks = [c for _, t in tensors for c in t.chunks]
    text = PlanText.of(
        [k for k, _ in tensors],
        [t.dtype for _, t in tensors],
        [t.shape for _, t in tensors],
        [len(t.chunks) for _, t in tensors],
        [c.offsets for c in chunks],
        [c.sizes for c in chunks],
        sorted(m.paths.items()),
        json_encoder(),
    )
    fields = ChunkFields(
        [c.file for c in chunks],
        [c.byte_offset for c in chunks],
        [c.byte_length for c in chunks],
        [c.block_hashes for c in chunks],
    )
    digests = [c.digest for c in chunks] if m.is_v2 else None
    return text is not None and text.tensors(fields, digests) is not None  # type: ignore[arg-type]


def _one_chunk(**fields: Any) -> Manifest:
    chunk = ChunkRecord((0, 8), (8, 8), "data/f.safetensors", 0, 256, ("00ff",))
    chunk = chunk.replace(**fields)
    return dataclasses.replace(_EMPTY, tensors={"t": TensorRecord("F32", (8, 16), (chunk,))})


class _Name(str):
    pass


def test_records_of_other_types_are_written_by_json_dumps() -> None:
    """A bool is 1 to ``%d`` but true to JSON, a float would be cut to an int: such records
    leave the fast path, so the bytes stay json.dumps's whatever the records hold."""
    for odd in (
        _one_chunk(offsets=(True, 0)),
        _one_chunk(byte_length=256.5),
        _one_chunk(file=_Name("data/f.safetensors")),
        _one_chunk(block_hashes=(7,)),
    ):
        assert not _templated(odd), odd.tensors
        assert manifest_to_json(odd) == _oracle(odd)
    assert b'"offsets":[true,0]' in manifest_to_json(_one_chunk(offsets=(True, 0)))


def test_a_huge_int_is_refused_as_json_dumps_refuses_it() -> None:
    """Python writes no int of over 4,300 digits by default; neither path writes one."""
    huge = _one_chunk(byte_offset=10**5000)
    for write in (manifest_to_json, _oracle):
        try:
            write(huge)
        except ValueError as e:
            assert "digits" in str(e)
        else:
            raise AssertionError(f"{write.__name__} wrote a 5,000-digit int")


def _header_oracle(entries: list[datafile.HeaderEntry], metadata: dict[str, str]) -> bytes:
    """A data file's header as json.dumps of one dict writes it (the writer before #18's template)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-(len(raw) + 8)) % 8)
    return len(raw).to_bytes(8, "little") + raw


_names = st.one_of(st.sampled_from(["w", "w@0,4", "__metadata__", 'q"x', "b\\s", "é", "\x7f", "\x00"]), st.text())
_entries = st.lists(
    st.builds(
        datafile.HeaderEntry,
        _names,
        st.sampled_from(["F32", "BF16", "I64", 'F"8']),
        st.lists(st.integers(0, 2**40), max_size=4).map(tuple),
        st.integers(0, 2**62),
        st.integers(0, 2**62),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(_entries, st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
@example([datafile.HeaderEntry("a", "F32", (2,), 0, 8), datafile.HeaderEntry("a", "F32", (2,), 8, 16)], {})
def test_a_data_file_header_is_json_dumps(entries: list[datafile.HeaderEntry], meta: dict[str, str]) -> None:
    """build_header formats plain names from a template; every header, odd names (quotes,
    backslashes, unicode, control characters, repeats, ``__metadata__``) included, is
    byte for byte the json.dumps one, so files saved before and after read the same."""
    assert datafile.build_header(entries, meta) == _header_oracle(entries, meta)
