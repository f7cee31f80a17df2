"""PlanRecords: a format-3 coordinator reuses the tensor records and manifest lines of the
plan's last save only when its table of chunks is equal (issue #18)."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.metadata import Metadata

from shardckpt.engine.plan_records import PlanRecords, Tensors
from shardckpt.engine.write_v3 import _tensors
from shardckpt.format import manifest_v3 as mv3

# two tensors of 4 rows each over 2 ranks: (file, byte offset, row offset, col offset, rows, cols)
TENSORS = {"a": ("F32", (4, 3)), "b": ("F32", (4, 2))}
TABLE = [[0, 0, 0, 0, 2, 3], [1, 0, 2, 0, 2, 3], [0, 24, 0, 0, 2, 2], [1, 24, 2, 0, 2, 2]]
TID = [0, 0, 1, 1]


class _Built:
    """A PlanRecords and the number of times it built records (write_v3's own build)."""

    def __init__(self) -> None:
        self.calls = 0
        self.records = PlanRecords(Metadata(state_dict_metadata={}))

    def ask(self, table: list[list[int]], tensors: Tensors = TENSORS) -> dict[str, mv3.Tensor]:
        return self.records.records(dict(tensors), torch.tensor(table), torch.tensor(TID), self._build)

    def _build(self, tensors: Tensors, table: torch.Tensor, tid: torch.Tensor) -> dict[str, mv3.Tensor]:
        self.calls += 1
        return _tensors(tensors, table, tid)


def test_an_equal_table_reuses_the_records_and_any_change_builds_them_again():
    b = _Built()
    first = b.ask(TABLE)
    assert b.calls == 1 and first["a"].rule is not None and first["a"].rule.runs[0].file_step == 1
    again = b.ask([list(r) for r in TABLE])  # equal values, new tensors
    assert b.calls == 1 and b.records.reused == 1
    assert again == first and again is not first  # a new dict of the same records
    assert all(again[k] is first[k] for k in first)
    moved = [list(r) for r in TABLE]
    moved[3][1] = 32  # one chunk elsewhere in its file
    changed = b.ask(moved)
    assert b.calls == 2 and changed["b"] != first["b"] and changed["b"].rule is not None
    assert changed["b"].rule.runs[0].byte_step == 8  # 24 in file 0, 32 in file 1
    retyped = {"a": ("F32", (4, 3)), "b": ("BF16", (4, 2))}
    b.ask(moved, retyped)
    assert b.calls == 3  # another tensor, same table: built again


def test_the_kept_lines_are_given_only_for_the_very_same_records():
    b = _Built()
    first, records = b.ask(TABLE), b.records
    lines = records.lines(first)
    assert lines == mv3.tensor_lines(first) and records.lines(dict(first)) is lines  # kept, same objects
    other = dict(first)
    other["b"] = mv3.Tensor("F32", (4, 2), None, ())  # one record replaced
    fresh = records.lines(other)
    assert fresh == mv3.tensor_lines(other) and fresh != lines
    assert records.lines(first) is lines  # still the kept records' own
    assert records.lines({k: first[k] for k in ("b", "a")}) == mv3.tensor_lines(first)  # any key order: formatted anew


def test_the_path_lines_are_kept_while_the_paths_stay_equal():
    records = PlanRecords(Metadata(state_dict_metadata={}))
    paths: dict[str, list[str | int]] = {"m.w": ["m", "w"], "m.b": ["m", "b"]}
    kept = records.path_lines(paths)
    assert kept == mv3.path_lines(paths) and records.path_lines(dict(paths)) is kept
    paths["m.b"].append(0)  # the caller's dict changed after the save: not the kept lines any more
    assert records.path_lines(paths) == mv3.path_lines(paths) != kept
