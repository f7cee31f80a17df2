"""The fast recovery tier in one process: local steps committed, restored bitwise, kept, cleaned
up, and anything half-written or damaged ignored; partner choice and the collective decision
as pure functions. Ranks and nodes: tests/distributed/test_local_tier_ranks.py."""

from __future__ import annotations

import logging
import os
import sys
import time

import pytest
import torch
from distributed import kill_group, run_command, start_command

import shardckpt
from shardckpt.engine.collective import RankGroup
from shardckpt.errors import ManifestError, StorageError
from shardckpt.format import local_step
from shardckpt.manager.local_decision import choose
from shardckpt.manager.local_store import LocalStore
from shardckpt.manager.local_tier import LocalTier, LocalTierOptions
from shardckpt.manager.replication import Topology


def state(v: float) -> dict:
    return {
        "model": {"w": torch.full((4, 3), v), "half": torch.full((5,), v, dtype=torch.bfloat16)},
        "ids": torch.arange(7, dtype=torch.int8) + int(v),
        "mask": torch.tensor([True, False, v > 1]),
        "scalar": torch.tensor(v, dtype=torch.float64),
        "empty": torch.empty(0, 2),
        "extra": {"lr": v / 10, "name": f"run{v}", "sched": [1, 2, int(v)]},
    }


def blank() -> dict:
    s = state(0.0)
    for t in (s["model"]["w"], s["model"]["half"], s["ids"], s["scalar"]):
        t.fill_(0)
    s["mask"].fill_(False)
    s["extra"] = {"lr": 0.0, "name": "", "sched": []}
    return s


def assert_bitwise(got: dict, want: dict) -> None:
    for k, v in want.items():
        if isinstance(v, dict):
            assert_bitwise(got[k], v)
        elif isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(
                got[k].view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)
            ), k
        else:
            assert got[k] == v, k


TIER = "0123456789abcdef"  # the durable root's tier id, for tiers made without a manager


def tier(local_dir, keep_last: int = 2, tier_id: str = TIER) -> LocalTier:
    return LocalTier(LocalTierOptions(str(local_dir), keep_last=keep_last), RankGroup.current(), tier_id)


def root_dir(local_dir, tier_id: str = TIER):
    return local_dir / local_step.root_dir_name(tier_id)


def step_dirs(local_dir) -> list[str]:
    """The step folders of the (one) durable root's folder in ``local_dir``."""
    roots = [n for n in os.listdir(local_dir) if n.startswith("root_")]
    assert len(roots) <= 1, roots
    return sorted(n for n in os.listdir(local_dir / roots[0]) if n.startswith("step_")) if roots else []


def test_save_restore_bitwise_in_place_and_safetensors_readable(tmp_path):
    t = tier(tmp_path)
    src = state(3.0)
    t.save(3, src)
    src["model"]["w"].fill_(99)  # the save staged a copy: changing the state now is safe
    t.wait()
    target = blank()
    w = target["model"]["w"]
    assert t.restore(target) == 3
    assert target["model"]["w"] is w  # loaded in place
    assert_bitwise(target, state(3.0))
    from safetensors.torch import load_file

    data = root_dir(tmp_path) / "step_0000000003" / local_step.data_name(0, 0)
    assert torch.equal(load_file(str(data))["model.w"], torch.full((4, 3), 3.0))
    t.close()


