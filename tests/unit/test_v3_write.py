"""save(format_version=3) in one process (docs/format.md section 12): the manifest parses,
every regular tensor is one rule, every chunk's bytes are the tensor's and match the block
hashes of its rank's index record; a failed save leaves nothing; other saves are unchanged;
the coordinator's column-wise compression is rules.compress."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_rules import layouts
from v3files import assemble, read_v3

import shardckpt
from shardckpt.engine import Checkpointer
from shardckpt.engine.options import DEFAULT_FORMAT_VERSION
from shardckpt.engine.write_v3 import V3_HASH_BLOCK_BYTES, compress_rows
from shardckpt.format import layout, rules
from shardckpt.format import manifest_v3 as mv3
from shardckpt.storage import WriteStream
from shardckpt.storage.local import LocalStorage


def _state() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "w": torch.randn(64, 48, generator=g),
            "b": torch.randn(48, generator=g).to(torch.bfloat16),
            "big": torch.randn(300_000, generator=g),  # 1.2 MB: five 256 KiB hash blocks
            "count": torch.tensor(7, dtype=torch.int64),
            "empty": torch.zeros(0, 3),
        },
        "step": 12,
    }


def test_a_format_3_save_parses_and_every_chunk_matches_its_block_hashes(tmp_path):
    path = str(tmp_path / "c")
    state = _state()
    m = shardckpt.save(state, path, format_version=3, num_io_threads=2)
    parsed, chunks = read_v3(path)  # every page, index record, file hash and block hash checked
    assert m is not None and parsed.tensors == m.tensors and parsed.values == {"step": 12}
    assert parsed.hash_block_bytes == V3_HASH_BLOCK_BYTES and parsed.world_size == 1
    # 2 files of the io threads (big; empty), then the coordinator's small tensors (w, b, count:
    # <= 64 KiB each) in a last file whose index the manifest copies (format.md 12.8)
    assert parsed.file_table.groups[0].files == ((1, 3),)
    assert parsed.inline_index is not None and parsed.inline_index.file == 2
    assert sorted(e.byte_length for e in parsed.inline_index.index.entries) == [8, 96, 64 * 48 * 4]
    model = state["model"]
    assert isinstance(model, dict)
    for name, t in model.items():
        record = parsed.tensors[f"model.{name}"]
        if t.numel():
            assert record.rule is not None and record.chunks == (), name  # one rule, nothing listed
            assert torch.equal(assemble(chunks[f"model.{name}"], tuple(t.shape), t.dtype), t), name
        else:
            assert record.rule is None and chunks[f"model.{name}"] == []


def test_no_block_hash_is_in_the_manifest_and_the_index_records_hold_them(tmp_path):
    path = str(tmp_path / "c")
    shardckpt.save(_state(), path, format_version=3)
    raw = open(os.path.join(path, "manifest.json"), "rb").read()
    assert b"block_hashes" not in raw and b"process_layout" not in raw
    (index,) = [n for n in os.listdir(os.path.join(path, "data")) if n.endswith(".index.json")]
    doc = json.loads(open(os.path.join(path, "data", index), "rb").read())
    blocks = [e[2] for f in doc["files"] for e in f["entries"]]
    assert doc["hash_block_bytes"] == V3_HASH_BLOCK_BYTES and doc["digests"] is False
    big = max(e[1] for f in doc["files"] for e in f["entries"])  # "big"'s byte length
    assert sorted(len(b) // 16 for b in blocks)[-1] == -(-big // V3_HASH_BLOCK_BYTES) > 1


def test_an_explicit_block_size_is_kept(tmp_path):
    m = shardckpt.save(_state(), str(tmp_path / "c"), format_version=3, hash_block_bytes=4096)
    assert m is not None and m.hash_block_bytes == 4096
    read_v3(str(tmp_path / "c"))


class _FailingPages(LocalStorage):
    """Writing a page of the rank table fails: after the rank's data files and index record."""

    def __init__(self, root: str, opened: list[str]) -> None:
        super().__init__(root)
        self.opened = opened

    def open_write(self, name: str) -> WriteStream:
        self.opened.append(name)
        if name.endswith(".ranks.json"):
            raise OSError(f"injected: cannot write {name}")
        return super().open_write(name)


def test_a_save_failing_midway_leaves_no_index_record_page_or_data_file(tmp_path):
    path = str(tmp_path / "c")
    opened: list[str] = []
    with Checkpointer(storage_factory=lambda url, options=None: _FailingPages(url, opened)) as ckpt:
        with pytest.raises(shardckpt.ShardckptError, match="injected"):
            ckpt.save(_state(), path, format_version=3)
    assert [n.rsplit(".", 2)[-2:] for n in opened][-2:] == [["index", "json"], ["ranks", "json"]]
    assert not os.path.exists(path)  # a new folder: everything this save wrote is gone, and the folder


