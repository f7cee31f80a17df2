"""A manifest file's envelope, checked before its JSON is trusted: the size and nesting
limits every reader enforces (:func:`check_manifest_limits`) and the checksum that seals it
(:func:`seal`, :func:`unseal`). Every format version uses both. Pure, no I/O.
"""

from __future__ import annotations

from shardckpt.errors import ManifestError
from shardckpt.format import datafile, integrity

MAX_MANIFEST_BYTES = 2 * 1024**3


def check_manifest_limits(
    raw: bytes, *, source: str, writing: bool = False, bytes_per_container: int = datafile.JSON_BYTES_PER_CONTAINER
) -> None:
    """Raise ManifestError if ``raw`` exceeds a limit that :func:`parse_manifest` enforces.

    The limits (datafile.json_limits_problem): at most MAX_MANIFEST_BYTES bytes, JSON
    nesting at most datafile.MAX_JSON_DEPTH deep, at most datafile.max_json_containers(
    len(raw), bytes_per_container) arrays and objects (format 3 allows one per 8 bytes).
    Checked on the bytes in linear time and constant memory, before anything is parsed.
    :func:`manifest_to_json` calls it with ``writing=True``, so a save never commits a
    manifest that readers would refuse; the hint then says what to shrink instead of
    calling the file hostile.
    """
    problem = datafile.json_limits_problem(raw, max_bytes=MAX_MANIFEST_BYTES, bytes_per_container=bytes_per_container)
    if problem is None:
        return
    if writing:
        hint = (
            "Readers refuse such manifests, so the save stops before committing it: make the "
            "non-tensor values or the metadata smaller or flatter (store big lists as tensors), "
            "or write fewer chunk records and block hashes (fewer shards, a larger hash_block_bytes)."
        )
    else:
        hint = (
            "shardckpt refuses to write such manifests, so this file is corrupt or hostile; load an earlier checkpoint."
        )
    raise ManifestError(f"{source}: manifest {problem}. {hint}")


_SEAL_MARKER = b',\n "manifest_hash": "'
_SEAL_END = b'"\n}\n'


def seal(document: bytes) -> bytes:
    """Append the manifest's own checksum as its last field, ``"manifest_hash"``.

    The hash is xxh3-64 over every byte of the file before ``,\n "manifest_hash"``, so a
    flipped bit anywhere in the manifest - an inline value, a data-file hash - is caught
    before the JSON is trusted. ``document`` is the JSON text without the field.
    """
    end = _stripped_end(document, len(document))
    if end and document[end - 1] == _CLOSE:
        end = _stripped_end(document, end - 1)
    head = memoryview(document)[:end]  # one copy of the document in all (the join): 9.5 MB for 12k tensors
    return b"".join((head, _SEAL_MARKER, integrity.hash_hex(head).encode(), _SEAL_END))


_CLOSE = ord("}")
_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")  # what bytes.rstrip() strips


def _stripped_end(document: bytes, end: int) -> int:
    """Where ``document[:end].rstrip()`` would end, without copying it."""
    while end and document[end - 1] in _WHITESPACE:
        end -= 1
    return end


def unseal(raw: bytes, *, source: str) -> bytes:
    """Check the ``manifest_hash`` written by :func:`seal`; return the bytes it covers.

    Raises ManifestError naming ``source`` when the field is missing or does not match.
    """
    at = raw.rfind(_SEAL_MARKER)
    digest = raw[at + len(_SEAL_MARKER) : at + len(_SEAL_MARKER) + 16] if at >= 0 else b""
    if at < 0 or raw[at + len(_SEAL_MARKER) + 16 :] != _SEAL_END:
        raise ManifestError(
            f'{source}: the manifest does not end with its checksum field "manifest_hash"; it is '
            "truncated, corrupted, or was not written by shardckpt. Load an earlier checkpoint."
        )
    computed = integrity.hash_hex(raw[:at])
    if computed.encode() != digest:
        raise ManifestError(
            f"{source}: manifest checksum mismatch (manifest_hash {digest.decode(errors='replace')!r}, "
            f"computed {computed!r}): the manifest was corrupted or edited after the save. Load an "
            "earlier checkpoint, or restore manifest.json from a good copy."
        )
    return raw[:at]
