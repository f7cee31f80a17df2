"""Per-rank random number streams: captured as uint8 tensors (no pickle), restored exactly,
or re-derived deterministically from ``(seed, step, rank)`` when the world size changed.

Streams: torch CPU, CUDA (when present), numpy's global generator, Python ``random``.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Sequence
from typing import Any

import torch


class RngStreamsRederivedWarning(UserWarning):
    """Per-rank RNG streams were re-derived from (seed, step, rank) instead of restored."""


def derived_seed(seed: int, step: int, rank: int) -> int:
    """The 64-bit seed of ``rank``'s streams when they start (or restart) at ``step``."""
    digest = hashlib.sha256(f"shardckpt.training.rng:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _bytes_tensor(raw: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _pack_python(state: tuple[Any, ...]) -> bytes:
    version, internal, gauss = state
    return struct.pack(f"<II{len(internal)}I?d", version, len(internal), *internal, gauss is not None, gauss or 0.0)


def _unpack_python(raw: bytes) -> tuple[Any, ...]:
    version, n = struct.unpack_from("<II", raw)
    internal = struct.unpack_from(f"<{n}I", raw, 8)
    has_gauss, gauss = struct.unpack_from("<?d", raw, 8 + 4 * n)
    return (version, tuple(internal), gauss if has_gauss else None)


def _pack_numpy(state: tuple[Any, ...]) -> bytes:
    name, key, pos, has_gauss, gauss = state
    if name != "MT19937":
        raise ValueError(f"numpy's global RNG uses {name!r}; only MT19937 (numpy.random's legacy global) is supported")
    key_bytes: bytes = key.astype("<u4").tobytes()
    return struct.pack("<I", len(key)) + key_bytes + struct.pack("<iid", pos, has_gauss, gauss)


def _unpack_numpy(raw: bytes) -> tuple[Any, ...]:
    import numpy as np

    (n,) = struct.unpack_from("<I", raw)
    key = np.frombuffer(raw, dtype="<u4", count=n, offset=4).astype(np.uint32)
    pos, has_gauss, gauss = struct.unpack_from("<iid", raw, 4 + 4 * n)
    return ("MT19937", key, pos, has_gauss, gauss)


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # numpy is optional for torch; without it there is no numpy stream to keep
        return None
    return numpy


def capture_rng() -> dict[str, torch.Tensor]:
    """This process's RNG streams as uint8 tensors (no pickle): torch CPU, CUDA (current
    device, when available), numpy's global RNG (when installed) and Python ``random``."""
    streams = {"torch": torch.get_rng_state().clone(), "python": _bytes_tensor(_pack_python(random.getstate()))}
    np = _numpy()
    if np is not None:
        streams["numpy"] = _bytes_tensor(_pack_numpy(np.random.get_state()))
    if torch.cuda.is_available():
        streams["cuda"] = torch.cuda.get_rng_state().clone()
    return streams


def apply_rng(streams: dict[str, torch.Tensor]) -> None:
    """Set this process's streams from :func:`capture_rng`'s output (missing ones untouched)."""
    if "torch" in streams:
        torch.set_rng_state(streams["torch"].cpu())
    if "python" in streams:
        random.setstate(_unpack_python(streams["python"].numpy().tobytes()))
    np = _numpy()
    if np is not None and "numpy" in streams:
        np.random.set_state(_unpack_numpy(streams["numpy"].numpy().tobytes()))
    if "cuda" in streams and torch.cuda.is_available():
        torch.cuda.set_rng_state(streams["cuda"].cpu())


def reseed_rng(seed: int, step: int, rank: int, which: Sequence[str] = ("torch", "python", "numpy", "cuda")) -> None:
    """Seed the named streams of this process from :func:`derived_seed` ``(seed, step, rank)``."""
    s = derived_seed(seed, step, rank)
    if "torch" in which:
        torch.default_generator.manual_seed(s)
    if "python" in which:
        random.seed(s)
    np = _numpy()
    if np is not None and "numpy" in which:
        np.random.seed(s % 2**32)
    if "cuda" in which and torch.cuda.is_available():
        torch.cuda.manual_seed_all(s)