def test_retention_keeps_newest_and_close_removes_only_what_it_wrote(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    foreign = root_dir(tmp_path) / "step_0000000001"
    foreign.mkdir(parents=True)
    (foreign / local_step.data_name(1, 1)).write_bytes(b"another holder's file")
    (foreign / "user.bin").write_bytes(b"x")
    t = tier(tmp_path, keep_last=2)
    for s in (1, 2, 3, 4):
        t.save(s, state(float(s)))
    t.wait()
    assert step_dirs(tmp_path) == ["step_0000000001", "step_0000000003", "step_0000000004"]
    assert sorted(os.listdir(foreign)) == sorted([local_step.data_name(1, 1), "user.bin"])
    t.close()
    assert step_dirs(tmp_path) == ["step_0000000001"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(foreign)) == sorted([local_step.data_name(1, 1), "user.bin"])


def test_half_written_and_damaged_steps_are_never_restored(tmp_path, caplog):
    t = tier(tmp_path, keep_last=5)
    for s in (1, 2, 3, 4):
        t.save(s, state(float(s)))
    t.wait()

    def folder(s: int):
        return root_dir(tmp_path) / f"step_{s:010d}"

    # step 4: the data file flipped one byte (checksum), step 3: no index (crash before the
    # commit), step 2: the index names another size. Step 1 is intact.
    data4 = folder(4) / local_step.data_name(0, 0)
    raw = bytearray(data4.read_bytes())
    raw[-1] ^= 0xFF
    data4.write_bytes(bytes(raw))
    (folder(3) / local_step.index_name(0, 0)).unlink()
    (folder(3) / ".shard_r00000_h00000.json.tmp-0123456789ab").write_bytes(b"{")
    with open(folder(2) / local_step.data_name(0, 0), "ab") as f:
        f.write(b"tail")
    folder(9).mkdir()
    (folder(9) / local_step.index_name(0, 0)).write_bytes(b"\x00garbage")
    target = blank()
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        assert t.restore(target) == 1
    assert_bitwise(target, state(1.0))
    text = caplog.text
    assert "checksum mismatch" in text and "step_0000000009" in text and "bytes, its index says" in text
    t.close()


def test_an_image_of_several_blocks_is_read_in_place_and_verified_on_the_way(tmp_path, caplog):
    from shardckpt.errors import IntegrityError
    from shardckpt.manager.local_tier import restore_tiers

    big = {  # 3 x 5 MiB: blocks of 8 MiB end inside tensors
        "a": torch.arange(5 << 18, dtype=torch.float32),
        "b": torch.arange(5 << 18, dtype=torch.int32) * 3,
        "c": torch.full((5 << 18,), 7.0),
        "n": 4,
    }
    t = tier(tmp_path)
    t.save(1, big)
    t.wait()
    target = {"a": torch.zeros(5 << 18), "b": torch.zeros(5 << 18, dtype=torch.int32), "n": 0}
    target["c"] = torch.zeros(2, 5 << 18)[1]  # a contiguous view into a larger storage: read in place
    assert t.restore(target) == 1
    assert all(torch.equal(target[k], big[k]) for k in "abc") and target["n"] == 4
    noncontig = {"a": torch.zeros(5 << 18), "b": torch.zeros(5 << 18, dtype=torch.int32), "n": 0}
    noncontig["c"] = torch.zeros(5 << 18, 2)[:, 1]  # not contiguous: through a bounce buffer
    assert t.restore(noncontig) == 1 and torch.equal(noncontig["c"], big["c"])
    data = root_dir(tmp_path) / "step_0000000001" / local_step.data_name(0, 0)
    with open(data, "r+b") as f:  # one byte of the second block, inside tensor "b"
        f.seek(9 << 20)
        byte = f.read(1)
        f.seek(9 << 20)
        f.write(bytes([byte[0] ^ 1]))
    with caplog.at_level(logging.WARNING, logger="shardckpt"):
        with pytest.raises(IntegrityError, match="holds part of a damaged copy"):
            restore_tiers(t, noncontig, None, "durable-root")
    assert "checksum mismatch" in caplog.text
    t.close()


def test_restore_without_local_steps_returns_none(tmp_path, caplog):
    t = tier(tmp_path)
    with caplog.at_level(logging.INFO, logger="shardckpt"):
        assert t.restore(blank()) is None
    assert "no committed local step" in caplog.text
    t.close()


def test_a_state_of_another_shape_falls_back(tmp_path, caplog):
    t = tier(tmp_path)
    t.save(1, state(1.0))
    other = blank()
    other["model"]["w"] = torch.zeros(2, 2)
    with caplog.at_level(logging.INFO, logger="shardckpt"):
        assert t.restore(other) is None
    assert "key 'model.w'" in caplog.text and torch.equal(other["model"]["w"], torch.zeros(2, 2))
    t.close()


def test_manager_restores_the_newest_step_of_either_tier(tmp_path, caplog):
    root, local = tmp_path / "durable", tmp_path / "local"
    with shardckpt.CheckpointManager(
        root, local_dir=local, local_interval_steps=2, save_interval_steps=5, replicas=1
    ) as mgr:
        for s in range(1, 8):
            mgr.save(s, state(float(s)))
        assert mgr.steps() == [5]
        target = blank()
        with caplog.at_level(logging.INFO, logger="shardckpt"):
            assert mgr.restore(target) == 6
        assert "from the local tier" in caplog.text
        assert_bitwise(target, state(6.0))
        assert mgr.restore(blank(), step=5) == 5  # an explicit step is a durable step
    assert step_dirs(local) == []  # a clean exit leaves no local steps
    with shardckpt.CheckpointManager(root, local_dir=local, local_interval_steps=2, save_interval_steps=5) as mgr:
        target = blank()
        assert mgr.restore(target) == 5
        assert_bitwise(target, state(5.0))


def test_options_are_checked():
    with pytest.raises(ValueError, match="node-local path"):
        LocalTierOptions("s3://bucket/x")
    with pytest.raises(ValueError, match="keep_last must be an int >= 1"):
        LocalTierOptions("/tmp/x", keep_last=0)


# ---------------------------------------------------------------- pure: partners and the decision


def test_partners_live_on_other_nodes():
    two = Topology(("a", "a", "b", "b"))
    assert [two.partner(r, 1) for r in range(4)] == [2, 3, 0, 1]
    assert two.sources(2, 1) == [0]
    three = Topology(("a", "b", "c", "a", "b", "c"))
    for r in range(6):
        nodes = {three.nodes[r]} | {three.nodes[three.partner(r, k)] for k in (1, 2)}
        assert len(nodes) == 3  # own node + two others: any two nodes may vanish
    uneven = Topology(("a", "a", "a", "b"))
    assert uneven.sources(3, 1) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"replicas=1 needs at least 2 nodes.*SHARDCKPT_NODE_ID"):
        Topology(("h", "h")).check(1)
    Topology(("h", "h")).check(0)


