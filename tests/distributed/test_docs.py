"""The documentation runs (issue #15), so README cannot drift from the code again.

- README.md: every ```python block, top to bottom, all in one working folder (a reader
  following the page), once on one process and once on 2 gloo ranks under torchrun; then,
  after the 2-rank run, every ``shardckpt ...`` line of its shell blocks, in that folder,
  must exit 0 (the set-up commands of "Quick start", ``bash launch/...`` and ``bash
  tests/run.sh``, are not run: they are the suite and the demos themselves).
- docs/: the first ```python block of each guide page (``GUIDES``), the same way, each in
  a folder of its own. Pages that are reference or reports are listed in ``REFERENCE``
  with the reason; a new page must be put in one of the two.

Each block runs in a namespace of its own after the prelude, but all the blocks of one
world size share one launch (an interpreter and torch import cost seconds each; the
suite has a time budget): one python process, one torchrun job. When a block fails, that
launch ends there and every block after it runs in a launch of its own, so each failure
is still reported (``Workspace.run_blocks``).

What the snippets assume (``model``, ``optim``, ``step``, ``state``, ``total_steps``, ``v``,
``mgr``...) is defined by tests/support/doc_prelude.py; tests/support/doc_runner.py runs
prelude and snippet, with tracebacks naming the page's own lines. A snippet that uses a
name the prelude lacks fails naming it. S3 URLs run against a local moto server (its
endpoint and credentials in the standard AWS environment variables; buckets a snippet
names are created first). No block is skipped: one that cannot run as written gets an
entry in ``ONE_PROCESS``, ``SETUP``, ``SUBSTITUTE`` or ``PAGE_ENV`` below, with the reason.

A failing block fails its test with the block, where it is, how it ran, and its output.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from distributed import run_command
from s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server, moto_available

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "support" / "doc_runner.py"
README = "README.md"

# docs/ pages that teach a task: their first ```python block is run.
GUIDES = ("docs/manager.md", "docs/training.md", "docs/interop.md", "docs/storage.md", "docs/scale.md")
# docs/ pages that are reference or reports: not run, for the reason given.
REFERENCE = {
    "docs/architecture.md": "the package's layout and data flow; no python block",
    "docs/benchmarks.md": "measurements; its shell blocks run the benchmarks for minutes",
    "docs/design.md": "how it is built and why; no python block",
    "docs/format.md": "the on-disk format's reference; its blocks read a data file named by the save id of "
    "the checkpoint the page describes (fd68cfe241f8), not one a reader has",
    "docs/reliability.md": "the failure model and its evidence; no python block",
    "docs/recovery.md": "the fast tier needs ranks on two nodes; tests/distributed/test_local_tier_ranks.py runs "
    "its calls on 4 ranks as 2 simulated nodes",
    "docs/from_dcp.md": "differences from DCP, no python block; tests/unit/test_from_dcp.py runs each one "
    "against DCP and shardckpt",
}
# Blocks that run on one process only (every other runs on 1 and on 2 ranks), and why.
ONE_PROCESS = {
    "docs/interop.md": "export_checkpoint and read_state_dict are not collective: one process reads the "
    "checkpoint (shardckpt/convert/source.py)",
}
# What a page's example assumes beyond the prelude, run before it in the same namespace.
SETUP = {
    # the checkpoint the example exports, with the "model" key it selects
    "docs/interop.md": 'shardckpt.save({"model": model.state_dict(), "step": 1000}, "runs/llama/step_0000001000")\n',
}
# Placeholders replaced in a block before it runs: {endpoint} is the local S3 server's URL.
SUBSTITUTE = {
    "docs/storage.md": {"https://ceph.example.org": "{endpoint}"},
}
# Environment a page's example reads, beyond the AWS variables that point at the local server.
PAGE_ENV = {
    "docs/storage.md": {"CEPH_KEY": ACCESS_KEY_ID, "CEPH_SECRET": SECRET_ACCESS_KEY},
}
SHELL_COMMAND = re.compile(r"^(shardckpt|python3? -m shardckpt)\s")
DOC_OK = re.compile(r"DOC-OK (\S+?:\d+)")  # doc_runner.py's line for a block that ran to its end
BUCKET = re.compile(r"\bs3a?://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository, e.g. "README.md"
    line: int  # the page's line of the block's first line of code
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of ``page`` (```lang ... ```), in order, dedented to their fence."""
    lines = (REPO / page).read_text("utf-8").split("\n")
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w+)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        indent, end = fence.group(1), i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]]
        found.append(Block(page, i + 2, fence.group(2), "\n".join(body) + "\n"))
        i = end + 1
    return found


