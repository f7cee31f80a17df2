"""The coordinator's and the planner's shortcuts for saves of thousands of small tensors
(issue #18): manifest_to_json formats the chunk records column by column with one JSON
encoder for the whole manifest, and check_savable checks each distinct shape once. The
bytes written and the errors raised must stay what the per-record path gave."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch

from shardckpt.engine.savable import check_savable
from shardckpt.errors import UnsupportedValueError
from shardckpt.format import datafile
from shardckpt.format import manifest as manifest_module
from shardckpt.format.manifest import ChunkRecord, FileRecord, Manifest, TensorRecord, manifest_to_json


def _dump(v: Any) -> str:
    return json.dumps(v, allow_nan=False, separators=(",", ":"))


def _manifest(tensors: dict[str, TensorRecord], *, paths: dict[str, list[str | int]] | None = None) -> Manifest:
    return Manifest(
        world_size=1,
        process_layout=({"rank": 0, "host": "h"},),
        tensors=tensors,
        values={"step": 3},
        files={"data/f.safetensors": FileRecord(1 << 20, "00ff00ff00ff00ff", 0)},
        hash_block_bytes=1 << 22,
        created_at="2026-12-01T00:00:00+00:00",
        shardckpt_version="0",
        torch_version="2",
        paths=paths or {},
    )


def _tensor_lines(raw: bytes) -> list[str]:
    """The manifest's lines inside ``"tensors"``, as written."""
    lines = raw.decode().split("\n")
    start = lines.index(' "tensors": {') + 1
    end = lines.index(" },", start)
    return [line.removeprefix("  ").removesuffix(",") for line in lines[start:end]]


def _expected_lines(m: Manifest) -> list[str]:
    """What json.dumps writes for each tensor's entry (the writer before the fast path)."""
    return [f"{_dump(k)}: {_dump(manifest_module._tensor_doc(t, v2=m.is_v2))}" for k, t in sorted(m.tensors.items())]


def _chunk(offsets: tuple[int, ...], sizes: tuple[int, ...], hashes: tuple[str, ...], **kw: Any) -> ChunkRecord:
    return ChunkRecord(offsets, sizes, "data/f.safetensors", 8 * sum(offsets), 4 * max(sizes or (1,)), hashes, **kw)


def test_tensors_of_different_ranks_of_dimensions_keep_their_order_and_bytes() -> None:
    """Chunks of 0, 1, 2 and 3 dimensions interleaved across tensors are formatted by one
    template each, then put back in the records' order."""
    tensors = {
        "a.bias": TensorRecord(
            "F32", (8,), (_chunk((0,), (4,), ("0123456789abcdef",)), _chunk((4,), (4,), ("1" * 16,)))
        ),
        "b.weight": TensorRecord(
            "BF16", (4, 6), (_chunk((0, 0), (2, 6), ("2" * 16,)), _chunk((2, 0), (2, 6), ("3" * 16,)))
        ),
        "c.scalar": TensorRecord("I64", (), (_chunk((), (), ("4" * 16,)),)),
        "d.cube": TensorRecord("F16", (2, 2, 2), (_chunk((0, 0, 0), (2, 2, 2), ("5" * 16, "6" * 16)),)),
        "e.empty": TensorRecord("F32", (0, 3), ()),
    }
    m = _manifest(tensors)
    lines = _tensor_lines(manifest_to_json(m))
    assert lines == _expected_lines(m)
    assert '"offsets":[2,0],"sizes":[2,6]' in lines[1]
    assert lines[3].endswith('"block_hashes":["5555555555555555","6666666666666666"]}]}')


@pytest.mark.parametrize(
    "hashes",
    [
        ('a"b',),  # a quote: JSON escapes it
        ("é0",),  # not ASCII: JSON writes \u00e9
        ("ab cd",),  # a space: ASCII but not a letter or digit
        (),  # no block (an empty chunk): "[]", not '[""]'
        ("",),  # one empty string: '[""]'
    ],
)
def test_block_hashes_that_need_escaping_or_are_missing_are_written_as_json_dumps(hashes: tuple[str, ...]) -> None:
    plain = _chunk((0,), (4,), ("00ff00ff00ff00ff",))
    odd = _chunk((4,), (4,), hashes)
    m = _manifest({"t": TensorRecord("F32", (8,), (plain, odd))})
    assert _tensor_lines(manifest_to_json(m)) == _expected_lines(m)


def test_a_format_2_manifest_writes_each_digest_as_json_dumps() -> None:
    chunks = (_chunk((0,), (4,), ("0" * 16,), digest="a" * 32), _chunk((4,), (4,), ("1" * 16,), digest='q"'))
    m = dataclasses.replace(_manifest({"t": TensorRecord("F32", (8,), chunks)}), format_version=2)
    raw = manifest_to_json(m)
    assert _tensor_lines(raw) == _expected_lines(m)
    assert '"digest":"q\\""' in raw.decode()


def test_paths_and_values_written_with_one_encoder_are_json_dumps() -> None:
    """Every ``paths`` entry through one C encoder: the same text as json.dumps per entry,
    odd strings and ints included, and an entry after a nested one is not taken for a cycle."""
    paths: dict[str, list[str | int]] = {
        "model.layers.0.w": ["model", "layers", 0, "w"],
        'q"uote': ['q"uote'],
        "uni": ["é中🙂", "\x00"],
        "again": ["model", "layers", 0, "w"],
    }
    m = _manifest({}, paths=paths)
    text = manifest_to_json(m).decode()
    for key, value in paths.items():
        assert f"  {_dump(key)}: {_dump(value)}" in text
    assert json.loads(text)["paths"] == paths


def test_a_nan_in_the_metadata_is_refused_as_json_dumps_refuses_it() -> None:
    m = dataclasses.replace(_manifest({}), metadata={"loss": float("nan")})
    with pytest.raises(ValueError, match="Out of range float values"):
        manifest_to_json(m)


def test_check_savable_names_the_first_key_with_a_bad_shape_when_shapes_repeat() -> None:
    """Shapes are checked once each: a shape that passed is not checked again, but a shape
    that fails is, so the error names the first key (sorted) holding it."""
    deep = (1,) * (datafile.MAX_NDIM + 1)
    state = {f"ok.{i}": torch.zeros(2, 3) for i in range(5)}
    state.update({"z.deep": torch.zeros(deep), "m.deep": torch.zeros(deep)})
    with pytest.raises(UnsupportedValueError, match=r"key 'm\.deep': the tensor has 65 dimensions"):
        check_savable(state)


def test_check_savable_still_checks_every_key_and_dtype_behind_a_repeated_shape() -> None:
    """A shape seen before skips only the shape check: the key and the dtype of every
    tensor are still refused where they cannot be saved."""
    good = {f"a.{i}": torch.zeros(4, 4) for i in range(3)}
    with pytest.raises(UnsupportedValueError, match=r"b\.complex"):
        check_savable({**good, "b.complex": torch.zeros(4, 4, dtype=torch.complex64)})
    with pytest.raises(UnsupportedValueError, match="surrogate"):
        check_savable({**good, "b.\ud800": torch.zeros(4, 4)})
    with pytest.raises(UnsupportedValueError, match="meta tensor"):
        check_savable({**good, "b.meta": torch.zeros(4, 4, device="meta")})
    check_savable(good)  # and a state that is fine passes