def rep(step: int, rank: int, holder: int, world: int = 4, save: str = "a" * 16) -> tuple:
    return (step, rank, world, holder, 10, "0" * 16, save)


def test_choose_takes_the_newest_complete_step_and_prefers_own_copies():
    topo = Topology(("a", "a", "b", "b"))
    # node a (ranks 0, 1) lost step 20 entirely; node b holds its own shards and a's replicas.
    b = [rep(20, r, h) for r, h in ((2, 2), (3, 3), (0, 2), (1, 3))]
    reports = [[rep(10, 0, 0)], [rep(10, 1, 1)], b, b]
    step, sources, _ = choose(reports, topo, 4, set(), None)
    assert step == 20
    assert sources[0][0] == 2 and sources[1][0] == 2 and sources[2][0] == 2 and sources[3][0] == 3
    step, _, why = choose([[], [], [rep(20, 2, 2)], [rep(20, 2, 2)]], topo, 4, set(), None)
    assert step is None and "rank(s) [0, 1, 3]" in why
    step, _, why = choose([[rep(20, 0, 0, world=2)], [], [], []], topo, 4, set(), None)
    assert step is None and "saved by [2] ranks; this job has 4" in why
    step, _, why = choose(reports, topo, 4, set(), 30)
    assert step is None and "older than the durable step 30" in why
    step, _, _ = choose(reports, topo, 4, {("b", rep(20, 0, 2))}, None)
    assert step is None  # the only copy of rank 0's step 20 was damaged, step 10 lacks ranks 2, 3


def test_choose_never_mixes_shards_of_two_saves_of_one_step():
    topo = Topology(("a", "b"))
    # step 8 of an earlier attempt survives on node b (rank 1's own copy) while node a
    # holds rank 0's shard of a later save of the same step number: not one save.
    mixed = [[rep(8, 0, 0, 2, "b" * 16), rep(4, 0, 0, 2), rep(4, 1, 0, 2)], [rep(8, 1, 1, 2, "a" * 16)]]
    step, sources, _ = choose(mixed, topo, 2, set(), None)
    assert step == 4 and {r: src[1][6] for r, src in sources.items()} == {0: "a" * 16, 1: "a" * 16}
    step, _, why = choose([mixed[0][:1], mixed[1]], topo, 2, set(), None)
    assert step is None and "step 8: its shards come from 2 different saves, none complete" in why
    both = [[rep(8, 0, 0, 2, "b" * 16), rep(8, 1, 0, 2, "b" * 16)], [rep(8, 0, 1, 2), rep(8, 1, 1, 2)]]
    step, _, why = choose(both, topo, 2, set(), None)
    assert step is None and "each complete" in why