def python_blocks(page: str) -> list[Block]:
    return [b for b in blocks(page) if b.lang == "python"]


def shell_lines(page: str) -> list[tuple[str, str]]:
    """(where, command) for every ``shardckpt ...`` line of the page's shell blocks."""
    return [
        (f"{b.page}:{b.line + n}", line.strip())
        for b in blocks(page)
        if b.lang in ("bash", "sh", "shell", "console")
        for n, line in enumerate(b.code.splitlines())
        if SHELL_COMMAND.match(line.strip())
    ]


def numbered(block: Block) -> str:
    return "\n".join(f"{block.line + n:5d} | {line}" for n, line in enumerate(block.code.splitlines()))


def _tail(text: str, limit: int = 8000) -> str:
    return text if len(text) <= limit else "[...]\n" + text[-limit:]


class Workspace:
    """One world size's run of the pages: a folder per page, and the environment the
    snippets see: this checkout first on PYTHONPATH, a ``shardckpt`` command that is this
    interpreter's ``python -m shardckpt`` (the console script runs the same
    ``shardckpt.cli.app:main``; one elsewhere on PATH may belong to another checkout), and
    one local S3 server for the buckets any of the blocks names."""

    def __init__(self, folder: Path, world_size: int) -> None:
        self.folder = folder
        self.world_size = world_size
        self.folder.mkdir(parents=True, exist_ok=True)
        bin_dir = folder / ".doc-test-bin"
        bin_dir.mkdir(exist_ok=True)
        command = bin_dir / "shardckpt"
        command.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m shardckpt "$@"\n')
        command.chmod(command.stat().st_mode | stat.S_IXUSR)
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {
            **os.environ,
            "PYTHONPATH": pythonpath,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1",
        }
        self.endpoint = ""
        self.servers: list[S3Server] = []

    def close(self) -> None:
        for server in self.servers:
            server.stop()

    def page_folder(self, page: str) -> Path:
        folder = self.folder / Path(page).stem
        folder.mkdir(exist_ok=True)
        return folder

    def _serve(self, plan: list[Block]) -> None:
        """The S3 server for the buckets the plan's blocks name, and the pages' environment."""
        buckets = sorted({bucket for b in plan for bucket in BUCKET.findall(b.code)})
        if buckets and not self.servers:
            if not moto_available():
                pytest.skip(f"{plan[0].where}.. uses S3: moto is not installed (`pip install -e '.[test]'`)")
            server = S3Server()
            self.servers.append(server)
            self.env.update(server.env())
            self.endpoint = server.endpoint_url
        for bucket in buckets:
            self.servers[0].create_bucket(bucket)
        for b in plan:
            self.env.update(PAGE_ENV.get(b.page, {}))

    def _entry(self, block: Block) -> dict[str, object]:
        """The block's plan entry for doc_runner.py: its code, with its page's substitutions
        made, in a file in its page's folder."""
        code, folder = block.code, self.page_folder(block.page)
        for placeholder, value in SUBSTITUTE.get(block.page, {}).items():
            assert placeholder in code, f"{block.where}: the placeholder {placeholder!r} is gone: update SUBSTITUTE"
            code = code.replace(placeholder, value.format(endpoint=self.endpoint))
        snippet = folder / f".doc-test-{Path(block.page).stem}-{block.line}.py"
        snippet.write_text(code)
        setup = None
        if block.page in SETUP:
            setup = folder / f".doc-test-{Path(block.page).stem}-setup.py"
            setup.write_text(SETUP[block.page])
        return {"snippet": str(snippet), "source": block.page, "line": block.line, "cwd": str(folder), "setup": setup}

    def _launch(self, plan: list[Block], name: str) -> tuple[set[str], str]:
        """Run ``plan`` in one launch: (the blocks that ran to their end, how it went)."""
        entries = [self._entry(b) for b in plan]
        plan_file = self.folder / f".doc-test-plan-{name}.json"
        plan_file.write_text(json.dumps([{**e, "setup": e["setup"] and str(e["setup"])} for e in entries]))
        if self.world_size == 1:
            cmd = [sys.executable, str(RUNNER), str(plan_file)]
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd = [*launcher, "--nproc-per-node", str(self.world_size), str(RUNNER), str(plan_file)]
        done = run_command(cmd, cwd=self.folder, env=self.env)
        passed = set(DOC_OK.findall(done.stdout))
        how = "one process" if self.world_size == 1 else f"{self.world_size} ranks under torchrun"
        report = (
            f"exit {done.returncode} on {how}, in {self.folder}\n"
            f"----- stdout -----\n{_tail(done.stdout)}\n----- stderr -----\n{_tail(done.stderr)}"
        )
        if done.returncode != 0:  # a launch that failed after its last block passed still fails
            passed.discard(plan[-1].where)
        return passed, report

    def run_blocks(self, plan: list[Block]) -> dict[str, str | None]:
        """Every block of ``plan``, in order, each in a fresh namespace after the prelude, in
        its page's folder: block.where -> None if it ran to its end, otherwise the failure,
        with the block and the output.

        All run in one launch. When a block fails there, the launch ends (a rank may be stuck
        in its collectives); each block after it then runs in a launch of its own, in order,
        as before, so every failing block is reported, not only the first."""
        self._serve(plan)
        results: dict[str, str | None] = {}
        remaining = list(plan)
        while remaining:
            passed, report = self._launch(remaining, name=f"{len(plan) - len(remaining)}")
            ran = [b for b in remaining if b.where in passed]
            results.update((b.where, None) for b in ran)
            if len(ran) == len(remaining):
                break
            failed = remaining[len(ran)]
            before = [b.where for b in plan[: plan.index(failed)]]
            results[failed.where] = (
                f"{failed.where} failed ({report})\n"
                f"(in this launch, before it and in the same interpreter: {', '.join(before) or 'nothing'})\n"
                f"----- the block -----\n{numbered(failed)}"
            )
            remaining = remaining[len(ran) + 1 :]
            for block in remaining:  # one launch each, as a reader runs them, to report each failure
                passed, report = self._launch([block], name=f"{plan.index(block)}-alone")
                results[block.where] = (
                    None
                    if block.where in passed
                    else f"{block.where} failed ({report})\n----- the block -----\n{numbered(block)}"
                )
            remaining = []
        return results

    def run_shell(self, where: str, command: str, folder: Path) -> str | None:
        done = run_command(["bash", "-c", command], cwd=folder, env=self.env)
        if done.returncode == 0:
            return None
        return (
            f"{where}: `{command}` exited {done.returncode}, in {folder} (after README's python blocks ran "
            f"there on {self.world_size} ranks):\n----- stdout -----\n{_tail(done.stdout)}\n"
            f"----- stderr -----\n{_tail(done.stderr)}"
        )


