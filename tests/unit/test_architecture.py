"""The package layout is the architecture (docs/architecture.md); these tests keep it so.

Every ``import`` in shardckpt/ (module level or inside a function, but not under
``if TYPE_CHECKING:``) is read from the source with ``ast`` and checked against the
allowed arrows:

    cli, integrations  ->  manager, training, convert, dcp  ->  engine  ->  storage  ->  format  ->  errors

A room may import itself and any room below it; rooms on one level do not import each
other. The package root (``shardckpt/__init__.py``, ``__main__.py``) may import
anything. Module-level imports must also form no cycle, and third-party stacks stay in
their room (fsspec/s3fs in storage, lightning in integrations).
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import shardckpt

pytestmark = pytest.mark.compat  # the subset .ci/torch_compat runs on other torch releases

PACKAGE_DIR = Path(shardckpt.__file__).parent

LEVELS = {
    "errors": 0,
    "_version": 0,
    "format": 1,
    "storage": 2,
    "engine": 3,
    "manager": 4,
    "training": 4,
    "convert": 4,
    "dcp": 4,
    "cli": 5,
    "integrations": 5,
}
ROOT_ROOM = "<root>"
THIRD_PARTY_ROOMS = {
    "fsspec": {"storage"},
    "s3fs": {"storage"},
    "botocore": {"storage"},
    "lightning": {"integrations"},
    "transformers": {"convert"},  # convert/ties.py asks an architecture which weights it ties (lazily)
    "torchtitan": {"integrations"},
    "xxhash": {"format"},  # format/integrity.py: "swap the algorithm here and nowhere else"
    "msgspec": {"format"},  # manifest_records.py, manifest_bulk.py: the tensor records, decoded by type
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module, dotted (a shardckpt module or a third-party top name)
    line: int
    top_level: bool  # executed at import time (not inside a function or class body's method)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__init__", "__main__"):
        return ROOT_ROOM
    return parts[1]


def is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (PACKAGE_DIR / rel).with_suffix(".py").is_file() or (PACKAGE_DIR / rel / "__init__.py").is_file()


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path) -> list[Import]:
    source = module_name(path)
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            nested = top_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(source, alias.name, child.lineno, top_level))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import: resolve against this module's package
                    anchor = source.split(".") if is_package else source.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if base.startswith("shardckpt") and is_module(sub) else base
                    found.append(Import(source, target, child.lineno, top_level))
            visit(child, nested)

    visit(ast.parse(path.read_text("utf-8"), filename=str(path)), True)
    return found


def all_imports() -> list[Import]:
    return [imp for path in sorted(PACKAGE_DIR.rglob("*.py")) for imp in imports_of(path)]


def allowed(src_room: str, dst_room: str) -> bool:
    if src_room == ROOT_ROOM or src_room == dst_room:
        return True
    if dst_room == ROOT_ROOM:
        return False  # nothing inside imports the package root (that was the import cycle)
    return LEVELS[dst_room] < LEVELS[src_room]


def test_every_room_is_known():
    rooms = {room(module_name(p)) for p in PACKAGE_DIR.rglob("*.py")}
    assert rooms - {ROOT_ROOM} == set(LEVELS), "a new room needs its level here and a section in docs/architecture.md"


def test_no_upward_or_sideways_import():
    bad = [
        f"{imp.source} (line {imp.line}) imports {imp.target}: {room(imp.source)} may not depend on {room(imp.target)}"
        for imp in all_imports()
        if imp.target.startswith("shardckpt") and not allowed(room(imp.source), room(imp.target))
    ]
    assert not bad, "imports against the layering of docs/architecture.md:\n" + "\n".join(bad)


def test_third_party_stacks_stay_in_their_room():
    bad = []
    for imp in all_imports():
        top = imp.target.split(".")[0]
        if top in THIRD_PARTY_ROOMS and room(imp.source) not in THIRD_PARTY_ROOMS[top]:
            bad.append(f"{imp.source} (line {imp.line}) imports {imp.target}")
    assert not bad, "\n".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in ``edges`` as a list of modules (first == last), or None. Iterative DFS."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(edges):
        if state.get(start):
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(edges.get(start, ())))]
        path = [start]
        state[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(edges.get(nxt, ()))))
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_at_module_level():
    edges: dict[str, set[str]] = {}
    for imp in all_imports():
        if imp.top_level and imp.target.startswith("shardckpt.") and imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    cycle = find_cycle(edges)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_no_function_level_import_hides_a_cycle():
    """A deferred import inside a function is allowed only downwards (or into a sibling
    module of its own room that does not import the importer back)."""
    edges: dict[str, set[str]] = {}
    for imp in all_imports():
        if imp.target.startswith("shardckpt.") and imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    # Package __init__ modules re-export their children, so an edge into a package from
    # inside it is an edge back to the children: cycles through __init__ count too.
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle (counting imports inside functions): " + " -> ".join(cycle or [])


def test_import_shardckpt_stays_light():
    """``import shardckpt`` loads the engine, not the converters, the CLI or an
    integration's framework (tqdm is not checked: ``torch.hub`` imports it anyway)."""
    code = (
        "import sys, shardckpt; "
        "heavy = sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('lightning', 'torchtitan', 'matplotlib', 'safetensors') "
        "or m.startswith(('shardckpt.cli', 'shardckpt.integrations', 'shardckpt.convert', 'shardckpt.dcp'))); "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"import shardckpt loaded: {out.stdout.strip()}"


def test_lazy_public_names_resolve():
    for name in shardckpt.__all__:
        assert getattr(shardckpt, name) is not None, name
    assert importlib.util.find_spec("shardckpt.__main__") is not None
