"""load(): fill a state_dict in place from a checkpoint, resharding to the current layout.

Resharding is DCP's load planner's job: it maps the boxes each rank needs onto the
saved chunks; our reader fetches only those byte ranges and verifies them.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch

from shardckpt.engine.collector import collector_paused
from shardckpt.engine.exchange import Exchange, raise_gathered
from shardckpt.engine.mismatch import fresh_optimizer_hint, mismatch_fixes, wrong_kinds
from shardckpt.engine.options import Timeouts
from shardckpt.engine.plan_v3 import load_planner
from shardckpt.engine.protocol import read_in_rounds
from shardckpt.engine.reader import Reader
from shardckpt.engine.savable import tensor_problem
from shardckpt.engine.state import PlainState, flatten, flatten_plain_dicts
from shardckpt.errors import (
    CheckpointNotFoundError,
    InconsistentRanksError,
    ManifestError,
    NotCommittedError,
    StateDictMismatchError,
    UnsupportedFormatVersionError,
    UnsupportedValueError,
)
from shardckpt.format import integrity, layout
from shardckpt.format.manifest import MAX_MANIFEST_BYTES, Manifest, Share, unseal
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.format.manifest_v3_parser import parse_any_manifest
from shardckpt.storage import Storage, as_url, folder, open_storage

log = logging.getLogger("shardckpt")


@collector_paused()  # no full collections over the objects a save/load keeps (#18)
def load_from(
    state_dict: dict[str, Any],
    path: str,
    storage: Storage,
    exchange: Exchange,
    *,
    strict: bool,
    verify: bool,
    num_io_threads: int,
    allow_dtype_cast: bool,
    timeouts: Timeouts,
    slow_io_hint: str = "",
) -> LoadResult:
    """The body of a load: read and check the manifest of ``storage`` (the checkpoint
    ``path``), then fill ``state_dict``. Collective over the exchange's group (the
    checkpoint group, or None: a single process) in two round trips: a rank that does not
    arrive within ``timeouts.arrive_s``, or whose reads do not end within
    ``timeouts.io_s`` (``slow_io_hint`` then appended), is named.
    ``allow_dtype_cast``: floating tensors saved in another
    floating dtype are converted as they are read (see :func:`check_target`). Returns this
    rank's keys that were not loaded (none unless ``strict=False``)."""
    state = PlainState.of(state_dict)
    plain = state.tree
    action = f"load of {path}"
    mine: dict[str, Any] = {}

    def prepare() -> tuple[str, str, str, tuple[str, str] | None]:
        raw = read_manifest_bytes(storage)
        # each rank checks the chunk records of its share of the tensors; the round trip below
        # tells every rank that all shares passed (and were the same bytes) before any record is used
        share = Share(exchange.rank, exchange.world_size)
        mine["manifest"] = parse_any_manifest(raw, source=f"{storage.url}/{layout.MANIFEST_NAME}", share=share)
        mine["flat"] = flatten_plain_dicts(plain) or flatten(plain)  # the planner's too (#18)
        flat = mine["flat"][0]
        try:
            check_loadable(mine["manifest"], flat)
            mine["result"] = check_target(
                mine["manifest"], flat, strict=strict, source=storage.url, allow_dtype_cast=allow_dtype_cast
            )
        except (StateDictMismatchError, UnsupportedValueError) as e:
            mine["mismatch"] = e  # raised after the same-checkpoint check, which comes first
            return (path, storage.location, integrity.hash_hex(raw), (type(e).__name__, str(e)))
        return (path, storage.location, integrity.hash_hex(raw), None)

    def judge(everyone: list[tuple[str, str, str, tuple[str, str] | None]]) -> list[Any]:
        mismatches = {r: m for r, (*_, m) in enumerate(everyone) if m is not None}
        return [(different_checkpoints([e[:3] for e in everyone]), mismatches)] * len(everyone)

    # One round trip: every rank arrived (within the arrival bound), read the same manifest
    # and can hold what it lists; or every rank raises the same error.
    verdict, mismatches = exchange.round_trip(
        action,
        prepare,
        judge,
        wait_s=timeouts.arrive_s,
        reply_s=2 * timeouts.arrive_s,
        waiting=f"{action}: waiting for every rank to call load",
    )
    if verdict is not None:
        raise InconsistentRanksError(verdict)
    if mismatches:
        if exchange.alone:
            raise mine["mismatch"]
        raise_gathered(action, mismatches, local=mine.get("mismatch"), rank=exchange.rank)
    manifest: Manifest | ManifestV3 = mine["manifest"]
    result: LoadResult = mine["result"]
    reader = Reader(storage, manifest, verify=verify, num_io_threads=num_io_threads)
    planner = load_planner(manifest, flattened=mine["flat"])
    planner.reads_whole_chunks = True  # the Reader reads them (#18)
    read_in_rounds(plain, reader, planner, exchange, path=path, timeouts=timeouts, slow_io_hint=slow_io_hint)
    state.hand_back()
    if (result.missing_keys or result.unexpected_keys) and not _SKIPS_EXPECTED.get():
        log.warning("%s", skipped_message(result, path, exchange))
    return result


