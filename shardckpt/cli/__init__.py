"""The ``shardckpt`` command (also ``python -m shardckpt``): a thin front over the rooms
below it. :func:`main` takes argv and returns the exit status."""

from __future__ import annotations

from shardckpt.cli.app import main

__all__ = ["main"]
