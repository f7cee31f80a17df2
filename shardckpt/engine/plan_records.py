"""The coordinator's format-3 tensor records of one global plan, kept for the plan's next save.

A training run saves the same state again and again with one plan (``engine/protocol.py``
reuses it): every rank then writes the same chunks to the same files at the same offsets,
so the coordinator's table of chunks is the same, and so are the sharding rules compressed
from it, the tensor records and their lines of manifest text. Computing them again is most
of a format-3 commit's work for thousands of small tensors (#18: 0.35 s of rank 0's time per
save at 12,183 tensors, while the other ranks wait). :class:`PlanRecords` keeps the last
save's table and what was built from it; a save whose table is equal, element for element
(``torch.equal``, one vector comparison), takes them as they are, any other builds anew.
The lines of the manifest's ``paths`` are kept the same way while the paths stay equal.
This is format 1's reused manifest template (``engine/manifest_builder.py``) for format 3.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch.distributed.checkpoint.metadata import Metadata

from shardckpt.format import manifest_v3 as mv3

Tensors = dict[str, tuple[str, tuple[int, ...]]]  # fqn -> (dtype name, shape), as write_v3.tensors_of gives
Build = Callable[[Tensors, torch.Tensor, torch.Tensor], dict[str, mv3.Tensor]]


class PlanRecords:
    """The records and manifest lines of the last format-3 save of the global plan whose
    DCP metadata is ``metadata``. Owned by the coordinator's ``protocol.PlanCache``, used
    by one save at a time; holds no storage and needs no closing."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata
        self._tensors: Tensors | None = None
        self._table = torch.empty(0)
        self._tid = torch.empty(0)
        self._records: dict[str, mv3.Tensor] = {}
        self._lines: list[str] | None = None
        self._paths: dict[str, list[str | int]] | None = None  # a copy: the caller's may change
        self._path_lines: list[str] = []
        self.reused = 0  # saves that took the kept records (what the tests watch)

    def records(self, tensors: Tensors, table: torch.Tensor, tid: torch.Tensor, build: Build) -> dict[str, mv3.Tensor]:
        """``build(tensors, table, tid)``, or the kept records when the last save had the
        same tensors and an equal table. A new dict each time (the records in it are frozen)."""
        if (
            self._tensors == tensors
            and table.shape == self._table.shape
            and torch.equal(table, self._table)
            and torch.equal(tid, self._tid)
        ):
            self.reused += 1
            return dict(self._records)
        records = build(tensors, table, tid)
        self._tensors, self._table, self._tid = tensors, table, tid
        self._records, self._lines = dict(records), None
        return records

    def lines(self, records: dict[str, mv3.Tensor]) -> list[str]:
        """:func:`~shardckpt.format.manifest_v3.tensor_lines` of ``records``, formatted once
        for the kept records: ``records`` must hold the very same record objects under the
        same keys, else they are formatted anew (and not kept)."""
        kept = self._records
        same = (
            len(records) == len(kept)
            and list(records) == list(kept)
            and all(map(operator.is_, records.values(), kept.values()))
        )
        if not same:
            return mv3.tensor_lines(records)
        if self._lines is None:
            self._lines = mv3.tensor_lines(records)
        return self._lines

    def path_lines(self, paths: dict[str, list[str | int]]) -> list[str]:
        """:func:`~shardckpt.format.manifest_v3.path_lines` of ``paths``, formatted once
        while they stay equal (they are the plan's: one comparison, in C, a save)."""
        if paths != self._paths:
            self._paths = {k: list(v) for k, v in paths.items()}
            self._path_lines = mv3.path_lines(paths)
        return self._path_lines
