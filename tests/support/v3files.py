"""Reading a format-3 checkpoint with the format module alone (no loader): the tests of the
writer check every byte through the chain of docs/format.md section 12.3 with it.

``read_v3(path)`` parses the manifest, every page and every index record, checks each data
file's size and whole-file hash against its index record, and returns each tensor's stored
chunks with their bytes, each verified against its block hashes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from shardckpt.format import datafile, file_table, integrity, layout, manifest_v3_parser, rank_index, rules
from shardckpt.format import manifest_v3 as mv3


@dataclass(frozen=True)
class StoredChunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    rank: int
    data: torch.Tensor  # the chunk as stored, shape ``sizes``
    folder: str | None = None  # the base folder holding it; None: the checkpoint's own


def read_v3(path: str) -> tuple[mv3.ManifestV3, dict[str, list[StoredChunk]]]:
    """Also an incremental checkpoint: a base group's pages, index records and data files
    are read in the base's folder beside ``path`` (format.md 12.3)."""
    with open(os.path.join(path, layout.MANIFEST_NAME), "rb") as f:
        m = manifest_v3_parser.parse_manifest_v3(f.read(), source=path)
    indexes: dict[tuple[int, int], tuple[rank_index.FileIndex, ...]] = {}
    files: dict[tuple[int, str], bytes] = {}
    for g, group in enumerate(m.file_table.groups):
        folder = path if group.checkpoint is None else os.path.join(os.path.dirname(path), group.checkpoint)
        for p in range(len(group.pages)):
            with open(os.path.join(folder, layout.rank_page_name(group.save_id, p)), "rb") as f:
                entries = file_table.parse_page(f.read(), group=group, page=p, source=f"page {p}")
            for i, entry in enumerate(entries):
                rank = p * group.ranks_per_page + i
                with open(os.path.join(folder, layout.rank_index_name(group.save_id, rank)), "rb") as f:
                    indexes[(g, rank)] = rank_index.parse_rank_index(
                        f.read(), entry=entry, group=group, rank=rank, block_bytes=m.hash_block_bytes, source=f"r{rank}"
                    )
                for k, index in enumerate(indexes[(g, rank)]):
                    name = layout.data_file_name(group.save_id, rank, k)
                    with open(os.path.join(folder, name), "rb") as f:
                        files[(g, name)] = f.read()
                    raw = files[(g, name)]
                    assert len(raw) == index.size and integrity.hash_hex(raw) == index.hash, name
    out: dict[str, list[StoredChunk]] = {}
    for key, t in m.tensors.items():
        listed = [(c.offsets, c.sizes, c.file, c.byte_offset) for c in t.chunks]
        ruled = [] if t.rule is None else [(c.offsets, c.sizes, c.file, c.byte_offset) for c in rules.expand(t.rule)]
        out[key] = [_chunk(m, files, indexes, t.dtype, *c) for c in [*ruled, *listed] if math.prod(c[1]) > 0]
    return m, out


def _chunk(m, files, indexes, dtype, offsets, sizes, position, byte_offset) -> StoredChunk:  # type: ignore[no-untyped-def]
    ref = m.file_table.locate(position)
    length = math.prod(sizes) * datafile.itemsize(dtype)
    entry = indexes[(ref.group, ref.rank)][ref.number].entry(byte_offset, length, where=f"{ref.name}@{byte_offset}")
    raw = files[(ref.group, ref.name)][byte_offset : byte_offset + length]
    block = m.hash_block_bytes
    hashes = [integrity.hash_hex(raw[i : i + block]) for i in range(0, len(raw), block)]
    assert "".join(hashes) == entry.block_hashes, f"block hashes of {ref.name}@{byte_offset}"
    if entry.digest is not None:
        assert integrity.digest_hex(memoryview(raw)) == entry.digest, f"digest of {ref.name}@{byte_offset}"
    data = torch.frombuffer(bytearray(raw), dtype=datafile.torch_dtype(dtype, where=ref.name)).reshape(sizes)
    return StoredChunk(tuple(offsets), tuple(sizes), ref.rank, data, ref.checkpoint)


def assemble(chunks: list[StoredChunk], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The whole tensor from its stored chunks (each element written exactly once)."""
    out = torch.zeros(shape, dtype=dtype)
    seen = torch.zeros(shape, dtype=torch.int64)
    for c in chunks:
        box = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))
        out[box] = c.data
        seen[box] += 1
    assert bool((seen == 1).all()), "the chunks do not tile the tensor"
    return out
