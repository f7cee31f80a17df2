"""Non-tensor values as JSON: the tag scheme of format v1 (docs/format.md, section 6.3). Pure.

JSON natives stay as they are; tuples become ``{"$tuple": [...]}``, non-finite floats
``{"$float": "nan"}``, and dicts with a key starting with ``$`` are wrapped as
``{"$dict": {...}}``. Anything else is refused at save with the key and the type.
"""

from __future__ import annotations

import math
from typing import Any

from shardckpt.errors import ManifestError, UnsupportedValueError


def encode_value(value: Any, *, key: str) -> Any:
    """Map a plain Python value to JSON, tagging what JSON cannot say itself.

    Tuples become ``{"$tuple": [...]}``, non-finite floats ``{"$float": "nan"}``, and
    dicts with a key starting with ``$`` are wrapped as ``{"$dict": {...}}``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, list):
        return [encode_value(v, key=key) for v in value]
    if isinstance(value, tuple):
        return {"$tuple": [encode_value(v, key=key) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            bad = next(k for k in value if not isinstance(k, str))
            raise UnsupportedValueError(
                f"key {key!r}: dict key {bad!r} ({type(bad).__name__}) is not a str; "
                "only str-keyed dicts can be saved as values. Convert the keys to str."
            )
        enc = {k: encode_value(v, key=f"{key}.{k}") for k, v in value.items()}
        return {"$dict": enc} if any(k.startswith("$") for k in value) else enc
    hint = "use a dict or list to hold tensors" if _is_tensor(value) else "convert it to int, float, str, bool, None, list, tuple or dict"
    raise UnsupportedValueError(
        f"key {key!r}: value of type {type(value).__module__}.{type(value).__qualname__} "
        f"cannot be saved: non-tensor values are stored as JSON (no pickle); {hint}"
    )


def decode_value(obj: Any, *, where: str = "value") -> Any:
    if isinstance(obj, list):
        return [decode_value(v, where=where) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (tag, inner), = obj.items()
            if tag == "$tuple" and isinstance(inner, list):
                return tuple(decode_value(v, where=where) for v in inner)
            if tag == "$float" and inner in ("nan", "inf", "-inf"):
                return float(inner)
            if tag == "$dict" and isinstance(inner, dict):
                return {k: decode_value(v, where=where) for k, v in inner.items()}
        if any(k.startswith("$") for k in obj):
            raise ManifestError(f"{where}: unknown tagged value {obj!r}")
        return {k: decode_value(v, where=where) for k, v in obj.items()}
    return obj


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)
