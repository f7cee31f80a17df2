"""Storage: every backend and how it fails.

The conformance suite on LocalStorage, ``memory://`` and ``s3://`` (moto's server on
loopback, ``support/s3server.py``; S3 tests skip, saying why, without moto), injected S3
faults and permanent errors, racing and interrupted saves, files that are not what they
claim (FIFOs, symlinks, EIO), and full disks (injected ENOSPC, and a real tmpfs where
mounting is allowed).
"""
