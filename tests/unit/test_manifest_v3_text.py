"""manifest_v3_to_json's templated tensor lines (issue #18) are byte for byte json.dumps.

The oracle is the writer as it was before the templates: each tensor line is ``json.dumps``
of its plain document (``manifest_v3._tensor_doc``, what the fallback writes), the layout
that of ``manifest_oracle.two_levels``. Random manifests (hypothesis) cover odd keys and dtypes (unicode,
lone surrogates, quotes, control characters), huge and negative ints, scalars, tensors with
a rule, listed chunks or both, several runs; records of other types (a bool, a float, a str
subclass) must leave the templates and still be written as json.dumps writes them.
"""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from manifest_oracle import empty_v3, two_levels

from shardckpt.format import manifest_v3 as mv3
from shardckpt.format import rules
from shardckpt.format.file_table import file_table_to_json


def _oracle(m: mv3.ManifestV3) -> bytes:
    """The manifest's bytes from json.dumps alone: one line per field and per map entry."""
    doc = {
        "format": "shardckpt",
        "format_version": 3,
        "shardckpt_version": m.shardckpt_version,
        "torch_version": m.torch_version,
        "created_at": m.created_at,
        "world_size": m.world_size,
        "hash_algorithm": "xxh3_64",
        "hash_block_bytes": m.hash_block_bytes,
        "bases": sorted(m.bases),
        "tensors": {k: mv3._tensor_doc(t) for k, t in sorted(m.tensors.items())},  # the plain document
        "values": dict(sorted(m.values.items())),
        "file_table": file_table_to_json(m.file_table),
        "paths": dict(sorted(m.paths.items())),
        "metadata": m.metadata,
    }
    return two_levels(doc, ("tensors", "values", "paths", "metadata"))


_ODD = ['a"b', "back\\slash", "ctl\x00\x1f\x7f", "tab\tnl\n", "é中🙂", "\ud800lone", "</script>", ""]
_text = st.one_of(st.sampled_from(_ODD), st.text(max_size=12))
_int = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 2**63 - 1, 2**64, -1]))
_positive = st.integers(min_value=1, max_value=2**40)


@st.composite
def _chunk(draw: st.DrawFn, ndim: int) -> mv3.Chunk:
    dims = st.lists(_int, min_size=ndim, max_size=ndim).map(tuple)
    return mv3.Chunk(draw(dims), draw(dims), draw(_int), draw(_int), draw(_int))


@st.composite
def _tensor(draw: st.DrawFn) -> mv3.Tensor:
    ndim = draw(st.integers(min_value=0, max_value=3))
    shape = tuple(draw(st.lists(_positive, min_size=ndim, max_size=ndim)))
    rule = None
    if draw(st.booleans()):
        block = tuple(draw(st.lists(_positive, min_size=ndim, max_size=ndim)))
        run = st.builds(rules.Run, _int, _int, _int, _int, _int)
        rule = rules.Rule(shape, block, tuple(draw(st.lists(run, min_size=1, max_size=3))))
    chunks = tuple(draw(st.lists(_chunk(ndim), max_size=3)))
    return mv3.Tensor(draw(_text), shape, rule, chunks)


def _empty() -> mv3.ManifestV3:
    return empty_v3(created_at="2026-12-02T00:00:00+00:00")


@st.composite
def _manifests(draw: st.DrawFn) -> mv3.ManifestV3:
    return dataclasses.replace(
        _empty(),
        tensors=draw(st.dictionaries(_text, _tensor(), max_size=5)),
        values=draw(st.dictionaries(_text, st.one_of(_int, _text), max_size=2)),
        paths=draw(st.dictionaries(_text, st.lists(st.one_of(_text, _int), max_size=2), max_size=2)),
        metadata=draw(st.dictionaries(_text, _text, max_size=2)),
    )


_ONE = rules.Rule((8, 4), (4, 4), (rules.Run(2, 0, 1, 0, 0),))
_BESIDE = mv3.Tensor("F32", (8, 4), _ONE, (mv3.Chunk((8, 0), (0, 4), 0, 0, 0),))  # an empty box beside a rule


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_manifests())
@example(_empty())
@example(dataclasses.replace(_empty(), tensors={"scalar": mv3.Tensor("F32", (), rules.Rule((), (), ()), ())}))
@example(dataclasses.replace(_empty(), tensors={"w": _BESIDE}))
def test_the_templated_tensor_lines_are_what_json_dumps_writes(m: mv3.ManifestV3) -> None:
    assert mv3._tensor_texts(list(m.tensors.values())) is not None, "well-typed records take the templates"
    assert mv3.manifest_v3_to_json(m) == _oracle(m)


class _Name(str):
    pass


def test_records_of_other_types_are_written_by_json_dumps() -> None:
    """A bool is 1 to ``%d`` but true to JSON, a float would be cut to an int: such records
    leave the templates, so the bytes stay json.dumps's whatever the records hold."""
    chunk = mv3.Chunk((0, 0), (8, 4), 0, 0, 128)
    plain = mv3.Tensor("F32", (8, 4), None, (chunk,))
    for odd in (
        dataclasses.replace(plain, shape=(8, True)),
        dataclasses.replace(plain, chunks=(dataclasses.replace(chunk, byte_length=128.5),)),
        dataclasses.replace(plain, dtype=_Name("F32")),
        dataclasses.replace(plain, rule=rules.Rule((8, 4), (4, 4), (rules.Run(2, 0, 1, 0, False),))),
        dataclasses.replace(plain, rule=rules.Rule((8, 4), (4, 4.0), (rules.Run(2, 0, 1, 0, 0),))),
    ):
        m = dataclasses.replace(_empty(), tensors={"t": odd, "u": plain})
        assert mv3._tensor_texts([odd, plain]) is None, odd
        assert mv3.manifest_v3_to_json(m) == _oracle(m)
    m = dataclasses.replace(_empty(), tensors={"t": dataclasses.replace(plain, shape=(8, True))})
    assert b'"shape":[8,true]' in mv3.manifest_v3_to_json(m)
