"""save(format_version=3) over 2 gloo ranks (docs/format.md section 12): a DTensor Shard(0),
a replicated tensor and an irregular layout (a ShardedTensor with hand-chosen boxes), read
back with the format module alone (the loader of format 3 is built elsewhere)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from distributed import run_ranks
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard as LocalShard
from torch.distributed._shard.sharded_tensor import init_from_local_shards
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from v3files import assemble, read_v3

import shardckpt
from shardckpt.format import rules

WEIGHT = torch.arange(9 * 6, dtype=torch.float32).reshape(9, 6)  # 9 rows over 2 ranks: 5 + 4
BIAS = torch.linspace(-1, 1, 6)
ODD = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4) * 0.5  # rows 0-1 on rank 0, 2-4 on rank 1
ODD_ROWS = ((0, 2), (2, 3))


def _save(rank: int, world: int, path: str) -> None:
    mesh = init_device_mesh("cpu", (world,))
    first, count = ODD_ROWS[rank]
    local = [LocalShard(ODD[first : first + count].clone(), ShardMetadata([first, 0], [count, 4], f"rank:{rank}/cpu"))]
    state = {
        "model": {
            "w": distribute_tensor(WEIGHT, mesh, [Shard(0)]),
            "b": BIAS.clone(),  # the same on both ranks: stored once
            "odd": init_from_local_shards(local, [5, 4], process_group=dist.group.WORLD),
        },
        "step": 3,
    }
    shardckpt.save(state, path, format_version=3)


def test_a_2_rank_format_3_save_has_rules_pages_and_index_records(tmp_path):
    path = str(tmp_path / "ckpt")
    run_ranks(_save, 2, path)
    m, chunks = read_v3(path)  # page, both index records, file and block hashes: all checked
    (group,) = m.file_table.groups
    assert m.world_size == 2 and group.ranks == 2 and len(group.pages) == 1 and m.values == {"step": 3}
    w, b, odd = (m.tensors[f"model.{k}"] for k in ("w", "b", "odd"))
    assert w.rule is not None and w.rule.block == (5, 6) and w.chunks == ()
    assert [c.rank for c in chunks["model.w"]] == [0, 1]  # Shard(0): cell r on rank r
    assert b.rule is not None and b.rule.block == (6,) and len(rules.expand(b.rule)) == 1
    assert odd.rule is None and sorted((c.offsets, c.sizes) for c in odd.chunks) == [((0, 0), (2, 4)), ((2, 0), (3, 4))]
    assert {c.offsets: c.rank for c in chunks["model.odd"]} == {(0, 0): 0, (2, 0): 1}
    for key, want in (("model.w", WEIGHT), ("model.b", BIAS), ("model.odd", ODD)):
        assert torch.equal(assemble(chunks[key], tuple(want.shape), want.dtype), want), key
