"""Incremental checkpoints (#17) across gloo ranks: a CheckpointManager(incremental=True)
run of 8 steps on 4 ranks holding Shard(0) DTensors, under four retention set-ups in one
launch (keep_last with a small full_every, keep_every_n_steps with async saves, keep_best,
and keep_last=1 with async saves through a small max_staging_bytes), then loads of the kept
steps on 3 ranks, resharded, bitwise.

The state of a step is a pure function of the step (``global_state``): frozen parameters
never change, the trainable parameter and its two optimizer moments change every step, a
replicated tensor changes on even steps only, and a value. So every step knows exactly which
chunks an incremental save must write, and which bytes a restore must give back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from distributed import run_ranks
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import shardckpt
from shardckpt.convert.audit import verify_checkpoint
from shardckpt.engine.loading import read_manifest
from shardckpt.format import layout
from shardckpt.storage import open_storage

STEPS = 8
FROZEN = ("model.frozen.w", "model.frozen.e")
TRAINED = ("model.train.w", "optim.m", "optim.v")
REPLICATED = "model.rep"
# keep_best ranks these (smaller is better): steps 5 and 2 are the best two.
LOSS = {1: 0.9, 2: 0.5, 3: 0.8, 4: 0.7, 5: 0.3, 6: 0.6, 7: 0.65, 8: 0.62}

# One root per retention set-up, all run by the same ranks in the same launch.
SETUPS: dict[str, dict[str, Any]] = {
    "last2_full3": {"keep_last": 2, "full_every": 3},
    "every3_async": {"keep_every_n_steps": 3, "keep_last": 1, "async_save": True},
    "best2": {"keep_best": 2, "monitor": "loss", "keep_last": 1},
    # 1 KiB of staging per rank, about a quarter of a rank's shard: the bounded source path
    # (the first chunks are written from the caller's tensors while save() waits).
    "last1_bounded": {"keep_last": 1, "async_save": True, "max_staging_bytes": 1024},
}
# What each root holds after step 8: the committed steps, and the retired steps whose files a
# committed step still reads (the frozen tensors were written once, at step 1; the replicated
# tensor last changed at an even step; a full save reads nothing older).
KEPT = {"last2_full3": [7, 8], "every3_async": [3, 6, 8], "best2": [2, 5, 8], "last1_bounded": [8]}
RETIRED = {"last2_full3": [], "every3_async": [1, 2], "best2": [1, 4], "last1_bounded": [1]}


def global_state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(17)
    frozen_w = torch.randn(64, 32, generator=g)
    frozen_e = torch.randn(40, 16, generator=g).to(torch.bfloat16)
    train = torch.randn(18, 32, generator=g)  # 18 rows: uneven shards on 4 ranks (5, 5, 5, 3)
    rep = torch.randn(32, generator=g)
    t = float(step)
    return {
        "model.frozen.w": frozen_w,
        "model.frozen.e": frozen_e,
        "model.train.w": train + t,
        "optim.m": train * t,
        "optim.v": train * train + t,
        REPLICATED: rep + float(step // 2),  # changes on even steps
    }


def changed_keys(step: int) -> set[str]:
    """The keys whose bytes differ from step ``step - 1``."""
    return set(TRAINED) | ({REPLICATED} if step % 2 == 0 else set())


def nested(flat: dict[str, Any], step: int) -> dict[str, Any]:
    model = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("model.")}
    optim = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith("optim.")}
    return {"model": model, "optim": optim, "step": step, "lr": 1e-3 / step if step else 0.0}


def flat_tensors(sd: dict[str, Any]) -> dict[str, Any]:
    return {f"{group}.{k}": v for group in ("model", "optim") for k, v in sd[group].items()}


def sharded(mesh: DeviceMesh, step: int) -> dict[str, Any]:
    flat = {
        k: distribute_tensor(v, mesh, [Replicate()] if k == REPLICATED else [Shard(0)])
        for k, v in global_state(step).items()
    }
    return nested(flat, step)


def blank(mesh: DeviceMesh) -> dict[str, Any]:
    flat = {
        k: distribute_tensor(torch.zeros_like(v), mesh, [Replicate()] if k == REPLICATED else [Shard(0)])
        for k, v in global_state(0).items()
    }
    return nested(flat, 0) | {"step": -1, "lr": -1.0}


def assert_bitwise(target: dict[str, Any], step: int) -> None:
    want = global_state(step)
    for key, got in flat_tensors(target).items():
        full = got.full_tensor() if isinstance(got, DTensor) else got
        assert full.dtype == want[key].dtype, key
        assert torch.equal(full.view(torch.uint8), want[key].view(torch.uint8)), (key, step)
    assert target["step"] == step and target["lr"] == 1e-3 / step


def scribble(sd: dict[str, Any]) -> None:
    """What a training step does right after an async save returned: change the tensors in
    place. A save that still read them would commit these bytes, and the restore would see."""
    for t in flat_tensors(sd).values():
        local = t.to_local() if isinstance(t, DTensor) else t
        local.fill_(float("nan") if local.is_floating_point() else 0)


def check_step(mgr: shardckpt.CheckpointManager, step: int) -> None:
    """Rank 0, after ``step`` committed: every listed step verifies, and the step wrote the
    chunks of exactly the changed tensors (all of them for a full save), nothing else."""
    for s in mgr.steps():
        report = verify_checkpoint(mgr.path(s))
        assert report.ok, (mgr.root, s, report)
    m = mgr.manifest(step)
    chain = m.metadata["incremental_chain"]
    if mgr.full_every is not None:
        assert chain == (step - 1) % mgr.full_every, (mgr.root, step, chain)
    want = set(global_state(step)) if chain == 0 else changed_keys(step)
    own = [(k, c) for k, t in m.tensors.items() for c in t.chunks if m.files[c.file].checkpoint is None]
    reused = {k for k, t in m.tensors.items() for c in t.chunks if m.files[c.file].checkpoint is not None}
    assert {k for k, _ in own} == want and not (reused & want), (mgr.root, step, chain, sorted(reused))
    payload = sum(c.byte_length for _, c in own)
    assert payload == sum(global_state(step)[k].nbytes for k in want), (mgr.root, step)
    # On disk: the files of those chunks and nothing more; beyond the payload, only headers.
    data = Path(mgr.path(step)) / layout.DATA_DIR
    on_disk = {f"{layout.DATA_DIR}/{f.name}": f.stat().st_size for f in data.iterdir()}
    assert set(on_disk) == {c.file for _, c in own}, (mgr.root, step)
    assert payload <= sum(on_disk.values()) < payload + 1024 * len(on_disk), (mgr.root, step, on_disk)


def _train_on_4(rank: int, world: int, roots: dict[str, str]) -> None:
    mesh = init_device_mesh("cpu", (world,))
    managers: dict[str, shardckpt.CheckpointManager] = {}
    bounded = shardckpt.Checkpointer()  # the bounded root's, to read its staging stats
    for name, root in roots.items():
        extra = {"checkpointer": bounded} if name == "last1_bounded" else {}
        managers[name] = shardckpt.CheckpointManager(root, incremental=True, timeout_s=120, **SETUPS[name], **extra)
    for step in range(1, STEPS + 1):
        for mgr in managers.values():
            sd = sharded(mesh, step)
            assert mgr.save(step, sd, metrics={"loss": LOSS[step]})
            if mgr.async_save:
                scribble(sd)
            target = blank(mesh)
            assert mgr.restore(target) == step  # finishes the async save first
            assert_bitwise(target, step)
            if rank == 0:
                check_step(mgr, step)
        # The last bounded save wrote some chunks straight from the live tensors.
        assert bounded.staging_stats()["bounded_live_bytes"] > 0, bounded.staging_stats()
    for name, mgr in managers.items():
        assert mgr.steps() == KEPT[name], (name, mgr.steps())
        mgr.close()
    bounded.close()


def _load_on_3(rank: int, world: int, loads: list[tuple[str, int]], root_to_continue: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    for root, step in loads:
        target = blank(mesh)
        shardckpt.load(target, f"{root}/{layout.step_dir_name(step)}")
        assert_bitwise(target, step)
    # The run goes on on 3 ranks: shards of other offsets are written again; the replicated
    # tensor (the same single chunk on any world size) is reused.
    with shardckpt.CheckpointManager(root_to_continue, incremental=True, keep_last=2, full_every=3) as mgr:
        mgr.save(STEPS + 1, sharded(mesh, STEPS + 1), metrics={"loss": 0.1})
        target = blank(mesh)
        assert mgr.restore(target) == STEPS + 1
        assert_bitwise(target, STEPS + 1)
        if rank == 0:
            m = mgr.manifest(STEPS + 1)
            reused = {k for k, t in m.tensors.items() for c in t.chunks if m.files[c.file].checkpoint is not None}
            assert reused == {REPLICATED} and m.bases == (layout.step_dir_name(STEPS),), (reused, m.bases)
            assert all(verify_checkpoint(mgr.path(s)).ok for s in mgr.steps())


def assert_only_what_kept_steps_read(root: Path, kept: list[int], retired: list[int]) -> None:
    """The root holds the kept steps, committed, and the retired ones that a kept step reads:
    of those, exactly the data files kept steps read. Every file a kept step reads exists."""
    needed: dict[str, set[str]] = {}
    for s in kept:
        m = read_manifest(open_storage(str(root / layout.step_dir_name(s))))
        for name, record in m.files.items():
            needed.setdefault(record.checkpoint or layout.step_dir_name(s), set()).add(name)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == sorted(layout.step_dir_name(s) for s in kept + retired), (root.name, folders)
    for name in folders:
        files = {f"{layout.DATA_DIR}/{f.name}" for f in (root / name / layout.DATA_DIR).iterdir()}
        assert needed.get(name, set()) <= files, (root.name, name)
        if layout.parse_step_dir(name) in retired:
            assert not (root / name / layout.MANIFEST_NAME).exists(), (root.name, name)
            assert (root / name / layout.REFERENCED_NAME).exists(), (root.name, name)
            assert files == needed[name], (root.name, name, sorted(files - needed[name]))


def test_incremental_manager_on_4_ranks_then_resharded_loads_on_3(tmp_path: Path) -> None:
    roots = {name: str(tmp_path / name) for name in SETUPS}
    run_ranks(_train_on_4, 4, roots)
    for name, root in roots.items():
        assert_only_what_kept_steps_read(Path(root), KEPT[name], RETIRED[name])
    # Each root's newest step (the keep_last=1 ones read their retired base's files), and an
    # older kept step whose base retention retired.
    loads = [(roots[name], KEPT[name][-1]) for name in SETUPS] + [(roots["every3_async"], 6)]
    run_ranks(_load_on_3, 3, loads, roots["last2_full3"])
    # Step 9 (saved on 3 ranks) read only step 8; step 8 still reads step 7's frozen tensors.
    assert_only_what_kept_steps_read(Path(roots["last2_full3"]), [STEPS, STEPS + 1], [STEPS - 1])
