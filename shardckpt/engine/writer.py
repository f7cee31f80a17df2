"""DCP StorageWriter over :mod:`shardckpt.storage`: safetensors data files, a JSON manifest.

DCP calls, in order (``*`` = coordinator only)::

    set_up_storage_writer -> prepare_local_plan -> prepare_global_plan* -> write_data -> finish*

``prepare_global_plan`` (coordinator) checks that every rank means the same folder,
that the folder is new, empty, or shardckpt's own (never a user's folder), and claims
it by creating the save marker exclusively, before any data byte is written.
``write_data`` runs on every rank: the rank's items are split over
``num_io_threads`` files, each streamed to storage tensor by tensor (no full copy of
the rank's state), hashed while written, then made durable. ``finish`` runs on the
coordinator only after every rank's ``write_data`` succeeded; it checks that every
listed file is there with its size, then commits by creating ``manifest.json``
exclusively (so of two racing saves exactly one commits). With ``overwrite=True`` it
then removes the data files of the checkpoint it replaced, which it listed before
writing; nothing else is ever deleted (errors there are warnings: the save is done).
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult

from shardckpt._version import __version__
from shardckpt.engine.incremental import BaseIndex, ChunkLocation, Prepass, digest_pass
from shardckpt.engine.options import check_hash_block_bytes, check_io_threads
from shardckpt.engine.planner import SavePlanner as ShardckptSavePlanner
from shardckpt.engine.staging import item_bytes
from shardckpt.errors import (
    CheckpointExistsError,
    DestinationNotEmptyError,
    InconsistentRanksError,
    ShardckptError,
    StorageError,
    UnsupportedValueError,
)
from shardckpt.format import datafile, integrity, layout
from shardckpt.format.manifest import ChunkRecord, FileRecord, Manifest, TensorRecord, manifest_to_json
from shardckpt.format.values import encode_value
from shardckpt.storage import Storage, folder
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

    def __post_init__(self) -> None:
        check_io_threads(self.num_io_threads)
        check_hash_block_bytes(self.hash_block_bytes)
        try:
            json.dumps(self.metadata, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata must be plain JSON (str keys, finite numbers): {e}") from e


class Writer(StorageWriter):
    """One instance per save and rank. Not thread-safe; DCP calls it from one thread."""

    def __init__(self, storage: Storage, options: WriterOptions, after_write: Callable[[], None] | None = None) -> None:
        """``after_write`` runs on every rank when its writes ended, failed or not (a
        barrier with a timeout, so a rank stuck writing is named instead of hanging all)."""
        super().__init__()
        self._after_write = after_write
        self.storage = storage
        self.options = options
        self.rank = 0
        self.is_coordinator = False
        self.manifest: Manifest | None = None
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
        }
        return dataclasses.replace(plan, storage_data=host)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        _check_same_location(self.storage.url, [p.storage_data for p in plans])
        self._layout = [{k: v for k, v in p.storage_data.items() if k != "location"} for p in plans]
        save_id = uuid.uuid4().hex[:12]
        self._claim_folder(save_id)
        return [dataclasses.replace(p, storage_data={"save_id": save_id, "rank": r}) for r, p in enumerate(plans)]

    def _claim_folder(self, save_id: str) -> None:
        self._replaced = claim_folder(self.storage, save_id, overwrite=self.options.overwrite)
        self._save_id = save_id

    def _create(self, name: str, data: bytes, *, lost_race: str) -> None:
        create_file(self.storage, name, data, overwrite=self.options.overwrite, lost_race=lost_race)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future[list[WriteResult]]:
        try:
            # Values first: one that cannot be stored fails before this rank writes a byte.
            results = self.value_results(plan, planner)
            results += self.write_files(plan, planner)
        finally:
            if self._after_write is not None:
                self._after_write()
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
                to_bytes=_tensor_and_bytes,
            )
            results += prepass.reused
            items, resolve = prepass.to_write, prepass.resolve
        buckets = _split_by_bytes(items, self.options.num_io_threads)
        version = "2" if self.options.digests else "1"  # the format of the manifest this save commits
        meta = {"format": "shardckpt", "format_version": version, "save_id": save_id, "rank": str(rank)}
        if not buckets:
            self._remember(plan, results)
            return results
        cancel = threading.Event()
        pool = ThreadPoolExecutor(len(buckets), thread_name_prefix="shardckpt-write")
        try:
            futures = [
                pool.submit(
                    write_file,
                    self.storage,
                    layout.data_file_name(save_id, rank, k),
                    bucket,
                    resolve,
                    release=release,
                    rank=rank,
                    block_bytes=self.options.hash_block_bytes,
                    metadata=meta,
                    cancel=cancel,
                    digests=prepass.digests if prepass is not None else None,
                )
                for k, bucket in enumerate(buckets)
            ]
            for f in futures:
                results.extend(f.result())
        except BaseException:
            # Ctrl-C, or one file failed: the other threads stop at their next block
            # (and remove their partial files) instead of writing on for seconds.
            cancel.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        self.storage.sync_dir(layout.DATA_DIR)
        self._remember(plan, results)
        return results

    def _remember(self, plan: SavePlan, results: list[WriteResult]) -> None:
        """Keep this rank's chunk locations (with digests) and count the bytes written."""
        self.bytes_written = sum(
            r.file_record.size
            for r in {wr.storage_data.file: wr.storage_data for wr in results}.values()
            if r.file_record.checkpoint is None
        )
        if self.options.digests:
            by_index = {it.index: it for it in plan.items}
            self.saved = [(by_index[wr.index], wr.storage_data) for wr in results]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        m = build_manifest(metadata, results, self._layout, self.options.hash_block_bytes)
        m = dataclasses.replace(m, metadata=dict(self.options.metadata))
        self._check_files_present(m)
        self._mark_bases_referenced(m)
        self._create(
            layout.MANIFEST_NAME,
            manifest_to_json(m),
            lost_race="another save committed this folder "
            "first; this one was not committed. Save each checkpoint to its own path.",
        )
        self.manifest = m
        self._committed = True
        self._remove_replaced(m)

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

    def _remove_replaced(self, m: Manifest) -> None:
        """After an overwrite's commit: remove the replaced checkpoint's data files. The
        save has succeeded; a failure here is a warning naming what was left."""
        stale = [n for n in self._replaced if n not in m.files]
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


