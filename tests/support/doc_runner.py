"""Runs documentation snippets: ``python doc_runner.py PLAN.json`` (or under torchrun).

The plan is a JSON list of blocks, run in its order in this one interpreter (one launch
for many blocks: an interpreter and torch import cost seconds each):
``{"snippet": FILE, "source": PAGE, "line": FIRST_LINE, "cwd": FOLDER, "setup": FILE|null}``.
Each block runs in a namespace of its own, in its ``cwd``, after ``doc_prelude.py`` ran
afresh in that namespace (a new model, optimizer and state, the seed reset), so no name
carries over from one block to the next; under torchrun every block shares the one
process group the first prelude initialized. tests/distributed/test_docs.py writes the
plan (a temporary folder per page) and starts this.

A block is compiled under the name of the page it comes from, padded so that a traceback
names the page's own line: ``README.md:35``. ``setup``, if given, runs between the
prelude and the snippet, in the same namespace: what one page's example assumes beyond
the prelude, such as a checkpoint to export.

Before a block runs, the names it uses without defining them are checked against what
the prelude defines; one it does not define fails at once, naming it (rather than a
NameError after half the snippet ran).

After each block that ran to its end (on every rank: the prelude's ``doc_test_finish``
waits for all), this prints ``DOC-OK PAGE:LINE``. The first block that fails ends the
run with its traceback and a non-zero exit: under torchrun the other ranks may be
waiting in that block's collectives, so nothing after it can run in this launch.
"""

from __future__ import annotations

import ast
import atexit
import builtins
import json
import os
import sys
import threading


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


def run_block(block: dict[str, object], prelude_code: object) -> None:
    source, first_line = str(block["source"]), int(str(block["line"]))
    os.chdir(str(block["cwd"]))
    with open(str(block["snippet"])) as f:
        snippet = "\n" * (first_line - 1) + f.read()  # line numbers as on the page
    code = compile(snippet, source, "exec")
    needed = free_names(ast.parse(snippet))
    namespace: dict[str, object] = {"__name__": "__main__", "DOC_FREE_NAMES": needed}
    exec(prelude_code, namespace)  # type: ignore[arg-type]
    missing = sorted(needed - set(namespace))
    if missing:
        sys.exit(
            f"{source}:{first_line}: the snippet uses {', '.join(missing)} without defining it, and "
            f"tests/support/doc_prelude.py does not define it either: define it there"
        )
    if block.get("setup"):
        with open(str(block["setup"])) as f:
            exec(compile(f.read(), f"doc-test setup for {source}", "exec"), namespace)
    exec(code, namespace)
    namespace["doc_test_finish"]()  # type: ignore[operator]
    sys.stdout.flush()
    os.write(1, f"DOC-OK {source}:{first_line}\n".encode())  # one write: ranks' lines do not interleave


def main() -> None:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    prelude = os.path.join(os.path.dirname(os.path.abspath(__file__)), "doc_prelude.py")
    with open(prelude) as f:
        prelude_code = compile(f.read(), prelude, "exec")
    for block in plan:
        run_block(block, prelude_code)
    import torch.distributed as dist  # the prelude initialized the group under torchrun

    if dist.is_initialized():
        dist.destroy_process_group()


def leave() -> None:
    """End as the interpreter would, without its module teardown: the non-daemon threads
    (and executors' workers) joined, the atexit handlers run, the output flushed. Tearing
    down a process that imported torch costs seconds per launch, and under torchrun gloo's
    teardown can abort a rank that passed (tests/support/distributed.py ends its ranks so)."""
    threading._shutdown()  # what Py_Finalize calls first
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    leave()