def world_plan(world_size: int) -> list[Block]:
    """What runs on ``world_size`` processes: README's python blocks top to bottom, then the
    first block of each guide (on 2 ranks: those not in ONE_PROCESS)."""
    guides = [python_blocks(page)[0] for page in GUIDES if world_size == 1 or page not in ONE_PROCESS]
    return python_blocks(README) + guides


class DocRuns:
    """The pages run once per world size for the whole module (one launch each; the tests
    below each assert on their own blocks), and README's shell lines once, after its
    blocks ran on 2 ranks (its commands then see a checkpoint saved by 2 ranks)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.workspaces: dict[int, Workspace] = {}
        self.results: dict[int, dict[str, str | None]] = {}
        self.shell_results: list[str | None] | None = None

    def blocks(self, world_size: int) -> dict[str, str | None]:
        if world_size not in self.results:
            workspace = self.workspaces[world_size] = Workspace(self.root / f"{world_size}proc", world_size)
            self.results[world_size] = workspace.run_blocks(world_plan(world_size))
        return self.results[world_size]

    def shell(self) -> list[str | None]:
        if self.shell_results is None:
            self.blocks(2)
            workspace = self.workspaces[2]
            folder = workspace.page_folder(README)
            self.shell_results = [workspace.run_shell(where, cmd, folder) for where, cmd in shell_lines(README)]
        return self.shell_results

    def close(self) -> None:
        for workspace in self.workspaces.values():
            workspace.close()


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DocRuns]:
    runs = DocRuns(tmp_path_factory.mktemp("docs"))
    try:
        yield runs
    finally:
        runs.close()


# ---------------------------------------------------------------- the pages


def test_every_docs_page_is_a_guide_or_listed_as_reference() -> None:
    pages = sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))
    unlisted = [p for p in pages if p not in GUIDES and p not in REFERENCE]
    assert not unlisted, f"put {unlisted} in GUIDES (its first python block runs) or REFERENCE (with why not)"
    assert not set(GUIDES) & set(REFERENCE)
    for page in (*GUIDES, *ONE_PROCESS, *SETUP, *SUBSTITUTE, *PAGE_ENV):
        assert (REPO / page).is_file(), page
    for page in GUIDES:
        assert python_blocks(page), f"{page} is listed as a guide but has no ```python block"


def test_the_parser_finds_readmes_blocks() -> None:
    # so that a change of fence style cannot make the tests below run nothing
    assert len(python_blocks(README)) >= 2
    assert any("shardckpt.save(" in b.code for b in python_blocks(README))
    assert shell_lines(README), "README has no `shardckpt ...` shell lines any more?"


@pytest.mark.parametrize("world_size", [1, 2], ids=["1proc", "2ranks"])
def test_readme_runs_top_to_bottom(doc_runs: DocRuns, world_size: int) -> None:
    """README's python blocks in order, one folder, each in a fresh namespace; on 2 ranks,
    then its shell lines there. Every failure is reported, not only the first."""
    results = doc_runs.blocks(world_size)
    failures = [results[b.where] for b in python_blocks(README)]
    if world_size == 2:
        failures += doc_runs.shell()
    failed = [f for f in failures if f is not None]
    assert not failed, f"{len(failed)} of README's snippets failed:\n\n" + "\n\n".join(failed)


GUIDE_CASES = [
    pytest.param(page, world_size, id=f"{page}-{'1proc' if world_size == 1 else '2ranks'}")
    for page in GUIDES
    for world_size in (1, 2)
    if world_size == 1 or page not in ONE_PROCESS
]


@pytest.mark.parametrize(("page", "world_size"), GUIDE_CASES)
def test_guide_first_example_runs(doc_runs: DocRuns, page: str, world_size: int) -> None:
    failure = doc_runs.blocks(world_size)[python_blocks(page)[0].where]
    assert failure is None, failure


def test_a_failing_block_is_reported_and_the_blocks_after_it_still_run(tmp_path: Path) -> None:
    # the shared launch stops at a failing block; the ones after it must still run and report
    plan = [
        Block(README, 1, "python", "first = 1\n"),
        Block(README, 3, "python", "raise ValueError('the page is wrong here')\n"),
        Block(README, 5, "python", "assert not os.path.exists('never')\n"),
    ]
    workspace = Workspace(tmp_path, 1)
    try:
        results = workspace.run_blocks(plan)
    finally:
        workspace.close()
    assert results[f"{README}:1"] is None and results[f"{README}:5"] is None, results
    failure = results[f"{README}:3"]
    assert failure is not None and "the page is wrong here" in failure and f"{README}:3" in failure, failure