class _Cancelled(Exception):
    """A writer thread stopped because the save was interrupted or failed elsewhere."""


def _check_same_location(url: str, per_rank: list[dict[str, Any]]) -> None:
    """All ranks must write into one folder: a per-rank path (a timestamp in it, a
    relative path on nodes with different working directories) would commit a manifest
    that lists files living elsewhere."""
    places: dict[str, list[int]] = {}
    for r, data in enumerate(per_rank):
        places.setdefault(data["location"], []).append(r)
    if len(places) > 1:
        shown = "; ".join(f"ranks {ranks}: {loc}" for loc, ranks in sorted(places.items(), key=lambda kv: kv[1][0]))
        raise InconsistentRanksError(
            f"save to {url}: ranks passed different paths ({shown}). Every rank must pass the same path "
            "(compute it once, e.g. on rank 0, and broadcast it); nothing was written."
        )


def claim_folder(storage: Storage, save_id: str, *, overwrite: bool, what: str = "save") -> list[str]:
    """Refuse a folder that is not ours to write; then create the save marker, the proof
    (for clean-up) that shardckpt owns what follows, before any data byte. Coordinator
    only; ``what`` names the operation in errors (``"save"``, ``"materialize"``).

    With ``overwrite`` an existing checkpoint there is uncommitted at once and the names of
    its data files are returned (the caller removes them after its own commit); else []."""
    url = storage.url
    found = folder.contents(storage)
    if found.foreign:
        shown = ", ".join(repr(n) for n in found.foreign[:5])
        raise DestinationNotEmptyError(
            f"{what} to {url}: the folder already holds {len(found.foreign)} "
            f"{'entry that is' if len(found.foreign) == 1 else 'entries that are'} not part of a "
            f"shardckpt checkpoint ({shown}); shardckpt saves only into a new or empty folder, or over its "
            "own checkpoint, so it never deletes or overwrites your files. Save to a new path (one folder "
            "per checkpoint, e.g. runs/exp1/step_100) or empty this one."
        )
    if found.is_referenced:
        raise CheckpointExistsError(
            f"{what} to {url}: incremental checkpoints beside this one read its data files (it holds "
            f"{layout.REFERENCED_NAME}), so it is never overwritten, even with overwrite=True: that would "
            "break them. Save to a new path; delete it through the CheckpointManager that wrote the "
            "incremental steps, which keeps every file a kept step needs."
        )
    if not overwrite and found.has_manifest:
        raise CheckpointExistsError(
            f"{url}: a committed checkpoint is already there; save to a new path, "
            "or pass overwrite=True to replace it (the old one stops being loadable at once)"
        )
    if not overwrite and found.has_marker:
        raise CheckpointExistsError(
            f"{what} to {url}: another save is writing into this folder, or an earlier one was interrupted "
            f"(it holds {layout.SAVE_MARKER_NAME} and no {layout.MANIFEST_NAME}). If no other job is saving "
            "here, pass overwrite=True to replace what the interrupted save left, or save to a new path."
        )
    marker = json.dumps(
        {
            "format": "shardckpt",
            "save_id": save_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": time.time(),
        }
    ).encode()
    replaced: list[str] = []
    if overwrite:
        # Listed now, deleted only after the new commit: the replaced save's files.
        replaced = [n for n in found.checkpoint_files if layout.is_data_file_name(n)]
        # Uncommit first: from here on nobody may trust the old files.
        storage.delete([layout.MANIFEST_NAME])
    create_file(
        storage,
        layout.SAVE_MARKER_NAME,
        marker,
        overwrite=overwrite,
        lost_race="another save started writing into this folder "
        "at the same moment; two saves to one path cannot both succeed. Save each to its own path.",
        what=what,
    )
    return replaced


