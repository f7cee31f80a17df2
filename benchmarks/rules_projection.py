"""What format 3 (docs/format.md section 12, DRAFT) would make of a save: the manifest with
sharding rules instead of chunk lists and the compact file table, the pages of the rank
table, and the per-rank index records that take the block hashes and file sizes. Projected,
not written by saves: nothing here touches the writer, but the manifest is the real
``manifest_v3_to_json`` of the records and is parsed with the real ``parse_manifest_v3``.

planning_scale.py calls :func:`project` on the manifest its simulated save built (the same
chunks, files and byte offsets as version 1), and :func:`synthetic_tensors` to project a
full model at rank counts where the version-1 pipeline would not fit in time or memory.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from shardckpt.format import file_table, layout, manifest, manifest_v3_parser, rank_index, rules
from shardckpt.format import manifest_v3 as mv3

HEADER_BYTES = 4096  # data section start of a synthetic data file, as planning_scale's
FAKE_HASH = "f" * 16


@dataclass(frozen=True)
class Stored:
    """One chunk as a writer lays it out."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    byte_offset: int
    byte_length: int


@dataclass
class Projection:
    manifest_v3: int = 0  # bytes of the sealed v3 manifest
    manifest_v1: int = 0  # bytes of the v1 manifest of the same chunks (synthetic_tensors only)
    index_bytes: dict[int, int] = field(default_factory=dict)  # per rank: its index record
    page_bytes: list[int] = field(default_factory=list)  # per page of the rank table
    file_table: int = 0  # bytes of the manifest's file_table line
    rules: int = 0
    listed_tensors: int = 0
    runs: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "manifest_v3": self.manifest_v3,
            "file_table_v3": self.file_table,
            "index_total_v3": sum(self.index_bytes.values()),
            "index_max_rank_v3": max(self.index_bytes.values(), default=0),
            "pages_total_v3": sum(self.page_bytes),
            "page_max_v3": max(self.page_bytes, default=0),
            # what a loading rank that reads its own rank's files fetches: manifest, its page, its index record
            "load_metadata_max_rank_v3": self.manifest_v3
            + max(self.page_bytes, default=0)
            + max(self.index_bytes.values(), default=0),
            "rules": self.rules,
            "listed_tensors": self.listed_tensors,
            "runs": self.runs,
        }


