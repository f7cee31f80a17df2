"""What every ``shardckpt`` subcommand shares: the Command record, the registry, exit
codes and table formatting. :mod:`shardckpt.cli.app` builds the parser from the registry."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

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


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]


def _clip(text: str) -> str:
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 3] + "..."


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