def test_an_overwrite_and_retention_remove_the_index_records_and_pages(tmp_path):
    path = str(tmp_path / "c")
    shardckpt.save(_state(), path, format_version=3)
    old = set(os.listdir(os.path.join(path, "data")))
    assert all(layout.is_checkpoint_name(f"data/{n}") for n in old)
    assert sum(n.endswith(".index.json") for n in old) == 1 and sum(n.endswith(".ranks.json") for n in old) == 1
    shardckpt.save(_state(), path, overwrite=True)  # a version-1 save over it
    assert not old & set(os.listdir(os.path.join(path, "data")))
    root = str(tmp_path / "root")
    with shardckpt.CheckpointManager(root, keep_last=1, format_version=3) as mgr:
        for step in (1, 2):
            mgr.save(step, {"w": torch.full((8,), float(step))})
    assert os.listdir(root) == [layout.step_dir_name(2)]  # step 1 removed whole, its records too
    _, chunks = read_v3(os.path.join(root, layout.step_dir_name(2)))
    assert torch.equal(chunks["w"][0].data, torch.full((8,), 2.0))


def test_format_version_is_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"format_version=1 with incremental=True"):
        shardckpt.save(_state(), str(tmp_path / "a"), format_version=2)  # format 2 is format 1's incremental form
    for bad in (4, 0, True, 3.0, "3"):
        with pytest.raises(ValueError, match=r"format_version must be None .*, 1 .* or 3, got"):
            shardckpt.save(_state(), str(tmp_path / "a"), format_version=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="format_version must be None"):
        shardckpt.CheckpointManager(str(tmp_path / "r"), format_version=2, incremental=True)
    assert not os.listdir(tmp_path)


def test_the_default_save_is_still_version_1_with_its_8_mib_blocks(tmp_path):
    assert DEFAULT_FORMAT_VERSION == 1  # docs/format.md 12.7, "When written": flipping it is a decision
    m = shardckpt.save(_state(), str(tmp_path / "c"))
    assert m is not None and m.format_version == 1 and m.hash_block_bytes == 8 * 2**20
    names = os.listdir(tmp_path / "c" / "data")
    assert names and all(n.endswith(".safetensors") for n in names)


def _data_file_versions(folder) -> set[str]:
    out = set()
    for n in os.listdir(folder / "data"):
        raw = (folder / "data" / n).read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        out.add(header["__metadata__"]["format_version"])
    return out


def test_format_version_1_says_the_old_format_explicitly_and_incremental_saves_are_version_2(tmp_path):
    state = _state()
    with Checkpointer() as ckpt:
        said = ckpt.save(state, tmp_path / "said", format_version=1)
        implied = ckpt.save(state, tmp_path / "implied")
        full = ckpt.save(state, tmp_path / "full", format_version=1, incremental=True)
        model = state["model"]
        assert isinstance(model, dict)
        model["w"] = model["w"] + 1  # one tensor changes: the next save writes it alone
        incr = ckpt.save(state, tmp_path / "incr", format_version=1, base=tmp_path / "full")
    assert said is not None and implied is not None and full is not None and incr is not None
    assert (said.format_version, said.hash_block_bytes) == (1, 8 * 2**20)
    assert (implied.format_version, implied.hash_block_bytes) == (1, 8 * 2**20)
    assert {k: len(t.chunks) for k, t in said.tensors.items()} == {k: len(t.chunks) for k, t in implied.tensors.items()}
    assert _data_file_versions(tmp_path / "said") == {"1"}
    # format 2 is version 1's incremental form: the manifest and every data file it wrote say 2
    assert (full.format_version, incr.format_version) == (2, 2) and incr.bases == ("full",)
    assert _data_file_versions(tmp_path / "full") == _data_file_versions(tmp_path / "incr") == {"2"}
    back = {"model": {k: torch.zeros_like(v) for k, v in model.items()}, "step": 0}
    shardckpt.load(back, tmp_path / "incr")
    assert all(torch.equal(back["model"][k], v) for k, v in model.items()) and back["step"] == 12


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_column_wise_compression_is_rules_compress(layout_):
    shape, chunks = layout_
    d = len(shape)
    n = len(chunks)
    offsets = torch.tensor([c.offsets for c in chunks], dtype=torch.int64).reshape(n, d)
    sizes = torch.tensor([c.sizes for c in chunks], dtype=torch.int64).reshape(n, d)
    files = torch.tensor([c.file for c in chunks], dtype=torch.int64)
    byte_offsets = torch.tensor([c.byte_offset for c in chunks], dtype=torch.int64)
    rule, listed = compress_rows(tuple(shape), offsets, sizes, files, byte_offsets)
    expected, rest = rules.compress(shape, chunks)
    assert rule == expected
    if rule is not None:  # made by rules.new_rule: every attribute as the constructor's, grid and starts too
        assert vars(rule) == vars(expected) and [vars(r) for r in rule.runs] == [vars(r) for r in expected.runs]
    assert sorted(chunks[i] for i in listed) == sorted(rest)
    if rule is not None:
        assert sum(math.prod(c.sizes) for c in rules.expand(rule)) == math.prod(shape)


