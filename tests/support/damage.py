"""Small helpers for tests that damage checkpoints on purpose."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any


def chunk_of(manifest: dict, key: str) -> dict:
    """The only chunk of ``key`` in a manifest read as plain JSON."""
    (chunk,) = manifest["tensors"][key]["chunks"]
    return chunk


def flip_byte(path: str, offset: int, mask: int = 0x01) -> None:
    """XOR the byte at ``offset`` of the file at ``path`` with ``mask``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        (b,) = f.read(1)
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def value_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON-like ``doc`` (dict keys and list indices, the root first) where
    a damaged value can go."""
    out = [prefix]
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for k, v in items:
        out += value_paths(v, (*prefix, k))
    return out


DELETE = object()
"""As a damage value: remove the entry (dict keys only)."""


def damaged(doc: Any, where: tuple[Any, ...], value: Any) -> Any:
    """A deep copy of ``doc`` with the value at ``where`` replaced by (a copy of) ``value``,
    or removed for :data:`DELETE`; None when ``DELETE`` points into a list."""
    out = copy.deepcopy(doc)
    parent = out
    for k in where[:-1]:
        parent = parent[k]
    if value is DELETE:
        if not isinstance(parent, dict):
            return None
        del parent[where[-1]]
    else:
        parent[where[-1]] = copy.deepcopy(value)
    return out


def single_damages(valid: Any, values: list[Any]) -> Iterator[Any]:
    """``valid`` with each of its values in turn replaced by each of ``values`` (one of
    them may be :data:`DELETE`): every single damage, exhaustively."""
    for where in value_paths(valid)[1:]:
        for value in values:
            doc = damaged(valid, where, value)
            if doc is not None:
                yield doc