_SKIPS_EXPECTED: contextvars.ContextVar[bool] = contextvars.ContextVar("shardckpt_skips_expected", default=False)


@contextlib.contextmanager
def skipped_keys_expected() -> Iterator[None]:
    """Within this block (this thread or task only), a ``strict=False`` load does not log
    the keys it skipped. For callers that check the keys themselves and load part of a
    checkpoint on purpose (TrainState: other ranks' RNG streams; the Lightning strategy:
    everything but the model and optimizers). ``load`` still returns them."""
    token = _SKIPS_EXPECTED.set(True)
    try:
        yield
    finally:
        _SKIPS_EXPECTED.reset(token)


def skipped_message(result: LoadResult, path: str, exchange: Exchange) -> str:
    """The one warning of a ``strict=False`` load that skipped keys (bounded, like every listing)."""
    where = "" if exchange.alone else f"rank {exchange.rank}: "
    parts = []
    if result.missing_keys:
        parts.append(
            f"{_count(len(result.missing_keys), 'key')} of the state_dict not in the checkpoint, left as they were: "
            + listing([repr(k) for k in result.missing_keys])
        )
    if result.unexpected_keys:
        parts.append(
            f"{_count(len(result.unexpected_keys), 'key')} of the checkpoint not in the state_dict, not read: "
            + listing([repr(k) for k in result.unexpected_keys])
        )
    return f"shardckpt: {where}load of {path} with strict=False: " + "; ".join(parts)


def read_manifest(
    checkpoint: Storage | str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    tool: str = "shardckpt.read_manifest",
) -> Manifest:
    """Read and validate the manifest of a checkpoint of format 1 or 2: a folder given as a
    path or fsspec URL (``str`` or ``os.PathLike``; ``storage_options`` for fsspec), or a
    Storage rooted there. Reads on the calling process only. Raises CheckpointNotFoundError
    (no such folder), NotCommittedError (no manifest) or ManifestError (a bad one), and
    UnsupportedFormatVersionError naming ``tool`` for a format-3 checkpoint (which
    :func:`read_any_manifest` reads)."""
    m = read_any_manifest(checkpoint, storage_options)
    if isinstance(m, ManifestV3):
        where = checkpoint.url if isinstance(checkpoint, Storage) else as_url(checkpoint)
        raise UnsupportedFormatVersionError(
            f"{where}: a format-3 checkpoint (docs/format.md section 12); {tool} reads formats 1 and 2 only. "
            "Format 3 is read by shardckpt.load, CheckpointManager.restore, TrainState.restore, read_state_dict, "
            "shardckpt.read_any_manifest, shardckpt.dcp.StorageReader and `python -m shardckpt verify`, `inspect`, "
            "`ls`, `export`, `diff` and `materialize` (which also makes a format-1 copy: --format-version 1)."
        )
    return m