def test_root_record_and_tier_ids():
    record = local_step.root_record("0" * 32)
    assert local_step.parse_root_record(record, where="x") == "0" * 32
    for bad in (b"{}", b"[", record.replace(b"0" * 32, b"zz"), b" " * 5000):
        with pytest.raises(ManifestError):
            local_step.parse_root_record(bad, where="x")
    a = local_step.tier_id("/runs/a", "0" * 32)
    assert local_step.is_tier_id(a) and a != local_step.tier_id("/runs/b", "0" * 32)
    assert a != local_step.tier_id("/runs/a", "1" * 32)
    assert local_step.parse_root_dir_name(local_step.root_dir_name(a)) == a


def test_a_tier_of_another_root_neither_restores_nor_removes_these_local_steps(tmp_path, caplog):
    t = tier(tmp_path, tier_id="a" * 16)
    t.save(1, state(1.0))
    t.wait()
    before = snapshot(tmp_path)
    other = tier(tmp_path, keep_last=1, tier_id="b" * 16)
    with caplog.at_level(logging.INFO, logger="shardckpt"):
        assert other.restore(blank()) is None
    assert "no committed local step" in caplog.text and "ignoring ['root_aaaaaaaaaaaaaaaa']" in caplog.text
    for s in (2, 3):  # its retention and close stay in its own folder
        other.save(s, state(float(s)))
    other.close()
    assert snapshot(tmp_path) == before
    target = blank()
    assert t.restore(target) == 1
    assert_bitwise(target, state(1.0))
    t.close()


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CRASHED_JOB = """
import os, sys, torch, shardckpt
mgr = shardckpt.CheckpointManager(sys.argv[1], local_dir=sys.argv[2], save_interval_steps=2)
for step in (1, 2, 3):
    mgr.save(step, {"w": torch.full((4,), float(step)), "step": step})
mgr.wait()
os._exit(0)  # a crash: no close(), the local steps stay
"""


def test_a_fresh_durable_root_never_restores_an_old_local_dir(tmp_path, caplog):
    root, local = tmp_path / "run", tmp_path / "local"
    done = run_command([sys.executable, "-c", CRASHED_JOB, str(root), str(local)])
    assert done.returncode == 0, done.stderr
    before = snapshot(local)
    assert len(before) == 4  # steps 2 and 3 (keep_last_local=2), data file and index each

    def restore(where) -> tuple[int | None, dict]:
        target = {"w": torch.zeros(4), "step": 0}
        with shardckpt.CheckpointManager(where, local_dir=local, save_interval_steps=2) as mgr:
            return mgr.restore(target), target

    step, got = restore(root)  # its own root: the local step 3
    assert step == 3 and got["step"] == 3 and torch.equal(got["w"], torch.full((4,), 3.0))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="shardckpt"):
        assert restore(tmp_path / "another")[0] is None  # a new job with another root
    assert "ignoring ['root_" in caplog.text and "no committed local step" in caplog.text
    os.rename(root, tmp_path / "old")  # the same URL, a fresh root: its durable step 2 is gone too
    assert restore(root)[0] is None
    assert snapshot(local) == before  # never replaced or deleted


def test_index_parser_refuses_hostile_input():
    good = local_step.ShardIndex(1, 0, 2, 1, 10, "0123456789abcdef", TIER, "fedcba9876543210")
    assert local_step.parse_index(good.to_json(), where="x") == good
    for bad in (b"[]", b"{", b'{"format": "shardckpt-local-shard", "version": 1}', b" " * 5000):
        with pytest.raises(ManifestError):
            local_step.parse_index(bad, where="x")
    doc = good.to_json().replace(b'"rank":0', b'"rank":7')
    with pytest.raises(ManifestError, match="outside world"):
        local_step.parse_index(doc, where="x")
    assert local_step.holder_of(".shard_r00001_h00003.json.tmp-0123456789ab") == 3
    assert local_step.holder_of("shard_r00001_h00003.txt") is None


