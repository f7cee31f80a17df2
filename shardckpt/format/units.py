"""Sizes as people read them. Pure; used by the manifest's repr, the CLI and the converters."""

from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(n: int) -> str:
    """``512`` -> ``"512 B"``, ``3 * 2**30`` -> ``"3.0 GiB"``: one decimal, binary units."""
    size, unit = float(n), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, larger
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
