"""Which node each rank is on, who keeps whose replica, and moving shard images between ranks.

Node identity is ``$SHARDCKPT_NODE_ID`` when set (tests and demos simulate several nodes on
one host with it), else the host name. A rank's ``k``-th replica goes to the node ``k``
places after its own (nodes in order of their lowest rank), to the rank at the same
position there (modulo that node's size): the ``replicas`` copies of a shard live on
``replicas`` nodes other than its own, so losing any ``replicas`` whole nodes keeps one.

The transfers are point-to-point sends on the tier's own gloo group, posted by every rank
in an order computed from the same inputs on every rank, so no rank waits on a send that
nobody posted.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shardckpt.engine.collective import RankGroup, typed_transport_errors

NODE_ID_ENV = "SHARDCKPT_NODE_ID"


def node_id() -> str:
    """This process's node: ``$SHARDCKPT_NODE_ID``, else the host name."""
    return os.environ.get(NODE_ID_ENV) or socket.gethostname()


@dataclass(frozen=True)
class Topology:
    """The node of every rank of the tier's group (``nodes[r]``)."""

    nodes: tuple[str, ...]

    @functools.cached_property
    def node_order(self) -> list[str]:
        return list(dict.fromkeys(self.nodes))

    @functools.cached_property
    def _ranks_by_node(self) -> dict[str, list[int]]:
        by_node: dict[str, list[int]] = {}
        for r, n in enumerate(self.nodes):
            by_node.setdefault(n, []).append(r)
        return by_node

    @functools.cached_property
    def _positions(self) -> list[int]:
        """Each rank's index among its node's ranks."""
        return [ranks.index(r) for r, ranks in ((r, self._ranks_by_node[n]) for r, n in enumerate(self.nodes))]

    @classmethod
    def gather(cls, group: RankGroup) -> Topology:
        """Collective over ``group``: every rank's :func:`node_id`."""
        mine = node_id()
        if not group.is_distributed:
            return cls((mine,))
        ids: list[str | None] = [None] * group.world_size
        with typed_transport_errors("local tier: sharing node ids"):
            dist.all_gather_object(ids, mine, group=group.group)
        return cls(tuple(str(i) for i in ids))

    def ranks_on(self, node: str) -> list[int]:
        return self._ranks_by_node[node]

    def check(self, replicas: int) -> None:
        """ValueError unless ``replicas`` copies fit on other nodes."""
        count = len(self.node_order)
        if replicas > 0 and count <= replicas:
            raise ValueError(
                f"replicas={replicas} needs at least {replicas + 1} nodes, but all {len(self.nodes)} ranks are on "
                f"{count} node(s) ({', '.join(self.node_order)}, from ${NODE_ID_ENV} or the host name): a copy "
                f"on the same node does not survive that node. Use replicas={count - 1} or run on more nodes "
                f"(set ${NODE_ID_ENV} per simulated node to test on one host)."
            )

    def partner(self, rank: int, k: int) -> int:
        """The rank keeping ``rank``'s ``k``-th replica (``k`` from 1)."""
        order = self.node_order
        there = self.ranks_on(order[(order.index(self.nodes[rank]) + k) % len(order)])
        return there[self._positions[rank] % len(there)]

    def sources(self, rank: int, k: int) -> list[int]:
        """The ranks whose ``k``-th replica ``rank`` keeps, ascending."""
        return [r for r in range(len(self.nodes)) if self.partner(r, k) == rank]


def exchange(
    group: RankGroup, topology: Topology, replicas: int, image: torch.Tensor, digest: int
) -> dict[int, tuple[torch.Tensor, int]]:
    """Collective over ``group`` (a gloo group): send ``image`` to this rank's partners and
    receive the images this rank keeps. Returns {source rank: (image, digest as sent)}.

    Sizes and digests travel first in one all_gather, so receive buffers are exact."""
    sizes = _gather_pairs(group, image.numel(), digest)
    received: dict[int, tuple[torch.Tensor, int]] = {}
    ops: list[tuple[str, torch.Tensor, int, int]] = []
    for k in range(1, replicas + 1):
        ops.append(("send", image, topology.partner(group.rank, k), k))
        for src in topology.sources(group.rank, k):
            buf = torch.empty(sizes[src][0], dtype=torch.uint8)
            received[src] = (buf, sizes[src][1])
            ops.append(("recv", buf, src, k))
    run_p2p(group, ops, "local tier: replicating shards to partner ranks")
    return received


def run_p2p(group: RankGroup, ops: list[tuple[str, torch.Tensor, int, int]], action: str) -> None:
    """Post every (kind, tensor, peer rank in ``group``, tag) at once, then wait for all.
    Both sides of each pair must post it; the order of posting does not matter."""
    works = []
    with typed_transport_errors(action):
        for kind, tensor, peer, tag in ops:
            to = dist.get_global_rank(group.group, peer) if group.group is not None else peer
            if kind == "send":
                works.append(dist.isend(tensor, dst=to, group=group.group, tag=tag))
            else:
                works.append(dist.irecv(tensor, src=to, group=group.group, tag=tag))
        for w in works:
            if w is not None:
                w.wait()


def _gather_pairs(group: RankGroup, a: int, b: int) -> list[tuple[int, int]]:
    mine = torch.tensor([a, b], dtype=torch.int64)
    out = [torch.zeros(2, dtype=torch.int64) for _ in range(group.world_size)]
    with typed_transport_errors("local tier: sharing shard sizes"):
        dist.all_gather(out, mine, group=group.group)
    return [(int(t[0]), int(t[1])) for t in out]


def digest_int(hex_digest: str) -> int:
    """An xxh3-64 hex digest as a signed 64-bit int (it travels in an int64 tensor)."""
    value = int(hex_digest, 16)
    return value - (1 << 64) if value >= 1 << 63 else value


def digest_hex(value: int) -> str:
    return f"{value % (1 << 64):016x}"