def test_store_commit_replaces_a_shard_of_the_same_step(tmp_path):
    store = LocalStore(str(tmp_path), 0, TIER)
    for payload, save in ((b"first", "1" * 16), (b"second!", "2" * 16)):
        index = local_step.ShardIndex(5, 0, 1, 0, len(payload), local_step.digest_of(memoryview(payload)), TIER, save)
        store.commit(index, memoryview(payload))
    (shard,) = store.scan()
    with open(shard.path, "rb") as f:
        assert f.read() == b"second!" and shard.index.save_id == "2" * 16
    assert sorted(os.listdir(root_dir(tmp_path) / "step_0000000005")) == [
        local_step.index_name(0, 0),
        local_step.data_name(0, 0),
    ]


def test_retention_counts_only_committed_steps_not_a_folder_of_temp_files(tmp_path):
    store = LocalStore(str(tmp_path), 0, TIER)
    for step in (1, 2):
        payload = b"step %d" % step
        index = local_step.ShardIndex(
            step, 0, 1, 0, len(payload), local_step.digest_of(memoryview(payload)), TIER, "1" * 16
        )
        store.commit(index, memoryview(payload))
    crashed = root_dir(tmp_path) / "step_0000000003"  # a write of step 3 cut off before its rename
    crashed.mkdir()
    (crashed / local_step.temp_name(local_step.data_name(0, 0), "0123456789ab")).write_bytes(b"half")
    (crashed / local_step.temp_name(local_step.data_name(0, 1), "0123456789ab")).write_bytes(b"holder 1's")
    assert store.retain(2) == [3]  # steps 1 and 2 are the two newest committed ones: both stay
    assert step_dirs(tmp_path) == ["step_0000000001", "step_0000000002", "step_0000000003"]
    assert os.listdir(crashed) == [local_step.temp_name(local_step.data_name(0, 1), "0123456789ab")]
    assert [s.index.step for s in store.scan()] == [1, 2]


class DiskFullAfterData(LocalStore):
    """Writes a shard's data file, then fails as a full disk would, before the index."""

    def commit(self, index: local_step.ShardIndex, image: memoryview) -> str:
        if index.step == 2:
            folder = self.step_dir(2)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, local_step.data_name(index.rank, index.holder)), "wb") as f:
                f.write(image)
            raise StorageError(f"rank {self.holder}: no space left on device")
        return super().commit(index, image)


def test_a_local_save_that_fails_midway_is_raised_once_and_never_restored(tmp_path):
    store = DiskFullAfterData(str(tmp_path), 0, TIER)
    t = LocalTier(LocalTierOptions(str(tmp_path)), RankGroup.current(), TIER, store=store)
    t.save(1, state(1.0))
    t.save(2, state(2.0))
    with pytest.raises(StorageError, match="no space left"):
        t.wait()
    t.wait()  # raised once
    target = blank()
    assert t.restore(target) == 1
    assert_bitwise(target, state(1.0))
    t.close()


def test_modules_and_a_fresh_optimizer_come_back_bitwise(tmp_path):
    def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        return model, torch.optim.AdamW(model.parameters(), lr=0.01)

    model, optim = make()
    for _ in range(3):
        model(torch.randn(5, 4)).sum().backward()
        optim.step()
        optim.zero_grad()
    t = tier(tmp_path)
    t.save(3, {"model": model, "optim": optim, "step": 3})
    t.wait()
    model2, optim2 = make()
    target = {"model": model2, "optim": optim2, "step": 0}
    assert t.restore(target) == 3
    assert target["step"] == 3
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = optim.state_dict()["state"], optim2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        assert all(torch.equal(s1[k][n], s2[k][n]) for n in ("exp_avg", "exp_avg_sq", "step"))
    t.close()


def test_a_step_due_in_both_tiers_is_saved_in_both_and_restored_from_the_local_one(tmp_path, caplog):
    with shardckpt.CheckpointManager(
        tmp_path / "durable", local_dir=tmp_path / "local", local_interval_steps=5, save_interval_steps=5
    ) as mgr:
        assert mgr.save(4, state(4.0)) is False
        assert mgr.save(5, state(5.0)) is True
        mgr.wait()
        assert mgr.steps() == [5] and step_dirs(tmp_path / "local") == ["step_0000000005"]
        target = blank()
        with caplog.at_level(logging.INFO, logger="shardckpt"):
            assert mgr.restore(target) == 5
        assert "restored step 5 from the local tier" in caplog.text
        assert_bitwise(target, state(5.0))


