"""A format-3 manifest listed chunk by chunk, as versions 1 and 2 describe a checkpoint.

``materialize`` copies a checkpoint file by file from a manifest that names every chunk's
file, offset and block hashes (format 1 or 2). A format-3 manifest (docs/format.md section
12) describes regular shardings by rule and keeps the checksums in per-rank index records,
so :func:`listed_manifest` expands every rule (O(chunks): the copy reads every byte anyway)
and resolves each chunk through the checksum chain (``engine.load_v3.RuleChunks``: the page,
then the index record of the rank that wrote it, each verified against the record above it).
The result holds the same tensors, values, paths and metadata; its files are the source's
data files, in their own folder or a base's, with the sizes and hashes the index records give.
Not collective; reads on the calling process only.
"""

from __future__ import annotations

from shardckpt.engine.load_v3 import RuleChunks, read_record
from shardckpt.errors import ManifestError
from shardckpt.format import layout
from shardckpt.format.file_table import parse_page
from shardckpt.format.manifest import ChunkRecord, Manifest, TensorRecord
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.storage import Storage

__all__ = ["listed_manifest"]


def listed_manifest(storage: Storage, m: ManifestV3) -> Manifest:
    """``m``, the format-3 manifest of the checkpoint at ``storage``, with every chunk listed
    and every data file it reads recorded (format 1, or 2 where it has bases or digests).
    ManifestError for a missing or damaged page or index record, naming it."""
    where = storage.url
    chain = RuleChunks(storage, m, verify=True, where=where)
    tensors: dict[str, TensorRecord] = {}
    for key, t in m.tensors.items():
        whole = t.chunks_for_box((0,) * len(t.shape), t.shape)  # every stored chunk with an element
        records: list[ChunkRecord] = [chain.chunk(key, c.offsets) for c in whole]
        tensors[key] = TensorRecord(t.dtype, t.shape, tuple(sorted(records, key=lambda c: c.offsets)))
    files = dict(chain.boxes.files.files)
    bases = tuple(b for b in m.bases if any(f.checkpoint == b for f in files.values()))
    return Manifest(
        world_size=m.world_size,
        process_layout=_process_layout(storage, m),
        tensors=tensors,
        values=dict(m.values),
        files=files,
        hash_block_bytes=m.hash_block_bytes,
        created_at=m.created_at,
        shardckpt_version=m.shardckpt_version,
        torch_version=m.torch_version,
        paths=dict(m.paths),
        metadata=dict(m.metadata),
        format_version=2 if bases else 1,
        bases=bases,
    )


def _process_layout(storage: Storage, m: ManifestV3) -> tuple[dict[str, object], ...]:
    """Each rank's host and local rank, from the pages of this checkpoint's own save (format
    3 keeps them there, not in the manifest); none when every byte lives in bases."""
    own = [g for g in m.file_table.groups if g.checkpoint is None]
    if not own:
        return ()
    (group,) = own
    found: list[dict[str, object]] = []
    for p, page in enumerate(group.pages):
        name = layout.rank_page_name(group.save_id, p)
        what = f"page of the rank table of save {group.save_id}"
        raw = read_record(storage, name, page.size, what=what, shown=repr(name), where=storage.url)
        entries = parse_page(raw, group=group, page=p, source=f"{storage.url}: {name!r}")
        first = p * group.ranks_per_page
        found += [{"rank": first + i, "host": e.host, "local_rank": e.local_rank} for i, e in enumerate(entries)]
    if len(found) != m.world_size:
        raise ManifestError(f"{storage.url}: the pages list {len(found)} ranks, world_size is {m.world_size}")
    return tuple(found)
