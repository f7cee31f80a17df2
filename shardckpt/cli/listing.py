"""``shardckpt ls``: the steps and other checkpoints under a CheckpointManager root."""

from __future__ import annotations

import argparse
import json
from typing import Any

from shardckpt.cli.base import EXIT_OK, Command, _table, register
from shardckpt.convert.progress import human_bytes
from shardckpt.errors import CheckpointNotFoundError
from shardckpt.format.layout import MANIFEST_NAME, parse_step_dir, step_dir_name
from shardckpt.storage import open_storage
from shardckpt.storage.folder import is_committed

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
        print(json.dumps(_ls_document(args.root, infos, others, latest, best), indent=2))
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
    _print_notes(infos)
    if others:
        _print_others(args.root, others)
    return EXIT_OK


def _ls_document(root: str, infos: list[Any], others: list[Any], latest: int | None, best: int | None) -> Any:
    """``shardckpt ls --json``: the root, its latest and best steps, every step folder and
    every other checkpoint."""
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
    return {"root": root, "latest": latest, "best": best, "steps": rows, "other_checkpoints": plain}


def _print_notes(infos: list[Any]) -> None:
    """One line on each kind of step folder that is not simply committed and full."""
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


def _print_others(root: str, others: list[Any]) -> None:
    """The committed checkpoints in ``root`` that are not manager steps, and how to use them."""
    table = [[o.name, _NOT_A_STEP, human_bytes(o.size_bytes), str(o.world_size or "-")] for o in others]
    example = f"{root.rstrip('/')}/{others[0].name}"
    print()
    print("\n".join(_table(["FOLDER", "STATE", "SIZE", "RANKS"], table)))
    print(
        f"A {_NOT_A_STEP} was saved with shardckpt.save to a folder of its own: `shardckpt inspect {example}` "
        f"shows it and shardckpt.load(state, {example!r}) loads it, but a CheckpointManager on this root "
        "never restores or deletes it (the manager's step 100 is step_0000000100)."
    )


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
