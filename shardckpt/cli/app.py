"""The ``shardckpt`` command line: a thin argparse front over the library.

Every subcommand is one :class:`Command` in :data:`COMMANDS`, made of two small
functions: ``configure`` adds its arguments, ``run`` does the work and returns the
exit status. To add one (``ls``, ``export``, ...), write those two functions next to
the others and :func:`register` a Command; ``--help`` is built from its fields.

Exit status, for every subcommand: 0 success; 1 the checkpoint is damaged
(``verify`` found problems); 2 a path does not exist or is not a committed checkpoint
this shardckpt can read (one line on stderr names it), or the command line is wrong.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from shardckpt._version import __version__
from shardckpt.cli.base import (
    _PATH_HELP,
    COMMANDS,
    EXIT_DAMAGED,
    EXIT_OK,
    EXIT_UNUSABLE,
    Command,
    _add_output_flags,
    _clip,
    _progress,
    _reported,
    _table,
    register,
)
from shardckpt.convert.audit import AuditReport, Problem, describe_checkpoint, verify_checkpoint
from shardckpt.convert.progress import human_bytes
from shardckpt.errors import CheckpointNotFoundError, ManifestError, ShardckptError, UnsupportedFormatVersionError
from shardckpt.format.layout import MANIFEST_NAME, parse_step_dir, step_dir_name
from shardckpt.storage import open_storage
from shardckpt.storage.folder import is_committed

# ---------------------------------------------------------------- inspect


def _configure_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help=_PATH_HELP)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON document instead of tables")
    p.add_argument(
        "--keys", metavar="PATTERN", help="show only keys matching this shell-style pattern, e.g. 'model.layers.0.*'"
    )


def _run_inspect(args: argparse.Namespace) -> int:
    summary = describe_checkpoint(args.path)
    if args.keys is not None:
        summary["keys"] = {k: v for k, v in summary["keys"].items() if fnmatch.fnmatchcase(k, args.keys)}
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=False))
    else:
        print(_format_summary(summary, pattern=args.keys))
    return EXIT_OK


def _format_summary(s: dict[str, Any], *, pattern: str | None) -> str:
    lines = [
        f"checkpoint  {s['path']}",
        f"format      shardckpt format {s['format_version']}, written by shardckpt {s['shardckpt_version']} "
        f"with torch {s['torch_version']}",
        f"created_at  {s['created_at']}",
        f"world_size  {s['world_size']}",
        f"keys        {s['num_keys']} ({s['num_tensors']} tensors, {s['num_values']} values)",
        _size_line(s),
    ]
    if s["metadata"]:
        lines.append(f"metadata    {json.dumps(s['metadata'])}")
    if s["bases"]:
        lines.append(
            f"bases       {', '.join(s['bases'])} (incremental: unchanged tensors are read from these "
            "checkpoints beside it; `shardckpt materialize` makes a copy without them)"
        )
        lines += ["", *_folders_table(s["folders"])]
    keys = s["keys"]
    tensors = [
        [k, r["dtype"], str(r["shape"]), str(r["chunks"]), human_bytes(r["bytes"])]
        for k, r in keys.items()
        if r["kind"] == "tensor"
    ]
    values = [[k, r["type"], _clip(json.dumps(r["value"]))] for k, r in keys.items() if r["kind"] == "value"]
    if tensors:
        lines += ["", *_table(["KEY", "DTYPE", "SHAPE", "CHUNKS", "SIZE"], tensors)]
    if values:
        lines += ["", *_table(["KEY", "TYPE", "VALUE (JSON)"], values)]
    if not keys:
        lines += ["", f"no key matches {pattern!r}" if pattern is not None else "the checkpoint holds no keys"]
    return "\n".join(lines)


def _size_line(s: dict[str, Any]) -> str:
    if s["total_bytes"] is None:  # format 3: the file sizes are in the index records, not the manifest
        return (
            f"size        {human_bytes(s['tensor_bytes'])} of tensor data in {s['num_files']} data files "
            "(format 3: file sizes are in the index records, which `shardckpt verify` reads)"
        )
    return (
        f"size        {human_bytes(s['total_bytes'])} in {s['num_files']} data files "
        f"({human_bytes(s['tensor_bytes'])} of tensor data)"
    )


def _folders_table(folders: list[dict[str, Any]]) -> list[str]:
    """Which bytes of an incremental checkpoint live in which checkpoint folder."""
    rows = [
        [
            f["folder"] + (" (this checkpoint)" if f["own"] else " (base)"),
            str(f["files"]),
            "-" if f["file_bytes"] is None else human_bytes(f["file_bytes"]),
            "-" if f["tensor_bytes"] is None else human_bytes(f["tensor_bytes"]),
        ]
        for f in folders
    ]
    return _table(["DATA IN FOLDER", "FILES", "FILE BYTES", "TENSOR BYTES"], rows)


# ---------------------------------------------------------------- verify


def _configure_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help=_PATH_HELP)
    _add_output_flags(p)


def _run_verify(args: argparse.Namespace) -> int:
    def work() -> AuditReport:
        try:
            return verify_checkpoint(args.path, progress=_progress(args))
        except UnsupportedFormatVersionError:
            raise
        except ManifestError as e:
            # The manifest exists, so the checkpoint was committed: a broken manifest is damage.
            return AuditReport(args.path, 0, 0, 0, [Problem(MANIFEST_NAME, None, str(e))])

    return _reported("verify", args, work, _format_report, lambda report: EXIT_OK if report.ok else EXIT_DAMAGED)


def _format_report(r: AuditReport) -> str:
    where = []
    if len(r.folders) > 1:  # incremental: say where the bytes were read from
        where = ["", *_folders_table([f.to_json() for f in r.folders])]
    if r.ok:
        ok = (
            f"OK  {r.path}: {r.files_checked} data files, {r.chunks_checked} chunks, "
            f"{human_bytes(r.bytes_hashed)} re-hashed; every checksum matches the manifest"
        )
        return "\n".join([ok, *where])
    files = len({p.file for p in r.problems})
    lines = [f"PROBLEM  {p}" for p in r.problems] + where
    lines.append(
        f"FAILED  {r.path}: {len(r.problems)} problem(s) in {files} file(s). Do not resume from this "
        "checkpoint: restore the files named above from a good copy, or load an earlier checkpoint."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- ls


def _configure_ls(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "root",
        metavar="ROOT",
        help="a CheckpointManager root: the folder holding step_0000000100-style folders (and maybe other checkpoints)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--monitor", metavar="METRIC", help="metric that decides the best step, e.g. val_loss")
    p.add_argument(
        "--mode", choices=("min", "max"), default="min", help="whether smaller or larger --monitor is better"
    )


_NOT_A_STEP = "checkpoint (not a manager step)"


def _run_ls(args: argparse.Namespace) -> int:
    from shardckpt.manager.retention import RetentionPolicy
    from shardckpt.manager.steps import list_other_checkpoints, list_root

    _check_root(args.root)
    infos = list_root(args.root)
    others = list_other_checkpoints(args.root)
    committed = [i.step for i in infos if i.committed]
    latest = committed[-1] if committed else None
    policy = RetentionPolicy(monitor=args.monitor, mode=args.mode)
    ranked = policy.best(committed, {i.step: i.metrics for i in infos}) if args.monitor else []
    best = ranked[0] if ranked else None
    if args.json:
        rows = [
            {
                "step": i.step,
                "folder": step_dir_name(i.step),
                "committed": i.committed,
                "foreign": i.foreign,
                "size_bytes": i.size_bytes,
                "metrics": i.metrics,
                "created_at": i.created_at,
                "world_size": i.world_size,
                "latest": i.step == latest,
                "best": i.step == best,
                "bases": list(i.bases),
                "base_bytes": i.base_bytes,
                "retired": i.retired,
            }
            for i in infos
        ]
        plain = [
            {"folder": o.name, "size_bytes": o.size_bytes, "created_at": o.created_at, "world_size": o.world_size}
            for o in others
        ]
        doc = {"root": args.root, "latest": latest, "best": best, "steps": rows, "other_checkpoints": plain}
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    if not infos and not others:
        print(
            f"{args.root}: no checkpoints: no manager step folders (step_0000000100, ...) and no other "
            f"folder holding a {MANIFEST_NAME}"
        )
        return EXIT_OK
    if infos:
        print("\n".join(_steps_table(infos, latest, best)))
    else:
        print(f"{args.root}: no manager step folders (a CheckpointManager names step 100 step_0000000100)")
    if any(not i.committed and not i.foreign and not i.retired for i in infos):
        print("UNCOMMITTED folders are left by interrupted saves: never restored, removed by the next writing manager.")
    if any(i.bases for i in infos):
        print(
            "INCREMENTAL steps read the tensors that did not change from the earlier step named; SIZE counts those "
            "bytes too. `shardckpt materialize STEP DST` makes a copy that needs no other folder."
        )
    if any(i.retired for i in infos):
        print(
            "RETIRED folders are deleted steps (no manifest: never restored) whose data files incremental steps "
            "still read; the manager removes them once no kept step does. Do not delete them by hand."
        )
    if any(i.foreign for i in infos):
        print(
            "FOREIGN folders were not written by shardckpt (no manifest.json, no .shardckpt-save.json): "
            "never restored, never deleted."
        )
    if others:
        table = [[o.name, _NOT_A_STEP, human_bytes(o.size_bytes), str(o.world_size or "-")] for o in others]
        example = f"{args.root.rstrip('/')}/{others[0].name}"
        print()
        print("\n".join(_table(["FOLDER", "STATE", "SIZE", "RANKS"], table)))
        print(
            f"A {_NOT_A_STEP} was saved with shardckpt.save to a folder of its own: `shardckpt inspect {example}` "
            f"shows it and shardckpt.load(state, {example!r}) loads it, but a CheckpointManager on this root "
            "never restores or deletes it (the manager's step 100 is step_0000000100)."
        )
    return EXIT_OK


def _steps_table(infos: list[Any], latest: int | None, best: int | None) -> list[str]:
    table: list[list[str]] = []
    incremental = any(i.bases for i in infos)
    for i in infos:
        marks = ",".join(m for m, on in (("latest", i.step == latest), ("best", i.step == best)) if on)
        state = "committed" if i.committed else "FOREIGN" if i.foreign else "RETIRED" if i.retired else "UNCOMMITTED"
        row = [str(i.step), state, human_bytes(i.size_bytes), str(i.world_size or "-")]
        if incremental:
            row.append(_bases_cell(i.bases, i.base_bytes))
        table.append([*row, json.dumps(i.metrics) if i.metrics else "-", marks])
    header = ["STEP", "STATE", "SIZE", "RANKS", *(["INCREMENTAL"] if incremental else []), "METRICS", ""]
    return _table(header, table)


def _bases_cell(bases: tuple[str, ...], base_bytes: int) -> str:
    """``on step 100 (2.0 GiB there)`` for an incremental step, ``-`` for a full one."""
    if not bases:
        return "-"
    steps = [parse_step_dir(b) for b in bases]
    names = [str(n) if n is not None else b for n, b in zip(steps, bases, strict=True)]
    return f"on step{'s' if len(names) > 1 else ''} {','.join(names)} ({human_bytes(base_bytes)} there)"


def _check_root(root: str) -> None:
    """CheckpointNotFoundError unless ``root`` is a folder; a checkpoint is not a root."""
    storage = open_storage(root)
    if is_committed(storage):
        raise CheckpointNotFoundError(
            f"{root} is a checkpoint, not a CheckpointManager root: `shardckpt inspect {root}` shows what it "
            f"holds; `shardckpt ls` lists the folders of a root, e.g. `shardckpt ls {_parent(root)}`"
        )
    if not storage.is_dir(""):
        what = "is a file, not a folder" if storage.exists("") else "does not exist"
        raise CheckpointNotFoundError(f"{root} {what}: pass the folder a CheckpointManager saves into")


def _parent(path: str) -> str:
    head = path.rstrip("/").rsplit("/", 1)
    return head[0] if len(head) == 2 and head[0] else "."


# ---------------------------------------------------------------- registry and entry point

register(
    Command(
        name="inspect",
        summary="show what a checkpoint holds: keys, dtypes, shapes, sizes, values",
        description=(
            "Print a summary of a committed checkpoint from its manifest alone, without reading "
            "any tensor data: the format version, the shardckpt and torch versions that wrote it, "
            "when, with how many processes, and its total size; then one row per tensor key "
            "(dtype, global shape, number of saved chunks, size) and one row per non-tensor value "
            "with its JSON. Long values are cut in the table; --json prints everything."
        ),
        examples=(
            "shardckpt inspect runs/llama/step_0000001000",
            "shardckpt inspect s3://bucket/run/step_0000001000 --keys 'model.layers.0.*'",
            "shardckpt inspect runs/llama/step_0000001000 --json | jq '.keys | length'",
        ),
        configure=_configure_inspect,
        run=_run_inspect,
    )
)

register(
    Command(
        name="verify",
        summary="re-read every byte of a checkpoint and check it against the manifest's checksums",
        description=(
            "Check that a committed checkpoint is intact: every data file listed in the manifest "
            "exists with its recorded size, its safetensors header agrees with the manifest, its "
            "whole-file xxh3 checksum matches, and every checksum block of every tensor chunk "
            "matches. Every problem is printed with the file and key it concerns; verify does not "
            "stop at the first. Exit status 0 means intact, 1 damaged, 2 not a committed checkpoint."
        ),
        examples=(
            "shardckpt verify runs/llama/step_0000001000",
            "shardckpt verify s3://bucket/run/step_0000001000 --json --no-progress > report.json",
        ),
        configure=_configure_verify,
        run=_run_verify,
    )
)

register(
    Command(
        name="ls",
        summary="list the steps under a CheckpointManager root: committed or not, size, metrics",
        description=(
            "List every step folder (step_0000000100 for step 100) under a root written by "
            "CheckpointManager, oldest first: "
            "whether it is committed (has a manifest; only those are ever restored), its size, "
            "the world size that saved it and the metrics saved with it. The latest committed step "
            "is marked, and with --monitor the best one too. Uncommitted folders are leftovers of "
            "interrupted saves; FOREIGN ones were not written by shardckpt (another tool's checkpoint "
            "named step_*) and are never touched. Metrics that are not a dict (another version, a "
            "hand edit) are shown as none. Below the steps, other committed checkpoints in the root "
            "(a folder such as step_100 saved with shardckpt.save) are listed as 'checkpoint (not a "
            "manager step)': loadable, but never restored or deleted by the manager. A ROOT that does "
            "not exist, or is itself a checkpoint, exits with status 2."
        ),
        examples=(
            "shardckpt ls runs/llama",
            "shardckpt ls s3://bucket/run --monitor val_loss --mode min",
            "shardckpt ls runs/llama --json | jq .latest",
        ),
        configure=_configure_ls,
        run=_run_ls,
    )
)

# export, import and diff register themselves after inspect, verify and ls (the --help order)
import shardckpt.cli.convert  # noqa: E402,F401

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