def read_any_manifest(
    checkpoint: Storage | str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> Manifest | ManifestV3:
    """:func:`read_manifest` for every format a load reads: a ``Manifest`` (formats 1, 2)
    or a ``ManifestV3`` (format 3: rules and a file table instead of chunk and file lists)."""
    storage = checkpoint if isinstance(checkpoint, Storage) else open_storage(as_url(checkpoint), storage_options)
    return parse_any_manifest(read_manifest_bytes(storage), source=f"{storage.url}/{layout.MANIFEST_NAME}")


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


def different_checkpoints(everyone: list[tuple[str, str, str]]) -> str | None:
    """The InconsistentRanksError message when the ranks did not all open the same
    location and read the same manifest bytes, else None. ``everyone``: every rank's
    (path as given, location, manifest hash), by rank. The same text on every rank:
    each distinct triple with its ranks."""
    if len({(loc, d) for _, loc, d in everyone}) <= 1:
        return None
    ranks: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for r, (p, loc, d) in enumerate(everyone):
        ranks[(p, loc, d)].append(r)
    lines = []
    for (p, loc, d), rs in sorted(ranks.items(), key=lambda kv: kv[1][0]):
        who = f"rank {rs[0]}" if len(rs) == 1 else f"ranks {_span(rs)}"
        lines.append(f"{who}: {p} (location {loc}, manifest hash {d})")
    shown = lines[:32] + ([f"... and {len(lines) - 32} more"] if len(lines) > 32 else [])
    return (
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


def check_loadable(manifest: Manifest | ManifestV3, flat: dict[str, Any]) -> None:
    """Raise UnsupportedValueError for a target tensor that cannot be filled from a saved
    tensor (meta, sparse, nested), naming the first such key and the fix; other keys are
    :func:`check_target`'s. Outside autograd, ``to_local()`` costs 2 us, not 14 (#18)."""
    with torch.no_grad():
        found = ((k, v) for k, v in flat.items() if k in manifest.tensors and isinstance(v, torch.Tensor))
        problems = {k: p for k, v in found if (p := tensor_problem(v, loading=True))}
    if problems:
        first = min(problems)
        raise UnsupportedValueError(f"key {first!r}: the state_dict holds {problems[first]}")


class LoadResult(NamedTuple):
    """What a load left out, like ``nn.Module.load_state_dict``'s result: flattened keys
    (``"model.fc.weight"``, ``"optim.state.fc.weight.exp_avg"``) of the state_dict that the
    checkpoint does not hold (left as they were), and keys of the checkpoint that the
    state_dict does not hold (not read). Both empty after a ``strict=True`` load."""

    missing_keys: list[str]
    unexpected_keys: list[str]


SHOWN_KEYS = 10
"""How many keys (or problems) a message lists before "... and K more"."""


def listing(items: Sequence[str], limit: int = SHOWN_KEYS, width: int = 160) -> str:
    """The first ``limit`` of ``items``, each cut to ``width`` characters, then "... and K more"."""
    shown = [s if len(s) <= width else s[: width - 3] + "..." for s in items[:limit]]
    more = [f"... and {len(items) - limit} more"] if len(items) > limit else []
    return ", ".join(shown + more)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def check_target(
    manifest: Manifest | ManifestV3, flat: dict[str, Any], *, strict: bool, source: str, allow_dtype_cast: bool = False
) -> LoadResult:
    """Raise StateDictMismatchError if ``flat`` cannot be filled from ``manifest`` (keys,
    with ``strict``; tensors of another shape or dtype; a tensor where a value was saved
    or the other way). The message lists at most :data:`SHOWN_KEYS` of each and ends
    with the fix. Returns the keys each side lacks.

    ``allow_dtype_cast``: a floating tensor saved in another floating dtype (fp32 into
    bf16, bf16 into fp32, ...) is accepted; the reader converts each box it reads, after
    verifying the saved bytes. Integer, bool and complex tensors must match exactly
    either way: a cast there truncates or drops data (DCP would turn 0.7 into 0).
    """
    saved = manifest.tensors.keys() | manifest.values.keys()
    missing = sorted(k for k in flat if k not in saved)
    unexpected = sorted(saved - flat.keys())
    found = wrong_kinds(manifest, flat)
    kinds = [found[k] for k in sorted(found)]
    wrong = [kind.text for kind in kinds if not (kind.castable and allow_dtype_cast)]
    problems, fixes = [], []
    if strict and missing:
        problems.append(
            f"{_count(len(missing), 'key')} missing from the checkpoint: {listing([repr(k) for k in missing])}"
        )
    if strict and unexpected:
        problems.append(
            f"{_count(len(unexpected), 'key')} in the checkpoint but not in the state_dict: "
            + listing([repr(k) for k in unexpected])
        )
    if strict and (missing or unexpected):
        fixes += fresh_optimizer_hint(flat, unexpected)
        fixes.append(
            "Pass strict=False to load only the keys both have (load returns the keys it skipped), "
            "or build the state_dict the way the saved one was built."
        )
    if wrong:
        problems.append(
            f"{_count(len(wrong), 'key')} where the state_dict cannot hold what was saved: {listing(wrong, width=240)}"
        )
        fixes += mismatch_fixes(castable=any(kind.castable for kind in kinds), allow_dtype_cast=allow_dtype_cast)
    if problems:
        raise StateDictMismatchError(
            f"{source}: the state_dict does not match the checkpoint:\n  "
            + "\n  ".join(problems)
            + "\n"
            + " ".join(fixes)
        )
    return LoadResult(missing, unexpected)
