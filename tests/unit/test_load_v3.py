"""Loading format 3 on one process: a checkpoint of 4 simulated ranks (tests/support/v3_fixture.py)
read bitwise, with each page and index record fetched once, and refused clearly when a link of
the checksum chain (page, index record, data file) is missing, tampered or the wrong size.

The resharded loads on 2 and 3 real ranks, and the bytes each rank reads, are in
tests/distributed/test_load_v3_ranks.py.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import Any

import pytest
import torch
from v3_fixture import SAVE_ID, Boxes, Split, Written, rewrite_as_v3, write_v3

import shardckpt
from shardckpt.engine.checkpointer import Checkpointer
from shardckpt.errors import IntegrityError, ManifestError, UnsupportedFormatVersionError
from shardckpt.format import integrity, layout
from shardckpt.format.file_table import FileTable, Page, RankEntry, page_to_json, parse_page
from shardckpt.format.manifest_v3 import ManifestV3, manifest_v3_to_json
from shardckpt.format.rank_index import FileIndex, parse_rank_index, rank_index_to_json
from shardckpt.storage.local import LocalStorage

W = torch.arange(40, dtype=torch.float32).reshape(10, 4)
G = torch.arange(48, dtype=torch.int64).reshape(6, 8)
IRR = torch.arange(10, dtype=torch.float16).reshape(5, 2)
BIAS = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)


def _write(path: Any, **kw: Any) -> Written:
    tensors = {
        "model.w": (W, Split((4, 1))),  # Shard(0) over 4 ranks: rows 3, 3, 3, 1
        "model.g": (G, Split((2, 2))),  # a 2 x 2 mesh
        "model.bias": (BIAS, Split((1,))),  # replicated, stored once
        "model.irr": (IRR, Boxes((((0, 0), (1, 2)), ((1, 0), (4, 2))))),  # not a block grid: listed
        "model.scale": (torch.tensor(0.5), Split(())),  # 0-d
        "model.empty": (torch.zeros(0, 3), Split((1, 1))),  # no bytes, no rule
    }
    return write_v3(path, tensors, ranks=4, values={"step": 7, "lr": (0.1, "x")}, **kw)


def _target() -> dict[str, Any]:
    return {
        "model": {
            "w": torch.zeros(10, 4),
            "g": torch.zeros(6, 8, dtype=torch.int64),
            "bias": torch.zeros(3, dtype=torch.bfloat16),
            "irr": torch.zeros(5, 2, dtype=torch.float16),
            "scale": torch.tensor(0.0),
            "empty": torch.zeros(0, 3),
        },
        "step": 0,
        "lr": None,
    }


class CountingStorage(LocalStorage):
    """Counts every byte read, per name (reads of metadata and of data alike)."""

    def __init__(self, root: str, log: Counter[str], calls: Counter[str]) -> None:
        super().__init__(root)
        self.log, self.calls = log, calls

    def read_bytes(self, name: str) -> bytes:
        data = super().read_bytes(name)
        self.log[name] += len(data)
        self.calls[name] += 1
        return data

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        super().read_into(name, offset, out)
        self.log[name] += len(out)
        self.calls[name] += 1


def test_one_rank_loads_four_ranks_bitwise_and_reads_each_record_once(tmp_path):
    w = _write(tmp_path / "c", files_per_rank=2, ranks_per_page=3)  # 2 pages: ranks 0-2, rank 3
    log: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    ckpt = Checkpointer(storage_factory=lambda url, opts, *rest: CountingStorage(url, log, calls))
    try:
        state = _target()
        result = ckpt.load(state, tmp_path / "c")
    finally:
        ckpt.close()
    assert result.missing_keys == [] and result.unexpected_keys == []
    m = state["model"]
    assert torch.equal(m["w"], W) and torch.equal(m["g"], G) and torch.equal(m["irr"], IRR)
    assert torch.equal(m["bias"], BIAS) and m["scale"].item() == 0.5 and m["empty"].shape == (0, 3)
    assert w.manifest.tensors["model.empty"].rule is None and w.manifest.tensors["model.empty"].chunks == ()
    assert state["step"] == 7 and state["lr"] == (0.1, "x")
    records = [layout.MANIFEST_NAME, *w.page_names, *w.index_names.values()]
    assert len(w.page_names) == 2
    assert {n: calls[n] for n in records} == dict.fromkeys(records, 1)  # each once, every one needed
    data = [n for files in w.files_of_rank.values() for n in files]
    assert set(log) == set(records) | set(data)
    assert sum(log[n] for n in data) == sum(os.path.getsize(tmp_path / "c" / n) for n in data) - sum(
        _header_bytes(tmp_path / "c" / n) for n in data
    )


def test_a_load_looks_each_chunk_up_once_when_planning(tmp_path, monkeypatch):
    """The chunks the planner found for this rank's boxes are the ones the reader resolves
    (issue #16: a second look-up per chunk was a tenth of a load of small tensors)."""
    from shardckpt.engine import load_v3

    _write(tmp_path / "c")
    asked: list[tuple[str, tuple[int, ...]]] = []
    real = load_v3.chunk_at
    monkeypatch.setattr(
        load_v3, "chunk_at", lambda rec, offsets, *, key: asked.append((key, offsets)) or real(rec, offsets, key=key)
    )
    state = _target()
    shardckpt.load(state, tmp_path / "c")
    m = state["model"]
    assert torch.equal(m["w"], W) and torch.equal(m["g"], G) and torch.equal(m["irr"], IRR)
    assert torch.equal(m["bias"], BIAS) and m["scale"].item() == 0.5
    assert asked == []


def test_a_load_reads_one_cell_keys_whole_without_read_items_unless_the_planner_commits(tmp_path, monkeypatch):
    """A key whose box is exactly one cell is read whole, as the reader reads a same-layout
    chunk of format 1 (no ReadItem, its record resolved through the chain); the others keep
    DCP's items; a planner that commits tensors gets items for every key (#18)."""
    from shardckpt.engine import plan_v3
    from shardckpt.engine import reader as reader_module

    _write(tmp_path / "c", files_per_rank=2, ranks_per_page=3)
    seen: list[tuple[list[str], list[str]]] = []  # (keys of the read items, keys read whole) of each read_runs
    original = reader_module.read_runs

    def recording(items: Any, chunks: Any, boxes: Any, whole: Any = ()) -> Any:
        seen.append((sorted({i.dest_index.fqn for i in items}), sorted(k for k, _, _ in whole)))
        for key, record, _ in whole:  # the record resolved through page and index record: its data file's name
            assert record.file.startswith("data/") and record.block_hashes and key in ("model.bias", "model.scale")
        return original(items, chunks, boxes, whole)

    monkeypatch.setattr(reader_module, "read_runs", recording)
    state = _target()
    shardckpt.load(state, tmp_path / "c")
    m = state["model"]
    assert torch.equal(m["w"], W) and torch.equal(m["g"], G) and torch.equal(m["irr"], IRR)
    assert torch.equal(m["bias"], BIAS) and m["scale"].item() == 0.5
    # one process loads 4 ranks' W and G (several cells a box) and the listed IRR: items
    assert seen == [(["model.g", "model.irr", "model.w"], ["model.bias", "model.scale"])]

    committed: list[str] = []

    class Committing(plan_v3.RulePlanner):
        def commit_tensor(self, read_item: Any, tensor: torch.Tensor) -> None:
            committed.append(read_item.dest_index.fqn)

    monkeypatch.setattr(plan_v3, "RulePlanner", Committing)
    seen.clear()
    state = _target()
    shardckpt.load(state, tmp_path / "c")
    assert seen == [(["model.bias", "model.g", "model.irr", "model.scale", "model.w"], [])]
    assert set(committed) == {"model.bias", "model.g", "model.irr", "model.scale", "model.w"}
    assert torch.equal(state["model"]["bias"], BIAS) and state["model"]["scale"].item() == 0.5


def test_a_same_layout_format_3_load_of_small_tensors_reads_each_whole_and_names_a_bad_block(tmp_path, monkeypatch):
    """Saved by shardckpt in format 3 on one process, every tensor one cell: all read whole,
    bitwise, every dtype; a flipped byte in one is refused naming its key."""
    g = torch.Generator().manual_seed(3)
    state = {
        "f32": torch.rand(5, 3, generator=g),
        "bf16": torch.rand(4, 3, generator=g).to(torch.bfloat16),
        "i8": torch.randint(-100, 100, (3, 3), generator=g, dtype=torch.int8),
        "bool": torch.rand(9, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "param": torch.nn.Parameter(torch.rand(6, generator=g)),
    }
    path = tmp_path / "c3"
    shardckpt.save(state, path, format_version=3)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    target["param"] = torch.nn.Parameter(torch.zeros(6))
    before = dict(target)
    shardckpt.load(target, path)
    assert all(target[k] is before[k] for k in state)  # filled in place
    assert all(target[k].dtype == v.dtype and torch.equal(target[k].detach(), v.detach()) for k, v in state.items())
    # a partial load (DCP plans it: the checkpoint holds keys the state lacks) reads the cells once, whole
    from shardckpt.engine import reader as reader_module

    seen: list[tuple[int, list[str]]] = []
    original = reader_module.read_runs

    def recording(items: Any, chunks: Any, boxes: Any, whole: Any = ()) -> Any:
        seen.append((len(items), sorted(k for k, _, _ in whole)))
        return original(items, chunks, boxes, whole)

    monkeypatch.setattr(reader_module, "read_runs", recording)
    part = {"f32": torch.zeros(5, 3), "bool": torch.zeros(9, dtype=torch.bool)}
    result = shardckpt.load(part, path, strict=False)
    assert seen == [(0, ["bool", "f32"])]
    assert torch.equal(part["f32"], state["f32"]) and torch.equal(part["bool"], state["bool"])
    assert sorted(result.unexpected_keys) == ["bf16", "i8", "param", "scalar"]
    data = next(n for n in os.listdir(path / "data") if n.endswith(".safetensors"))
    header = _header_bytes(path / "data" / data)
    _flip(path / "data" / data, header)  # the first tensor's first byte
    with pytest.raises(IntegrityError, match=r"key '\w+'.*checksum mismatch"):
        shardckpt.load({k: torch.zeros_like(v) for k, v in state.items()}, path)


def _header_bytes(path: Any) -> int:
    raw = open(path, "rb").read(8)
    return 8 + int.from_bytes(raw, "little")


def test_a_load_with_verify_off_still_checks_the_chain_and_sizes(tmp_path):
    w = _write(tmp_path / "c")
    victim = tmp_path / "c" / w.files_of_rank[1][0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(IntegrityError, match=r"data file '.*r00001-00.safetensors' is \d+ bytes.*restore it"):
        shardckpt.load(_target(), tmp_path / "c", verify=False)


def test_strict_and_shape_checks_apply_to_format_3(tmp_path):
    _write(tmp_path / "c")
    state = _target()
    state["model"]["w"] = torch.zeros(4, 10)
    with pytest.raises(shardckpt.StateDictMismatchError, match=r"'model.w': saved shape \[10, 4\]"):
        shardckpt.load(state, tmp_path / "c")
    partial = {"model": {"w": torch.zeros(10, 4)}}
    result = shardckpt.load(partial, tmp_path / "c", strict=False)
    assert torch.equal(partial["model"]["w"], W) and "model.g" in result.unexpected_keys


# ---------------------------------------------------------------- hostile: every link of the chain


def _flip(path: Any, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_tampered_page_is_refused(tmp_path):
    w = _write(tmp_path / "c")
    _flip(tmp_path / "c" / w.page_names[0], 40)
    with pytest.raises(ManifestError, match=r"p00000.ranks.json.*checksum mismatch of the page of the rank table"):
        shardckpt.load(_target(), tmp_path / "c")


def test_a_missing_page_or_index_record_is_named_with_its_rank(tmp_path):
    w = _write(tmp_path / "c")
    os.remove(tmp_path / "c" / w.index_names[2])
    with pytest.raises(
        ManifestError, match=r"index record of rank 2 of save 0123456789ab, '.*r00002.index.json', is missing.*Restore"
    ):
        shardckpt.load(_target(), tmp_path / "c")
    os.remove(tmp_path / "c" / w.page_names[0])
    with pytest.raises(
        ManifestError, match=r"page of the rank table of save 0123456789ab, '.*p00000.ranks.json', is missing"
    ):
        shardckpt.load(_target(), tmp_path / "c")


def test_a_tampered_or_replaced_index_record_is_refused(tmp_path):
    w = _write(tmp_path / "c")
    _flip(tmp_path / "c" / w.index_names[1], 30)
    with pytest.raises(ManifestError, match=r"r00001.index.json.*checksum mismatch of the index record"):
        shardckpt.load(_target(), tmp_path / "c")
    (tmp_path / "c" / w.index_names[1]).write_bytes(b" " * 10_000)  # the wrong size: refused before it is read
    with pytest.raises(
        ManifestError, match=r"index record of rank 1 of save .* has 10000 bytes, the record that points"
    ):
        shardckpt.load(_target(), tmp_path / "c")


def test_a_tampered_data_block_is_refused_naming_file_and_key(tmp_path):
    w = _write(tmp_path / "c")
    victim = tmp_path / "c" / w.files_of_rank[3][0]
    _flip(victim, os.path.getsize(victim) - 1)  # the last byte: rank 3's piece of model.w
    with pytest.raises(IntegrityError, match=r"r00003-00.safetensors.*key 'model.w'.*checksum mismatch in block 0"):
        shardckpt.load(_target(), tmp_path / "c")


def test_a_missing_data_file_is_refused(tmp_path):
    w = _write(tmp_path / "c")
    os.remove(tmp_path / "c" / w.files_of_rank[0][0])
    with pytest.raises(IntegrityError, match=r"r00000-00.safetensors' listed in the manifest is missing"):
        shardckpt.load(_target(), tmp_path / "c")


def test_an_index_record_without_the_chunk_is_refused(tmp_path):
    """A consistent chain (page and manifest re-sealed) whose index record lacks a chunk the
    manifest's rule places in that file: the read is refused, not served from other bytes."""
    root = tmp_path / "c"
    w = _write(root)
    m = w.manifest
    group = m.file_table.groups[0]
    page_raw = (root / w.page_names[0]).read_bytes()
    entries = list(parse_page(page_raw, group=group, page=0, source="page"))
    index_raw = (root / w.index_names[3]).read_bytes()
    files = parse_rank_index(index_raw, entry=entries[3], group=group, rank=3, block_bytes=4096, source="index")
    cut = [FileIndex(f.size, f.hash, f.entries[:-1]) for f in files]  # rank 3 holds model.g's cell 3, model.w's 3
    new_index = rank_index_to_json(SAVE_ID, 3, m.hash_block_bytes, cut)
    (root / w.index_names[3]).write_bytes(new_index)
    entries[3] = RankEntry(len(new_index), integrity.hash_hex(new_index), "node0", 3)
    new_page = page_to_json(SAVE_ID, 0, entries)
    (root / w.page_names[0]).write_bytes(new_page)
    table = FileTable((dataclasses.replace(group, pages=(Page(len(new_page), integrity.hash_hex(new_page)),)),))
    (root / layout.MANIFEST_NAME).write_bytes(manifest_v3_to_json(dataclasses.replace(m, file_table=table)))
    with pytest.raises(ManifestError, match=r"rank 3\).*the index record has no chunk at byte \d+"):
        shardckpt.load(_target(), root)


# ---------------------------------------------------------------- what is built on load


def test_train_state_and_manager_restore_a_format_3_step(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    optim.step()
    with shardckpt.CheckpointManager(str(tmp_path / "v1")) as manager:
        assert shardckpt.TrainState(model=model, optimizer=optim, step=3).save(manager, force=True)
    step_dir = layout.step_dir_name(3)
    written = rewrite_as_v3(tmp_path / "v1" / step_dir, tmp_path / "v3" / step_dir, ranks=2)
    assert any(t.rule is not None for t in written.manifest.tensors.values())
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    fresh_optim = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    with shardckpt.CheckpointManager(str(tmp_path / "v3")) as manager:
        restored = shardckpt.TrainState(model=fresh, optimizer=fresh_optim)
        assert restored.restore(manager) == 3 and restored.step == 3
        assert isinstance(manager.manifest(3), ManifestV3)
        plain = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
        assert manager.restore({"train": plain}, strict=False) == 3
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
        assert torch.equal(plain["model"][name], a), name
    saved, loaded = optim.state_dict()["state"], fresh_optim.state_dict()["state"]
    assert all(torch.equal(saved[i]["exp_avg_sq"], loaded[i]["exp_avg_sq"]) for i in saved)


def test_tools_that_read_formats_1_and_2_only_refuse_format_3_by_name(tmp_path):
    _write(tmp_path / "c")
    with pytest.raises(
        UnsupportedFormatVersionError, match=r"format-3 checkpoint.*shardckpt.read_manifest reads formats 1"
    ):
        shardckpt.read_manifest(tmp_path / "c")
    assert isinstance(shardckpt.read_any_manifest(tmp_path / "c"), ManifestV3)


# ---------------------------------------------------------------- planning from rules


def test_the_planner_lists_only_the_cells_a_box_touches_never_enumerating_the_rule(monkeypatch):
    """2^20 cells (one per simulated rank); this rank's box covers rows 1000-1002: the
    metadata DCP plans with holds those 3 chunks, and no step expands the rule."""

    from shardckpt.engine import plan_v3
    from shardckpt.engine.reader import manifest_to_metadata
    from shardckpt.format import rules
    from shardckpt.format.file_table import FileGroup
    from shardckpt.format.manifest_v3 import Tensor

    cells = 1 << 20
    rule = rules.Rule((cells, 4), (1, 4), (rules.Run(cells, 0, 1, 128, 0),))
    group = FileGroup("ab", None, cells, ((cells, 1),), 1024, tuple(Page(10, "0" * 16) for _ in range(cells // 1024)))
    m = ManifestV3(
        world_size=cells,
        hash_block_bytes=4096,
        bases=(),
        file_table=FileTable((group,)),
        tensors={"w": Tensor("F32", (cells, 4), rule, ()), "other": Tensor("F32", (cells, 4), rule, ())},
        values={},
        paths={"w": ["w"], "other": ["other"]},
        created_at="now",
        shardckpt_version="0",
        torch_version="2",
    )

    def refuse(*args: Any) -> Any:
        raise AssertionError("a load enumerated a rule's cells")

    monkeypatch.setattr(rules, "expand", refuse)
    shard = ((3, 4), (1000, 0))  # this rank's shard of a DTensor: (sizes, offsets)
    monkeypatch.setattr(plan_v3, "placed_box", lambda obj, meshes: (*shard, obj, obj.shape))
    md = plan_v3.needed_metadata(manifest_to_metadata(m), m, {"w": torch.empty(cells, 4, device="meta")})
    chunks = md.state_dict_metadata["w"].chunks
    assert [(list(c.offsets), list(c.sizes)) for c in chunks] == [([r, 0], [1, 4]) for r in (1000, 1001, 1002)]
    assert md.state_dict_metadata["other"].chunks == []  # not loaded: nothing planned
    located = [m.file_table.locate(m.tensors["w"].chunks_for_box((r, 0), (1, 4))[0].file).rank for r in (1000, 1002)]
    assert located == [1000, 1002]


def test_an_incremental_format_3_checkpoint_reads_unchanged_tensors_from_its_base(tmp_path):
    """Group 1 of the file table is the base beside it: its pages, index records and data
    files are read there (load, verify, export all follow the reference)."""
    base = _write(tmp_path / "step_1")
    new_w = W + 100
    written = write_v3(
        tmp_path / "step_2",
        {"model.w": (new_w, Split((2, 1)))},
        ranks=2,
        values={"step": 8},
        save_id="fedcba987654",
        base=base,
        from_base=("model.g", "model.irr"),
    )
    assert written.manifest.bases == ("step_1",) and len(written.manifest.file_table.groups) == 2
    state = {
        "model": {
            "w": torch.zeros(10, 4),
            "g": torch.zeros(6, 8, dtype=torch.int64),
            "irr": torch.zeros(5, 2, dtype=torch.float16),
        },
        "step": 0,
    }
    shardckpt.load(state, tmp_path / "step_2")
    assert torch.equal(state["model"]["w"], new_w) and torch.equal(state["model"]["g"], G)
    assert torch.equal(state["model"]["irr"], IRR) and state["step"] == 8
    from shardckpt.convert.audit import verify_checkpoint

    report = verify_checkpoint(tmp_path / "step_2")
    assert report.ok, report.problems
    assert [(f.folder, f.own) for f in report.folders] == [("step_2", True), ("step_1", False)]
    assert torch.equal(shardckpt.read_state_dict(tmp_path / "step_2", flat=True)["model.g"], G)
    os.remove(tmp_path / "step_1" / base.index_names[1])  # the base's record of rank 1 (model.g's cell 1)
    with pytest.raises(
        ManifestError, match=r"index record of rank 1 of save 0123456789ab, .* of base checkpoint 'step_1'"
    ):
        shardckpt.load(state, tmp_path / "step_2")