def create_file(
    storage: Storage, name: str, data: bytes, *, overwrite: bool, lost_race: str, what: str = "save"
) -> None:
    """Create ``name`` exclusively (replace it with ``overwrite``); a lost race is
    CheckpointExistsError saying ``lost_race``. The commit of a save is this call for the
    manifest, after every data file is durable."""
    if overwrite:
        storage.write_atomic(name, data)
        return
    try:
        storage.create_exclusive(name, data)
    except FileExistsError as e:
        raise CheckpointExistsError(f"{what} to {storage.url}: {lost_race}") from e


def discard_save(storage: Storage, save_id: str) -> None:
    """After a failed save or materialize that did not commit (coordinator): remove the
    files of ``save_id``, so a failure in a new folder leaves nothing behind. Only names of
    this save id; the marker only while it is still this save's. Best effort: a failure
    here is logged, never raised over the save's own error."""
    try:
        if folder.is_committed(storage):
            return  # committed after all (or by a racing overwrite): not ours to touch
        prefix = f"{layout.DATA_DIR}/{save_id}-"
        storage.delete([n for n in storage.list_files(layout.DATA_DIR) if n.startswith(prefix)])
        if _marker_save_id(storage) == save_id:
            storage.delete([layout.SAVE_MARKER_NAME])
            if storage.remove_empty_dir(layout.DATA_DIR):
                storage.remove_empty_dir("")
    except (OSError, ShardckptError) as e:
        log.warning(
            "shardckpt: the failed save to %s left files behind (%s); a CheckpointManager "
            "removes them at its next start, or save again with overwrite=True",
            storage.url,
            e,
        )


def _marker_save_id(storage: Storage) -> str | None:
    try:
        doc = json.loads(storage.read_bytes(layout.SAVE_MARKER_NAME))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # not a marker we wrote
    return doc.get("save_id") if isinstance(doc, dict) else None


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


def _split_by_bytes(items: list[WriteItem], n: int) -> list[list[WriteItem]]:
    """Up to ``n`` non-empty buckets of roughly equal byte counts (largest item first)."""
    buckets: list[list[WriteItem]] = [[] for _ in range(min(n, len(items)))]
    sizes = [0] * len(buckets)
    for it in sorted(items, key=lambda i: -item_bytes(i)):
        k = sizes.index(min(sizes))
        buckets[k].append(it)
        sizes[k] += item_bytes(it)
    return [b for b in buckets if b]


def _entry_name(item: WriteItem) -> str:
    """Name inside the safetensors header: the key for a whole tensor, ``key@o1,o2`` for a
    chunk. Keys containing ``@`` (or named ``__metadata__``) always get the suffix, so the
    last ``@`` unambiguously separates key and offsets and no two entries collide."""
    assert item.index.offset is not None and item.tensor_data is not None
    fqn = item.index.fqn
    whole = all(o == 0 for o in item.index.offset) and tuple(item.tensor_data.chunk.sizes) == tuple(
        item.tensor_data.size
    )
    if whole and "@" not in fqn and fqn != "__metadata__":
        return fqn
    return f"{fqn}@{','.join(map(str, item.index.offset))}"


def _tensor_bytes(tensor: torch.Tensor, item: WriteItem) -> memoryview:
    return _tensor_and_bytes(tensor, item)[1]


