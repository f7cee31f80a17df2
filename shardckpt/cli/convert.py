"""``shardckpt export | import | diff | materialize``: the command-line front of :mod:`shardckpt.convert`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from shardckpt.cli.base import _PATH_HELP, EXIT_OK, Command, _add_output_flags, _clip, _progress, _reported, register
from shardckpt.convert.progress import human_bytes

# ---------------------------------------------------------------- export, import, diff

EXIT_DIFFERENT = 3  # diff --exit-code: the checkpoints differ (1 and 2 keep their meaning)


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="CKPT", help=_PATH_HELP)
    p.add_argument("out", metavar="OUT", help="a file for --format safetensors|torch, a folder for --format hf")
    p.add_argument("--format", required=True, choices=("safetensors", "hf", "torch"), help="what to write")
    p.add_argument(
        "--keys",
        metavar="PATTERN",
        nargs="+",
        action="extend",
        default=[],
        help="export only keys matching a shell-style pattern ('model.layers.*'); a pattern without "
        "wildcards is a prefix of whole components ('model' takes 'model.*')",
    )
    p.add_argument("--strip-prefix", metavar="P", default="", help="remove P from the front of names, e.g. 'model.'")
    p.add_argument(
        "--dtype", metavar="DTYPE", help="cast floating tensors to DTYPE (bf16, fp16, fp32); others are kept"
    )
    p.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        default="5GB",
        help="--format hf: most tensor bytes per shard file: 5GB = 5*10^9, 2GiB = 2*2^30 (default 5GB)",
    )
    p.add_argument(
        "--flat", action="store_true", help="--format torch: a flat dict of dotted names, not the saved nesting"
    )
    p.add_argument(
        "--tied",
        metavar="TIED=KEPT",
        action="append",
        default=[],
        help="--format safetensors|hf: TIED is the same tensor as KEPT in the model "
        "(lm_head.weight=transformer.wte.weight): write it once, as KEPT, after checking they are equal",
    )
    p.add_argument(
        "--tied-from",
        metavar="CONFIG",
        help="--format safetensors|hf: tie what the Hugging Face config.json (or folder holding it) declares "
        "tied; needs transformers",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    _add_output_flags(p)


def _run_export(args: argparse.Namespace) -> int:
    from shardckpt.convert import export_checkpoint, hf_tied_weights, parse_tied

    def work() -> Any:
        tied = {**(hf_tied_weights(args.tied_from) if args.tied_from else {}), **parse_tied(args.tied)}
        return export_checkpoint(
            args.path,
            args.out,
            format=args.format,
            keys=args.keys,
            strip_prefix=args.strip_prefix,
            dtype=args.dtype,
            max_shard_bytes=args.max_shard_size,
            flat=args.flat,
            overwrite=args.overwrite,
            progress=_progress(args),
            tied=tied,
        )

    return _reported("export", args, work, _format_export)


def _format_export(r: Any) -> str:
    lines = [f"exported {r.num_tensors} tensors ({human_bytes(r.tensor_bytes)}) as {r.format}:"]
    lines += [f"  {f}" for f in r.files]
    if r.skipped_values:
        lines.append(
            f"left out {len(r.skipped_values)} non-tensor value(s), which safetensors cannot hold: "
            f"{', '.join(r.skipped_values[:10])}{' ...' if len(r.skipped_values) > 10 else ''}"
        )
    lines += [f"tied: {t} not written, it is {k} (checked equal)" for t, k in r.dropped_tied.items()]
    return "\n".join(lines)


def _configure_import(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source", metavar="SRC", help="a .safetensors file, a Hugging Face folder, a torch.save file or a DCP folder"
    )
    p.add_argument("out", metavar="OUT", help="the checkpoint folder to create (local path or fsspec URL)")
    p.add_argument(
        "--from",
        dest="source_format",
        default="auto",
        choices=("auto", "safetensors", "hf", "torch", "dcp"),
        help="the source format (default: detected from SRC)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow reading a DCP folder, whose .metadata is a pickle that can run code: only for sources you trust",
    )
    p.add_argument(
        "--under",
        metavar="KEY",
        help="nest everything under KEY, e.g. 'model' to load into {'model': model.state_dict()}",
    )
    p.add_argument(
        "--tied",
        metavar="TIED=KEPT",
        action="append",
        help="safetensors/hf sources: fill TIED from KEPT when SRC stores only KEPT (or the reverse); "
        "replaces what a Hugging Face folder's config.json declares (default: that, via transformers)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at OUT")
    _add_output_flags(p)


def _run_import(args: argparse.Namespace) -> int:
    from shardckpt.convert import import_checkpoint, parse_tied

    def work() -> Any:
        return import_checkpoint(
            args.source,
            args.out,
            source_format=args.source_format,
            trust_pickle=args.trust_pickle,
            under=args.under,
            overwrite=args.overwrite,
            progress=_progress(args),
            tied=None if args.tied is None else parse_tied(args.tied),
        )

    return _reported("import", args, work, _format_import)


def _format_import(r: Any) -> str:
    line = (
        f"imported {r.format} {r.source} -> {r.path}: {r.num_tensors} tensors "
        f"({human_bytes(r.tensor_bytes)}), {r.num_values} values; it loads on any number of processes"
    )
    return "\n".join(
        [line, *(f"tied: {t} filled from {k} (not stored in the source)" for t, k in r.filled_tied.items())]
    )


def _configure_diff(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="the first checkpoint folder")
    p.add_argument("b", metavar="B", help="the second checkpoint folder")
    p.add_argument(
        "--atol",
        type=float,
        default=0.0,
        metavar="X",
        help="tensors whose largest |a - b| is at most X count as unchanged (default 0: any difference)",
    )
    p.add_argument(
        "--keys", metavar="PATTERN", nargs="+", action="extend", default=[], help="compare only matching keys"
    )
    p.add_argument(
        "--exit-code", action="store_true", help=f"exit with status {EXIT_DIFFERENT} when the checkpoints differ"
    )
    _add_output_flags(p)


def _run_diff(args: argparse.Namespace) -> int:
    from shardckpt.convert import diff_checkpoints

    def work() -> Any:
        return diff_checkpoints(args.a, args.b, atol=args.atol, keys=tuple(args.keys), progress=_progress(args))

    def status(report: Any) -> int:
        return EXIT_DIFFERENT if args.exit_code and not report.identical else EXIT_OK

    return _reported("diff", args, work, _format_diff, status)


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
    lines += [
        f"~ {k}  {_clip(json.dumps(va))} -> {_clip(json.dumps(vb))}" for k, (va, vb) in sorted(r.changed_values.items())
    ]
    same = sum(not t.changed for t in r.tensors)
    lines.append(
        f"{len(r.removed)} removed, {len(r.added)} added, {len(r.changed)} changed; {same} of {len(r.tensors)} "
        f"common tensors unchanged (atol {r.atol:g}), {r.values_compared - len(r.changed_values)} of "
        f"{r.values_compared} common values equal"
    )
    return "\n".join(lines)


def _configure_materialize(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SRC", help=_PATH_HELP)
    p.add_argument("out", metavar="DST", help="the new checkpoint folder (must not exist or be empty)")
    p.add_argument(
        "--format-version",
        type=int,
        choices=(1, 2),
        help="2: keep the chunk digests (the copy can be the base of a later incremental save); 1: drop them "
        "(any shardckpt reads it). Default: keep what SRC has (a format-3 SRC is copied into format 1; "
        "materialize does not write format 3)",
    )
    _add_output_flags(p)


def _run_materialize(args: argparse.Namespace) -> int:
    from shardckpt.convert import materialize_checkpoint

    def work() -> Any:
        return materialize_checkpoint(
            args.source, args.out, format_version=args.format_version, progress=_progress(args)
        )

    return _reported("materialize", args, work, _format_materialize)


def _format_materialize(r: Any) -> str:
    read = ", ".join(
        f"{human_bytes(f.tensor_bytes)} from {f.folder}{' (base)' if not f.own else ''}" for f in r.folders
    )
    return (
        f"materialized {r.source} -> {r.path}: {r.files} data files, {human_bytes(r.file_bytes)} "
        f"(tensor data read: {read}); format {r.format_version}, no references: it loads without any other folder"
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
            "shardckpt export runs/llama/step_0000001000 llama-hf --format hf --keys model "
            "--strip-prefix model. --dtype bf16",
            "shardckpt export runs/llama/step_0000001000 model.safetensors --format safetensors --keys 'model.*'",
            "shardckpt export runs/llama/step_0000001000 weights.pt --format torch --keys model "
            "--strip-prefix model. --flat",
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

register(
    Command(
        name="materialize",
        summary="copy an incremental checkpoint into a standalone one that reads no other folder",
        description=(
            "An incremental checkpoint (saved with base= or by CheckpointManager(incremental=True)) reads "
            "the tensors that did not change from the earlier checkpoints beside it (its bases; "
            "`shardckpt inspect` lists them). materialize writes a copy at DST that holds every byte it "
            "needs and no reference, so it survives deleting or moving the bases, and can be moved or "
            "archived alone. Only the chunks SRC uses are copied, streamed piece by piece, every byte checked "
            "against the checksums; DST is committed like a save (manifest last). DST must not exist or be "
            "empty; SRC and its bases are not changed. Works for any checkpoint (a full one is copied)."
        ),
        examples=(
            "shardckpt materialize runs/llama/step_0000001000 archive/llama-step1000",
            "shardckpt materialize s3://bucket/run/step_0000001000 s3://bucket/keep/step1000 --format-version 1",
        ),
        configure=_configure_materialize,
        run=_run_materialize,
    )
)
