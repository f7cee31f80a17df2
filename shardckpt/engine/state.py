"""What a state_dict may hold, and how Stateful objects enter and leave it.

Like DCP, only top-level values are treated as Stateful (objects with both
``state_dict()`` and ``load_state_dict()``); modules and optimizers are found in
nested dicts and lists too, and go through DCP's state_dict API (:mod:`.live`).
:class:`PlainState` calls their methods in sorted key order on every rank.

:func:`check_savable` and :func:`tensor_problem` refuse, by type and before any byte
is written, what a checkpoint cannot hold or a reader would refuse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from shardckpt.engine._torch_private import flatten_state_dict, is_checkpointable_tensor
from shardckpt.engine.live import Path, live_statefuls, order_key
from shardckpt.errors import ManifestError, UnsupportedValueError
from shardckpt.format import datafile
from shardckpt.format.values import check_str

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

    For saving: also refuses (UnsupportedValueError, see :func:`check_savable`) leaves
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


class SavedLayouts(Protocol):
    """What an earlier save of the same owner checked (:class:`~shardckpt.engine.local_items.ItemCache`)."""

    def __contains__(self, fqn: object) -> bool:
        """Whether key ``fqn`` passed every check of :func:`check_savable` then."""
        ...

    def unchanged(self, fqn: str, value: Any, local: torch.Tensor | None) -> bool:
        """Whether ``value`` has the dtype and shape it was checked with then."""
        ...


def check_savable(
    flat: dict[str, Any], locals_: dict[str, torch.Tensor] | None = None, layouts: SavedLayouts | None = None
) -> None:
    """Raise UnsupportedValueError, naming the key, what was found, the limit and the
    fix, for the first (sorted) leaf of the flattened ``flat`` that save cannot store
    in a way load accepts: a key UTF-8 cannot encode, or a tensor that is sparse,
    nested or meta, of an unsupported dtype, or whose shape the reader refuses
    (more than ``datafile.MAX_NDIM`` dimensions, a dimension too large).

    Non-tensor values are checked when encoded (``values.encode_value``). ``locals_``: the
    DTensors' local tensors by key, when the caller has them (saves a ``to_local()`` each;
    a DTensor's dtype is then read from its local tensor, whose bytes are the ones written).
    A shape (and whether a type is a ShardedTensor) is checked once per call: a model's
    thousands of tensors have a few distinct ones (issue #18); a shape that fails is never
    marked checked, so the error still names the first key (sorted) that has it.
    ``layouts``: an earlier save's checks; a key it checked skips the key check, and a
    DTensor it finds unchanged the dtype and shape checks (the tensor checks always run).
    """
    known = locals_ or {}
    shapes_ok: set[tuple[int, ...]] = set()
    sharded: dict[type, bool] = {}
    for fqn in sorted(flat):
        seen = layouts is not None and fqn in layouts
        if not seen:
            check_str(fqn, key=fqn, what="the key")
        value = flat[fqn]
        if not isinstance(value, torch.Tensor):
            continue
        local = known.get(fqn)
        problem = tensor_problem(value, loading=False, local=local)
        if problem is not None:
            raise UnsupportedValueError(f"key {fqn!r}: {problem}")
        if seen and layouts is not None and layouts.unchanged(fqn, value, local):
            continue
        is_sharded = sharded.get(type(value))
        if is_sharded is None:
            is_sharded = sharded[type(value)] = _is_sharded_tensor(value)
        if is_sharded:
            continue  # its shards were checked; DCP flattens it into chunks with the global metadata
        datafile.dtype_name(value.dtype if local is None else local.dtype, key=fqn)
        shape = tuple(value.shape)
        if shape not in shapes_ok:
            check_tensor_shape(shape, key=fqn)
            shapes_ok.add(shape)


def check_tensor_shape(shape: tuple[int, ...], *, key: str) -> None:
    """Refuse a (global) shape that the manifest and data-file readers would refuse,
    using their own check (``datafile.check_shape``) so both sides share one limit."""
    if len(shape) > datafile.MAX_NDIM:
        raise UnsupportedValueError(
            f"key {key!r}: the tensor has {len(shape)} dimensions; a checkpoint holds tensors of at most "
            f"{datafile.MAX_NDIM} dimensions (the limit of shardckpt's reader and safetensors). Reshape it "
            "before saving (e.g. t.reshape(-1)) and back after loading."
        )
    try:
        datafile.check_shape(list(shape), where=f"key {key!r}")
    except ManifestError as e:
        raise UnsupportedValueError(
            f"{e}: the checkpoint reader would refuse this shape, so save refuses it too (every dimension "
            "must be below 2**62). Reshape the tensor or save a smaller one."
        ) from None


_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
"""Types the quick answer of :func:`tensor_problem` takes as they are (no subclass hooks)."""


def _is_sharded_tensor(value: Any) -> bool:
    """A torch.distributed ShardedTensor (recognised by its method: the class is private)."""
    return callable(getattr(type(value), "local_shards", None))


def tensor_problem(tensor: torch.Tensor, *, loading: bool, local: torch.Tensor | None = None) -> str | None:
    """What keeps ``tensor`` from being saved (or, ``loading``, filled from a checkpoint),
    with the fix; None when it is a plain strided tensor with storage.

    Checked before DCP touches it: DCP's own failures for these ("unsupported memory
    format option", "Cannot copy out of meta tensor") carry no key and surface as if
    a peer had died. For a DTensor, its local shard is checked (``local``, when given;
    outside autograd a DTensor's ``to_local()`` costs 2 us, not 14).

    The common case is answered first: a plain tensor, Parameter or DTensor of one, strided,
    with storage, at a fifth of the full checks' cost (``device.type`` alone is 2 us; a save
    or load of thousands of small tensors checks each one, #18).
    """
    if local is None and type(tensor) is DTensor:
        local = tensor.to_local()
    plain = tensor if local is None else local
    if (
        type(plain) in _PLAIN_TYPES
        and not plain.is_nested
        and plain.layout == torch.strided
        and not plain.is_meta
        and not is_checkpointable_tensor(tensor)
        and not is_checkpointable_tensor(plain)
    ):
        return None
    if _is_sharded_tensor(tensor):
        # FSDP1's sharded state dicts: the object itself answers no attribute queries
        # (its __torch_function__ refuses them); its local shards are plain tensors.
        shards = tensor.local_shards()  # type: ignore[attr-defined]
        problems = (tensor_problem(shard.tensor, loading=loading) for shard in shards)
        return next((p for p in problems if p is not None), None)
    if is_checkpointable_tensor(tensor):
        return (
            "a tensor carrying DCP's CheckpointableTensor attributes (global_shape, global_offsets, "
            "local_offsets, local_sizes; torch 2.14), which shardckpt does not support. "
            + (
                "Load into a DTensor (DTensor.from_local) or a full tensor instead."
                if loading
                else "Save the shard as a DTensor (DTensor.from_local) instead, or delete those attributes "
                "to save it as a plain tensor."
            )
        )
    if local is None:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    if local.is_nested:
        return "a nested (jagged) tensor, which a checkpoint cannot hold (it stores strided tensors). " + (
            "Load into a list of its components instead."
            if loading
            else "Save its components instead (e.g. list(t.unbind())) or a padded copy "
            "(torch.nested.to_padded_tensor(t, 0.0))."
        )
    if local.layout != torch.strided:
        return (
            f"a {str(local.layout).removeprefix('torch.')} tensor, but a checkpoint holds dense (strided) tensors. "
            + (
                "Load into a dense tensor (call .to_dense() on the target) and convert it after loading."
                if loading
                else "Call .to_dense() on it before saving (and convert it back after loading)."
            )
        )
    if local.device.type == "meta":
        return "a meta tensor, which has a shape but no data: " + (
            "materialize the tensor before loading into it (e.g. model.to_empty(device='cpu'))."
            if loading
            else "materialize the tensor (e.g. model.to_empty(device=...), then initialize it) "
            "before saving, or leave the key out."
        )
    return None


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {list(value.shape)} and dtype {str(value.dtype).removeprefix('torch.')}"
    return f"a {type(value).__name__} value"
