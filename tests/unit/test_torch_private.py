"""The private torch API shardckpt depends on, checked on the installed torch (issue #14).

Each private name in :mod:`shardckpt.engine._torch_private` must exist and behave as we rely
on; DCP must still call the private planner hooks we override; and no other module of
the package may reach into torch's private API. A torch upgrade that breaks one of
these fails here, naming it.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed import run_ranks
from torch.distributed.checkpoint.default_planner import (
    DefaultSavePlanner,
    create_default_global_save_plan,
)
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType

import shardckpt
from shardckpt.engine import _torch_private
from shardckpt.engine.placement import balance_replicated
from shardckpt.engine.planner import SavePlanner
from shardckpt.engine.staging import item_bytes
from shardckpt.errors import ShardckptError, UnsupportedValueError

pytestmark = pytest.mark.compat  # the subset .ci/torch_compat runs on other torch releases

PACKAGE_DIR = Path(shardckpt.__file__).parent
BOUNDARY = PACKAGE_DIR / "engine" / "_torch_private.py"


# ------------------------------------------------------------------ behaviour of each private name


def test_flatten_state_dict_keys_and_paths():
    t = torch.ones(1)
    flat, mappings = _torch_private.flatten_state_dict({"a": {"b": t, "c": [1, 2], "e": [t]}, "d": 3, 1: "x"})
    assert flat == {"a.b": t, "a.c": [1, 2], "a.e.0": t, "d": 3, "1": "x"}  # a list of plain values stays one leaf
    assert mappings == {"a.b": ("a", "b"), "a.c": ("a", "c"), "a.e.0": ("a", "e", 0), "d": ("d",), "1": ("1",)}
    # int dict keys are recorded as str (planner.set_in_place compensates), list indices as int
    assert type(mappings["a.e.0"][2]) is int and type(mappings["1"][0]) is str


def test_flatten_state_dict_collision_text_and_deep_nesting():
    # state.flattening_errors (around our flattening and the planners' set_up_planner) knows a collision by this text.
    with pytest.raises(ValueError, match="duplicated flatten key"):
        _torch_private.flatten_state_dict({"a.b": 1, "a": {"b": 2}})
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(5000):
        node["n"] = {}
        node = node["n"]
    node["t"] = torch.ones(1)
    with pytest.raises(RecursionError):  # state.flattening_errors relies on the flattening being recursive
        _torch_private.flatten_state_dict(deep)


def _check_items_of_a_tensor(items: list[Any], fqn: str, offsets: list[int], sizes: list[int], size: list[int]) -> None:
    """The fields staging and the planner read from a write item."""
    assert len(items) == 1
    item = items[0]
    assert item.index.fqn == fqn and list(item.index.offset) == offsets
    assert item.type in (WriteItemType.TENSOR, WriteItemType.SHARD)
    assert list(item.tensor_data.chunk.offsets) == offsets and list(item.tensor_data.chunk.sizes) == sizes
    assert item.tensor_data.properties.dtype == torch.float32 and list(item.tensor_data.size) == size
    assert item_bytes(item) == 4 * sizes[0] * sizes[1]


def test_create_write_items_of_a_plain_tensor():
    _check_items_of_a_tensor(_torch_private.create_write_items("w", torch.ones(2, 3)), "w", [0, 0], [2, 3], [2, 3])


def test_local_chunks_of_a_plain_tensor_is_the_whole_tensor():
    (box,) = _torch_private.local_chunks(torch.ones(2, 3))
    assert (list(box.offsets), list(box.sizes)) == ([0, 0], [2, 3])
    (scalar,) = _torch_private.local_chunks(torch.tensor(1.0))
    assert (list(scalar.offsets), list(scalar.sizes)) == ([], [])


def _dtensor_items(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    dt = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
    items = _torch_private.create_write_items("w", dt)
    _check_items_of_a_tensor(items, "w", [2 * rank, 0], [2, 3], [4, 3])
    assert items[0].type == WriteItemType.SHARD
    # the boxes the format-3 load planner asks the rules for: this rank's shard, 5 x 3 split 3 + 2
    uneven = distribute_tensor(torch.ones(5, 3), mesh, [Shard(0)])
    (box,) = _torch_private.local_chunks(uneven)
    assert (list(box.offsets), list(box.sizes)) == ([3 * rank, 0], [3 - rank, 3])


def test_create_write_items_and_local_chunks_of_a_dtensor_shard():
    run_ranks(_dtensor_items, 2)


def _checkpointable(rank: int) -> torch.Tensor:
    """Rows 2*rank..2*rank+1 of a (4, 3) global tensor, in DCP 2.14's CheckpointableTensor form."""
    t = torch.full((2, 3), float(rank))
    t.global_shape, t.global_offsets = (4, 3), ((2 * rank, 0),)  # type: ignore[attr-defined]
    t.local_offsets, t.local_sizes = ((0, 0),), ((2, 3),)  # type: ignore[attr-defined]
    return t