def index_entry_bytes(byte_offset: int, byte_length: int, block_bytes: int) -> int:
    """Bytes of ``[byte_offset,byte_length,"<hashes>"]`` in an index record (section 12.4)."""
    hashes = 16 * max(0, -(-byte_length // block_bytes))
    return len(str(byte_offset)) + len(str(byte_length)) + hashes + 6


def rank_index_bytes(save_id: str, rank: int, block_bytes: int, files: list[tuple[int, int, int]]) -> int:
    """Bytes of a rank's index record whose files are ``(size, entry bytes, entries)``:
    ``rank_index.rank_index_to_json`` without building it (checked against it by test_rules)."""
    out = len(rank_index.rank_index_to_json(save_id, rank, block_bytes, []))
    for size, entry_bytes, entries in files:
        out += len(f'{{"size":{size},"hash":"{FAKE_HASH}","entries":[]}}') + entry_bytes + max(0, entries - 1)
    return out + max(0, len(files) - 1)


def project(
    tensors: Iterable[tuple[str, str, tuple[int, ...], list[Stored]]],
    files: dict[str, tuple[int, int]],
    rest: dict[str, Any],
    block_bytes: int,
    *,
    with_v1: bool = False,
    index_block_bytes: int | None = None,
    inline_file: str | None = None,
) -> Projection:
    """The v3 manifest, rank pages and index records of ``tensors`` (key, dtype, shape,
    chunks) stored in ``files`` (name -> (size, rank)); ``rest``: the manifest's other fields
    (values, paths, process_layout, ...). With ``with_v1``, also the v1 manifest's size,
    summed per tensor line so that no full v1 document is held. ``index_block_bytes``: the
    hash block of the index records (default ``block_bytes``; a format-3 save's is 1 MiB).
    ``inline_file``: the data file whose index the manifest copies (``inline_index``,
    format.md 12.8: :func:`coordinator_file`), or None for a manifest without the copy."""
    out = Projection()
    index_block = index_block_bytes or block_bytes
    ranks = rest["world_size"]
    save_id = next(iter(files)).split("/")[1].split("-r")[0] if files else "0"
    by_rank: dict[int, list[str]] = {}
    for name in sorted(files):  # within a rank, k is zero-padded: name order is number order
        by_rank.setdefault(files[name][1], []).append(name)
    position = {n: p for p, n in enumerate(n for r in range(ranks) for n in by_rank.get(r, []))}
    entries: dict[str, list[int]] = {n: [0, 0] for n in files}  # bytes, count
    tensor_recs, v1_lines, compress_s = {}, 0, 0.0
    inline: list[rank_index.IndexEntry] = []
    for key, dtype, shape, chunks in tensors:
        for c in chunks:
            e = entries[c.file]
            e[0], e[1] = e[0] + index_entry_bytes(c.byte_offset, c.byte_length, index_block), e[1] + 1
            if c.file == inline_file and c.byte_length:
                inline.append(_fake_entry(c, index_block))
        t0 = time.perf_counter()  # the coordinator's work: positions and compress, not the simulation
        positioned = [rules.Chunk(c.offsets, c.sizes, position[c.file], c.byte_offset) for c in chunks]
        rule, _ = rules.compress(shape, positioned)
        compress_s += time.perf_counter() - t0
        listed = [c for c in chunks if rule is None or math.prod(c.sizes) == 0]
        if rule is None:
            out.listed_tensors += 1
        else:
            out.rules, out.runs = out.rules + 1, out.runs + len(rule.runs)
        recs = tuple(mv3.Chunk(c.offsets, c.sizes, position[c.file], c.byte_offset, c.byte_length) for c in listed)
        tensor_recs[key] = mv3.Tensor(dtype, shape, rule, recs)
        if with_v1:
            v1_lines += _v1_line_bytes(key, dtype, shape, chunks, block_bytes)
    out.seconds["compress_v3"] = compress_s
    for r in range(ranks):
        mine = [(files[n][0], *entries[n]) for n in by_rank.get(r, [])]
        out.index_bytes[r] = rank_index_bytes(save_id, r, index_block, mine)
    hosts = rest["process_layout"]
    pages = []
    for first in range(0, ranks, file_table.DEFAULT_RANKS_PER_PAGE):
        page = [
            file_table.RankEntry(out.index_bytes[r], FAKE_HASH, hosts[r]["host"], hosts[r]["local_rank"])
            for r in range(first, min(ranks, first + file_table.DEFAULT_RANKS_PER_PAGE))
        ]
        out.page_bytes.append(len(file_table.page_to_json(save_id, first, page)))
        pages.append(file_table.Page(out.page_bytes[-1], FAKE_HASH))
    counts = [len(by_rank.get(r, [])) for r in range(ranks)]
    runs = [(len(list(g)), k) for k, g in itertools.groupby(counts)]
    group = file_table.FileGroup(save_id, None, ranks, tuple(runs), file_table.DEFAULT_RANKS_PER_PAGE, tuple(pages))
    table = file_table.FileTable((group,))
    out.file_table = len(json.dumps(file_table.file_table_to_json(table), separators=(",", ":")))
    m = mv3.ManifestV3(
        world_size=ranks,
        hash_block_bytes=index_block,
        bases=(),
        file_table=table,
        tensors=tensor_recs,
        values=rest["values"],
        paths=rest["paths"],
        created_at=rest["created_at"],
        shardckpt_version=rest["shardckpt_version"],
        torch_version=rest["torch_version"],
        metadata=rest.get("metadata", {}),
        inline_index=None
        if inline_file is None
        else mv3.InlineIndex(position[inline_file], _fake_index(files[inline_file][0], inline)),
    )
    raw = mv3.manifest_v3_to_json(m)
    out.manifest_v3 = len(raw)
    t0 = time.perf_counter()
    manifest_v3_parser.parse_manifest_v3(raw, source="projected")  # what every loading rank does with the manifest
    out.seconds["parse_v3"] = time.perf_counter() - t0
    if with_v1:
        v1_files = {n: {"size": s, "hash": FAKE_HASH, "rank": r} for n, (s, r) in sorted(files.items())}
        empty = _document(rest, block_bytes, {}, v1_files)
        # "tensors": {} becomes "{\n" + the lines joined by ",\n" + "\n }": 3 bytes more, plus the lines
        out.manifest_v1 = len(empty) + v1_lines + 2 * max(0, len(tensor_recs) - 1) + 3
    return out


def _fake_entry(c: Stored, block_bytes: int) -> rank_index.IndexEntry:
    return rank_index.IndexEntry(c.byte_offset, c.byte_length, FAKE_HASH * -(-c.byte_length // block_bytes))


def _fake_index(size: int, entries: list[rank_index.IndexEntry]) -> rank_index.FileIndex:
    return rank_index.FileIndex(size, FAKE_HASH, tuple(sorted(entries, key=lambda e: e.byte_offset)))


def _v1_line_bytes(key: str, dtype: str, shape: tuple[int, ...], chunks: list[Stored], block_bytes: int) -> int:
    """Bytes of the tensor's line in a v1 manifest, counted without building it (at 16384
    ranks there are millions of chunk records); ``test_rules_projection`` checks the count
    against json.dumps."""
    head = len(f"  {json.dumps(key)}: ") + len(
        json.dumps({"dtype": dtype, "shape": list(shape), "chunks": []}, separators=(",", ":"))
    )
    return head + sum(_v1_chunk_bytes(c, block_bytes) for c in chunks) + max(0, len(chunks) - 1)


def _v1_chunk_bytes(c: Stored, block_bytes: int) -> int:
    """``{"offsets":[..],"sizes":[..],"file":"..","byte_offset":..,"byte_length":..,"block_hashes":[..]}``"""
    hashes = max(1, -(-c.byte_length // block_bytes))  # planning_scale's synthetic results hash empty chunks once
    numbers = ",".join(map(str, (*c.offsets, *c.sizes, c.byte_offset, c.byte_length)))
    d = len(c.offsets)
    commas = 2 * d + 1 - max(0, 2 * d - 2)  # in numbers but not in the record: between the fields
    return 83 + len(numbers) - commas + len(c.file) + 19 * hashes - 1


def _document(rest: dict[str, Any], block_bytes: int, tensors: Any, files: Any) -> bytes:
    """A version-1 manifest around ``tensors`` and ``files``."""
    doc = {
        "format": manifest.FORMAT_NAME,
        "format_version": 1,
        **{k: rest[k] for k in ("shardckpt_version", "torch_version", "created_at", "world_size", "process_layout")},
        "hash_algorithm": manifest.HASH_ALGORITHM,
        "hash_block_bytes": block_bytes,
        "tensors": tensors,
        "values": rest["values"],
        "files": files,
        "paths": rest["paths"],
        "metadata": rest.get("metadata", {}),
    }
    return manifest.seal(manifest._dumps_two_levels(doc).encode())


# ------------------------------------------------------------------ a full model, synthetically


def split_sizes(sizes: list[int], n: int) -> list[list[int]]:
    """Item indices per bucket, as engine.datawrite.split_by_bytes splits a rank's items:
    largest first (stable), each to the lightest bucket, empty buckets dropped."""
    buckets: list[list[int]] = [[] for _ in range(min(n, len(sizes)))]
    load = [0] * len(buckets)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        k = load.index(min(load))
        buckets[k].append(i)
        load[k] += sizes[i]
    return [b for b in buckets if b]


def synthetic_tensors(
    keys: list[tuple[str, tuple[int, ...]]], steps: list[str], ranks: int, threads: int, save_id: str
) -> tuple[Iterator[tuple[str, str, tuple[int, ...], list[Stored]]], dict[str, tuple[int, int]]]:
    """FSDP ``Shard(0)`` of every key over ``ranks`` (torch.chunk rows, F32), each rank's
    items split over ``threads`` files as the writer splits them, then one replicated 0-d
    ``steps`` tensor per name, on the coordinator as a format-3 save places them
    (:func:`_place_steps`): in a last data file of rank 0's own (:func:`coordinator_file`,
    whose index the manifest copies, format.md 12.8).
    Ranks with the same rows of every first dimension share one layout, so this costs
    O(keys x ranks) time but O(ranks) memory per key."""
    firsts = sorted({shape[0] for _, shape in keys})
    signature = [tuple(_rows(n, r, ranks) for n in firsts) for r in range(ranks)]
    plans: dict[tuple[int, ...], tuple[list[tuple[int, int]], list[int]]] = {}
    for sig in set(signature):
        rows = dict(zip(firsts, sig, strict=True))
        sizes = [rows[s[0]] * math.prod(s[1:]) * 4 for _, s in keys]
        place, load = [(-1, 0)] * len(keys), []
        live = [i for i, x in enumerate(sizes) if x]
        for k, bucket in enumerate(split_sizes([sizes[i] for i in live], threads)):
            at = HEADER_BYTES
            for j in bucket:
                place[live[j]] = (k, at)
                at += sizes[live[j]]
            load.append(at)
        plans[sig] = (place, load)
    step_place, loads = _place_steps(steps, ranks, [plans[s][1] for s in signature])
    names = [[layout.data_file_name(save_id, r, k) for k in range(len(loads[r]))] for r in range(ranks)]
    files = {names[r][k]: (size, r) for r in range(ranks) for k, size in enumerate(loads[r])}

    def tensors() -> Iterator[tuple[str, str, tuple[int, ...], list[Stored]]]:
        for i, (key, shape) in enumerate(keys):
            chunks = []
            for r in range(ranks):
                rows = _rows(shape[0], r, ranks)
                if rows:
                    k, at = plans[signature[r]][0][i]
                    sizes = (rows, *shape[1:])
                    offsets = (-(-shape[0] // ranks) * r, *[0] * (len(shape) - 1))
                    chunks.append(Stored(offsets, sizes, names[r][k], at, math.prod(sizes) * 4))
            yield key, "F32", shape, chunks
        for name, (r, k, at) in zip(steps, step_place, strict=True):
            yield name, "F32", (), [Stored((), (), names[r][k], at, 4)]

    return tensors(), files


def _rows(n: int, rank: int, ranks: int) -> int:
    per = -(-n // ranks)
    return max(0, min(per, n - rank * per))


def _place_steps(
    steps: list[str], ranks: int, loads: list[list[int]]
) -> tuple[list[tuple[int, int, int]], list[list[int]]]:
    """(rank, file, byte offset) of each step; the files' final sizes per rank. As a
    format-3 save places and writes them (engine.placement.balance_replicated with ``small_to``
    the coordinator, then engine.rank_result.split_inline): every 4-byte step on rank 0 while
    within SMALL_REPLICATED_BUDGET_BYTES, in a new last file of rank 0's (when rank 0 also
    holds sharded items; else in its one file); any beyond the budget round-robin over the
    ranks (standing for the balanced placement), each in its rank's lightest file."""
    from shardckpt.engine.placement import SMALL_REPLICATED_BUDGET_BYTES

    loads = [list(x) for x in loads]
    out = []
    on_coordinator = SMALL_REPLICATED_BUDGET_BYTES // 4
    inline = len(loads[0]) if steps else -1  # the coordinator's file of small tensors
    for j, _ in enumerate(steps):
        r = 0 if j < on_coordinator else j % ranks
        if not loads[r] or (r == 0 and len(loads[0]) == inline):
            loads[r].append(HEADER_BYTES)  # a new file: rank 0's small one, or a rank's one file
        k = len(loads[0]) - 1 if r == 0 else loads[r].index(min(loads[r]))
        out.append((r, k, loads[r][k]))
        loads[r][k] += 4
    return out, loads


def coordinator_file(files: dict[str, tuple[int, int]]) -> str:
    """Rank 0's last data file of a :func:`synthetic_tensors` layout with steps: the file of
    the coordinator's small tensors, whose index a format-3 manifest copies (12.8)."""
    return max(n for n, (_, r) in files.items() if r == 0)


# ------------------------------------------------------------------ the writer's own path


def rank_results(
    tensors: Iterable[tuple[str, str, tuple[int, ...], list[Stored]]],
    files: dict[str, tuple[int, int]],
    ranks: int,
    dims: int = 2,
    index_sizes: dict[int, int] | None = None,
    inline_file: str | None = None,
) -> list[Any]:
    """What every rank of that save reports to the coordinator under format 3
    (``engine.rank_result.RankResult``: one row per chunk, its data files' sizes, its index
    record's size and hash, host): the input of the coordinator's ``write_v3.assemble``;
    rank 0's carries the index of ``inline_file`` (its last, the small tensors') when given.
    Simulated (not timed): O(chunks) Python steps."""
    import array

    from shardckpt.engine import rank_result

    number = {name: int(name.rsplit("-", 1)[1].split(".")[0]) for name in files}
    sizes: list[dict[int, int]] = [{} for _ in range(ranks)]
    for name, (size, r) in files.items():
        sizes[r][number[name]] = size
    rows = [array.array("q") for _ in range(ranks)]
    keys: list[list[str]] = [[] for _ in range(ranks)]
    inline: list[rank_index.IndexEntry] = []
    for key, _, shape, chunks in tensors:
        pad = dims - len(shape)
        for c in chunks:
            if c.file == inline_file and c.byte_length:
                inline.append(_fake_entry(c, 1 << 20))
            r = files[c.file][1]
            held = keys[r]
            if not held or held[-1] != key:
                held.append(key)
            rows[r].extend((len(held) - 1, number[c.file], c.byte_offset, *c.offsets, *(0,) * pad, *c.sizes))
            rows[r].extend((1,) * pad)
    shared: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple per distinct key list, as ranks would send
    out = []
    for r in range(ranks):
        held_keys = shared.setdefault(tuple(keys[r]), tuple(keys[r]))
        entry = file_table.RankEntry((index_sizes or {}).get(r, 30_000), FAKE_HASH, f"node{r // 8:04d}", r % 8)
        file_sizes = tuple(sizes[r][k] for k in range(len(sizes[r])))
        copy = _fake_index(files[inline_file][0], inline) if r == 0 and inline_file is not None else None
        out.append(rank_result.RankResult(r, entry, file_sizes, held_keys, 3 + 2 * dims, rows[r].tobytes(), copy))
        rows[r] = array.array("q")
    return out
