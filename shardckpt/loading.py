"""load(): fill a state_dict in place from a checkpoint, resharding to the current layout.

Resharding is DCP's load planner's job: it maps the boxes each rank needs onto the
saved chunks; our reader fetches only those byte ranges and verifies them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from shardckpt import datafile, layout
from shardckpt.collective import RankGroup, arrive, checkpoint_group, translated_failures
from shardckpt.errors import CheckpointNotFoundError, ManifestError, NotCommittedError, StateDictMismatchError
from shardckpt.manifest import MAX_MANIFEST_BYTES, Manifest, parse_manifest, unseal
from shardckpt.planner import LoadPlanner
from shardckpt.reader import Reader
from shardckpt.saving import DEFAULT_TIMEOUT_S, wait_pending
from shardckpt.state import apply_loaded_stateful, describe, flat_keys, to_plain_state_dict
from shardckpt.storage import Storage, open_storage

DEFAULT_LOAD_IO_THREADS = 4


def load(
    state_dict: dict[str, Any],
    path: str,
    *,
    process_group: Any = None,
    strict: bool = True,
    verify: bool = True,
    num_io_threads: int = DEFAULT_LOAD_IO_THREADS,
    storage_options: dict[str, Any] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Fill ``state_dict`` in place from the checkpoint at ``path``.

    Collective when torch.distributed is initialized (or ``process_group`` is given).
    The target's layout decides what each rank reads: tensors and DTensors receive
    their local part of the saved global tensor, whatever world size saved it.
    Non-tensor values are replaced by the saved ones; top-level Stateful objects get
    ``load_state_dict`` with their loaded state.

    ``strict``: every key of the target must be in the checkpoint and vice versa
    (otherwise StateDictMismatchError lists them); with ``strict=False`` keys missing
    from the checkpoint are left untouched. Shape and dtype must match either way.
    ``verify``: check every byte read against the checksums recorded at save time.
    A problem on any rank raises on every rank, naming the rank; a rank that does not
    call ``load`` makes the others raise RankTimeoutError after ``timeout_s``. Like
    ``save``, the collectives run on the gloo checkpoint group, after this process's
    pending async save (if any) has finished.
    """
    if not 1 <= num_io_threads <= 256:
        raise ValueError(f"num_io_threads must be in [1, 256], got {num_io_threads}")
    wait_pending()
    group = RankGroup.current(process_group)
    ckpt_group = checkpoint_group(process_group, timeout_s) if group.is_distributed else None
    arrive(ckpt_group, f"load of {path}: waiting for every rank to call load", timeout_s)
    group = RankGroup.current(ckpt_group) if ckpt_group is not None else group
    storage = open_storage(path, storage_options)
    plain = to_plain_state_dict(state_dict)

    def check() -> Manifest:
        manifest = read_manifest(storage)
        check_target(manifest, flat_keys(plain), strict=strict, source=storage.url)
        return manifest

    manifest = group.agree(f"load of {path}", check)
    reader = Reader(storage, manifest, verify=verify, num_io_threads=num_io_threads)
    with translated_failures(f"load of {path}"):
        dcp.load(
            plain,
            storage_reader=reader,
            planner=LoadPlanner(allow_partial_load=True),
            process_group=ckpt_group,
            no_dist=not group.is_distributed,
        )
    apply_loaded_stateful(state_dict, plain)


def read_manifest(storage: Storage) -> Manifest:
    """Read and validate the manifest of the checkpoint at ``storage``'s root."""
    if not storage.exists(layout.MANIFEST_NAME):
        if storage.is_dir(""):
            raise NotCommittedError(
                f"{storage.url} has no {layout.MANIFEST_NAME}: the save into it was interrupted or "
                "has not finished, so it is not a checkpoint. Load a committed checkpoint instead "
                "(`shardckpt ls` on the parent folder lists them)."
            )
        raise CheckpointNotFoundError(f"no checkpoint at {storage.url}: the path does not exist")
    size = storage.size(layout.MANIFEST_NAME)
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{storage.url}/{layout.MANIFEST_NAME}: {size} bytes is too large for a manifest")
    source = f"{storage.url}/{layout.MANIFEST_NAME}"
    raw = storage.read_bytes(layout.MANIFEST_NAME)
    unseal(raw, source=source)
    return parse_manifest(raw, source=source)


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
        raise StateDictMismatchError(f"{source}: the state_dict does not match the checkpoint: " + "; ".join(problems) + "." + hint)


def _some(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
