"""``StorageWriter``: ``dcp.save`` and ``dcp.async_save`` into a shardckpt checkpoint.

DCP calls, in order (``*`` = coordinator only)::

    reset(checkpoint_id)? -> storage_meta -> set_up_storage_writer -> prepare_local_plan
    -> prepare_global_plan* -> write_data -> finish*

``reset`` runs only when the caller passes ``checkpoint_id`` to ``dcp.save``; that path
then replaces the one given to the constructor. ``set_up_storage_writer`` opens the
folder (every rank). ``prepare_global_plan`` checks that every rank means one folder and
claims it (refusing a foreign or committed one) before any data byte. ``write_data``
first encodes the rank's non-tensor values as JSON, and all ranks agree on the outcome
before any tensor byte is written; then the tensors are written and all ranks agree
again, so a failure on any rank is raised on every rank and the coordinator removes what
this save wrote. ``finish`` commits by creating ``manifest.json`` exclusively.

The two agreements are collectives on ``process_group`` (the default group unless given),
which must be the group passed to ``dcp.save``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import StorageWriter as _DcpStorageWriter
from torch.distributed.checkpoint.storage import WriteResult

from shardckpt.engine.collective import RankGroup
from shardckpt.engine.options import IOOptions
from shardckpt.engine.saving import writer_options
from shardckpt.engine.writer import Writer, WriterOptions
from shardckpt.errors import InconsistentRanksError, ShardckptError
from shardckpt.format import datafile
from shardckpt.format.manifest import Manifest
from shardckpt.storage import as_url, open_storage

__all__ = ["StorageWriter"]


class StorageWriter(_DcpStorageWriter):
    """A DCP ``StorageWriter`` that writes a shardckpt checkpoint (safetensors data files,
    a checksummed JSON manifest committed last, no pickle).

    ``path``: the checkpoint folder, a local path or fsspec URL (``str`` or
    ``os.PathLike``); or None, and pass ``checkpoint_id=path`` to ``dcp.save``.
    ``overwrite``: replace a committed checkpoint there (as ``shardckpt.save``).
    ``metadata``: plain JSON stored in the manifest. ``storage_options``: for fsspec URLs.
    ``io``/``num_io_threads``: threads and checksum block size, as for ``shardckpt.save``.
    ``process_group``: the group given to ``dcp.save`` (None: the default group).

    Non-tensor values are stored as JSON (DCP's ``DefaultSavePlanner`` would pickle them);
    one JSON cannot hold is refused on every rank before any byte is written. Use one
    writer per ``dcp.save`` call (a new ``checkpoint_id`` resets it for another save).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        overwrite: bool = False,
        metadata: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
        io: IOOptions | None = None,
        num_io_threads: int | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__()
        self.path = None if path is None else as_url(path)
        self.io = (io or IOOptions()).with_shortcuts(num_io_threads=num_io_threads)
        self.storage_options = storage_options
        self.process_group = process_group
        self._overwrite = overwrite
        self._metadata = dict(metadata or {})
        self._options(self.path or ".")  # bad options fail here, not inside dcp.save
        self._inner: Writer | None = None

    @property
    def manifest(self) -> Manifest | None:
        """The committed Manifest (coordinator, after ``dcp.save`` returned), else None."""
        m = None if self._inner is None else self._inner.manifest
        return m if isinstance(m, Manifest) else None  # this writer never writes format 3

    def _options(self, path: str) -> WriterOptions:
        # version 1 whatever shardckpt.save's default: ``manifest`` is a Manifest, and format 3's
        # writer is tested under shardckpt's planner only, not DCP's
        return writer_options(self.io, path, overwrite=self._overwrite, metadata=self._metadata, format_version=1)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = as_url(checkpoint_id, "checkpoint_id")
        self._inner = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def storage_meta(self) -> None:
        return None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.path is None:
            raise ValueError(
                "shardckpt.dcp.StorageWriter has no path: pass it, StorageWriter('runs/exp1/step_100'), "
                "or give dcp.save(..., checkpoint_id='runs/exp1/step_100')"
            )
        if kwargs.get("use_collectives") is False and _default_world() > 1:
            raise ValueError(
                "shardckpt.dcp.StorageWriter needs dcp.save's collectives (use_collectives=True): without them "
                "every rank would commit its own checkpoint into one folder"
            )
        rank = int(kwargs.get("rank", 0))
        if _default_world() > 1 and rank != dist.get_rank(self.process_group):
            raise InconsistentRanksError(
                f"save to {self.path}: dcp.save runs this process as rank {rank} of its group, but it is rank "
                f"{dist.get_rank(self.process_group)} of StorageWriter's process_group. Pass the group you give "
                "dcp.save to StorageWriter(process_group=...) too."
            )
        storage = open_storage(self.path, self.storage_options, self.io.transfer_for(self.path))
        self._inner = Writer(storage, self._options(self.path))
        self._inner.set_up_storage_writer(is_coordinator, *args, **kwargs)

    def _writer(self) -> Writer:
        assert self._inner is not None, "DCP calls set_up_storage_writer first"
        return self._inner

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # A dtype safetensors cannot hold fails here, on every rank (DCP gathers local
        # plans), before the folder is claimed; shardckpt's planner checks it too, DCP's not.
        for item in plan.items:
            if item.tensor_data is not None:
                datafile.dtype_name(item.tensor_data.properties.dtype, key=item.index.fqn)
        return self._writer().prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        world = len(plans)
        if world > 1 and world != dist.get_world_size(self.process_group):
            raise InconsistentRanksError(
                f"save to {self.path}: dcp.save runs on {world} ranks, but StorageWriter's process_group has "
                f"{dist.get_world_size(self.process_group)}. Pass the group you give dcp.save to "
                "StorageWriter(process_group=...) too."
            )
        planned = self._writer().prepare_global_plan(plans)
        return [dataclasses.replace(p, storage_data={**p.storage_data, "world": world}) for p in planned]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future[list[WriteResult]]:
        """Every rank: values, agree, tensors, agree (see the module docstring)."""
        inner = self._writer()
        alone = plan.storage_data["world"] == 1  # dcp.save without a process group
        group = RankGroup(None, 0, 1, False) if alone else RankGroup.current(self.process_group)
        where = f"save to {self.path}"
        try:
            values = group.agree(f"{where}: encoding non-tensor values", lambda: inner.value_results(plan, planner))
            tensors = group.agree(f"{where}: writing data files", lambda: inner.write_files(plan, planner))
        except BaseException as e:
            if inner.is_coordinator:
                inner.discard()  # every rank has stopped writing: remove this save's files
            if isinstance(e, ShardckptError) and type(e).__init__ is ShardckptError.__init__:
                # DCP pickles each rank's error to the coordinator; the other ranks'
                # stand-ins in e.failures do not survive that, the message (naming them) does.
                raise type(e)(str(e)) from e
            raise
        done: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        done.set_result(values + tensors)
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        inner = self._writer()
        try:
            inner.finish(metadata, results)
        except BaseException:
            inner.discard()
            raise


def _default_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
