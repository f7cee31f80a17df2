"""``StorageReader``: ``dcp.load`` from a shardckpt checkpoint, built from its path.

DCP calls, in order (``*`` = coordinator only)::

    reset(checkpoint_id)? -> read_metadata -> set_up_storage_reader -> prepare_local_plan
    -> prepare_global_plan* -> read_data

``read_metadata`` (every rank) opens the folder and reads and validates its manifest;
``prepare_global_plan`` checks that every rank read the same checkpoint (same location,
same manifest bytes). ``read_data`` reads and verifies only the byte ranges each rank
needs (:class:`shardckpt.engine.reader.Reader`). Non-tensor values come from the
manifest's JSON and are never unpickled, whatever the planner
(:func:`shardckpt.engine.reader.deliver_value`).

A format-3 checkpoint (docs/format.md section 12) describes regular shardings by rule; DCP's
load planner needs every stored chunk listed, so ``read_metadata`` expands the rules into
DCP's ``Metadata`` once per load: O(chunks) per rank, as for versions 1 and 2, so the scale
benefit of format 3 is lost under DCP's planner (``shardckpt.load`` plans from the rules). The
reads still go through the format's checksum chain: each rank fetches only the pages and
index records of the files it reads.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader as _DcpStorageReader

from shardckpt.engine.loading import read_manifest_bytes
from shardckpt.engine.options import IOOptions
from shardckpt.engine.reader import Reader, manifest_to_metadata
from shardckpt.errors import InconsistentRanksError
from shardckpt.format import integrity, layout
from shardckpt.format.manifest import Manifest
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.format.manifest_v3_parser import parse_any_manifest
from shardckpt.storage import as_url, open_storage

__all__ = ["StorageReader"]


class StorageReader(_DcpStorageReader):
    """A DCP ``StorageReader`` over a committed shardckpt checkpoint.

    ``path``: the checkpoint folder, a local path or fsspec URL (``str`` or
    ``os.PathLike``); or None, and pass ``checkpoint_id=path`` to ``dcp.load``.
    ``verify`` (True): check every byte read against the checksums recorded at save.
    ``storage_options``: for fsspec URLs. ``io``/``num_io_threads``: read threads per
    rank (default 4). Works with DCP's ``DefaultLoadPlanner`` and with shardckpt's.
    Use one reader per ``dcp.load`` call (a new ``checkpoint_id`` resets it).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        verify: bool = True,
        storage_options: dict[str, Any] | None = None,
        io: IOOptions | None = None,
        num_io_threads: int | None = None,
    ) -> None:
        super().__init__()
        self.path = None if path is None else as_url(path)
        self.verify = verify
        self.storage_options = storage_options
        self.io = (io or IOOptions()).with_shortcuts(num_io_threads=num_io_threads)
        self._inner: Reader | None = None
        self._metadata: Metadata | None = None
        self._digest = ""

    @property
    def manifest(self) -> Manifest | ManifestV3 | None:
        """The checkpoint's Manifest, once ``dcp.load`` has read it."""
        return None if self._inner is None else self._inner.manifest

    @property
    def bytes_read(self) -> int:
        """Bytes this rank read from storage in the last ``dcp.load``."""
        return 0 if self._inner is None else self._inner.bytes_read

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = as_url(checkpoint_id, "checkpoint_id")
        self._inner = None
        self._metadata = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    # No **kwargs on purpose: DCP then never retries with read_metadata(rank=...), which
    # would switch dcp.load to per-rank plans (use_collectives=False) after a failed read.
    def read_metadata(self) -> Metadata:
        if self._inner is None:
            if self.path is None:
                raise ValueError(
                    "shardckpt.dcp.StorageReader has no path: pass it, StorageReader('runs/exp1/step_100'), "
                    "or give dcp.load(..., checkpoint_id='runs/exp1/step_100')"
                )
            storage = open_storage(self.path, self.storage_options, self.io.transfer_for(self.path))
            raw = read_manifest_bytes(storage)
            manifest = parse_any_manifest(raw, source=f"{storage.url}/{layout.MANIFEST_NAME}")
            self._digest = integrity.hash_hex(raw)
            self._inner = Reader(storage, manifest, verify=self.verify, num_io_threads=self.io.load_threads())
            self._metadata = (
                every_chunk(manifest) if isinstance(manifest, ManifestV3) else manifest_to_metadata(manifest)
            )
        assert self._metadata is not None
        return self._metadata

    def _reader(self) -> Reader:
        assert self._inner is not None, "DCP calls read_metadata first"
        return self._inner

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._reader().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        mine = {"location": self._reader().storage.location, "digest": self._digest, "path": self.path}
        return dataclasses.replace(plan, storage_data=mine)

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        seen: dict[tuple[str, str], list[int]] = {}
        for rank, p in enumerate(plans):
            seen.setdefault((p.storage_data["location"], p.storage_data["digest"]), []).append(rank)
        if len(seen) > 1:
            shown = "; ".join(
                f"ranks {ranks}: {plans[ranks[0]].storage_data['path']} (location {loc}, manifest hash {digest})"
                for (loc, digest), ranks in seen.items()
            )
            raise InconsistentRanksError(
                f"load: the ranks were given different checkpoints ({shown}); every rank must load the same one. "
                "Pass the same path on every rank (e.g. broadcast rank 0's path first)."
            )
        return [dataclasses.replace(p, storage_data=None) for p in plans]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        return self._reader().read_data(plan, planner)


def every_chunk(m: ManifestV3) -> Metadata:
    """DCP's view of a format-3 manifest with every stored chunk listed: each rule expanded
    (``Tensor.chunks_for_box`` over the whole tensor) beside the listed chunks. O(chunks)."""
    md = manifest_to_metadata(m)
    sd = dict(md.state_dict_metadata)
    for fqn, t in m.tensors.items():
        listed = sd[fqn]
        assert isinstance(listed, TensorStorageMetadata)
        chunks = [
            ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes))
            for c in t.chunks_for_box((0,) * len(t.shape), t.shape)
        ]
        sd[fqn] = TensorStorageMetadata(properties=listed.properties, size=listed.size, chunks=chunks)
    return Metadata(state_dict_metadata=sd, planner_data=md.planner_data, storage_data=md.storage_data)
