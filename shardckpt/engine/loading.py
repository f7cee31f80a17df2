"""load(): fill a state_dict in place from a checkpoint, resharding to the current layout.

Resharding is DCP's load planner's job: it maps the boxes each rank needs onto the
saved chunks; our reader fetches only those byte ranges and verifies them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from shardckpt.engine.collective import RankGroup, translated_failures, typed_transport_errors
from shardckpt.engine.planner import LoadPlanner
from shardckpt.engine.reader import Reader
from shardckpt.engine.state import apply_loaded_stateful, describe, flat_keys, tensor_problem, to_plain_state_dict
from shardckpt.errors import (
    CheckpointNotFoundError,
    InconsistentRanksError,
    ManifestError,
    NotCommittedError,
    StateDictMismatchError,
    UnsupportedValueError,
)
from shardckpt.format import datafile, integrity, layout
from shardckpt.format.manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest, unseal
from shardckpt.storage import Storage, as_url, folder, open_storage


def load_from(
    state_dict: dict[str, Any],
    path: str,
    storage: Storage,
    group: RankGroup,
    ckpt_group: Any,
    *,
    strict: bool,
    verify: bool,
    num_io_threads: int,
    after_read: Callable[[], None] | None = None,
) -> None:
    """The body of a load, once every rank has arrived: read and check the manifest of
    ``storage`` (the checkpoint ``path``), then fill ``state_dict``. Collective over
    ``group`` (the checkpoint group ``ckpt_group``'s ranks, or a single process).
    ``after_read`` runs on every rank when its reads ended (the wait for the others'
    reads, bounded on its own)."""
    plain = to_plain_state_dict(state_dict)

    def read() -> tuple[Manifest, str]:
        raw = read_manifest_bytes(storage)
        return parse_manifest(raw, source=f"{storage.url}/{layout.MANIFEST_NAME}"), integrity.hash_hex(raw)

    manifest, digest = group.agree(f"load of {path}", read)
    # Before any other check: a rank given another checkpoint would otherwise fill its
    # shard from it without a word (or report a confusing key mismatch).
    check_same_checkpoint(group, path, storage.location, digest)

    def check() -> None:
        flat = flat_keys(plain)
        check_loadable(manifest, flat)
        check_target(manifest, flat, strict=strict, source=storage.url)

    group.agree(f"load of {path}", check)
    reader = Reader(storage, manifest, verify=verify, num_io_threads=num_io_threads, after_read=after_read)
    with translated_failures(f"load of {path}", alone=not group.is_distributed):
        dcp.load(
            plain,
            storage_reader=reader,
            planner=LoadPlanner(allow_partial_load=True),
            process_group=ckpt_group,
            no_dist=not group.is_distributed,
        )
    apply_loaded_stateful(state_dict, plain)


def read_manifest(
    checkpoint: Storage | str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> Manifest:
    """Read and validate the manifest of a checkpoint: a folder given as a path or fsspec
    URL (``str`` or ``os.PathLike``; ``storage_options`` for fsspec), or a Storage rooted
    there. Reads on the calling process only. Raises CheckpointNotFoundError (no such
    folder), NotCommittedError (no manifest) or ManifestError (a bad one)."""
    storage = checkpoint if isinstance(checkpoint, Storage) else open_storage(as_url(checkpoint), storage_options)
    return parse_manifest(read_manifest_bytes(storage), source=f"{storage.url}/{layout.MANIFEST_NAME}")


def read_manifest_bytes(storage: Storage) -> bytes:
    """The manifest's bytes, after the checks that need no parsing: it exists (else
    NotCommittedError / CheckpointNotFoundError), its size is sane, its seal matches."""
    if not folder.is_committed(storage):
        if storage.is_dir(""):
            raise NotCommittedError(f"{storage.url} has no {layout.MANIFEST_NAME}: {_not_a_checkpoint(storage)}")
        what = "is a file, not a checkpoint folder" if storage.exists("") else "does not exist"
        raise CheckpointNotFoundError(f"no checkpoint at {storage.url}: the path {what}")
    size = storage.size(layout.MANIFEST_NAME)
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{storage.url}/{layout.MANIFEST_NAME}: {size} bytes is too large for a manifest")
    source = f"{storage.url}/{layout.MANIFEST_NAME}"
    raw = storage.read_bytes(layout.MANIFEST_NAME)
    unseal(raw, source=source)
    return raw


def _not_a_checkpoint(storage: Storage) -> str:
    """Why a folder without a manifest is not a checkpoint, and what to do (an error
    path: one listing of the folder)."""
    found = folder.contents(storage)
    if found.is_ours or found.is_empty:
        return (
            "the save into it was interrupted or has not finished, so it is not a checkpoint. Load a "
            "committed checkpoint instead (`shardckpt ls` on the parent folder lists them)."
        )
    inner = [n.rstrip("/") for n in found.foreign if n.endswith("/")]
    if any(layout.parse_step_dir(n) is not None or folder.is_committed(storage, n) for n in inner):
        return (
            f"it is not a checkpoint but a folder of them (a CheckpointManager root?): `shardckpt ls "
            f"{storage.url}` lists them; pass one of those folders."
        )
    return f"it was not written by shardckpt (it holds {found.foreign[0]!r}), so it is not a checkpoint."


def check_same_checkpoint(group: RankGroup, path: str, location: str, digest: str) -> None:
    """Collective: raise InconsistentRanksError on every rank unless all ranks opened the
    same location and read the same manifest bytes (``digest``).

    Every rank builds the message from the same gathered list, so all raise the same
    text: each distinct (path as given, location, manifest hash) with its ranks.
    """
    if not group.is_distributed:
        return
    mine = (path, location, digest)
    everyone: list[Any] = [None] * group.world_size
    with typed_transport_errors(f"load of {path}: comparing the checkpoint every rank loads"):
        dist.all_gather_object(everyone, mine, group=group.group)
    if len({(loc, d) for _, loc, d in everyone}) == 1:
        return
    ranks: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for r, entry in enumerate(everyone):
        ranks[tuple(entry)].append(r)
    lines = []
    for (p, loc, d), rs in sorted(ranks.items(), key=lambda kv: kv[1][0]):
        who = f"rank {rs[0]}" if len(rs) == 1 else f"ranks {_span(rs)}"
        lines.append(f"{who}: {p} (location {loc}, manifest hash {d})")
    shown = lines[:32] + ([f"... and {len(lines) - 32} more"] if len(lines) > 32 else [])
    raise InconsistentRanksError(
        "load: the ranks were given different checkpoints; every rank must load the same one "
        "(the same location and manifest), or each rank would hold a shard of a different state:\n  "
        + "\n  ".join(shown)
        + "\nPass the same path on every rank (e.g. broadcast rank 0's path first)."
    )


def _span(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``: a compact list of sorted ranks."""
    runs: list[list[int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_loadable(manifest: Manifest, flat: dict[str, Any]) -> None:
    """Raise UnsupportedValueError for a target tensor that cannot be filled from a saved
    tensor (meta, sparse, nested), naming the key and the fix. Keys the checkpoint
    does not hold as tensors are left to :func:`check_target`."""
    for k in sorted(flat):
        v = flat[k]
        if k in manifest.tensors and isinstance(v, torch.Tensor):
            problem = tensor_problem(v, loading=True)
            if problem is not None:
                raise UnsupportedValueError(f"key {k!r}: the state_dict holds {problem}")


def check_target(manifest: Manifest, flat: dict[str, Any], *, strict: bool, source: str) -> None:
    """Raise StateDictMismatchError if ``flat`` cannot be filled from ``manifest``."""
    saved = set(manifest.tensors) | set(manifest.values)
    problems = []
    missing = sorted(k for k in flat if k not in saved)
    unexpected = sorted(saved - set(flat))
    if strict and missing:
        problems.append(f"keys missing from the checkpoint: {_some(missing)}")
    if strict and unexpected:
        problems.append(f"keys in the checkpoint but not in the state_dict: {_some(unexpected)}")
    for k, v in flat.items():
        rec = manifest.tensors.get(k)
        if rec is not None:
            dtype = datafile.torch_dtype(rec.dtype, where=k)
            if not isinstance(v, torch.Tensor):
                problems.append(f"key {k!r}: saved as a tensor, the state_dict holds {describe(v)}")
            elif tuple(v.shape) != rec.shape or v.dtype != dtype:
                problems.append(
                    f"key {k!r}: saved shape {list(rec.shape)} dtype {str(dtype).removeprefix('torch.')}, "
                    f"the state_dict holds {describe(v)}"
                )
        elif k in manifest.values and isinstance(v, torch.Tensor):
            problems.append(f"key {k!r}: saved as a non-tensor value, the state_dict holds {describe(v)}")
    if problems:
        hint = " Pass strict=False to load only the keys both have." if (missing or unexpected) else ""
        raise StateDictMismatchError(
            f"{source}: the state_dict does not match the checkpoint: " + "; ".join(problems) + "." + hint
        )


def _some(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
