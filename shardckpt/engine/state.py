"""How Stateful objects enter and leave a state_dict, and how it is flattened and nested.

Like DCP, only top-level values are treated as Stateful (objects with both
``state_dict()`` and ``load_state_dict()``); modules and optimizers are found in
nested dicts and lists too, and go through DCP's state_dict API (:mod:`.live`).
:class:`PlainState` calls their methods in sorted key order on every rank.

:mod:`.savable` says what a state_dict may hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from shardckpt.engine._torch_private import flatten_state_dict
from shardckpt.engine.live import Path, live_statefuls, order_key
from shardckpt.engine.savable import check_savable
from shardckpt.errors import ManifestError, UnsupportedValueError

_NEVER_STATEFUL = frozenset(
    {torch.Tensor, torch.nn.Parameter, DTensor, dict, list, tuple, str, int, float, bool, type(None)}
)
"""Types whose values :meth:`PlainState.of` does not ask ``isinstance(v, Stateful)``:
their instances hold no ``state_dict``/``load_state_dict`` of their own (exact types, not
subclasses). Asking the runtime Protocol costs ~20 us a value, 60-70 ms on every save and
load of a flat dict of 3,000 tensors (issue #18)."""


def to_plain_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The tree DCP saves for ``state_dict``: see :class:`PlainState`."""
    return PlainState.of(state_dict).tree


@dataclass(frozen=True)
class PlainState:
    """A state_dict as DCP sees it (``tree``) and the objects that gave parts of it.

    ``tree`` is ``source`` with every top-level Stateful replaced by its ``state_dict()``
    and every module and optimizer in its dicts and lists by DCP's state dict for it
    (:mod:`shardckpt.engine.live`). Only the containers on the way to those objects are
    copied; everything else is ``source``'s own. The methods are called in one order
    on every rank (sorted key paths): they may run collectives (an FSDP-wrapped module
    does), and the ranks' dicts need not have been built in the same order.
    """

    source: dict[str, Any]
    tree: dict[str, Any]
    objects: dict[Path, Stateful]

    @classmethod
    def of(cls, state_dict: dict[str, Any]) -> PlainState:
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        objects: dict[Path, Stateful] = dict(live_statefuls(state_dict))
        for k, v in state_dict.items():
            if type(v) not in _NEVER_STATEFUL and (k,) not in objects and isinstance(v, Stateful):
                objects[(k,)] = v
        states = {p: objects[p].state_dict() for p in sorted(objects, key=order_key)}
        return cls(state_dict, _replaced(state_dict, (), states, _prefixes(objects)), objects)

    def hand_back(self) -> None:
        """After a load filled ``tree``: give each object its part (in the same order as
        :meth:`of`), and copy the other loaded values (a load replaces non-tensor values
        in ``tree``) into ``source``'s containers where ``tree`` holds copies."""
        for p in sorted(self.objects, key=order_key):
            self.objects[p].load_state_dict(_at(self.tree, p))
        _write_back(self.source, self.tree, (), self.objects, _prefixes(self.objects))


def _prefixes(objects: dict[Path, Any]) -> set[Path]:
    """The paths of the containers that lead to ``objects`` (the top level included)."""
    return {p[:i] for p in objects for i in range(len(p))} | {()}


def _replaced(value: Any, path: Path, states: dict[Path, Any], prefixes: set[Path]) -> Any:
    if path in states:
        return states[path]
    if path not in prefixes:
        return value
    if isinstance(value, dict):
        return {k: _replaced(v, (*path, k), states, prefixes) for k, v in value.items()}
    return [_replaced(v, (*path, i), states, prefixes) for i, v in enumerate(value)]


def _at(tree: Any, path: Path) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _write_back(source: Any, tree: Any, path: Path, objects: dict[Path, Any], prefixes: set[Path]) -> None:
    for k in list(source) if isinstance(source, dict) else range(len(source)):
        where = (*path, k)
        if where in objects:
            continue
        if where in prefixes:
            _write_back(source[k], tree[k], where, objects, prefixes)
        elif tree[k] is not source[k]:
            source[k] = tree[k]


def flatten_with_mappings(plain: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """DCP's flattening: ``{"a.b.0": leaf}`` and the mapping back to each leaf's path.

    For saving: also refuses (UnsupportedValueError, see :func:`.savable.check_savable`) leaves
    that cannot be saved, so a bad leaf fails before anything is staged or written.
    """
    flat, mappings = _flatten(plain)
    check_savable(flat)
    return flat, mappings


_SCALARS = (int, float, str, bool, type(None))


def flatten_plain_dicts(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """What DCP's flattening (``flatten_state_dict``, then its ShardedTensor pass) gives a
    state_dict of str-keyed dicts nested down to tensors and JSON scalars, built in one
    walk without DCP's container tests per leaf (a save of thousands of tensors, issue #18).
    None for anything else (lists, tuples, ShardedTensors, other objects or key types, two
    leaves on one flat key, nesting past the recursion limit): DCP flattens those, with
    its errors. ``tests/unit/test_flatten_plain.py`` compares both on the same states."""
    flat: dict[str, Any] = {}
    mappings: dict[str, Any] = {}
    try:
        return (flat, mappings) if _walk_plain((), state_dict, flat, mappings) else None
    except RecursionError:
        return None


def _walk_plain(path: tuple[str, ...], tree: dict[Any, Any], flat: dict[str, Any], mappings: dict[str, Any]) -> bool:
    """:func:`flatten_plain_dicts`' walk, adding ``tree``'s leaves under ``path``; False at
    anything it does not take. A module function, not a closure: a recursive closure refers
    to itself through its cell, a reference cycle that kept ``flat`` and ``mappings`` (a
    tuple a tensor) alive after every save and load until the cyclic collector ran, and
    made it run on them (tests/unit/test_no_cycles.py)."""
    for key, value in tree.items():
        if type(key) is not str:
            return False
        here = (*path, key)
        if type(value) is dict:
            if not _walk_plain(here, value, flat, mappings):
                return False
        elif isinstance(value, torch.Tensor) or type(value) in _SCALARS:
            name = ".".join(here)
            if name in flat:
                return False
            flat[name], mappings[name] = value, here
        else:
            return False
    return True


def flat_keys(plain: dict[str, Any]) -> dict[str, Any]:
    """Flattened view (``a.b.0``) of a state_dict, exactly as DCP's planners key it."""
    return _flatten(plain)[0]


def flatten(plain: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`flat_keys` and the mapping back to each leaf's path, as DCP's planners flatten."""
    return _flatten(plain)


def _flatten(plain: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    with flattening_errors():
        return flatten_state_dict(plain)


def nest(leaves: Iterable[tuple[Sequence[str | int], Any]]) -> dict[str, Any]:
    """Rebuild a nested state_dict from (path, leaf) pairs, the inverse of the flattening
    (paths as the manifest's ``paths`` record them): str components are dict keys, int
    components list indices (lists grow with None placeholders where a path skips).

    Raises ManifestError for an empty path, two leaves at one path, or paths that
    disagree (one runs through another's leaf, or uses it both as a dict and a list).
    """
    root: dict[str, Any] = {}
    for path, leaf in leaves:
        if not path:
            raise ManifestError("a key has an empty path")
        holder = container_at(root, path)
        if isinstance(holder, dict) and path[-1] in holder:
            raise ManifestError(f"two keys have the same path {list(path)}")
        holder[path[-1]] = leaf
    return root


def container_at(root: dict[str, Any], path: Sequence[str | int]) -> Any:
    """The dict or list inside ``root`` that holds ``path[-1]`` (``path`` is not empty),
    made on the way: a dict for a str component, a list for an int one; a list is
    padded with None up to the index the path names in it.

    Raises ManifestError where ``path`` runs through a leaf, or names a list with a str
    or a dict with an int.
    """
    node: Any = root
    for i, part in enumerate(path):
        if isinstance(node, list) and isinstance(part, int):
            node.extend([None] * (part + 1 - len(node)))
        elif not (isinstance(node, dict) and isinstance(part, str)):
            raise ManifestError(
                f"path {list(path)} runs through a {type(node).__name__} at {part!r}; the manifest's "
                "paths disagree with each other"
            )
        if i == len(path) - 1:
            return node
        new: Any = [] if isinstance(path[i + 1], int) else {}
        if isinstance(node, dict):
            node = node.setdefault(part, new)
        else:
            if node[part] is None:
                node[part] = new
            node = node[part]
    raise ValueError("container_at needs a non-empty path")


@contextlib.contextmanager
def flattening_errors() -> Iterator[None]:
    """Around a call that flattens a state_dict with DCP (ours, or a DCP planner's
    ``set_up_planner``): its failures become UnsupportedValueError saying what to change.

    DCP's flattening is recursive (so a deep state_dict exhausts the recursion limit, and
    the key is unknown then) and reports a collision as a ValueError whose text contains
    ``"duplicated flatten key"``; ``tests/unit/test_torch_private.py`` pins both."""
    try:
        yield
    except RecursionError as e:
        raise UnsupportedValueError(
            "the state_dict nests dicts/lists too deeply for DCP's flattening (Python's recursion "
            "limit was reached); flatten the structure (e.g. join the path into one key)"
        ) from e
    except ValueError as e:
        if "duplicated flatten key" not in str(e):
            raise
        raise UnsupportedValueError(
            f"two entries of the state_dict flatten to the same key ({e}): a key containing '.' "
            "collides with a nested dict (e.g. {'a.b': x} and {'a': {'b': y}}). Rename one of them."
        ) from e


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {list(value.shape)} and dtype {str(value.dtype).removeprefix('torch.')}"
    return f"a {type(value).__name__} value"