SAVER = """
import sys, torch
from shardckpt.engine.collective import RankGroup
from shardckpt.manager.local_tier import LocalTier, LocalTierOptions
tier = LocalTier(LocalTierOptions(sys.argv[1], keep_last=2), RankGroup.current(), sys.argv[2])
step = 0
while True:  # until killed
    step += 1
    tier.save(step, {"w": torch.full((1 << 20,), float(step)), "step": step})
"""


def wait_for_step(local_dir, at_least: int, timeout_s: float = 120.0) -> None:
    """Until a step folder numbered ``at_least`` or higher exists. Not step ``at_least``
    itself: keep_last=2 removes it two saves later, often between two looks (the test then
    waited out the deadline and failed on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while not any(n[5:15].isdigit() and int(n[5:15]) >= at_least for n in step_dirs(local_dir)):
        assert time.monotonic() < deadline, f"no step >= {at_least} in {local_dir} within {timeout_s:g} s"
        time.sleep(0.05)


def test_a_process_killed_in_the_middle_of_local_saves_leaves_a_restorable_step(tmp_path):
    proc = start_command([sys.executable, "-c", SAVER, str(tmp_path), TIER])
    try:
        wait_for_step(tmp_path, 4)  # saves are in flight from here on
    finally:
        kill_group(proc.pid)  # SIGKILL, wherever it is: staging, writing, renaming, retention
        proc.wait()
    target = {"w": torch.zeros(1 << 20), "step": 0}
    t = tier(tmp_path)
    step = t.restore(target)
    assert step is not None and step >= 3
    assert target["step"] == step and torch.equal(target["w"], torch.full((1 << 20,), float(step)))
    t.close()


def test_train_state_restores_from_the_local_tier(tmp_path, caplog):
    from shardckpt.training.train_state import TrainState

    def make() -> TrainState:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return TrainState(model=model, optimizer=optim, seed=0, extras={"tokens": 0})

    ts = make()
    with shardckpt.CheckpointManager(
        tmp_path / "durable", local_dir=tmp_path / "local", local_interval_steps=2, save_interval_steps=10
    ) as mgr:
        for step in range(1, 5):
            ts.model(torch.randn(2, 4)).sum().backward()
            ts.optimizers[0].step()
            ts.step, ts.extras["tokens"] = step, step * 8
            ts.save(mgr)
        expected_rng = torch.rand(3)  # the stream after step 4's save
        fresh = make()
        with caplog.at_level(logging.INFO, logger="shardckpt"):
            assert fresh.restore(mgr) == 4
        assert "restored step 4 from the local tier" in caplog.text
        assert fresh.step == 4 and fresh.extras["tokens"] == 32
        assert torch.equal(fresh.model.weight, ts.model.weight)
        assert torch.equal(torch.rand(3), expected_rng)  # the RNG stream came back too


def test_a_read_only_manager_reads_the_record_and_never_writes_one(tmp_path, caplog):
    bare, local = tmp_path / "bare", tmp_path / "local"
    with shardckpt.CheckpointManager(bare) as mgr:  # no local_dir: no record
        mgr.save(1, state(1.0))
    with caplog.at_level(logging.INFO, logger="shardckpt"):
        with shardckpt.CheckpointManager(bare, local_dir=local, read_only=True) as ro:
            target = blank()
            assert ro.restore(target) == 1
    assert "local tier" in caplog.text and "off" in caplog.text
    assert not (bare / local_step.ROOT_RECORD_NAME).exists()
    assert_bitwise(target, state(1.0))
    with shardckpt.CheckpointManager(tmp_path / "run", local_dir=local, save_interval_steps=10) as writer:
        writer.save(3, state(3.0))
        writer.wait()
        with shardckpt.CheckpointManager(tmp_path / "run", local_dir=local, read_only=True) as ro:
            target = blank()
            assert ro.restore(target) == 3  # the writer's local step, through the root's record
        assert_bitwise(target, state(3.0))
