"""DCP StorageReader over :mod:`shardckpt.storage`: ranged, verified, parallel reads.

DCP calls, in order: ``read_metadata -> set_up_storage_reader -> prepare_local_plan
-> prepare_global_plan* -> read_data`` (``*`` coordinator only).

``read_data`` reads, for each ReadItem, only the byte range that covers the box the
rank needs (rounded out to whole checksum blocks when verifying), checks those blocks,
and copies the box into the destination tensor, through the same
:class:`~shardckpt.engine.boxes.BoxReader` as every other reader. Small boxes whose bytes
lie back to back in a data file are read together, with one read (:func:`read_runs`); a
same-layout load of a larger chunk reads straight into the destination tensor, with no
staging copy.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter
from typing import Any, NamedTuple, Protocol, cast

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader

from shardckpt.engine.boxes import BoxReader, RunBox, Span
from shardckpt.engine.load_items import ListedTensorMetadata, WholeChunk
from shardckpt.engine.load_v3 import RuleChunks
from shardckpt.engine.plan_v3 import RulePlanner
from shardckpt.engine.planner import LoadPlanner as ShardckptLoadPlanner
from shardckpt.engine.planner import set_in_place
from shardckpt.errors import IntegrityError
from shardckpt.format.manifest import ChunkRecord, Manifest
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.format.values import decode_value
from shardckpt.storage import LocalStorage, Storage


class Reader(StorageReader):
    """One instance per load and rank, built around an already parsed manifest."""

    def __init__(
        self,
        storage: Storage,
        manifest: Manifest | ManifestV3,
        *,
        verify: bool,
        num_io_threads: int,
    ) -> None:
        super().__init__()
        self.storage = storage
        self.manifest = manifest
        self.verify = verify
        self.num_io_threads = num_io_threads
        self.bytes_read = 0
        self.rank = 0

    def reset(self, checkpoint_id: Any = None) -> None:
        self.bytes_read = 0

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # This reader finds chunks in the manifest: no per-chunk storage_data (issue #18).
        return manifest_to_metadata(self.manifest, storage_data=False)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.rank = int(kwargs.get("rank", 0))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return isinstance(checkpoint_id, str)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        self._read_all(plan, planner)
        done: torch.futures.Future[None] = torch.futures.Future()
        done.set_result(None)
        return done

    def _read_all(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        tensor_items = []
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                deliver_value(planner, item, self.manifest.values[item.storage_index.fqn])
            else:
                tensor_items.append(item)
        where = f"{self.storage.url} (rank {self.rank})"
        # the chunks the planner found for this rank's boxes are not looked up again
        known = planner.found if isinstance(planner, RulePlanner) and planner.manifest3 is self.manifest else None
        chunks: ChunkSource = (
            RuleChunks(self.storage, self.manifest, verify=self.verify, where=where, known=known)
            if isinstance(self.manifest, ManifestV3)
            else ListedChunks(self.storage, self.manifest, verify=self.verify, where=where)
        )
        whole = planner.whole if isinstance(planner, ShardckptLoadPlanner) else []
        if whole and not isinstance(chunks, ListedChunks):
            raise AssertionError("listed whole chunks planned for a format-3 manifest: its reads find chunks by rule")
        cells = planner.cells if isinstance(planner, RulePlanner) else []
        if cells:  # format 3's keys read whole, without ReadItems (#18)
            if not isinstance(chunks, RuleChunks) or known is None:
                raise AssertionError("whole cells planned for another manifest than the one read")
            boxes = chunks.prepare(tensor_items, threads=self.num_io_threads, cells=cells)
            whole = chunks.whole(cells)
        else:
            boxes = chunks.prepare(tensor_items, threads=self.num_io_threads)
        runs = read_runs(tensor_items, chunks, boxes, whole)
        # One task per thread, each taking the next run until none is left: thousands
        # of small chunks cost no future, submit and wake-up each (issue #18). The calling
        # thread reads too, so a small local load starts no thread at all; an object
        # store's reads wait on the network, so each of its runs may have a thread.
        per_thread = READ_BYTES_PER_THREAD if isinstance(self.storage, LocalStorage) else None
        workers = reader_threads(runs, self.num_io_threads, bytes_per_thread=per_thread)
        queue, lock = iter(runs), threading.Lock()
        if workers == 1:
            self.bytes_read += self._read_runs(boxes, queue, lock, planner)
            return
        with ThreadPoolExecutor(workers - 1, thread_name_prefix="shardckpt-read") as pool:
            helpers = [pool.submit(self._read_runs, boxes, queue, lock, planner) for _ in range(workers - 1)]
            self.bytes_read += self._read_runs(boxes, queue, lock, planner)
            for f in helpers:
                self.bytes_read += f.result()

    def _read_runs(
        self,
        boxes: BoxReader,
        queue: Iterator[list[PlannedRead]],
        lock: threading.Lock,
        planner: LoadPlanner,
    ) -> int:
        """Read runs from ``queue`` (shared by the reader threads) until it is empty;
        returns the bytes read from storage."""
        done = 0
        # DCP's own commit_tensor does nothing: not called 3,000 times for small chunks (#18)
        commits = type(planner).commit_tensor is not DefaultLoadPlanner.commit_tensor
        while True:
            with lock:
                run = next(queue, None)
            if run is None:
                return done
            # detached (3 us a tensor) only where it requires grad (a parameter's local
            # tensor), which the copy into it, or ``numpy()`` of it, would refuse
            targets = [
                t.detach() if t.requires_grad else t
                for t in (
                    cast(torch.Tensor, p.target) if p.item is None else planner.resolve_tensor(p.item) for p in run
                )
            ]
            if len(run) == 1:
                p = run[0]
                if p.item is None:  # a whole chunk (a box is never empty)
                    assert p.box is not None
                    done += boxes.read_box(p.box.key, p.chunk, (0,) * len(p.chunk.sizes), targets[0])
                else:
                    done += boxes.read_box(p.item.storage_index.fqn, p.chunk, p.item.storage_offsets, targets[0])
            else:  # no object made per box: each is one more GC-tracked allocation (#18)
                done += boxes.read_run([p.box for p in run if p.box is not None], targets)
            if commits:
                for p, t in zip(run, targets, strict=True):
                    assert p.item is not None, "a planner that commits tensors plans no whole chunk"
                    planner.commit_tensor(p.item, t)


READ_BYTES_PER_THREAD = 32 << 20
"""A load reads with one more thread for each this many bytes it reads (up to its
``num_io_threads``, one per run at most): below that, starting a thread and handing the GIL
between threads cost more CPU than overlapping the reads saves (#18)."""


def reader_threads(
    runs: Sequence[list[PlannedRead]], num_io_threads: int, *, bytes_per_thread: int | None = READ_BYTES_PER_THREAD
) -> int:
    """How many threads (the calling one included) read ``runs``: one per
    ``bytes_per_thread`` of their bytes (None: no limit by bytes), at least one, at most
    ``num_io_threads`` and one per run."""
    if bytes_per_thread is None:
        return max(1, min(num_io_threads, len(runs)))
    total = 0
    for run in runs:
        first, last = run[0].box, run[-1].box
        if first is not None and last is not None:  # a run of an empty box reads nothing
            total += last.chunk.byte_offset + last.span.hi - first.chunk.byte_offset - first.span.lo
    return max(1, min(num_io_threads, len(runs), 1 + total // bytes_per_thread))


RUN_ITEM_MAX_BYTES = 1 << 20
"""Boxes up to this size are read together with their neighbours in the file (larger
ones are read alone, straight into their target where the layout allows)."""

RUN_MAX_BYTES = 8 << 20
"""At most this many bytes per joined read (the staging buffer of one reader thread)."""


class PlannedRead(NamedTuple):
    """A tensor ReadItem with its chunk and, unless its box is empty, the bytes of the chunk
    it reads (``box``, planned once, as :meth:`BoxReader.read_run` takes it); or (``item``
    None) a whole chunk read into ``target`` (a :data:`~shardckpt.engine.load_items.WholeChunk`)."""

    item: ReadItem | None
    chunk: ChunkRecord
    box: RunBox | None
    target: torch.Tensor | None = None


def read_runs(
    items: Sequence[ReadItem], chunks: ChunkSource, boxes: BoxReader, whole: Sequence[WholeChunk] = ()
) -> list[list[PlannedRead]]:
    """``items``, and the ``whole`` chunks (each read whole into its target, planned
    without a ReadItem: ``LoadPlanner.whole``), grouped into runs, each read with one read: boxes of at most
    :data:`RUN_ITEM_MAX_BYTES` whose bytes lie back to back in one data file, up to
    :data:`RUN_MAX_BYTES` a run; every other item is a run of its own. No byte is read
    that a box does not need (a gap ends a run). Runs are in file and offset order.
    Before returning, checks the size of every data file an item reads
    (:meth:`BoxReader.check_file_sizes`: a truncated file is named before any read), with
    the chunks found here: each item's chunk is looked up once per load (#18)."""
    by_file: dict[str, list[tuple[int, int, PlannedRead]]] = {}
    alone: list[list[PlannedRead]] = []
    chunk_at, span_of = chunks.chunk, boxes.span

    def place(chunk: ChunkRecord, span: Span, planned: PlannedRead) -> None:
        begin = chunk.byte_offset + span.lo
        by_file.setdefault(chunk.file, []).append((begin, begin + span.hi - span.lo, planned))

    for item in items:
        index = item.storage_index
        key = index.fqn
        chunk = chunk_at(key, tuple(index.offset or ()))
        if 0 in item.lengths:  # an empty box (lengths are non-negative)
            alone.append([PlannedRead(item, chunk, None)])
            continue
        span = span_of(key, chunk, item.storage_offsets, item.lengths)
        place(chunk, span, PlannedRead(item, chunk, RunBox(key, chunk, span)))
    origins: dict[int, tuple[int, ...]] = {}
    for key, chunk, target in whole:  # the chunk and target known: no look-up (#18)
        origin = origins.get(len(chunk.sizes))
        if origin is None:
            origin = origins[len(chunk.sizes)] = (0,) * len(chunk.sizes)
        span = span_of(key, chunk, origin, chunk.sizes)
        place(chunk, span, PlannedRead(None, chunk, RunBox(key, chunk, span), target))
    boxes.check_file_sizes([*by_file, *(run[0].chunk.file for run in alone)])
    runs: list[list[PlannedRead]] = []
    item_max, run_max = RUN_ITEM_MAX_BYTES, RUN_MAX_BYTES
    for name in sorted(by_file):
        in_file = by_file[name]
        in_file.sort(key=_BEGIN_STOP)  # already in order after a same-layout save: one pass
        end, size = -1, 0  # no box begins at -1: the first starts a run
        run: list[PlannedRead] = []
        for begin, stop, planned in in_file:
            n = stop - begin
            if n <= item_max and begin == end and size + n <= run_max:
                run.append(planned)
                size += n
            else:
                run = [planned]
                runs.append(run)
                size = n if n <= item_max else run_max  # nothing joins a large box
            end = stop
    return runs + alone


_BEGIN_STOP = itemgetter(0, 1)


class ChunkSource(Protocol):
    """Where the chunks a rank reads are and how to verify them: ``prepare`` (one thread,
    before any read) readies the chunks the items read and returns their box reader (it
    may check the sizes of their data files; :func:`read_runs` checks those not checked
    yet); ``chunk`` may then be called from the reader threads."""

    def prepare(self, items: Sequence[ReadItem], *, threads: int = 1) -> BoxReader: ...

    def chunk(self, key: str, offsets: tuple[int, ...]) -> ChunkRecord: ...


class ListedChunks:
    """The chunks of a version-1 or -2 manifest, which lists each with its checksums."""

    SCAN_MAX_CHUNKS = 16
    """A tensor of at most this many chunks is searched for one; a larger one gets an index
    by offsets at its first look-up (indexing every chunk of the manifest for each load
    cost more than a load reads in a same-layout load of thousands of tensors; #18)."""

    def __init__(self, storage: Storage, manifest: Manifest, *, verify: bool, where: str) -> None:
        self._boxes = BoxReader(storage, manifest, verify=verify, where=where)
        self._tensors = manifest.tensors
        self._index: dict[str, dict[tuple[int, ...], ChunkRecord]] = {}  # key -> offsets -> chunk (large tensors)

    def prepare(self, items: Sequence[ReadItem], *, threads: int = 1) -> BoxReader:
        """The box reader: every chunk is in the manifest already (:func:`read_runs` checks
        the data files' sizes as it finds each item's chunk)."""
        return self._boxes

    def chunk(self, key: str, offsets: tuple[int, ...]) -> ChunkRecord:
        """The chunk of ``key`` at ``offsets`` (thread-safe: two threads may both index a
        tensor, and one index replaces the other, equal to it)."""
        rec = self._tensors.get(key)
        chunks = () if rec is None else rec.chunks
        chunk = None
        if len(chunks) <= self.SCAN_MAX_CHUNKS:
            for c in chunks:
                if c.offsets == offsets:
                    chunk = c
                    break
        else:
            index = self._index.get(key)
            if index is None:
                index = self._index[key] = {c.offsets: c for c in chunks}
            chunk = index.get(offsets)
        if chunk is not None:
            return chunk
        raise IntegrityError(f"key {key!r}: no chunk at offsets {offsets} in the manifest")


def deliver_value(planner: LoadPlanner, item: ReadItem, encoded: Any) -> None:
    """Hand the planner a saved non-tensor value (``encoded``: its JSON from the manifest)
    without ever unpickling checkpoint bytes.

    - Our planner gets the JSON text and decodes it itself.
    - DCP's ``DefaultLoadPlanner`` (or a subclass that keeps its ``load_bytes``) would
      ``torch.load(weights_only=False)`` the stream: instead the decoded value is set
      where that ``load_bytes`` would set it (the same path through its ``mappings``).
    - A planner with its own ``load_bytes`` needs a byte stream: it gets ``torch.save``
      of the decoded value, built here in memory from the manifest's JSON. What crosses
      is only None, bool, int, float, str and lists, tuples and str-keyed dicts of them
      (``format.values`` decodes nothing else), which ``torch.load(weights_only=True)``
      accepts too; no byte read from the checkpoint is ever unpickled.
    """
    fqn = item.dest_index.fqn
    if isinstance(planner, ShardckptLoadPlanner):
        planner.load_bytes(item, io.BytesIO(json.dumps(encoded, allow_nan=False).encode()))
        return
    value = decode_value(encoded, where=f"value {item.storage_index.fqn!r}")
    if isinstance(planner, DefaultLoadPlanner) and type(planner).load_bytes is DefaultLoadPlanner.load_bytes:
        if planner.flatten_state_dict:
            set_in_place(planner.original_state_dict, planner.mappings[fqn], value)
        else:
            planner.state_dict[fqn] = value
        return
    stream = io.BytesIO()
    torch.save(value, stream)
    stream.seek(0)
    planner.load_bytes(item, stream)


def manifest_to_metadata(m: Manifest | ManifestV3, *, storage_data: bool = True) -> Metadata:
    """The DCP view of a manifest, so DCP's load planner can plan resharding. A format-1
    or -2 manifest's tensors build their properties, size and chunks when first asked
    (:class:`~shardckpt.engine.load_items.ListedTensorMetadata`). A format-3
    manifest's tensors have no chunks here: its planner (``plan_v3.RulePlanner``) adds, per
    rank, those that the rank's boxes overlap. ``storage_data``: map each chunk's
    MetadataIndex to its ChunkRecord (DCP's planners never read it; :class:`Reader` looks
    chunks up in the manifest itself, so it passes False and skips one object per chunk)."""
    sd: dict[str, Any]
    # DCP's objects of each tensor are built when a planner first asks (#18)
    if isinstance(m, ManifestV3):
        lazy = ListedTensorMetadata.lazy
        sd = {fqn: lazy(fqn, t.dtype, t.shape, ()) for fqn, t in m.tensors.items()}
    else:
        listed = ListedTensorMetadata.of_record
        sd = {fqn: listed(fqn, t) for fqn, t in m.tensors.items()}
    for fqn in m.values:
        sd[fqn] = BytesStorageMetadata()
    records = (
        {}
        if isinstance(m, ManifestV3) or not storage_data
        else {MetadataIndex(fqn, c.offsets): c for fqn, t in m.tensors.items() for c in t.chunks}
    )
    return Metadata(
        state_dict_metadata=sd,
        planner_data={k: tuple(v) for k, v in m.paths.items()},
        storage_data=records,
    )
