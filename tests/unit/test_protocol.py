"""The save protocol (engine/protocol.py) and its round trips (engine/exchange.py): a save in
two round trips, the last plan reused only while no rank's layout changed, and every
failure, timeout included, raised on every rank that came."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from distributed import mark, run_ranks, wait_for

import shardckpt
from shardckpt.engine import Checkpointer
from shardckpt.engine import planner as planner_module
from shardckpt.engine.claim import agreed_options, check_same_options
from shardckpt.engine.exchange import Exchange
from shardckpt.engine.writer import WriterOptions


def count_global_plans(monkeypatch: Any) -> list[int]:
    """How often the coordinator made a global plan (DCP's hook of our planner)."""
    calls = [0]
    original = planner_module.SavePlanner._create_global_plan

    def counted(self: Any, all_plans: Any) -> Any:
        calls[0] += 1
        return original(self, all_plans)

    monkeypatch.setattr(planner_module.SavePlanner, "_create_global_plan", counted)
    return calls


def count_round_trips(monkeypatch: Any) -> list[int]:
    calls = [0]
    original = Exchange.round_trip

    def counted(self: Exchange, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Exchange, "round_trip", counted)
    return calls


def test_one_process_reuses_the_plan_while_the_layout_holds(tmp_path, monkeypatch):
    plans, trips = count_global_plans(monkeypatch), count_round_trips(monkeypatch)
    with Checkpointer() as ckpt:
        for step in range(3):
            ckpt.save({"w": torch.full((3,), float(step)), "step": step}, str(tmp_path / f"s{step}"))
        assert plans == [1] and trips == [6]  # planned once; two round trips per save
        ckpt.save({"w": torch.zeros(3), "b": torch.ones(2), "step": 3}, str(tmp_path / "s3"))
        assert plans == [2]  # a new key: planned anew
        target = {"w": torch.zeros(3), "step": -1}
        ckpt.load(target, str(tmp_path / "s2"))
    assert torch.equal(target["w"], torch.full((3,), 2.0)) and target["step"] == 2


def test_a_reused_plan_still_refuses_a_bad_value(tmp_path, monkeypatch):
    """The checks that depend on values run on every save, planned or reused."""
    from shardckpt.format import manifest

    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", 1000)
    plans = count_global_plans(monkeypatch)
    with Checkpointer() as ckpt:
        ckpt.save({"w": torch.ones(2), "v": "x"}, str(tmp_path / "a"))
        with pytest.raises(shardckpt.UnsupportedValueError, match="manifest would take at least"):
            ckpt.save({"w": torch.ones(2), "v": "x" * 2000}, str(tmp_path / "b"))
    assert plans == [1]  # the plan was reused: the size was checked without it
    assert not (tmp_path / "b" / "manifest.json").exists()


def test_a_reused_plan_counts_the_keys_once_and_the_values_every_save(tmp_path, monkeypatch):
    """The keys' share of the manifest is counted when the plan is made (O(all items of all
    ranks)); a save that reuses the plan adds it to this save's values, which may grow."""
    from shardckpt.format import manifest

    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", 11_000)  # the writer's own check: ~9.9 kB written
    counted = [0]
    original = planner_module.manifest_key_bytes

    def counting(all_plans: Any) -> int:
        counted[0] += 1
        return original(all_plans)

    monkeypatch.setattr(planner_module, "manifest_key_bytes", counting)
    plans = count_global_plans(monkeypatch)
    key = "k" * 3000  # 2 x 3002 bytes of JSON, plus 2 x 3 for "v": 6010 bytes of keys
    with Checkpointer() as ckpt:
        ckpt.save({key: torch.ones(2), "v": "x" * 10}, str(tmp_path / "a"))
        ckpt.save({key: torch.ones(2), "v": "x" * 100}, str(tmp_path / "b"))
        # 6010 + 6002 > 11,000: refused at planning only because the keys counted when the
        # plan was made still count (the values alone would pass, and the writer refuse later)
        with pytest.raises(shardckpt.UnsupportedValueError, match=r"at least 12012 bytes \(largest values: 'v': 6002"):
            ckpt.save({key: torch.ones(2), "v": "x" * 6000}, str(tmp_path / "c"))
    assert plans == [1] and counted == [1]  # planned once, keys counted once, for three saves
    assert (tmp_path / "b" / "manifest.json").exists() and not (tmp_path / "c" / "manifest.json").exists()


def _reuse_on_ranks(rank: int, world: int, root: str) -> None:
    import shardckpt.engine.planner as planner

    made = [0]
    original = planner.SavePlanner._create_global_plan

    def counted(self: Any, all_plans: Any) -> Any:
        made[0] += 1
        return original(self, all_plans)

    planner.SavePlanner._create_global_plan = counted  # type: ignore[method-assign]
    with Checkpointer() as ckpt:
        for step in range(2):
            sd = {"w": torch.full((4,), float(step)), f"r{rank}": torch.full((2,), float(rank)), "step": step}
            ckpt.save(sd, f"{root}/s{step}", timeout_s=30)
        assert made[0] == (1 if rank == 0 else 0)  # the second save reused the plan
        # A rank that missed the last answer (its plan id is stale) leaves its plan out; the
        # coordinator cannot reuse and asks for the plans: one more round trip, same result.
        if rank == 1:
            cache = ckpt._rounds.over(ckpt._groups[next(iter(ckpt._groups))])[1]
            cache.plan_id = "stale"
        ckpt.save({"w": torch.full((4,), 2.0), f"r{rank}": torch.full((2,), float(rank)), "step": 2}, f"{root}/s2")
        assert made[0] == (2 if rank == 0 else 0)
        # A value that differs across ranks is refused on every rank, the plan reused or not.
        with pytest.raises(shardckpt.UnsupportedValueError, match="key 'step': non-tensor value differs"):
            ckpt.save({"w": torch.ones(4), f"r{rank}": torch.ones(2), "step": rank}, f"{root}/bad", timeout_s=30)
        # So are different paths: the location is checked on every save.
        with pytest.raises(shardckpt.InconsistentRanksError, match="ranks passed different paths"):
            ckpt.save({"w": torch.ones(4), f"r{rank}": torch.ones(2), "step": 3}, f"{root}/p{rank}", timeout_s=30)
        # And options that shape the checkpoint (each rank hashes with its own block size).
        with pytest.raises(shardckpt.InconsistentRanksError, match="different save options: hash_block_bytes"):
            ckpt.save(
                {"w": torch.ones(4), f"r{rank}": torch.ones(2), "step": 3},
                f"{root}/opts",
                hash_block_bytes=4096 * (rank + 1),
                timeout_s=30,
            )
        target = {"w": torch.zeros(4), f"r{rank}": torch.zeros(2), "step": -1}
        ckpt.load(target, f"{root}/s2", strict=False, timeout_s=30)
    assert torch.equal(target["w"], torch.full((4,), 2.0)) and target["step"] == 2
    assert torch.equal(target[f"r{rank}"], torch.full((2,), float(rank)))


def test_ranks_reuse_the_plan_and_still_check_values_and_paths(tmp_path):
    run_ranks(_reuse_on_ranks, 2, str(tmp_path))
    assert not (tmp_path / "bad" / "manifest.json").exists()
    assert not (tmp_path / "opts").exists()


def test_save_options_are_compared_by_name_and_every_difference_named():
    """check_same_options: no rank's dict order decides (names sorted, values grouped by
    the first rank holding each), every differing option named with its ranks; a rank that
    lacks an option differs from one that has it; options that agree say nothing."""
    alike = {"hash_block_bytes": 4096, "overwrite": False}
    check_same_options("/c", [{"options": alike}, {"options": dict(reversed(alike.items()))}])
    per_rank = [{"options": {"overwrite": r == 2, "hash_block_bytes": 4096 if r < 9 else 8192}} for r in range(12)]
    with pytest.raises(shardckpt.InconsistentRanksError) as info:
        check_same_options("/c", per_rank)
    text = str(info.value)
    assert "different save options: hash_block_bytes (ranks 0-8: 4096; ranks 9-11: 8192), " in text
    assert "overwrite (ranks 0, 1, 3-11: False; rank 2: True)" in text
    assert text.startswith("save to /c: ") and text.endswith("nothing was written.")
    with pytest.raises(shardckpt.InconsistentRanksError, match=r"format_version \(rank 0: 3; rank 1: None\)"):
        check_same_options("/c", [{"options": {"format_version": 3}}, {"options": {}}])
    # what a rank sends: its writer's options under the names the errors use
    sent = agreed_options(WriterOptions(hash_block_bytes=4096, overwrite=True, digests=True, format_version=3))
    assert sent == {"hash_block_bytes": 4096, "format_version": 3, "incremental": True, "overwrite": True}


def _round_trips(rank: int, world: int, path: str) -> None:
    import datetime

    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=30))
    ex = Exchange.over(group)
    # Each rank gets its own item of the coordinator's answer.
    got = ex.round_trip(
        "adding", lambda: rank + 10, lambda xs: [sum(xs) * (r + 1) for r in range(len(xs))], wait_s=30, reply_s=30
    )
    assert got == 33 * (rank + 1)  # 10 + 11 + 12, times the rank it went to

    # A rank's failure is raised on every rank, typed and naming it.
    def fail_on_2() -> int:
        if rank == 2:
            raise shardckpt.StorageError("disk full")
        return 0

    with pytest.raises(shardckpt.StorageError, match=r"checking failed on rank 2: StorageError: disk full"):
        ex.round_trip("checking", fail_on_2, lambda xs: xs, wait_s=30, reply_s=30)

    # The coordinator's decision failing is its failure, on every rank.
    def refuse(xs: list[Any]) -> list[Any]:
        raise shardckpt.InconsistentRanksError("no")

    with pytest.raises(shardckpt.InconsistentRanksError, match="deciding failed on rank 0: InconsistentRanksError: no"):
        ex.round_trip("deciding", lambda: None, refuse, wait_s=30, reply_s=30)
    # A rank that does not come is named by the coordinator within the bound; gloo then
    # closes the group's connections, so the rank that came learns it from that.
    if rank == 1:
        wait_for(path + ".others-raised-0")
        wait_for(path + ".others-raised-2")
        return
    expected = shardckpt.RankTimeoutError if rank == 0 else shardckpt.RankFailureError
    with pytest.raises(expected) as info:
        ex.round_trip("late", lambda: None, lambda xs: xs, wait_s=2, reply_s=30, waiting="late: waiting for all")
    mark(f"{path}.others-raised-{rank}")
    if rank == 0:
        assert "late: waiting for all: not every rank arrived within 2 s (rank 1 did not)" in str(info.value)
    else:
        assert "the coordinator (rank 0) closed its connection" in str(info.value), str(info.value)


