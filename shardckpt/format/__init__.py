"""The on-disk format, pure: no I/O, no torch.distributed, no storage.

- :mod:`~shardckpt.format.layout`: every name inside a checkpoint folder and a run root.
- :mod:`~shardckpt.format.manifest`: ``manifest.json`` (parse, validate, seal), JSON Schema beside it; its
  records, envelope (limits, seal) and parser in ``manifest_records``, ``manifest_envelope``, ``manifest_parser``.
- :mod:`~shardckpt.format.datafile`: safetensors data files (header build and parse).
- :mod:`~shardckpt.format.integrity`: xxh3-64 block checksums and manifest hashes.
- :mod:`~shardckpt.format.values`: JSON encoding of non-tensor values (no pickle).
- format 3 (written by ``save(..., format_version=3)``, not yet loaded): :mod:`~shardckpt.format.rules` (sharding
  rules), :mod:`~shardckpt.format.file_table` (data files by rule, rank pages, index records),
  :mod:`~shardckpt.format.manifest_v3` (the whole manifest).

docs/format.md specifies what these modules implement.
"""
