"""The ``shardckpt`` command line: a thin argparse front over the library.

Every subcommand is one :class:`Command` in :data:`COMMANDS`, made of two small
functions: ``configure`` adds its arguments, ``run`` does the work and returns the
exit status. To add one (``ls``, ``export``, ...), write those two functions next to
the others and :func:`register` a Command; ``--help`` is built from its fields.

Exit status, for every subcommand: 0 success; 1 the checkpoint is damaged
(``verify`` found problems); 2 the path is not a committed checkpoint this
shardckpt can read, or the command line is wrong.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shardckpt import __version__
from shardckpt.audit import AuditReport, Problem, describe_checkpoint, verify_checkpoint
from shardckpt.errors import ManifestError, ShardckptError, UnsupportedFormatVersionError
from shardckpt.layout import MANIFEST_NAME

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
        f"size        {_human_bytes(s['total_bytes'])} in {s['num_files']} data files "
        f"({_human_bytes(s['tensor_bytes'])} of tensor data)",
    ]
    if s["metadata"]:
        lines.append(f"metadata    {json.dumps(s['metadata'])}")
    keys = s["keys"]
    tensors = [
        [k, r["dtype"], str(r["shape"]), str(r["chunks"]), _human_bytes(r["bytes"])]
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


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def _clip(text: str) -> str:
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 3] + "..."


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024:
            break
    return f"{size:.1f} {unit}"


# ---------------------------------------------------------------- verify


def _configure_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", help=_PATH_HELP)
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (one is shown on stderr when stderr is a terminal)"
    )


def _run_verify(args: argparse.Namespace) -> int:
    try:
        report = verify_checkpoint(args.path, progress=not args.no_progress and sys.stderr.isatty())
    except UnsupportedFormatVersionError:
        raise
    except ManifestError as e:
        # The manifest exists, so the checkpoint was committed: a broken manifest is damage.
        report = AuditReport(args.path, 0, 0, 0, [Problem(MANIFEST_NAME, None, str(e))])
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(_format_report(report))
    return EXIT_OK if report.ok else EXIT_DAMAGED


def _format_report(r: AuditReport) -> str:
    if r.ok:
        return (
            f"OK  {r.path}: {r.files_checked} data files, {r.chunks_checked} chunks, "
            f"{_human_bytes(r.bytes_hashed)} re-hashed; every checksum matches the manifest"
        )
    files = len({p.file for p in r.problems})
    lines = [f"PROBLEM  {p}" for p in r.problems]
    lines.append(
        f"FAILED  {r.path}: {len(r.problems)} problem(s) in {files} file(s). Do not resume from this "
        "checkpoint: restore the files named above from a good copy, or load an earlier checkpoint."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- ls


def _configure_ls(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", metavar="ROOT", help="a CheckpointManager root: the folder holding step_* folders")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--monitor", metavar="METRIC", help="metric that decides the best step, e.g. val_loss")
    p.add_argument("--mode", choices=("min", "max"), default="min", help="whether smaller or larger --monitor is better")


def _run_ls(args: argparse.Namespace) -> int:
    from shardckpt.manager import list_root
    from shardckpt.retention import RetentionPolicy

    infos = list_root(args.root)
    committed = [i.step for i in infos if i.committed]
    latest = committed[-1] if committed else None
    policy = RetentionPolicy(monitor=args.monitor, mode=args.mode)
    ranked = policy.best(committed, {i.step: i.metrics for i in infos}) if args.monitor else []
    best = ranked[0] if ranked else None
    if args.json:
        rows = [
            {"step": i.step, "committed": i.committed, "size_bytes": i.size_bytes, "metrics": i.metrics,
             "created_at": i.created_at, "world_size": i.world_size, "latest": i.step == latest, "best": i.step == best}
            for i in infos
        ]
        print(json.dumps({"root": args.root, "latest": latest, "best": best, "steps": rows}, indent=2))
        return EXIT_OK
    if not infos:
        print(f"{args.root}: no step folders")
        return EXIT_OK
    table: list[list[str]] = []
    for i in infos:
        marks = ",".join(m for m, on in (("latest", i.step == latest), ("best", i.step == best)) if on)
        state = "committed" if i.committed else "UNCOMMITTED"
        table.append([str(i.step), state, _human_bytes(i.size_bytes), str(i.world_size or "-"),
                     json.dumps(i.metrics) if i.metrics else "-", marks])
    print("\n".join(_table(["STEP", "STATE", "SIZE", "RANKS", "METRICS", ""], table)))
    if len(committed) < len(infos):
        print("UNCOMMITTED folders are left by interrupted saves: never restored, removed by the next manager.")
    return EXIT_OK


# ---------------------------------------------------------------- export, import, diff

EXIT_DIFFERENT = 3  # diff --exit-code: the checkpoints differ (1 and 2 keep their meaning)


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON document")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (one is shown on stderr when stderr is a terminal)"
    )


def _guarded(name: str, work: Callable[[], int]) -> int:
    """Damage is exit 1, a bad request (no key matches, bad size, bad source) exit 2, with the reason."""
    from shardckpt.errors import IntegrityError

    try:
        return work()
    except IntegrityError as e:
        print(f"shardckpt {name}: checkpoint damaged: {e}", file=sys.stderr)
        return EXIT_DAMAGED
    except ValueError as e:
        print(f"shardckpt {name}: error: {e}", file=sys.stderr)
        return EXIT_UNUSABLE


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="CKPT", help=_PATH_HELP)
    p.add_argument("out", metavar="OUT", help="a file for --format safetensors|torch, a folder for --format hf")
    p.add_argument("--format", required=True, choices=("safetensors", "hf", "torch"), help="what to write")
    p.add_argument("--keys", metavar="PATTERN", nargs="+", action="extend", default=[],
                   help="export only keys matching a shell-style pattern ('model.layers.*'); a pattern without "
                        "wildcards is a prefix of whole components ('model' takes 'model.*')")
    p.add_argument("--strip-prefix", metavar="P", default="", help="remove P from the front of names, e.g. 'model.'")
    p.add_argument("--dtype", metavar="DTYPE", help="cast floating tensors to DTYPE (bf16, fp16, fp32); others are kept")
    p.add_argument("--max-shard-size", metavar="SIZE", default="5GB",
                   help="--format hf: most tensor bytes per shard file: 5GB = 5*10^9, 2GiB = 2*2^30 (default 5GB)")
    p.add_argument("--flat", action="store_true", help="--format torch: a flat dict of dotted names, not the saved nesting")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_output_flags(p)


def _run_export(args: argparse.Namespace) -> int:
    from shardckpt.convert import export_checkpoint

    def work() -> int:
        report = export_checkpoint(
            args.path, args.out, format=args.format, keys=args.keys, strip_prefix=args.strip_prefix, dtype=args.dtype,
            max_shard_bytes=args.max_shard_size, flat=args.flat, overwrite=args.overwrite, progress=_progress(args),
        )
        if args.json:
            print(json.dumps(report.to_json(), indent=2))
            return EXIT_OK
        print(f"exported {report.num_tensors} tensors ({_human_bytes(report.tensor_bytes)}) as {report.format}:")
        print("\n".join(f"  {f}" for f in report.files))
        if report.skipped_values:
            print(f"left out {len(report.skipped_values)} non-tensor value(s), which safetensors cannot hold: "
                  f"{', '.join(report.skipped_values[:10])}{' ...' if len(report.skipped_values) > 10 else ''}")
        return EXIT_OK

    return _guarded("export", work)


def _configure_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SRC", help="a .safetensors file, a Hugging Face folder, a torch.save file or a DCP folder")
    p.add_argument("out", metavar="OUT", help="the checkpoint folder to create (local path or fsspec URL)")
    p.add_argument("--from", dest="source_format", default="auto", choices=("auto", "safetensors", "hf", "torch", "dcp"),
                   help="the source format (default: detected from SRC)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow reading a DCP folder, whose .metadata is a pickle that can run code: only for sources you trust")
    p.add_argument("--under", metavar="KEY", help="nest everything under KEY, e.g. 'model' to load into {'model': model.state_dict()}")
    p.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at OUT")
    _add_output_flags(p)


def _run_import(args: argparse.Namespace) -> int:
    from shardckpt.convert import import_checkpoint

    def work() -> int:
        report = import_checkpoint(args.source, args.out, source_format=args.source_format, trust_pickle=args.trust_pickle,
                                   under=args.under, overwrite=args.overwrite, progress=_progress(args))
        if args.json:
            print(json.dumps(report.to_json(), indent=2))
        else:
            print(f"imported {report.format} {report.source} -> {report.path}: {report.num_tensors} tensors "
                  f"({_human_bytes(report.tensor_bytes)}), {report.num_values} values; it loads on any number of processes")
        return EXIT_OK

    return _guarded("import", work)


def _configure_diff(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="the first checkpoint folder")
    p.add_argument("b", metavar="B", help="the second checkpoint folder")
    p.add_argument("--atol", type=float, default=0.0, metavar="X",
                   help="tensors whose largest |a - b| is at most X count as unchanged (default 0: any difference)")
    p.add_argument("--keys", metavar="PATTERN", nargs="+", action="extend", default=[], help="compare only matching keys")
    p.add_argument("--exit-code", action="store_true", help=f"exit with status {EXIT_DIFFERENT} when the checkpoints differ")
    _add_output_flags(p)


def _run_diff(args: argparse.Namespace) -> int:
    from shardckpt.convert import diff_checkpoints

    def work() -> int:
        report = diff_checkpoints(args.a, args.b, atol=args.atol, keys=tuple(args.keys), progress=_progress(args))
        print(json.dumps(report.to_json(), indent=2) if args.json else _format_diff(report))
        return EXIT_DIFFERENT if args.exit_code and not report.identical else EXIT_OK

    return _guarded("diff", work)


def _format_diff(r: Any) -> str:
    lines = [f"A  {r.a}", f"B  {r.b}"]
    lines += [f"- {k}  (only in A)" for k in r.removed] + [f"+ {k}  (only in B)" for k in r.added]
    lines += [f"~ {k}  (tensor in one, value in the other)" for k in r.kind_changed]
    for t in r.tensors:
        if t.changed:
            what = []
            if t.dtype[0] != t.dtype[1]:
                what.append(f"dtype {t.dtype[0]} -> {t.dtype[1]}")
            if t.shape[0] != t.shape[1]:
                what.append(f"shape {t.shape[0]} -> {t.shape[1]}")
            if t.max_abs_diff is not None:
                what.append(f"max |a-b| = {t.max_abs_diff:.6g}")
            lines.append(f"~ {t.key}  {', '.join(what)}")
    lines += [f"~ {k}  {_clip(json.dumps(va))} -> {_clip(json.dumps(vb))}" for k, (va, vb) in sorted(r.changed_values.items())]
    same = sum(not t.changed for t in r.tensors)
    lines.append(f"{len(r.removed)} removed, {len(r.added)} added, {len(r.changed)} changed; {same} of {len(r.tensors)} "
                 f"common tensors unchanged (atol {r.atol:g}), {r.values_compared - len(r.changed_values)} of "
                 f"{r.values_compared} common values equal")
    return "\n".join(lines)


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
            "List every step_* folder under a root written by CheckpointManager, oldest first: "
            "whether it is committed (has a manifest; only those are ever restored), its size, "
            "the world size that saved it and the metrics saved with it. The latest committed step "
            "is marked, and with --monitor the best one too. Uncommitted folders are leftovers of "
            "interrupted saves."
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


register(
    Command(
        name="export",
        summary="write a checkpoint as safetensors, a Hugging Face folder, or one torch.save file",
        description=(
            "Turn a checkpoint saved by any number of processes into weights other tools load, with no "
            "process group: --format safetensors writes one .safetensors file, --format hf a folder of "
            "model-0000k-of-0000n.safetensors shards plus model.safetensors.index.json (what "
            "transformers' from_pretrained reads), --format torch one file for "
            "torch.load(OUT, weights_only=True), nested as saved and including non-tensor values. "
            "Every byte read is checked against the checkpoint's checksums. safetensors and hf are "
            "streamed (memory: about twice the largest tensor); torch holds every selected tensor in "
            "memory at once and refuses when they would not fit. Select keys with --keys, rename "
            "with --strip-prefix, cast floating tensors with --dtype."
        ),
        examples=(
            "shardckpt export runs/llama/step_0000001000 llama-hf --format hf --keys model --strip-prefix model. --dtype bf16",
            "shardckpt export runs/llama/step_0000001000 model.safetensors --format safetensors --keys 'model.*'",
            "shardckpt export runs/llama/step_0000001000 weights.pt --format torch --keys model --strip-prefix model. --flat",
            "shardckpt export runs/llama/step_0000001000 llama-hf --format hf --max-shard-size 2GB --json",
        ),
        configure=_configure_export,
        run=_run_export,
    )
)
register(
    Command(
        name="import",
        summary="turn a safetensors file, Hugging Face folder, torch.save file or DCP folder into a checkpoint",
        description=(
            "Write SRC as a shardckpt checkpoint at OUT that loads on any number of processes like a "
            "native one. SRC may be a .safetensors file, a Hugging Face folder (model.safetensors or "
            "shards with a *.safetensors.index.json), a torch.save file (read with "
            "torch.load(weights_only=True) only, so files holding arbitrary objects are refused), or a "
            "torch.distributed.checkpoint (DCP) folder. A DCP folder's .metadata is a pickle, which "
            "can run code when read: it is imported only with --trust-pickle. The format is detected "
            "unless --from says it. Use --under model to nest everything under one key."
        ),
        examples=(
            "shardckpt import llama-hf runs/imported --under model",
            "shardckpt import weights.pt runs/from-torch --from torch",
            "shardckpt import old-run/dcp_step_100 runs/from-dcp --trust-pickle",
        ),
        configure=_configure_import,
        run=_run_import,
    )
)
register(
    Command(
        name="diff",
        summary="compare two checkpoints: keys added, removed, changed; max abs difference per tensor",
        description=(
            "Compare checkpoints A and B key by key, whatever world sizes saved them: keys only in B "
            "(+), only in A (-), and changed (~): a different dtype or shape, tensor values whose largest "
            "element-wise |a - b| exceeds --atol (NaN against non-NaN always counts), or a different "
            "non-tensor value. Tensors are read and compared piece by piece with checksums verified, so "
            "memory stays small. --json gives every tensor's max abs difference; --exit-code makes the "
            f"exit status {EXIT_DIFFERENT} when anything differs."
        ),
        examples=(
            "shardckpt diff runs/a/step_0000001000 runs/b/step_0000001000",
            "shardckpt diff ckpt-fp32 ckpt-roundtrip --atol 1e-3 --keys 'model.*'",
            "shardckpt diff A B --json --exit-code | jq '.changed'",
        ),
        configure=_configure_diff,
        run=_run_diff,
    )
)


_EXIT_STATUS = """exit status:
  0  success
  1  the checkpoint is damaged
  2  not a committed checkpoint, or a bad command line"""


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


if __name__ == "__main__":
    sys.exit(main())
