"""Live modules and optimizers in a state_dict, saved and loaded through DCP's state_dict API.

``shardckpt.save({"model": model, "optim": optim}, path)`` saves what DCP's
``get_model_state_dict(model)`` and ``get_optimizer_state_dict(model, optim)`` return:
parameters under their fully qualified names (no ``module.`` of DDP, FSDP2's DTensor
shards as they are) and the optimizer's state keyed by those names, not by parameter
ids. A load fills those dicts in place and hands them back with ``set_model_state_dict``
and ``set_optimizer_state_dict``, so the live objects get everything, param_groups
(lr, betas, ...) included; a fresh optimizer, which has no state before its first step,
is given zero state by DCP first so there is something to load into.

An optimizer's state is keyed by its parameters' names, and only a module knows those:
each optimizer is paired with the module of the same state_dict that holds all its
parameters (the first in sorted key order if several do), or else with all the modules
that hold some of them together (then names carry each module's key path, e.g.
``gen.weight`` and ``disc.weight`` for ``{"gen": g, "disc": d, "optim": o}``).

:class:`ModuleState` and :class:`OptimizerState` are those two halves as Stateful
objects; ``TrainState`` uses them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from shardckpt.errors import UnsupportedValueError

__all__ = ["ModuleState", "OptimizerState", "Path", "describe_path", "find_live", "live_statefuls"]

Path = tuple[Any, ...]
"""Where a value sits in a state_dict: dict keys and list indices from the top."""


class ModuleState:
    """A module as a Stateful: ``get_model_state_dict`` / ``set_model_state_dict``
    (plain, DDP, FSDP2 and tensor-parallel modules alike)."""

    def __init__(self, module: nn.Module, options: StateDictOptions | None = None) -> None:
        self.module = module
        self.options = options or StateDictOptions()

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.module, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.module, state_dict, options=self.options)


class OptimizerState:
    """Optimizers as one Stateful: ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``
    over ``module``, which holds their parameters (several optimizers share one dict)."""

    def __init__(
        self,
        module: nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        options: StateDictOptions | None = None,
    ) -> None:
        self.module = module
        self.optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        self.options = options or StateDictOptions()

    def state_dict(self) -> dict[str, Any]:
        # A fresh optimizer gets zero state (a step with lr 0 and zero gradients) here.
        return get_optimizer_state_dict(self.module, self.optimizers, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.module, self.optimizers, state_dict, options=self.options)


def describe_path(path: Path) -> str:
    """``("optims", 0)`` -> ``state_dict['optims'][0]``."""
    return "state_dict" + "".join(f"[{p!r}]" for p in path)


_LEAVES = frozenset({torch.Tensor, nn.Parameter, DTensor, int, float, str, bool, type(None)})
"""Types that hold no module or optimizer (exactly these types: a subclass is walked)."""


def find_live(state_dict: dict[str, Any]) -> list[tuple[Path, nn.Module | torch.optim.Optimizer]]:
    """Every module and optimizer in ``state_dict``'s dicts and lists, with its path.

    The walk does not enter a module or an optimizer. Raises UnsupportedValueError for
    one inside a tuple (DCP stores a tuple as one value, so it could not be filled).
    """
    found: list[tuple[Path, nn.Module | torch.optim.Optimizer]] = []
    todo: list[tuple[Path, Any]] = [((k,), v) for k, v in state_dict.items() if type(v) not in _LEAVES]
    while todo:  # iterative: a deep state_dict is refused by the flattening, with its own message
        path, value = todo.pop()
        if isinstance(value, (nn.Module, torch.optim.Optimizer)):
            found.append((path, value))
        elif isinstance(value, dict):  # no path built for a tensor or a number (thousands a state; #18)
            todo.extend(((*path, k), v) for k, v in value.items() if type(v) not in _LEAVES)
        elif isinstance(value, list):
            todo.extend(((*path, i), v) for i, v in enumerate(value) if type(v) not in _LEAVES)
        elif isinstance(value, tuple) and any(isinstance(v, (nn.Module, torch.optim.Optimizer)) for v in value):
            raise UnsupportedValueError(
                f"{describe_path(path)} is a tuple holding a module or optimizer; put them in a list or a dict "
                "so load can fill them in place"
            )
    return found


def live_statefuls(state_dict: dict[str, Any]) -> dict[Path, ModuleState | OptimizerState]:
    """Each module and optimizer of ``state_dict`` (see :func:`find_live`) as a Stateful,
    every optimizer paired with its module(s) (see the module docstring).

    Raises UnsupportedValueError for an optimizer holding parameters of no module in
    ``state_dict``.
    """
    found = find_live(state_dict)
    modules = [(p, m) for p, m in found if isinstance(m, nn.Module)]
    held = [(p, m, {id(q) for q in m.parameters()}) for p, m in sorted(modules, key=lambda pm: order_key(pm[0]))]
    out: dict[Path, ModuleState | OptimizerState] = {p: ModuleState(m) for p, m in modules}
    for path, optim in found:
        if isinstance(optim, torch.optim.Optimizer):
            out[path] = OptimizerState(_owner(path, optim, held), optim)
    return out


def order_key(path: Path) -> tuple[tuple[str, str], ...]:
    """Sorts paths as DCP sorts flattened keys (by ``str``); the type name only breaks
    ties between keys that print alike (1 and "1"), which the flattening refuses anyway."""
    return tuple((str(p), type(p).__name__) for p in path)


def _owner(path: Path, optim: torch.optim.Optimizer, held: list[tuple[Path, nn.Module, set[int]]]) -> nn.Module:
    """The module ``optim`` is saved against: the first of ``held`` holding all its
    parameters, else those holding some of them, nested by key path in ModuleDicts."""
    params = [q for group in optim.param_groups for q in group["params"]]
    mine = {id(q) for q in params}
    for _, module, ids in held:
        if mine <= ids:
            return module
    some = [(p, m) for p, m, ids in held if mine & ids]
    covered = set().union(*(ids for _, _, ids in held if mine & ids))
    orphans = [q for q in params if id(q) not in covered]
    if orphans:
        shapes = ", ".join(str(list(q.shape)) for q in orphans[:5]) + (" ..." if len(orphans) > 5 else "")
        raise UnsupportedValueError(
            f"{describe_path(path)} is an optimizer whose parameters ({len(orphans)} of {len(params)}; shapes "
            f"{shapes}) belong to no module in the same state_dict. Its state is saved under its "
            "parameters' names, which only their model knows: pass the model in the same state_dict, e.g. "
            "{'model': model, 'optim': optim}."
        )
    return _combined(path, some)


def _combined(path: Path, modules: list[tuple[Path, nn.Module]]) -> nn.Module:
    """One module holding ``modules`` at their key paths (``{"gen": g}`` -> ``gen.weight``)."""
    root = nn.ModuleDict()
    for where, module in modules:
        names = [str(p) for p in where]
        if any(not n or "." in n for n in names):
            raise UnsupportedValueError(
                f"{describe_path(path)} is an optimizer over the parameters of several modules, and "
                f"{describe_path(where)}'s key path cannot name a submodule (keys with '.' or empty keys); "
                "rename the key"
            )
        node = root
        for name in names[:-1]:
            if name not in node:
                node[name] = nn.ModuleDict()
            node = node[name]  # type: ignore[assignment]
        node[names[-1]] = module
    return root
