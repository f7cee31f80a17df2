"""Small helpers for tests that damage checkpoints on purpose."""

from __future__ import annotations


def chunk_of(manifest: dict, key: str) -> dict:
    """The only chunk of ``key`` in a manifest read as plain JSON."""
    (chunk,) = manifest["tensors"][key]["chunks"]
    return chunk


def flip_byte(path: str, offset: int, mask: int = 0x01) -> None:
    """XOR the byte at ``offset`` of the file at ``path`` with ``mask``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        (b,) = f.read(1)
        f.seek(offset)
        f.write(bytes([b ^ mask]))
