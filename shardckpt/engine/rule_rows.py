"""The plain tensors and values of a plan from rules (:mod:`shardckpt.engine.rule_plan`)
when ranks hold different ones: per-rank keys such as ``TrainState``'s
``per_rank.rank{r}`` RNG tensors.

Each rank sends its plain tensors and values as JSON rows (:func:`rows_of`, with a digest
beside them). While every rank's digest is the same, the coordinator never reads them (every
rank holds each; ``rule_plan`` places them from its own table). Otherwise :func:`place`
reads every rank's rows and lists each key's holders, as the full path's
``balance_replicated`` counts them: O(ranks x plain tensors and values) in C (the rows as
bytes), Python steps only per distinct row and per row not every rank holds; nothing per
sharded item.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

from shardckpt.engine.placement import Key


class _Summary(Protocol):
    @property
    def replicated(self) -> bytes: ...


def rows_of(
    plain: Sequence[tuple[str, str, tuple[int, ...], int]], values: Sequence[str], mappings: Mapping[str, Any]
) -> bytes:
    """A rank's rows: ``[key, dtype, shape, itemsize, key path]`` per plain tensor (``plain``:
    key, dtype name as ``str(dtype)``, global shape, itemsize), ``[key, null, null, 0, key
    path]`` per value; one JSON line each, in plan order (the same row is the same bytes on
    every rank)."""
    rows: list[list[Any]] = [[fqn, dtype, list(shape), size, _path(mappings, fqn)] for fqn, dtype, shape, size in plain]
    rows += [[fqn, None, None, 0, _path(mappings, fqn)] for fqn in values]
    return "\n".join(json.dumps(row, separators=(",", ":")) for row in rows).encode()


def _path(mappings: Mapping[str, Any], fqn: str) -> list[Any] | None:
    path = mappings.get(fqn)
    return None if path is None else list(path)


def place(
    summaries: Sequence[_Summary],
    load: list[int],
    shared: dict[Key, list[int]],
    sizes: dict[Key, int],
    metadata: Metadata,
) -> int | None:
    """Coordinator: every rank's rows into the placement's arguments: a key only one rank
    holds adds its bytes to that rank's ``load``, the others go to ``shared`` (holders in
    rank order) and ``sizes``; keys the coordinator's own plan lacks are added to
    ``metadata`` (and their paths to its ``planner_data``). Returns the manifest bytes of
    those added keys, or None when ranks disagree on a key's dtype, shape, kind or path (the
    full path then words the refusal). Pure but for the arguments it fills."""
    # The rows every rank holds are found by their bytes (split, counted and compared in C);
    # only the distinct rows are parsed, and only the others' holders listed rank by rank.
    per_rank = [s.replicated.split(b"\n") if s.replicated else [] for s in summaries]
    counts: Counter[bytes] = Counter()
    for lines in per_rank:
        counts.update(lines)
    everyone = list(range(len(summaries)))
    seen: dict[str, tuple[Any, ...]] = {}
    holders: dict[Key, list[int]] = {}
    keys: dict[bytes, Key] = {}
    for line, count in counts.items():
        fqn, dtype, shape, itemsize, path = json.loads(line)
        variant = (dtype, shape, itemsize, path)
        if seen.setdefault(fqn, variant) != variant or count > len(summaries):
            return None  # a key in two variants, or twice on a rank
        key = keys[line] = (fqn, None if dtype is None else torch.Size([0] * len(shape)))
        holders[key] = everyone if count == len(summaries) else []
        sizes[key] = 1 if dtype is None else math.prod(shape) * itemsize or 1
    partial = {line for line, count in counts.items() if count != len(summaries)}
    if partial:
        for rank, lines in enumerate(per_rank):
            for line in partial.intersection(lines):
                holders[keys[line]].append(rank)
    for key, ranks in holders.items():
        if len(ranks) == 1:
            load[ranks[0]] += sizes.pop(key)
        else:
            shared[key] = ranks
    return _add_metadata(metadata, seen)


def _add_metadata(metadata: Metadata, seen: dict[str, tuple[Any, ...]]) -> int | None:
    md = metadata.state_dict_metadata
    paths = metadata.planner_data if isinstance(metadata.planner_data, dict) else None
    added = 0
    properties: dict[str, TensorProperties] = {}  # one per dtype, shared (read only)
    for fqn, (dtype, shape, _, path) in seen.items():
        if fqn in md:
            continue
        if dtype is None:
            md[fqn] = BytesStorageMetadata()
        else:
            props = properties.get(dtype)
            if props is None:
                kind = getattr(torch, str(dtype).removeprefix("torch."), None)
                if not isinstance(kind, torch.dtype):
                    return None
                props = properties[dtype] = TensorProperties(dtype=kind)
            md[fqn] = TensorStorageMetadata(props, torch.Size(shape), [])
        if paths is not None and path is not None:
            paths[fqn] = tuple(path)
        added += 2 * len(json.dumps(fqn))
    return added
