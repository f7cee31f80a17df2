"""``shardckpt inspect | verify``: the command-line front of :mod:`shardckpt.convert.audit`."""

from __future__ import annotations

import argparse
import fnmatch
import json
from typing import Any

from shardckpt.cli.base import (
    _PATH_HELP,
    EXIT_DAMAGED,
    EXIT_OK,
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
from shardckpt.errors import ManifestError, UnsupportedFormatVersionError
from shardckpt.format.layout import MANIFEST_NAME

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


# ---------------------------------------------------------------- registry

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