def test_a_repeated_save_reuses_the_plan_and_writes_format_3_again(tmp_path):
    state = _state()
    with Checkpointer() as ckpt:
        ckpt.save(state, str(tmp_path / "a"), format_version=3)
        cache = ckpt._rounds.over(None)[1]
        plan_id = cache.global_id
        state["model"]["w"].add_(1.0)  # type: ignore[index]
        ckpt.save(state, str(tmp_path / "b"), format_version=3)
        assert cache.global_id == plan_id  # the global plan was reused, not made again
        assert cache.records is not None and cache.records.reused == 1  # and the tensor records with it
    (m_a, first), (m_b, second) = read_v3(str(tmp_path / "a")), read_v3(str(tmp_path / "b"))
    assert torch.equal(second["model.w"][0].data, first["model.w"][0].data + 1.0)
    assert m_b.tensors == m_a.tensors and m_b.file_table != m_a.file_table  # same records, its own files
    raw = (tmp_path / "b" / "manifest.json").read_bytes()
    assert mv3.manifest_v3_to_json(m_b) == raw  # the kept lines are the records' own


def test_async_save_writes_format_3_too(tmp_path):
    with Checkpointer() as ckpt:
        handle = ckpt.async_save(_state(), str(tmp_path / "c"), format_version=3)
        m = handle.wait(120)
    parsed, _ = read_v3(str(tmp_path / "c"))
    assert m is not None and parsed.tensors == m.tensors and parsed.values == {"step": 12}


def test_a_manager_removes_an_interrupted_format_3_step_whole(tmp_path):
    root = str(tmp_path / "root")
    step = os.path.join(root, layout.step_dir_name(5))
    shardckpt.save(_state(), step, format_version=3)
    os.remove(os.path.join(step, layout.MANIFEST_NAME))  # killed before its commit: marker, data, records
    assert any(n.endswith(".index.json") for n in os.listdir(os.path.join(step, "data")))
    with shardckpt.CheckpointManager(root) as mgr:
        assert mgr.steps() == []
    assert not os.path.exists(step)  # index record and page were shardckpt's names: nothing foreign kept it


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(layouts(), st.sampled_from(["as drawn", "a chunk twice", "a chunk missing", "twice, one missing"])),
        max_size=4,
    ),
    st.randoms(use_true_random=False),
)
def test_many_tensors_compressed_at_once_are_each_rules_compress(drawn, rnd):
    """compress_table over several tensors' chunks in one shuffled table, some with a chunk
    held twice or missing or both, gives each tensor what rules.compress gives it alone."""
    from shardckpt.engine.rule_table import compress_table

    dims = max((len(shape) for (shape, _), _ in drawn), default=0)
    shapes, rows, expected = [], [], []
    for t, ((shape, chunks), change) in enumerate(drawn):
        chunks = list(chunks)
        if change == "a chunk twice" and chunks:
            chunks.append(chunks[rnd.randrange(len(chunks))])
        elif change == "a chunk missing" and chunks:
            chunks.pop(rnd.randrange(len(chunks)))
        elif change == "twice, one missing" and len(chunks) > 1:  # as many chunks as cells, one cell twice
            i, j = rnd.sample(range(len(chunks)), 2)
            chunks[i] = chunks[j]
        shapes.append(tuple(shape))
        expected.append(rules.compress(shape, chunks))
        pad = dims - len(shape)
        rows += [(t, c, [c.file, c.byte_offset, *c.offsets, *(0,) * pad, *c.sizes, *(1,) * pad]) for c in chunks]
    rnd.shuffle(rows)
    table = torch.tensor([r for _, _, r in rows], dtype=torch.int64).reshape(len(rows), 2 + 2 * dims)
    tid = torch.tensor([t for t, _, _ in rows], dtype=torch.int64)
    done = compress_table(shapes, tid, table)
    for t, (rule, rest) in enumerate(expected):
        assert done.rules[t] == rule, (t, shapes[t])
        assert rule is None or vars(done.rules[t]) == vars(rule), (t, shapes[t])  # grid and starts too
        assert sorted(rows[i][1] for i in done.listed[t]) == sorted(rest), (t, shapes[t])
