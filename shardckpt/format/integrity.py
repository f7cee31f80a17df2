"""Checksums: xxh3-64 (python-xxhash, releases the GIL) over fixed-size blocks.

Each chunk is hashed in ``block_bytes`` pieces while it is written, so a reader can
verify just the blocks it reads (a resharding load reads part of a chunk). Each data
file also gets one whole-file hash. Swap the algorithm here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import xxhash

from shardckpt.errors import IntegrityError

if TYPE_CHECKING:
    from typing_extensions import Buffer

DEFAULT_BLOCK_BYTES = 8 * 1024 * 1024

Where = str | Callable[[], str]
"""Where the bytes come from, to start an error message: the text, or what makes it (called
only on a mismatch: a reader verifying thousands of small boxes need not format one each)."""


def new_file_hasher() -> xxhash.xxh3_64:
    return xxhash.xxh3_64()


def digest_hex(data: memoryview | bytes) -> str:
    """The digest incremental saves compare chunks by: xxh3-128, 32 lowercase hex digits
    (docs/format.md, section 11). Releases the GIL."""
    return xxhash.xxh3_128_hexdigest(data)


def new_digester() -> xxhash.xxh3_128:
    """A streaming :func:`digest_hex`: update() piece by piece gives the same digest."""
    return xxhash.xxh3_128()


hash_hex: Callable[[Buffer], str] = xxhash.xxh3_64_hexdigest
"""The hash of one checksum block, as lowercase hex (the C function itself: a reader hashes
thousands of small boxes, each one call less; #18)."""


def block_hashes(data: memoryview, block_bytes: int) -> list[str]:
    """Hash of every ``block_bytes`` piece of ``data`` (the last may be shorter)."""
    return [hash_hex(data[i : i + block_bytes]) for i in range(0, len(data), block_bytes)]


def verify_pieces(
    pieces: list[memoryview],
    *,
    first_block: int,
    block_bytes: int,
    expected: tuple[str, ...],
    where: Where,
) -> None:
    """:func:`verify_blocks` of the bytes of ``pieces`` laid end to end, without joining
    them: a block that spans two pieces is hashed by feeding both to one streaming xxh3
    (the same hash as over the joined bytes). Lets a reader read a box straight into its
    destination and the rest of its first and last blocks into small buffers."""
    block, at, hasher = first_block, 0, xxhash.xxh3_64()
    for piece in pieces:
        i = 0
        while i < len(piece):
            take = min(block_bytes - at, len(piece) - i)
            if at == 0 and take == block_bytes:
                got = hash_hex(piece[i : i + take])  # a whole block inside one piece
                _check_block(got, block, block_bytes, expected, where)
                block += 1
            else:
                hasher.update(piece[i : i + take])
                at += take
                if at == block_bytes:
                    _check_block(hasher.hexdigest(), block, block_bytes, expected, where)
                    block, at, hasher = block + 1, 0, xxhash.xxh3_64()
            i += take
    if at:  # the chunk's last block, shorter than block_bytes
        _check_block(hasher.hexdigest(), block, block_bytes, expected, where)


def box_matches(
    data: Buffer | list[memoryview], nbytes: int, first_block: int, block_bytes: int, expected: tuple[str, ...]
) -> bool:
    """Whether :func:`verify_box` of the same arguments passes; for a box within one block
    (thousands of small chunks), one hash and no error text to prepare (#18)."""
    if isinstance(data, list) or nbytes > block_bytes:
        try:
            verify_box(data, nbytes, first_block, block_bytes, expected, "")
        except IntegrityError:
            return False
        return True
    return first_block < len(expected) and hash_hex(data) == expected[first_block]


def first_mismatch(
    pieces: Sequence[Buffer | list[memoryview]],
    nbytes: Sequence[int],
    first_blocks: Sequence[int],
    expected: Sequence[tuple[str, ...]],
    block_bytes: int,
) -> int:
    """The index of the first box that :func:`verify_box` would reject, or -1 when all
    pass: box ``i`` is ``pieces[i]``, ``nbytes[i]`` bytes from block ``first_blocks[i]`` of
    a chunk whose block hashes are ``expected[i]``. One call for a run of thousands of
    small boxes, one hash each that fits in a block, and no error text prepared (#18); the
    caller then calls :func:`verify_box` on the box found, for the message."""
    digest = hash_hex
    for i, data in enumerate(pieces):
        first, want = first_blocks[i], expected[i]
        if nbytes[i] <= block_bytes and not isinstance(data, list):
            if first >= len(want) or digest(data) != want[first]:
                return i
        elif not box_matches(data, nbytes[i], first, block_bytes, want):
            return i
    return -1


def verify_box(
    data: Buffer | list[memoryview],
    nbytes: int,
    first_block: int,
    block_bytes: int,
    expected: tuple[str, ...],
    where: Where,
) -> None:
    """:func:`verify_blocks` of ``data``, ``nbytes`` bytes starting at block ``first_block``
    of its chunk: any C-contiguous buffer (a target tensor's ``numpy()``: one hash of the
    target itself when it is within one block, no byte view to make), or a list of byte views
    laid end to end (:func:`verify_pieces`). The one check a reader makes per box of a
    joined read, so thousands of small boxes cost one call each (#18)."""
    if isinstance(data, list):
        verify_pieces(data, first_block=first_block, block_bytes=block_bytes, expected=expected, where=where)
    elif nbytes <= block_bytes:
        got = hash_hex(data)
        if first_block >= len(expected) or got != expected[first_block]:
            _check_block(got, first_block, block_bytes, expected, where)
    else:
        view = memoryview(data).cast("B")
        verify_blocks(view, first_block=first_block, block_bytes=block_bytes, expected=expected, where=where)


def _check_block(got: str, b: int, block_bytes: int, expected: tuple[str, ...], where: Where) -> None:
    if b >= len(expected) or got != expected[b]:
        want = expected[b] if b < len(expected) else "(none recorded)"
        place = where if isinstance(where, str) else where()
        raise IntegrityError(
            f"{place}: checksum mismatch in block {b} (bytes {b * block_bytes}..): "
            f"expected xxh3 {want}, computed {got}. The data file is corrupt or was "
            "modified after the save; restore it from a good copy or load an earlier checkpoint."
        )


def verify_blocks(
    data: memoryview,
    *,
    first_block: int,
    block_bytes: int,
    expected: tuple[str, ...],
    where: Where,
) -> None:
    """Check ``data`` (which starts at block ``first_block`` of its chunk) against ``expected``."""
    for i in range(0, len(data), block_bytes):
        _check_block(hash_hex(data[i : i + block_bytes]), first_block + i // block_bytes, block_bytes, expected, where)
