"""Runs one documentation snippet: ``python doc_runner.py SNIPPET_FILE SOURCE FIRST_LINE [SETUP_FILE]``.

The snippet runs after ``doc_prelude.py``, in its namespace, in the current directory
(tests/distributed/test_docs.py starts this in a fresh interpreter, or under torchrun
for 2 ranks, in a temporary folder). It is compiled under the name of the page it comes
from, padded so that a traceback names the page's own line: ``README.md:35``.

``SETUP_FILE``, if given, runs between the prelude and the snippet, in the same
namespace: what one page's example assumes beyond the prelude, such as a checkpoint to
export.

Before running, the names the snippet uses without defining them are checked against
what the prelude defines; one it does not define fails at once, naming it (rather than
a NameError after half the snippet ran).
"""

from __future__ import annotations

import ast
import builtins
import os
import sys


def free_names(tree: ast.AST) -> set[str]:
    """Names read in ``tree`` that it never binds (assignments, loop and ``with`` targets,
    imports, definitions, parameters) and that are not builtins."""
    read: set[str] = set()
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound - set(dir(builtins))


def main() -> None:
    snippet_file, source, first_line = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(snippet_file) as f:
        snippet = "\n" * (first_line - 1) + f.read()  # line numbers as on the page
    code = compile(snippet, source, "exec")
    needed = free_names(ast.parse(snippet))
    prelude = os.path.join(os.path.dirname(os.path.abspath(__file__)), "doc_prelude.py")
    namespace: dict[str, object] = {"__name__": "__main__", "DOC_FREE_NAMES": needed}
    with open(prelude) as f:
        exec(compile(f.read(), prelude, "exec"), namespace)
    missing = sorted(needed - set(namespace))
    if missing:
        sys.exit(
            f"{source}:{first_line}: the snippet uses {', '.join(missing)} without defining it, and "
            f"tests/support/doc_prelude.py does not define it either: define it there"
        )
    if len(sys.argv) > 4:
        with open(sys.argv[4]) as f:
            exec(compile(f.read(), f"doc-test setup for {source}", "exec"), namespace)
    exec(code, namespace)
    namespace["doc_test_finish"]()  # type: ignore[operator]


if __name__ == "__main__":
    main()
