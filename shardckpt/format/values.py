"""Non-tensor values as JSON: the tag scheme of format v1 (docs/format.md, section 6.3). Pure.

JSON natives stay as they are; tuples become ``{"$tuple": [...]}``, non-finite floats
``{"$float": "nan"}``, and dicts with a key starting with ``$`` are wrapped as
``{"$dict": {...}}``. Anything else is refused at save with the key and the type.

Both directions apply the same two limits, so save refuses exactly what load would
refuse: at most :data:`MAX_VALUE_DEPTH` nested JSON containers per value, and only
strings that UTF-8 can encode (no lone surrogates such as ``"\\ud800"``).
"""

from __future__ import annotations

import math
from typing import Any

from shardckpt.errors import ManifestError, UnsupportedValueError
from shardckpt.format import datafile

# Nesting depth of one encoded value, counted in JSON containers (a list is one level,
# a tuple two: {"$tuple": [...]}). A value sits two levels deep in manifest.json (the
# document, its "values" object), and readers refuse documents nested deeper than
# datafile.MAX_JSON_DEPTH, so this is the most a value may take. (It is also far below
# Python's recursion limit, so encoding and decoding never hit RecursionError.)
MAX_VALUE_DEPTH = datafile.MAX_JSON_DEPTH - 2


def unencodable_str(text: str) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (manifest.json, safetensors headers), or None.

    Only lone surrogates (U+D800..U+DFFF, e.g. from ``os.fsdecode`` of undecodable bytes)
    fail: Python's json escapes them as ``\\ud800``, which strict JSON readers - safetensors'
    among them - refuse.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"it holds the lone surrogate {text[e.start]!r} at index {e.start}, which UTF-8 cannot encode"
    return None


def check_str(text: str, *, key: str, what: str) -> None:
    """Raise UnsupportedValueError when ``text`` (``what``: e.g. "the key") is not UTF-8-encodable."""
    problem = unencodable_str(text)
    if problem is not None:
        raise UnsupportedValueError(
            f"key {key!r}: {what} {_shorten(text)} cannot be saved: {problem} (checkpoints store "
            "text as UTF-8). Replace or remove the surrogate, e.g. "
            "text.encode('utf-8', 'replace').decode('utf-8')."
        )


def _shorten(text: str, limit: int = 80) -> str:
    shown = repr(text[:limit])
    return shown + f" (and {len(text) - limit} more characters)" if len(text) > limit else shown


def encode_value(value: Any, *, key: str) -> Any:
    """Map a plain Python value to JSON, tagging what JSON cannot say itself.

    Tuples become ``{"$tuple": [...]}``, non-finite floats ``{"$float": "nan"}``, and
    dicts with a key starting with ``$`` are wrapped as ``{"$dict": {...}}``. Raises
    UnsupportedValueError naming ``key`` for anything else, for strings UTF-8 cannot
    encode, and for values nested deeper than :data:`MAX_VALUE_DEPTH` JSON levels.
    """
    return _encode(value, key, 0)


def _encode(value: Any, key: str, depth: int) -> Any:
    """``depth``: JSON containers around ``value``'s encoding (0 at the top)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        check_str(value, key=key, what="the string")
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        _check_depth(depth + 1, key)
        return {"$float": repr(value)}
    if isinstance(value, list):
        _check_depth(depth + 1, key)
        return [_encode(v, key, depth + 1) for v in value]
    if isinstance(value, tuple):
        _check_depth(depth + 2, key)
        return {"$tuple": [_encode(v, key, depth + 2) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            bad = next(k for k in value if not isinstance(k, str))
            raise UnsupportedValueError(
                f"key {key!r}: dict key {bad!r} ({type(bad).__name__}) is not a str; "
                "only str-keyed dicts can be saved as values. Convert the keys to str."
            )
        tagged = any(k.startswith("$") for k in value)
        inner = depth + (2 if tagged else 1)
        _check_depth(inner, key)
        enc = {}
        for k, v in value.items():
            check_str(k, key=key, what="the dict key")
            enc[k] = _encode(v, f"{key}.{k}", inner)
        return {"$dict": enc} if tagged else enc
    hint = (
        "use a dict or list to hold tensors"
        if _is_tensor(value)
        else "convert it to int, float, str, bool, None, list, tuple or dict"
    )
    raise UnsupportedValueError(
        f"key {key!r}: value of type {type(value).__module__}.{type(value).__qualname__} "
        f"cannot be saved: non-tensor values are stored as JSON (no pickle); {hint}"
    )


def _check_depth(depth: int, key: str) -> None:
    if depth > MAX_VALUE_DEPTH:
        raise UnsupportedValueError(
            f"key {key!r}: the value nests deeper than {MAX_VALUE_DEPTH} JSON levels (lists, dicts; a "
            f"tuple counts twice), the most a checkpoint may hold. Flatten it, or store it as a "
            "string (json.dumps) and parse it after loading."
        )


def decode_value(obj: Any, *, where: str = "value") -> Any:
    """The Python value of an encoded value read from a manifest (untrusted).

    Raises ManifestError naming ``where`` for an unknown ``$`` tag and for nesting
    deeper than :data:`MAX_VALUE_DEPTH` (the limit ``encode_value`` applies at save).
    """
    return _decode(obj, where, 0)


def _decode(obj: Any, where: str, depth: int) -> Any:
    """``depth``: JSON containers around ``obj`` (0 at the top), counted as ``_encode`` does."""
    if isinstance(obj, list):
        _check_decoded_depth(depth + 1, where)
        return [_decode(v, where, depth + 1) for v in obj]
    if isinstance(obj, dict):
        _check_decoded_depth(depth + 1, where)
        if len(obj) == 1:
            ((tag, inner),) = obj.items()
            if tag == "$tuple" and isinstance(inner, list):
                _check_decoded_depth(depth + 2, where)
                return tuple(_decode(v, where, depth + 2) for v in inner)
            if tag == "$float" and inner in ("nan", "inf", "-inf"):
                return float(inner)
            if tag == "$dict" and isinstance(inner, dict):
                _check_decoded_depth(depth + 2, where)
                return {k: _decode(v, where, depth + 2) for k, v in inner.items()}
        if any(k.startswith("$") for k in obj):
            raise ManifestError(f"{where}: unknown tagged value {obj!r}")
        return {k: _decode(v, where, depth + 1) for k, v in obj.items()}
    return obj


def _check_decoded_depth(depth: int, where: str) -> None:
    if depth > MAX_VALUE_DEPTH:
        raise ManifestError(
            f"{where}: value nests deeper than {MAX_VALUE_DEPTH} JSON levels, more than shardckpt "
            "ever saves; the manifest is corrupt or hostile"
        )


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)
