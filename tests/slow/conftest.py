"""Slow: trial loops and soaks, about a minute per file; marked ``slow`` (tests/conftest.py).

SIGKILL at storage events of one process or of ranks, random damage to single- and
multi-rank checkpoints, an S3 soak through a fault proxy, and the benchmarks at their
smallest. CI runs a few trials of each; ``SHARDCKPT_STRESS=1`` runs many more
(docs/reliability.md). Skip them with ``-m "not slow"``.
"""
