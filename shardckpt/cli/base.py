"""What every ``shardckpt`` subcommand shares: the Command record, the registry, exit
codes, the output flags and table formatting. :mod:`shardckpt.cli.app` builds the
parser from the registry."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shardckpt.errors import IntegrityError

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_UNUSABLE = 2

_VALUE_WIDTH = 100
_PATH_HELP = "checkpoint folder: a local path or an fsspec URL such as s3://bucket/run/step_0000000100"


@dataclass(frozen=True)
class Command:
    """One subcommand: ``shardckpt NAME ...``."""

    name: str
    summary: str  # one line, listed by ``shardckpt --help``
    description: str  # one paragraph, shown by ``shardckpt NAME --help``
    examples: tuple[str, ...]  # command lines shown under "examples:"
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    if command.name in COMMANDS:
        raise ValueError(f"subcommand {command.name!r} is registered twice")
    COMMANDS[command.name] = command
    return command


def _reported(
    name: str,
    args: argparse.Namespace,
    work: Callable[[], Any],
    describe: Callable[[Any], str],
    status: Callable[[Any], int] = lambda report: EXIT_OK,
) -> int:
    """Run ``work`` and print the report it returns: as JSON with ``--json``, else as
    ``describe`` words it; exit with ``status(report)``. Damage is exit 1, a bad request
    (no key matches, bad size, bad source) exit 2, with the reason on stderr."""
    try:
        report = work()
    except IntegrityError as e:
        print(f"shardckpt {name}: checkpoint damaged: {e}", file=sys.stderr)
        return EXIT_DAMAGED
    except ValueError as e:
        print(f"shardckpt {name}: error: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(json.dumps(report.to_json(), indent=2) if args.json else describe(report))
    return status(report)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]


def _clip(text: str) -> str:
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 3] + "..."


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    """``--json`` and ``--no-progress``, for subcommands that report on a long read."""
    p.add_argument("--json", action="store_true", help="print the result as one JSON document")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (one is shown on stderr when stderr is a terminal)"
    )


def _progress(args: argparse.Namespace) -> bool:
    """Whether to show a progress bar: not with ``--no-progress``, and only on a terminal."""
    return not args.no_progress and sys.stderr.isatty()
