"""DCP StorageWriter over :mod:`shardckpt.storage`: safetensors data files, a JSON manifest.

DCP calls, in order (``*`` = coordinator only)::

    set_up_storage_writer -> prepare_local_plan -> prepare_global_plan* -> write_data -> finish*

``prepare_global_plan`` (coordinator) checks that every rank means the same folder,
that the folder is new, empty, or shardckpt's own (never a user's folder), and claims
it by creating the save marker exclusively, before any data byte is written.
``write_data`` runs on every rank: the rank's items are split over
``num_io_threads`` files, each streamed to storage tensor by tensor (small ones gathered
into a few MiB per write; no full copy of
the rank's state), hashed while written, then made durable. ``finish`` runs on the
coordinator only after every rank's ``write_data`` succeeded; it checks that every
listed file is there with its size, then commits by creating ``manifest.json``
exclusively (so of two racing saves exactly one commits). With ``overwrite=True`` it
then removes the data files of the checkpoint it replaced, which it listed before
writing; nothing else is ever deleted (errors there are warnings: the save is done).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult

from shardckpt.engine import rank_result, write_results, write_v3
from shardckpt.engine.claim import agreed_options, check_ranks_agree, claim_folder, create_file, discard_save
from shardckpt.engine.datawrite import WrittenFile, split_by_bytes, tensor_and_bytes, write_file
from shardckpt.engine.incremental import BaseIndex, ChunkLocation, Prepass, digest_pass
from shardckpt.engine.manifest_builder import ManifestBuilder
from shardckpt.engine.options import check_format_version, check_hash_block_bytes, check_io_threads
from shardckpt.engine.plan_records import PlanRecords
from shardckpt.engine.planner import SavePlanner as ShardckptSavePlanner
from shardckpt.engine.write_threads import WriteThreads
from shardckpt.errors import (
    ShardckptError,
    StorageError,
    UnsupportedValueError,
)
from shardckpt.format import integrity, layout
from shardckpt.format.manifest import Manifest
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.format.values import encode_value
from shardckpt.storage import Storage
from shardckpt.storage.datafiles import DataFiles

log = logging.getLogger("shardckpt")


@dataclass(frozen=True)
class _InlineValue:
    json_text: bytes


@dataclass(frozen=True)
class WriterOptions:
    num_io_threads: int = 2
    hash_block_bytes: int = integrity.DEFAULT_BLOCK_BYTES
    overwrite: bool = False
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Incremental saves (format 2): record every chunk's digest; ``base``, called on every
    # rank with the save's storage while planning, gives the chunks it may reuse.
    digests: bool = False
    base: Callable[[Storage], BaseIndex | None] | None = None
    # None: version 1 (2 with digests); 3: sharding rules and per-rank index records (write_v3)
    format_version: int | None = None
    direct_writes: bool = False  # data files through Storage.open_write_direct (IOOptions.direct_writes)

    def __post_init__(self) -> None:
        check_format_version(self.format_version)
        check_io_threads(self.num_io_threads)
        check_hash_block_bytes(self.hash_block_bytes)
        try:
            json.dumps(self.metadata, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata must be plain JSON (str keys, finite numbers): {e}") from e


class Writer(StorageWriter):
    """One instance per save and rank. Not thread-safe; DCP calls it from one thread."""

    def __init__(self, storage: Storage, options: WriterOptions, *, threads: WriteThreads | None = None) -> None:
        """``threads``: the owner's writer threads, kept across saves (None: this save's own)."""
        super().__init__()
        self._threads = threads
        self.storage = storage
        self.options = options
        self.rank = 0
        self.is_coordinator = False
        self.manifest: Manifest | ManifestV3 | None = None
        self._layout: list[dict[str, Any]] = []
        self._save_id: str | None = None  # set once this save's marker exists (coordinator)
        self._committed = False
        self._replaced: list[str] = []
        self._base: BaseIndex | None = None
        self.saved: list[tuple[WriteItem, ChunkLocation]] = []  # this rank's chunks, for the next save's base
        self.bytes_written = 0  # data file bytes this rank wrote (reused chunks write none)

    def reset(self, checkpoint_id: Any = None) -> None:
        self.manifest = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        if self.options.base is not None:
            # Here, inside DCP's planning step: a rank that cannot read the base fails the
            # save on every rank at once instead of leaving the others waiting.
            self._base = self.options.base(self.storage)
        host = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "location": self.storage.location,
            "options": agreed_options(self.options),  # compared by check_ranks_agree
        }
        return dataclasses.replace(plan, storage_data=host)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        check_ranks_agree(self.storage.url, [p.storage_data for p in plans])
        self._layout = [{k: v for k, v in p.storage_data.items() if k not in ("location", "options")} for p in plans]
        save_id = uuid.uuid4().hex[:12]
        self._claim_folder(save_id)
        return [dataclasses.replace(p, storage_data={"save_id": save_id, "rank": r}) for r, p in enumerate(plans)]

    def _claim_folder(self, save_id: str) -> None:
        self._replaced = claim_folder(self.storage, save_id, overwrite=self.options.overwrite)
        self._save_id = save_id

    def _create(self, name: str, data: bytes, *, lost_race: str) -> None:
        create_file(self.storage, name, data, overwrite=self.options.overwrite, lost_race=lost_race)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future[list[WriteResult]]:
        # Values first: one that cannot be stored fails before this rank writes a byte.
        results = self.value_results(plan, planner)
        results += self.write_files(plan, planner)
        done: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        done.set_result(results)
        return done

    def value_results(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        """The rank's non-tensor values as JSON write results (stored inline in the
        manifest); raises UnsupportedValueError naming the key of one JSON cannot hold.
        Writes nothing."""
        return [
            WriteResult(index=it.index, size_in_bytes=0, storage_data=_InlineValue(value_json(planner, it)))
            for it in plan.items
            if it.type == WriteItemType.BYTE_IO
        ]

    def write_files(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        """Write the rank's tensors into its data files (see :func:`write_file`); with
        digests, first drop the chunks the base already holds (:func:`digest_pass`)."""
        save_id, rank = plan.storage_data["save_id"], plan.storage_data["rank"]
        results: list[WriteResult] = []
        items = [it for it in plan.items if it.type != WriteItemType.BYTE_IO]
        resolve: Callable[[WriteItem], Any] = planner.resolve_data
        release = getattr(planner, "release_data", None)
        prepass: Prepass | None = None
        if self.options.digests:
            prepass = digest_pass(
                items,
                resolve,
                release,
                base=self._base,
                hash_block_bytes=self.options.hash_block_bytes,
                threads=self.options.num_io_threads,
                to_bytes=tensor_and_bytes,
            )
            results += prepass.reused
            items, resolve = prepass.to_write, prepass.resolve
        inline: list[WriteItem] = []
        if self.options.format_version == 3:  # the coordinator's small tensors: a last file (format.md 12.8)
            items, inline = rank_result.split_inline(items, rank=rank)
        split = self._threads.split_items if self._threads is not None else split_by_bytes
        buckets = split(items, self.options.num_io_threads) + ([inline] if inline else [])
        version = "3" if self.options.format_version == 3 else "2" if self.options.digests else "1"  # the manifest's
        meta = {"format": "shardckpt", "format_version": version, "save_id": save_id, "rank": str(rank)}
        written = self._write_buckets(buckets, resolve, release, save_id, rank, meta, prepass)
        self._remember(plan, results, written)
        return self._rank_result(plan, results, written, inline_last=bool(inline))

    def _write_buckets(
        self,
        buckets: list[list[WriteItem]],
        resolve: Callable[[WriteItem], Any],
        release: Callable[[WriteItem], None] | None,
        save_id: str,
        rank: int,
        meta: dict[str, str],
        prepass: Prepass | None,
    ) -> list[WrittenFile]:
        """Each bucket into its own data file, one writer thread each (:func:`write_file`,
        on the owner's :class:`WriteThreads` when the Writer was given them); then ``data/`` synced."""
        if not buckets:
            return []
        cancel = threading.Event()
        digests = prepass.digests if prepass is not None else None
        tasks: list[Callable[..., WrittenFile]] = [
            functools.partial(
                write_file,
                self.storage,
                layout.data_file_name(save_id, rank, k),
                bucket,
                resolve,
                release=release,
                rank=rank,
                block_bytes=self.options.hash_block_bytes,
                metadata=meta,
                digests=digests,
                cancel=cancel,
                direct=self.options.direct_writes,
            )
            for k, bucket in enumerate(buckets)
        ]
        threads = self._threads if self._threads is not None else WriteThreads()
        try:
            written = threads.run(tasks, cancel)
        finally:
            if threads is not self._threads:
                threads.close()
        self.storage.sync_dir(layout.DATA_DIR)
        return written

    def _rank_result(
        self, plan: SavePlan, results: list[WriteResult], written: list[WrittenFile], *, inline_last: bool = False
    ) -> list[WriteResult]:
        """The rank's results as sent to the coordinator: formats 1 and 2 packed into columns
        (write_results); format 3 this rank's index record written, the rank's one result (write_v3)."""
        if self.options.format_version != 3:
            return write_results.pack(results, written)
        block = self.options.hash_block_bytes
        return rank_result.rank_results(self.storage, plan, results, written, block, inline_last=inline_last)

    def _remember(self, plan: SavePlan, results: list[WriteResult], written: list[WrittenFile]) -> None:
        """Count the bytes written and, with digests, keep this rank's chunk locations
        (reused ones in ``results``, the ``written`` ones) for the next save's base."""
        self.bytes_written = sum(w.record.size for w in written)
        if self.options.digests:
            by_index = {it.index: it for it in plan.items}
            every = results + [r for w in written for r in w.results()]
            self.saved = [(by_index[wr.index], wr.storage_data) for wr in every]

    def finish(
        self,
        metadata: Metadata,
        results: list[list[WriteResult]],
        builder: ManifestBuilder | None = None,
        records: PlanRecords | None = None,
    ) -> None:
        """Coordinator: build, check and commit the manifest. ``builder`` (formats 1, 2) or
        ``records`` (format 3): the one the caller keeps for the global plan of ``metadata``
        (what the plan's later saves reuse; ``protocol.PlanCache``); None: built anew."""
        if self.options.format_version == 3:
            if records is not None and records.metadata is not metadata:
                raise ValueError("Writer.finish: the plan records given were made for another global plan")
            self._finish_v3(metadata, results, records)
            return
        if builder is None:
            builder = ManifestBuilder(metadata)
        elif builder.metadata is not metadata:
            raise ValueError("Writer.finish: the manifest builder given was made for another global plan")
        built = builder.build(results, self._layout, self.options.hash_block_bytes, dict(self.options.metadata))
        m = built.manifest
        self._check_files_present(m)
        self._mark_bases_referenced(m)
        self._create(
            layout.MANIFEST_NAME,
            built.to_json(),
            lost_race="another save committed this folder "
            "first; this one was not committed. Save each checkpoint to its own path.",
        )
        self.manifest = m
        self._committed = True
        self._remove_replaced(m.files)

    def _finish_v3(
        self, metadata: Metadata, results: list[list[WriteResult]], records: PlanRecords | None = None
    ) -> None:
        """Format 3: the pages and the manifest of rules (write_v3), committed like any save."""
        assert self._save_id is not None
        lost = "another save committed this folder first; this one was not committed. Save each to its own path."
        create = functools.partial(self._create, lost_race=lost)
        self.manifest = write_v3.finish(self.storage, metadata, results, self._save_id, self.options, create, records)
        self._committed = True
        self._remove_replaced(set())

    def _check_files_present(self, m: Manifest) -> None:
        """Every file the manifest lists must be there with the size its rank wrote: a
        rank that wrote elsewhere, or a file removed by someone else, is caught here,
        before the commit, not by the first load."""
        files = DataFiles(self.storage, m.files)
        for name, record in sorted(m.files.items()):
            try:
                size = files.size(name)
            except FileNotFoundError:
                size = None
            if size != record.size:
                found = "is missing" if size is None else f"has {size} bytes"
                if record.checkpoint is not None:
                    raise StorageError(
                        f"save to {self.storage.url}: data file {files.describe(name)}, which this incremental "
                        f"save reuses, {found}, expected {record.size} bytes: the base was deleted or changed "
                        "while the save ran. Nothing was committed; save again (without a base for a full save)."
                    )
                raise StorageError(
                    f"save to {self.storage.url}: data file {name} of rank {record.rank} {found}, expected "
                    f"{record.size} bytes. Something removed or changed it while the save ran (another job "
                    "writing to the same path?). Nothing was committed; save again to a new path."
                )

    def _mark_bases_referenced(self, m: Manifest) -> None:
        """Before the commit: tell every base folder, by a marker file in it, that a sibling
        checkpoint reads its data files. Tools that delete a checkpoint check for it
        (:func:`shardckpt.storage.folder.remove_checkpoint` refuses, overwriting refuses;
        a CheckpointManager deletes only the files no kept step references). Never removed
        while the folder holds data; created once, idempotent."""
        for base in m.bases:
            sibling = self.storage.sibling(base)
            try:
                sibling.create_exclusive(layout.REFERENCED_NAME, layout.referenced_marker())
            except FileExistsError:
                pass

    def _remove_replaced(self, listed: Collection[str]) -> None:
        """After an overwrite's commit: remove the replaced checkpoint's files (data files,
        format-3 index records and pages) that the new manifest does not list. The save has
        succeeded; a failure here is a warning naming what was left."""
        stale = [n for n in self._replaced if n not in listed]
        try:
            self.storage.delete(stale)
        except (OSError, ShardckptError) as e:
            log.warning(
                "shardckpt: committed %s, but could not remove %d data files of the checkpoint it "
                "replaced (%s); they are unused and safe to delete by hand",
                self.storage.url,
                len(stale),
                e,
            )

    def discard(self) -> None:
        """After a failed save (coordinator): remove this save's own files when nothing was
        committed (:func:`discard_save`)."""
        if self._save_id is None or self._committed:
            return
        discard_save(self.storage, self._save_id)

    def storage_meta(self) -> None:
        return None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return isinstance(checkpoint_id, str)


def value_json(planner: SavePlanner, item: WriteItem) -> bytes:
    """The JSON text of the non-tensor value of ``item`` (a BYTE_IO item).

    Our planner resolves values to JSON already. DCP's ``DefaultSavePlanner`` (and its
    subclasses) would resolve them to ``torch.save`` pickles, which a checkpoint never
    holds: the raw object comes from its ``lookup_object`` and is encoded here with
    :func:`shardckpt.format.values.encode_value` instead. Other planners cannot give
    the object, so their values are refused.
    """
    fqn = item.index.fqn
    if isinstance(planner, ShardckptSavePlanner):
        data = planner.resolve_data(item)
        assert isinstance(data, io.BytesIO), "our SavePlanner resolves values to JSON bytes"
        return data.getvalue()
    if isinstance(planner, DefaultSavePlanner):
        value = planner.lookup_object(item.index)
        return json.dumps(encode_value(value, key=fqn), allow_nan=False, separators=(",", ":")).encode()
    raise UnsupportedValueError(
        f"key {fqn!r}: a non-tensor value saved with the planner {type(planner).__qualname__}, which can only "
        "hand it over as opaque bytes (a pickle); shardckpt stores values as JSON and never pickles. Use DCP's "
        "DefaultSavePlanner (or a subclass of it), or store the value as a tensor."
    )