def test_a_round_trip_answers_each_rank_and_raises_every_failure_everywhere(tmp_path):
    run_ranks(_round_trips, 3, str(tmp_path / "x"))


def _other_checkpoint_and_wrong_target(rank: int, world: int, a: str, b: str) -> None:
    # Rank 1 loads another checkpoint, into a target that does not fit it either: the one
    # round trip of a load still reports the different checkpoints first, on every rank.
    target = {"w": torch.zeros(4)} if rank == 0 else {"v": torch.zeros(9)}
    with pytest.raises(shardckpt.InconsistentRanksError, match="the ranks were given different checkpoints"):
        shardckpt.load(target, a if rank == 0 else b, timeout_s=30)
    # The same checkpoint, a target that fits on rank 0 only: rank 1 is named on both.
    with pytest.raises(shardckpt.StateDictMismatchError, match=r"failed on rank 1: StateDictMismatchError"):
        shardckpt.load(target, a, timeout_s=30)


def test_a_load_checks_the_checkpoint_then_the_targets_in_one_round_trip(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shardckpt.save({"w": torch.arange(4.0)}, a)
    shardckpt.save({"u": torch.arange(2.0)}, b)
    run_ranks(_other_checkpoint_and_wrong_target, 2, a, b)


def test_dcps_global_load_step_changes_nothing_across_ranks():
    """read_in_rounds runs the load's global step on each rank over its own plan, as DCP
    does without collectives; that is only the same as DCP's gathered global step while
    its load planner and our reader leave every plan as it is. Fails on a torch where not."""
    from torch.distributed.checkpoint.planner import LoadPlan

    from shardckpt.engine.planner import LoadPlanner
    from shardckpt.engine.reader import Reader

    plans = []
    for rank in range(2):
        planner = LoadPlanner(allow_partial_load=True)
        state = {"w": torch.zeros(4), f"r{rank}": torch.zeros(2)}
        metadata = _metadata_of({"w": torch.ones(4), "r0": torch.ones(2), "r1": torch.ones(2)})
        planner.set_up_planner(state, metadata, rank == 0)
        plans.append(planner.create_local_plan())
    assert all(isinstance(p, LoadPlan) and p.items for p in plans)
    assert LoadPlanner(allow_partial_load=True).create_global_plan(list(plans)) == plans
    assert Reader.prepare_global_plan(object.__new__(Reader), list(plans)) == plans


def _metadata_of(state: dict[str, torch.Tensor]) -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    planner = DefaultSavePlanner()
    planner.set_up_planner(state, is_coordinator=True)
    _, metadata = planner.create_global_plan([planner.create_local_plan()])
    return metadata


def _rank_1_stuck_reading(rank: int, world: int, path: str) -> None:
    from shardckpt.storage import local

    shardckpt.save({"w": torch.arange(4.0), f"r{rank}": torch.ones(3)}, path, timeout_s=30)
    if rank == 1:
        original = local.LocalStorage.read_into

        def stuck(self: Any, *args: Any) -> Any:  # storage that hangs mid-read, until rank 0 gave up
            wait_for(path + ".rank0-raised")
            return original(self, *args)

        local.LocalStorage.read_into = stuck  # type: ignore[method-assign]
    target = {"w": torch.zeros(4), f"r{rank}": torch.zeros(3)}
    with pytest.raises(shardckpt.ShardckptError) as info:
        shardckpt.load(target, path, strict=False, timeout_s=3)
    if rank == 0:
        mark(path + ".rank0-raised")  # raised while rank 1 was still stuck: it did not wait for it
        assert isinstance(info.value, shardckpt.RankTimeoutError)
        assert "finish reading: not every rank arrived within 3 s (rank 1 did not)" in str(info.value), str(info.value)


def test_a_rank_stuck_reading_is_named(tmp_path):
    run_ranks(_rank_1_stuck_reading, 2, str(tmp_path / "ckpt"))


def test_item_texts_reuse_the_repr_of_a_kept_item_and_give_a_fresh_repr_s_fingerprint():
    """A repeated save's fingerprint reuses the repr of each item object of the last save
    (issue #18); a new item is written anew, and one not in the last save is forgotten.
    The digest is always the one a plain repr of every item gives."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    from shardckpt.engine.planner import layout_fingerprint
    from shardckpt.engine.protocol import ItemTexts

    written: list[str] = []

    class Counted(WriteItem):
        def __repr__(self) -> str:
            written.append(self.index.fqn)
            return super().__repr__()

    def item(fqn: str, rows: int) -> Counted:
        chunk = ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([rows, 4]))
        data = TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=torch.float32), size=chunk.sizes)
        return Counted(index=MetadataIndex(fqn, torch.Size([0, 0])), type=WriteItemType.TENSOR, tensor_data=data)

    a, b, b_grown = item("a", 2), item("b", 3), item("b", 5)
    texts = ItemTexts()
    first = SavePlan([a, b])
    assert texts.fingerprint(first, None) == layout_fingerprint(first)
    written.clear()
    grown = SavePlan([a, b_grown])
    fingerprint = texts.fingerprint(grown, 1)
    assert written == ["b"], "only the new item's repr was made; a's was kept"
    assert fingerprint == layout_fingerprint(grown, small_replicated_to=1) != layout_fingerprint(first)
    written.clear()
    fingerprint = texts.fingerprint(SavePlan([b, a]), None)
    assert written == ["b"], "b was not in the last save: its repr is made anew"
    assert fingerprint == layout_fingerprint(SavePlan([b, a]))