def test_is_checkpointable_tensor_agrees_with_how_dcp_plans_the_tensor():
    t = _checkpointable(1)
    assert not _torch_private.is_checkpointable_tensor(torch.ones(2, 3))
    assert not _torch_private.is_checkpointable_tensor(t.global_shape)  # the attributes alone are not a tensor
    if _torch_private.is_checkpointable_tensor(t):  # torch >= 2.14: DCP plans the shard of a (4, 3) tensor
        _check_items_of_a_tensor(_torch_private.create_write_items("w", t), "w", [2, 0], [2, 3], [4, 3])
    else:  # torch 2.13: a plain (2, 3) tensor
        _check_items_of_a_tensor(_torch_private.create_write_items("w", t), "w", [0, 0], [2, 3], [2, 3])


def test_a_checkpointable_tensor_is_refused_where_dcp_would_plan_it_as_shards(tmp_path):
    t = _checkpointable(0)
    if not _torch_private.is_checkpointable_tensor(t):
        pytest.skip(f"torch {torch.__version__}'s DCP has no CheckpointableTensor protocol")
    # An async save would stage a plain copy, which DCP plans as one replicated tensor.
    with pytest.raises(UnsupportedValueError, match="key 'w': a tensor carrying DCP's CheckpointableTensor"):
        shardckpt.save({"w": t}, str(tmp_path / "c"))
    with pytest.raises(UnsupportedValueError, match=r"CheckpointableTensor.*DTensor\.from_local"):
        shardckpt.async_save({"w": t}, str(tmp_path / "c"))
    assert not (tmp_path / "c" / "manifest.json").exists()
    shardckpt.save({"w": torch.ones(4, 3)}, str(tmp_path / "full"))
    with pytest.raises(UnsupportedValueError, match="key 'w': the state_dict holds a tensor carrying DCP's"):
        shardckpt.load({"w": t}, str(tmp_path / "full"))


def test_public_itemsize_replaces_the_private_element_size():
    for dtype in (torch.bool, torch.uint8, torch.bfloat16, torch.float32, torch.complex128, torch.float8_e4m3fn):
        assert dtype.itemsize == torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------ the private planner hooks


def test_the_hooks_exist_on_dcps_planner_with_the_signature_we_override():
    for hook in _torch_private.SAVE_PLANNER_HOOKS:
        assert list(inspect.signature(getattr(DefaultSavePlanner, hook)).parameters) == ["self", "all_plans"], hook


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(SavePlanner, name)

    def counted(self: SavePlanner, all_plans: list[SavePlan]) -> Any:
        calls.append(len(all_plans))
        return original(self, all_plans)

    monkeypatch.setattr(SavePlanner, name, counted)
    return calls


def test_a_real_save_calls_our_hooks(tmp_path, monkeypatch):
    calls = {hook: _count_calls(monkeypatch, hook) for hook in _torch_private.SAVE_PLANNER_HOOKS}
    shardckpt.save({"w": torch.ones(2, 3), "n": 3}, str(tmp_path / "c"))
    assert calls == {hook: [1] for hook in _torch_private.SAVE_PLANNER_HOOKS}


