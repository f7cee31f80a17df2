"""A plan-reused save's fingerprint (issue #18): when a plan holds, in order, the items of
the last save (the same objects, or items of the same repr), with equal key paths and
placement, the last digest is given without hashing again; anything else is hashed anew,
and the digest is always the one ``layout_fingerprint`` gives."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from shardckpt.engine import protocol
from shardckpt.engine.planner import _LocalPlannerData, layout_fingerprint
from shardckpt.engine.protocol import ItemTexts

_written: list[str] = []


class _Counted(WriteItem):
    def __repr__(self) -> str:
        _written.append(self.index.fqn)
        return super().__repr__()


def _item(fqn: str, rows: int) -> _Counted:
    chunk = ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([rows]))
    data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=torch.float32), size=chunk.sizes)
    return _Counted(index=MetadataIndex(fqn, torch.Size([0])), type=WriteItemType.TENSOR, tensor_data=data)


def _plan(items: list[WriteItem], mappings: dict[str, tuple[str, ...]]) -> SavePlan:
    return SavePlan(items, planner_data=_LocalPlannerData(mappings, {}, {}))


def test_the_same_items_give_the_last_digest_without_hashing_again() -> None:
    a, b = _item("m.a", 2), _item("m.b", 3)
    texts = ItemTexts()
    first = texts.fingerprint(_plan([a, b], {"m.a": ("m", "a"), "m.b": ("m", "b")}), None)
    _written.clear()
    again = _plan([a, b], {"m.a": ("m", "a"), "m.b": ("m", "b")})  # equal paths, a new dict
    got = texts.fingerprint(again, None)
    assert _written == []
    assert got == first == layout_fingerprint(again)


def test_changed_paths_order_items_or_placement_are_hashed_anew() -> None:
    a, b = _item("m.a", 2), _item("m.b", 3)
    paths = {"m.a": ("m", "a"), "m.b": ("m", "b")}
    texts = ItemTexts()
    first = texts.fingerprint(_plan([a, b], paths), None)
    cases = [
        (_plan([a, b], {"m.a": ("m", "a"), "m.b": ("n", "b")}), None),  # a key path changed
        (_plan([b, a], paths), None),  # the same items in another order
        (_plan([a, _item("m.b", 3)], paths), None),  # an equal but new item object
        (_plan([a], {"m.a": ("m", "a")}), None),  # an item dropped
        (_plan([a, b], paths), 0),  # small replicated tensors placed on the coordinator
        (_plan([a, b], paths), None),  # back to the first layout
    ]
    for plan, small_to in cases:
        got = texts.fingerprint(plan, small_to)
        assert got == layout_fingerprint(plan, small_replicated_to=small_to), (plan.items, small_to)
    assert got == first
    assert len({layout_fingerprint(p, small_replicated_to=s) for p, s in cases}) == len(cases) - 1


def test_paths_changed_in_place_after_a_fingerprint_are_seen() -> None:
    """The last paths are a copy: a caller that edits its dict in place gets a new digest."""
    a = _item("m.a", 2)
    paths = {"m.a": ("m", "a")}
    plan = _plan([a], paths)
    texts = ItemTexts()
    first = texts.fingerprint(plan, None)
    paths["m.a"] = ("x", "a")
    got = texts.fingerprint(plan, None)
    assert got == layout_fingerprint(plan) != first


def test_items_planned_anew_with_the_same_repr_keep_the_last_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """DCP plans values and plain tensors anew each save (new objects, the same repr): the
    last digest still holds for them; an item whose repr changed is hashed again."""
    hashed: list[int] = []

    def counted(plan: SavePlan, **kwargs: Any) -> str:
        hashed.append(len(plan.items))
        return layout_fingerprint(plan, **kwargs)

    monkeypatch.setattr(protocol, "layout_fingerprint", counted)
    kept, paths = _item("m.a", 2), {"m.a": ("m", "a"), "step": ("step",)}
    texts = ItemTexts()
    first = texts.fingerprint(_plan([kept, _item("step", 1)], paths), None)
    assert texts.fingerprint(_plan([kept, _item("step", 1)], paths), None) == first
    assert hashed == [2]  # only the first plan was hashed
    grown = _plan([kept, _item("step", 4)], paths)
    assert texts.fingerprint(grown, None) == layout_fingerprint(grown) != first
    assert hashed == [2, 2]
