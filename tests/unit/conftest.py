"""Unit tests: one process, no server, seconds per file.

The on-disk format (golden bytes in ``golden/``), parsers under hostile input, planner,
engine, async saves, manager, CLI, audit, conversion, the package's import layering and
its private-torch boundary. Where a feature itself involves ranks (a sharded fixture, an
error that must reach every rank) a case starts 2 gloo ranks through ``run_ranks``.
"""