def test_a_dcp_that_skips_create_global_plan_is_refused(tmp_path, monkeypatch):
    """A future DCP that plans globally without our hook: the save fails, naming it."""

    def without_hook(self: DefaultSavePlanner, all_plans: list[SavePlan]) -> Any:
        self.global_plan, self.metadata = create_default_global_save_plan(balance_replicated(all_plans))
        return self.global_plan, self.metadata

    monkeypatch.setattr(DefaultSavePlanner, "create_global_plan", without_hook)
    with pytest.raises(
        ShardckptError, match=r"no longer calls DefaultSavePlanner\._create_global_plan.*cross-rank checks"
    ):
        shardckpt.save({"w": torch.ones(2, 3)}, str(tmp_path / "c"))
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_finish_plan_on_the_coordinator_requires_the_global_checks():
    planner = SavePlanner()
    planner.set_up_planner({"w": torch.ones(2)}, is_coordinator=True)
    plan = planner.create_local_plan()
    with pytest.raises(ShardckptError, match="_create_global_plan"):
        planner.finish_plan(plan)
    other = SavePlanner()
    other.set_up_planner({"w": torch.ones(2)}, is_coordinator=False)
    other.finish_plan(other.create_local_plan())  # other ranks never run the global step


def _shardckpt_modules() -> list[Any]:
    modules = []
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="shardckpt."):
        if info.name.endswith("__main__"):  # runs the CLI when imported
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except ImportError:  # an optional extra (e.g. lightning) that is not installed
            continue
    return modules


def test_the_private_torch_methods_we_override_are_the_listed_hooks():
    overridden = set()
    for module in _shardckpt_modules():
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            torch_bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("torch")]
            for name, value in vars(cls).items():
                method = callable(value) or isinstance(value, (property, staticmethod, classmethod))
                if method and _is_private(name) and any(hasattr(b, name) for b in torch_bases):
                    overridden.add((cls.__name__, name))
    assert overridden == {("SavePlanner", hook) for hook in _torch_private.SAVE_PLANNER_HOOKS}


# ------------------------------------------------------------------ the boundary


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_torch_uses(source: str) -> list[str]:
    """``line: what`` for each import of, or attribute reached through, a private torch name."""
    tree = ast.parse(source)
    torch_names: set[str] = set()  # local names bound to something imported from torch
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "torch":
                    torch_names.add(alias.asname or "torch")
                    if any(_is_private(part) for part in alias.name.split(".")):
                        found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "torch":
            module = node.module or ""
            for alias in node.names:
                torch_names.add(alias.asname or alias.name)
                if any(_is_private(part) for part in module.split(".")) or _is_private(alias.name):
                    found.append(f"{node.lineno}: from {module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in torch_names:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_boundary_check_finds_private_uses():
    source = (
        "import torch\nimport torch.distributed as dist\n"
        "from torch.distributed.checkpoint._traverse import set_element\n"
        "from torch.distributed.checkpoint.planner_helpers import _create_write_items\n"
        "from torch.distributed.tensor import DTensor\n"
        "n = torch._utils._element_size(torch.float32)\nx = DTensor._local_tensor\ny = dist._functional\n"
        "ok = torch.__version__, self._storage\n"
    )
    assert sorted({int(line.split(":")[0]) for line in private_torch_uses(source)}) == [3, 4, 6, 7, 8]


def test_only_the_boundary_module_uses_private_torch_names():
    offenders = {
        str(path.relative_to(PACKAGE_DIR.parent)): uses
        for path in sorted(PACKAGE_DIR.rglob("*.py"))
        if path != BOUNDARY and (uses := private_torch_uses(path.read_text()))
    }
    assert offenders == {}, f"private torch API outside shardckpt/engine/_torch_private.py: {offenders}"
    assert private_torch_uses(BOUNDARY.read_text()), "the boundary module should hold the private imports"
