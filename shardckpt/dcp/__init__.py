"""A drop-in ``StorageWriter``/``StorageReader`` for ``torch.distributed.checkpoint`` (DCP).

::

    import torch.distributed.checkpoint as dcp
    from shardckpt.dcp import StorageReader, StorageWriter

    dcp.save(state, storage_writer=StorageWriter("runs/exp1/step_100"))
    dcp.load(state, storage_reader=StorageReader("runs/exp1/step_100"))

What they write is a normal shardckpt checkpoint (``shardckpt.load``, the CLI,
``CheckpointManager`` and the converters read it), and they read what ``shardckpt.save``
wrote. Imported only when the user imports it: ``import shardckpt`` does not load it.
"""

from __future__ import annotations

from shardckpt.dcp.reader import StorageReader
from shardckpt.dcp.writer import StorageWriter

__all__ = ["StorageReader", "StorageWriter"]
