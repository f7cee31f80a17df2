"""The ``shardckpt`` command line: a thin argparse front over the library.

Every subcommand is one :class:`Command` in :data:`COMMANDS`, made of two small
functions: ``configure`` adds its arguments, ``run`` does the work and returns the
exit status. To add one, write those two functions in the module of ``cli/`` that fits
(:mod:`~shardckpt.cli.audit`: ``inspect``, ``verify``; :mod:`~shardckpt.cli.listing`:
``ls``; :mod:`~shardckpt.cli.convert`: ``export``, ``import``, ``diff``, ``materialize``)
and :func:`register` a Command there; ``--help`` is built from its fields.

Exit status, for every subcommand: 0 success; 1 the checkpoint is damaged
(``verify`` found problems); 2 a path does not exist or is not a committed checkpoint
this shardckpt can read (one line on stderr names it), or the command line is wrong.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence

# The subcommands register themselves on import, in the order --help lists them:
# inspect and verify, ls, then export, import, diff and materialize.
import shardckpt.cli.audit
import shardckpt.cli.listing

# isort: split
import shardckpt.cli.convert  # noqa: F401
from shardckpt._version import __version__
from shardckpt.cli.base import COMMANDS, EXIT_DAMAGED, EXIT_OK, EXIT_UNUSABLE, Command, register
from shardckpt.errors import ShardckptError

__all__ = ["COMMANDS", "EXIT_DAMAGED", "EXIT_OK", "EXIT_UNUSABLE", "Command", "build_parser", "main", "register"]

_EXIT_STATUS = """exit status:
  0  success
  1  the checkpoint is damaged
  2  a path is missing or not a committed checkpoint, or a bad command line"""


def build_parser() -> argparse.ArgumentParser:
    examples = [e for c in COMMANDS.values() for e in c.examples[:1]]
    parser = argparse.ArgumentParser(
        prog="shardckpt",
        description=textwrap.fill(
            "Look into and check shardckpt checkpoints: folders of safetensors data files "
            "committed by one manifest.json. Paths are local folders or fsspec URLs "
            "(s3://, gs://, ...; credentials come from the usual environment). "
            "Run 'shardckpt COMMAND --help' for the options of one command.",
            79,
        ),
        epilog=_epilog(examples) + "\n\n" + _EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"shardckpt {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(
            cmd.name,
            help=cmd.summary,
            description=textwrap.fill(cmd.description, 79),
            epilog=_epilog(list(cmd.examples)),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.configure(sub)
        sub.set_defaults(run=cmd.run)
    return parser


def _epilog(examples: list[str]) -> str:
    return "examples:\n" + "\n".join(f"  {e}" for e in examples)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``shardckpt`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else EXIT_UNUSABLE
    try:
        return int(args.run(args))
    except BrokenPipeError:
        # The reader went away (`shardckpt inspect ... | head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except (ShardckptError, OSError) as e:
        print(f"shardckpt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
