"""Format 3's JSON records (pages of the rank table, index records, the manifest's own
fields): the checks every hostile-input parser of them shares, and the JSON number and
name rules the version 1-2 manifest parser shares with them. Pure, no I/O.

:func:`verified_json` checks a record's size and xxh3-64 against the record that points
to it before its JSON is parsed; the others word a refusal as ManifestError, naming
what was expected, what was found and where.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Callable
from typing import Any, TypeVar

from shardckpt.errors import ManifestError
from shardckpt.format import datafile, integrity

MAX_RECORD_BYTES = 256 * 1024 * 1024  # a page or an index record
HASH = re.compile(r"^[0-9a-f]{16}$")
DIGEST = re.compile(r"^[0-9a-f]{32}$")
SAVE_ID = re.compile(r"^[0-9a-f]{1,32}$")
FOLDER = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
BLOCK_HASHES = re.compile(r"^(?:[0-9a-f]{16})*$")


def verified_json(raw: bytes, expected: Any, source: str, what: str) -> Any:
    """``raw`` parsed, once its size and xxh3-64 match ``expected`` (a ``Page``: size, hash)
    and it is within the JSON limits; ManifestError naming ``source`` otherwise."""
    if len(raw) != expected.size:
        raise ManifestError(
            f"{source}: the {what} has {len(raw)} bytes, the record that points to it says {expected.size}; "
            "it is truncated or was replaced. Load an earlier checkpoint."
        )
    computed = integrity.hash_hex(raw)
    if computed != expected.hash:
        raise ManifestError(
            f"{source}: checksum mismatch of the {what} (expected {expected.hash}, computed {computed}): it was "
            "corrupted or edited after the save. Load an earlier checkpoint."
        )
    problem = datafile.json_limits_problem(raw, max_bytes=MAX_RECORD_BYTES)
    if problem is not None:
        raise ManifestError(f"{source}: the {what} {problem}; shardckpt never writes one, so it is corrupt or hostile")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"{source}: the {what} is not valid JSON ({e})") from e


def check_head(doc: Any, head: dict[str, Any], rest: set[str], source: str) -> None:
    if not isinstance(doc, dict) or set(doc) != set(head) | rest:
        raise ManifestError(f"{source}: expected an object with exactly the fields {sorted(set(head) | rest)}")
    for k, v in head.items():
        if type(doc[k]) is not type(v) or doc[k] != v:
            raise ManifestError(f"{source}: field {k} is {show(doc[k])}, expected {v!r}; the record belongs elsewhere")


def refuse_constant(name: str) -> Any:
    """``json.loads``'s ``parse_constant`` for untrusted text: NaN and Infinity are refused."""
    raise ValueError(f"non-standard JSON constant {name}")


_T = TypeVar("_T")


def parse_document(raw: bytes, source: str, parse: Callable[[Any, str], _T]) -> _T:
    """A manifest's bytes as JSON (:func:`manifest_json`), then :func:`parse_parsed`. The
    caller checks the JSON limits first."""
    return parse_parsed(manifest_json(raw, source), source, parse)


def manifest_json(text: bytes, source: str) -> Any:
    """A manifest's JSON text (the whole document or one of its fields) parsed, NaN,
    Infinity and numbers that overflow a float refused; ManifestError naming ``source``
    for text that is not JSON or nests too deeply for the parser."""
    try:
        return json.loads(text.decode("utf-8"), parse_constant=refuse_constant, parse_float=finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"{source}: manifest is not valid JSON ({e}); the checkpoint is corrupt") from e


def parse_parsed(doc: Any, source: str, parse: Callable[[Any, str], _T]) -> _T:
    """``parse(doc, source)``, a RecursionError worded as a ManifestError naming ``source``."""
    try:
        return parse(doc, source)
    except RecursionError as e:
        raise ManifestError(f"{source}: manifest nests too deeply; the checkpoint is corrupt or hostile") from e


def finite_float(text: str) -> float:
    """``json.loads``'s ``parse_float`` for a manifest: a number that overflows a float is refused."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows a float")
    return value


def check_int(v: Any, where: str, low: int, high: int) -> int:
    if type(v) is not int or not low <= v <= high:
        raise ManifestError(f"{where}: expected an integer in [{low}, {high}], found {show(v)}")
    return v


def show(v: Any) -> str:
    return reprlib.repr(v)