def _tensor_and_bytes(tensor: torch.Tensor, item: WriteItem) -> tuple[torch.Tensor, memoryview]:
    """``tensor`` as a contiguous CPU tensor (a copy only if it is not one) and its bytes."""
    assert item.tensor_data is not None
    t = tensor.detach()
    if tuple(t.shape) != tuple(item.tensor_data.chunk.sizes):
        raise UnsupportedValueError(
            f"key {item.index.fqn!r}: planned chunk shape {tuple(item.tensor_data.chunk.sizes)} "
            f"but resolved tensor has shape {tuple(t.shape)}"
        )
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return t, memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def write_file(
    storage: Storage,
    name: str,
    items: list[WriteItem],
    resolve: Any,
    *,
    release: Callable[[WriteItem], None] | None = None,
    rank: int,
    block_bytes: int,
    metadata: dict[str, str],
    cancel: threading.Event | None = None,
    digests: dict[Any, str] | None = None,
) -> list[WriteResult]:
    """Stream ``items`` into one safetensors file; return one WriteResult per item.

    Runs on a writer thread; ``resolve(item)`` gives the tensor and ``release(item)``, if
    given, is told when its bytes have been written (not yet durable). The header is built
    from the plan before any data, then each tensor is hashed block by block as it is
    written, and the file is fsynced (finish) before this returns. ``cancel``, when set
    by another thread, stops the write at the next block (the partial file is removed).
    ``digests`` (incremental saves): each item's digest from the digest pass, recorded.
    """
    entries, begin = [], 0
    for it in items:
        assert it.tensor_data is not None
        dtype = datafile.dtype_name(it.tensor_data.properties.dtype, key=it.index.fqn)
        sizes = tuple(it.tensor_data.chunk.sizes)
        end = begin + math.prod(sizes) * datafile.itemsize(dtype)
        entries.append(datafile.HeaderEntry(_entry_name(it), dtype, sizes, begin, end))
        begin = end
    header = datafile.build_header(entries, metadata)
    file_hasher = integrity.new_file_hasher()
    stream = storage.open_write(name)
    located = []
    try:
        stream.write(header)
        file_hasher.update(header)
        for it, entry in zip(items, entries, strict=True):
            data = _tensor_bytes(resolve(it), it)
            hashes = []
            # Incremental saves: a digest the digest pass did not compute is computed here,
            # piece by piece, while the other writer threads wait on I/O.
            digester = integrity.new_digester() if digests is not None and it.index not in digests else None
            for i in range(0, len(data), block_bytes):
                if cancel is not None and cancel.is_set():
                    raise _Cancelled(f"write of {name} cancelled")
                piece = data[i : i + block_bytes]
                hashes.append(integrity.hash_hex(piece))
                file_hasher.update(piece)
                if digester is not None:
                    digester.update(piece)
                stream.write(piece)
            digest = digester.hexdigest() if digester is not None else None
            if digests is not None and digester is None:
                digest = digests[it.index]
            located.append((it, len(header) + entry.begin, entry.end - entry.begin, tuple(hashes), digest))
            del data
            if release is not None:
                release(it)
        stream.finish()
    except BaseException:
        stream.abort()
        raise
    record = FileRecord(size=len(header) + begin, hash=file_hasher.hexdigest(), rank=rank)
    return [
        WriteResult(
            index=it.index, size_in_bytes=length, storage_data=ChunkLocation(name, off, length, hashes, record, digest)
        )
        for it, off, length, hashes, digest in located
    ]


def build_manifest(
    metadata: Metadata, results: list[list[WriteResult]], process_layout: list[dict[str, Any]], block_bytes: int
) -> Manifest:
    """Turn DCP's global metadata and every rank's write results into our manifest."""
    located: dict[MetadataIndex, Any] = {wr.index: wr.storage_data for per_rank in results for wr in per_rank}
    tensors: dict[str, TensorRecord] = {}
    values: dict[str, Any] = {}
    files: dict[str, FileRecord] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            values[fqn] = json.loads(located[MetadataIndex(fqn)].json_text)
            continue
        chunks = []
        for c in md.chunks:
            loc: ChunkLocation = located[MetadataIndex(fqn, c.offsets)]
            files[loc.file] = loc.file_record
            chunks.append(
                ChunkRecord(
                    tuple(c.offsets),
                    tuple(c.sizes),
                    loc.file,
                    loc.byte_offset,
                    loc.byte_length,
                    loc.block_hashes,
                    loc.digest,
                )
            )
        dtype = datafile.dtype_name(md.properties.dtype, key=fqn)
        tensors[fqn] = TensorRecord(dtype, tuple(md.size), tuple(chunks))
    paths = {k: list(v) for k, v in (metadata.planner_data or {}).items()}
    bases = tuple(sorted({f.checkpoint for f in files.values() if f.checkpoint is not None}))
    digests = any(c.digest is not None for t in tensors.values() for c in t.chunks)
    return Manifest(
        world_size=len(results),
        process_layout=tuple(process_layout),
        tensors=tensors,
        values=values,
        files=files,
        hash_block_bytes=block_bytes,
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        shardckpt_version=__version__,
        torch_version=torch.__version__,
        paths=paths,
        format_version=2 if bases or digests else 1,
        bases=bases,
    )
