"""The documentation runs (issue #15), so README cannot drift from the code again.

- README.md: every ```python block, top to bottom, each in a fresh interpreter, all in one
  working folder (a reader following the page), once on one process and once on 2 gloo
  ranks under torchrun; then every ``shardckpt ...`` line of its shell blocks, in that
  folder, must exit 0 (the set-up commands of "Quick start", ``bash launch/...`` and
  ``bash tests/run.sh``, are not run: they are the suite and the demos themselves).
- docs/: the first ```python block of each guide page (``GUIDES``), the same way, each in
  a folder of its own. Pages that are reference or reports are listed in ``REFERENCE``
  with the reason; a new page must be put in one of the two.

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

import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from distributed import run_command
from s3server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server, moto_available

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "support" / "doc_runner.py"
README = "README.md"

# docs/ pages that teach a task: their first ```python block is run.
GUIDES = ("docs/manager.md", "docs/training.md", "docs/interop.md", "docs/storage.md")
# docs/ pages that are reference or reports: not run, for the reason given.
REFERENCE = {
    "docs/architecture.md": "the package's layout and data flow; no python block",
    "docs/benchmarks.md": "measurements; its shell blocks run the benchmarks for minutes",
    "docs/design.md": "how it is built and why; no python block",
    "docs/format.md": "the on-disk format's reference; its blocks read a data file named by the save id of "
    "the checkpoint the page describes (fd68cfe241f8), not one a reader has",
    "docs/reliability.md": "the failure model and its evidence; no python block",
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
    """A folder the snippets run in, with the environment they see: this checkout first on
    PYTHONPATH, a ``shardckpt`` command that is this interpreter's ``python -m shardckpt``
    (the console script runs the same ``shardckpt.cli.app:main``; one elsewhere on PATH may
    belong to another checkout), and a local S3 server when a snippet names an s3:// URL."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
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
        self.servers: list[S3Server] = []

    def close(self) -> None:
        for server in self.servers:
            server.stop()

    def _prepare(self, block: Block) -> tuple[str, dict[str, str]]:
        """The block's code with its page's substitutions made, and its environment."""
        code, env = block.code, dict(self.env)
        buckets = sorted(set(BUCKET.findall(code)))
        endpoint = ""
        if buckets:
            if not moto_available():
                pytest.skip(f"{block.where} uses S3: moto is not installed (`pip install -e '.[test]'`)")
            server = S3Server()
            self.servers.append(server)
            for bucket in buckets:
                server.create_bucket(bucket)
            env.update(server.env())
            endpoint = server.endpoint_url
        for placeholder, value in SUBSTITUTE.get(block.page, {}).items():
            assert placeholder in code, f"{block.where}: the placeholder {placeholder!r} is gone: update SUBSTITUTE"
            code = code.replace(placeholder, value.format(endpoint=endpoint))
        env.update(PAGE_ENV.get(block.page, {}))
        return code, env

    def run_block(self, block: Block, world_size: int) -> str | None:
        """Run ``block`` on ``world_size`` processes (2: torchrun); None if it exited 0,
        otherwise the failure, with the block and its output."""
        code, env = self._prepare(block)
        snippet = self.folder / f".doc-test-{Path(block.page).stem}-{block.line}.py"
        snippet.write_text(code)
        args = [str(snippet), block.page, str(block.line)]
        if block.page in SETUP:
            setup = self.folder / f".doc-test-{Path(block.page).stem}-setup.py"
            setup.write_text(SETUP[block.page])
            args.append(str(setup))
        if world_size == 1:
            cmd = [sys.executable, str(RUNNER), *args]
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd = [*launcher, "--nproc-per-node", str(world_size), str(RUNNER), *args]
        done = run_command(cmd, cwd=self.folder, env=env)
        if done.returncode == 0:
            return None
        how = "one process" if world_size == 1 else f"{world_size} ranks under torchrun"
        return (
            f"{block.where} failed on {how} (exit {done.returncode}), in {self.folder}:\n"
            f"----- the block -----\n{numbered(block)}\n"
            f"----- stdout -----\n{_tail(done.stdout)}\n----- stderr -----\n{_tail(done.stderr)}"
        )

    def run_shell(self, where: str, command: str) -> str | None:
        done = run_command(["bash", "-c", command], cwd=self.folder, env=self.env)
        if done.returncode == 0:
            return None
        return (
            f"{where}: `{command}` exited {done.returncode}, in {self.folder} (after README's python blocks ran "
            f"there):\n----- stdout -----\n{_tail(done.stdout)}\n----- stderr -----\n{_tail(done.stderr)}"
        )


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
def test_readme_runs_top_to_bottom(tmp_path: Path, world_size: int) -> None:
    """README's python blocks in order, one folder, each in a fresh interpreter; then its
    shell lines there. Every failure is reported, not only the first."""
    workspace = Workspace(tmp_path / "reader")
    try:
        failures = [workspace.run_block(b, world_size) for b in python_blocks(README)]
        failures += [workspace.run_shell(where, command) for where, command in shell_lines(README)]
    finally:
        workspace.close()
    failed = [f for f in failures if f is not None]
    assert not failed, f"{len(failed)} of README's snippets failed:\n\n" + "\n\n".join(failed)


GUIDE_CASES = [
    pytest.param(page, world_size, id=f"{page}-{'1proc' if world_size == 1 else '2ranks'}")
    for page in GUIDES
    for world_size in (1, 2)
    if world_size == 1 or page not in ONE_PROCESS
]


@pytest.mark.parametrize(("page", "world_size"), GUIDE_CASES)
def test_guide_first_example_runs(tmp_path: Path, page: str, world_size: int) -> None:
    workspace = Workspace(tmp_path / "reader")
    try:
        failure = workspace.run_block(python_blocks(page)[0], world_size)
    finally:
        workspace.close()
    assert failure is None, failure
