"""save(): every rank writes its shard in parallel; the coordinator commits the manifest.

Async saving (its own issue) will reuse this path: staging copies the state into host
buffers, then the same writer persists it in the background.
"""

from __future__ import annotations

from typing import Any

import torch.distributed.checkpoint as dcp

from shardckpt import integrity
from shardckpt.collective import RankGroup, translated_failures
from shardckpt.manifest import Manifest
from shardckpt.planner import SavePlanner
from shardckpt.state import to_plain_state_dict
from shardckpt.storage import open_storage
from shardckpt.writer import Writer, WriterOptions

DEFAULT_SAVE_IO_THREADS = 2


def save(
    state_dict: dict[str, Any],
    path: str,
    *,
    process_group: Any = None,
    num_io_threads: int = DEFAULT_SAVE_IO_THREADS,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    hash_block_bytes: int = integrity.DEFAULT_BLOCK_BYTES,
    metadata: dict[str, Any] | None = None,
) -> Manifest | None:
    """Save ``state_dict`` to the checkpoint folder ``path`` (a local path or fsspec URL).

    Collective when torch.distributed is initialized (or ``process_group`` is given):
    every rank of the group must call it with its own shard of the state. Works with no
    process group too. Each rank writes the tensors it owns (replicated tensors once,
    spread over ranks) with ``num_io_threads`` threads; rank 0 then writes
    ``manifest.json``, which commits the checkpoint. When this returns on any rank the
    checkpoint is committed and durable. On failure nothing is committed, an earlier
    checkpoint elsewhere is untouched, and every rank raises the same ShardckptError.

    ``state_dict`` holds nested dicts/lists of tensors and DTensors, Stateful objects
    (``state_dict()``/``load_state_dict()``), and JSON-representable values (int, float,
    str, bool, None, list, tuple, str-keyed dict). A committed checkpoint already at
    ``path`` is refused unless ``overwrite=True``. ``metadata`` (plain JSON, the
    coordinator's copy is kept) is stored in the manifest, e.g. a step and metrics.

    Returns the committed Manifest on the coordinator, None on other ranks.
    """
    group = RankGroup.current(process_group)
    options = WriterOptions(
        num_io_threads=num_io_threads, hash_block_bytes=hash_block_bytes, overwrite=overwrite, metadata=dict(metadata or {})
    )
    writer = Writer(open_storage(path, storage_options), options)
    with translated_failures(f"save to {path}"):
        dcp.save(
            to_plain_state_dict(state_dict),
            storage_writer=writer,
            planner=SavePlanner(),
            process_group=process_group,
            no_dist=not group.is_distributed,
        )
    return writer.manifest
