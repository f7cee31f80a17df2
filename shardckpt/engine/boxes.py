"""Reading a box out of a saved chunk: the one read-and-verify path for tensor bytes.

A chunk is stored row-major and contiguous in its data file; the box a reader wants
(``dest``'s shape, starting at ``start`` in chunk coordinates) lies inside the byte range
from its first to its last element. :meth:`BoxReader.read_box` reads that range (rounded
out to whole checksum blocks when verifying), checks those blocks against the hashes the
manifest recorded at save time, and copies the box into ``dest``. When the range is
exactly the box and ``dest`` can take the raw bytes, it reads straight into ``dest``.

Used by the DCP load path (:class:`shardckpt.engine.reader.Reader`) and by every reader
that needs no process group (:class:`shardckpt.convert.source.CheckpointSource`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from shardckpt.errors import IntegrityError
from shardckpt.format import datafile, integrity
from shardckpt.format.manifest import ChunkRecord, FileRecord, Manifest
from shardckpt.format.manifest_v3 import ManifestV3
from shardckpt.storage import Storage
from shardckpt.storage.base import WriteBuffer, byte_view
from shardckpt.storage.datafiles import DataFiles


class BoxReader:
    """Verified reads of boxes out of the chunks of one committed checkpoint.

    ``where`` starts every error message (the checkpoint's location, and the rank where
    it matters). ``verify``: check every byte read against the manifest's block hashes.
    :meth:`read_box` may be called from several threads at once; :meth:`check_file_sizes`
    from one thread only. ``files``: the data files the chunks name (a format-3 load passes
    those of its chunks, from their index records, a mapping that grows as it resolves
    chunks in more files, all in this checkpoint or the ``bases`` beside it); the manifest's
    ``files`` by default.
    """

    def __init__(
        self,
        storage: Storage,
        manifest: Manifest | ManifestV3,
        *,
        verify: bool,
        where: str,
        files: Mapping[str, FileRecord] | None = None,
        bases: Sequence[str] = (),
    ) -> None:
        self.storage = storage
        if files is None:
            assert isinstance(manifest, Manifest), "a format-3 manifest lists no files: pass them"
            files = manifest.files
        self.files = DataFiles(storage, files, bases)  # own folder, or a base beside it (format 2 and 3)
        self.manifest = manifest
        self.verify = verify
        self.where = where
        self._sizes_checked: set[str] = set()
        self._strides: dict[tuple[int, ...], tuple[int, ...]] = {}  # a chunk's sizes -> its strides (any thread)
        # (sizes, dtype, byte length) of a chunk -> the Span of the whole chunk (any thread)
        self._whole_spans: dict[tuple[tuple[int, ...], str, int], Span] = {}

    in_place_min_bytes = 1 << 20
    """A box that is one run of its chunk but not whole checksum blocks is read in place
    (:meth:`_read_around`, three reads) from this size on; a smaller one is staged with
    its blocks in one read (a copy of at most a few blocks costs less than two more reads)."""

    def check_file_sizes(self, names: Iterable[str]) -> None:
        """Raise IntegrityError if a data file in ``names`` is missing or not the size the
        manifest records (so a truncated file is named before any chunk read runs into it).
        Each file is looked up once per BoxReader."""
        for name in sorted(set(names) - self._sizes_checked):
            expected = self.files.files[name].size
            try:
                found = self.files.size(name)
            except FileNotFoundError as e:
                raise IntegrityError(
                    f"{self.where}: data file {self.files.describe(name)} listed in the manifest is missing; "
                    + self.files.missing_hint(name)
                ) from e
            if found != expected:
                raise IntegrityError(
                    f"{self.where}: data file {self.files.describe(name)} is {found} bytes, the manifest says "
                    f"{expected}; it was truncated or replaced, restore it or load an earlier checkpoint"
                )
            self._sizes_checked.add(name)

    def span(self, key: str, chunk: ChunkRecord, start: Sequence[int], lengths: Sequence[int]) -> Span:
        """The bytes of ``chunk`` that a box (``lengths`` elements per dimension from
        ``start``, chunk coordinates) takes, rounded out to whole checksum blocks when
        verifying. The box must not be empty."""
        dtype_name = self.manifest.tensors[key].dtype
        whole = lengths == chunk.sizes and not any(start)  # the whole chunk (a same-layout load, #18)
        if whole:  # thousands of chunks have a few shapes: one Span each
            found = self._whole_spans.get((chunk.sizes, dtype_name, chunk.byte_length))
            if found is not None:
                return found
        dtype = datafile.torch_dtype(dtype_name, where=key)
        isz = dtype.itemsize
        strides = self._strides.get(chunk.sizes)
        if strides is None:
            strides = self._strides[chunk.sizes] = _contiguous_strides(chunk.sizes)
        if whole:  # no sums
            lengths = chunk.sizes  # a tuple already
            first, last = 0, (strides[0] * lengths[0] if lengths else 1) - 1
        else:
            lengths = tuple(lengths)
            first = sum(o * s for o, s in zip(start, strides, strict=True))
            last = sum((o + n - 1) * s for o, n, s in zip(start, lengths, strides, strict=True))
        lo, hi = first * isz, (last + 1) * isz
        if self.verify:
            block = self.manifest.hash_block_bytes
            lo, hi = lo // block * block, min(chunk.byte_length, -(-hi // block) * block)
        found = Span(lo, hi, first, last, lengths, strides, dtype)
        if whole:
            self._whole_spans[chunk.sizes, dtype_name, chunk.byte_length] = found
        return found

    def read_box(self, key: str, chunk: ChunkRecord, start: Sequence[int], dest: torch.Tensor) -> int:
        """Fill ``dest`` with the box of ``chunk`` (a chunk of tensor ``key``) that begins at
        ``start`` (chunk coordinates) and has ``dest``'s shape. ``dest`` may have another
        dtype or device than the saved tensor (the bytes are copied in, converted).

        Returns the bytes read from storage. Raises IntegrityError, naming the file, key and
        block, when the file ends early or a checksum block differs.
        """
        if dest.numel() == 0:
            return 0
        s = self.span(key, chunk, start, dest.shape)
        isz = s.dtype.itemsize
        run = s.last - s.first + 1 == dest.numel()  # the box is one run of the chunk's bytes
        in_place = run and dest.is_contiguous() and dest.device.type == "cpu" and dest.dtype == s.dtype
        exact = s.lo == s.first * isz and s.hi == (s.last + 1) * isz
        if in_place and not exact and dest.numel() * isz >= self.in_place_min_bytes:
            return self._read_around(key, chunk, s, dest)
        direct = in_place and exact
        buf = dest.reshape(-1).view(torch.uint8) if direct else torch.empty(s.hi - s.lo, dtype=torch.uint8)
        try:
            self.files.read_into(chunk.file, chunk.byte_offset + s.lo, memoryview(buf.numpy()))  # type: ignore[arg-type]
        except EOFError as e:
            raise IntegrityError(f"{self._where(key, chunk)}: {e}") from e
        self._check_and_copy(key, chunk, s, buf, None if direct else dest)
        return s.hi - s.lo

    def _read_around(self, key: str, chunk: ChunkRecord, s: Span, dest: torch.Tensor) -> int:
        """:meth:`read_box` of a box that is one run of the chunk's bytes but not whole
        checksum blocks (a resharded load, verifying): the box is read straight into
        ``dest`` and only the rest of its first and last blocks into small buffers, then
        the blocks are verified across the three (no staging buffer of the box's size to
        allocate, fault in and copy out of)."""
        isz = s.dtype.itemsize
        head = memoryview(bytearray(s.first * isz - s.lo))
        body = memoryview(dest.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
        tail = memoryview(bytearray(s.hi - (s.last + 1) * isz))
        at = chunk.byte_offset + s.lo
        try:
            for piece in (head, body, tail):
                if len(piece):
                    self.files.read_into(chunk.file, at, piece)
                at += len(piece)
        except EOFError as e:
            raise IntegrityError(f"{self._where(key, chunk)}: {e}") from e
        block = self.manifest.hash_block_bytes
        integrity.verify_pieces(
            [head, body, tail],
            first_block=s.lo // block,
            block_bytes=block,
            expected=chunk.block_hashes,
            where=self._where(key, chunk),
        )
        return s.hi - s.lo

    def read_run(self, boxes: Sequence[RunBox], dests: Sequence[torch.Tensor]) -> int:
        """Fill each box of ``boxes`` into its target in ``dests`` with one read: their spans (:meth:`span`) lie back to
        back, in this order, in one data file (thousands of small chunks then cost one
        open and one read per file region, not one each; issue #18). A box whose ``dest`` can
        take the saved bytes as they are (:func:`_target_bytes`) is read straight into it,
        the rest of its first and last checksum blocks into small buffers beside it, by one
        vectored read (:meth:`~shardckpt.storage.Storage.read_into_many`: no staging buffer
        to fault in and copy out of); any other box (a cast, a strided target) into a staging
        buffer, then converted into ``dest``. Then each box is verified, in order, as
        :meth:`read_box` would: on a mismatch, targets of this run may hold unverified bytes.
        Returns the bytes read from storage."""
        first, last = boxes[0], boxes[-1]
        begin = first.chunk.byte_offset + first.span.lo
        reads = _RunReads(begin, last.chunk.byte_offset + last.span.hi - begin)
        pieces = [reads.add(b, d) for b, d in zip(boxes, dests, strict=True)]  # per box: the bytes read for it
        try:
            self.files.read_into_many(first.chunk.file, begin, reads.views)
        except EOFError as e:
            keys = f"keys {first.key!r} .. {last.key!r} ({len(boxes)} chunks read together)"
            raise IntegrityError(f"{self.where}: file {self.files.describe(first.chunk.file)}, {keys}: {e}") from e
        if self.verify:
            self._verify_run(boxes, pieces)
        for b, dest, at in reads.staged:
            _copy_staged(reads.staging, at, b.span, dest)
        return reads.size

    def _verify_run(self, boxes: Sequence[RunBox], pieces: Sequence[WriteBuffer | list[memoryview]]) -> None:
        """Check the bytes read for each box (``pieces``, as :meth:`read_run` read them)
        against the manifest's block hashes; raise IntegrityError naming the file, key and
        block of the first box that differs. One call into :mod:`~shardckpt.format.integrity`
        for the run (#18)."""
        block = self.manifest.hash_block_bytes
        spans = [b.span for b in boxes]
        nbytes = [s.hi - s.lo for s in spans]
        first_blocks = [s.lo // block for s in spans]
        expected = [b.chunk.block_hashes for b in boxes]
        bad = integrity.first_mismatch(pieces, nbytes, first_blocks, expected, block)  # type: ignore[arg-type]
        if bad >= 0:  # the error text, formatted on a mismatch only
            b = boxes[bad]
            where = self._where(b.key, b.chunk)
            integrity.verify_box(pieces[bad], nbytes[bad], first_blocks[bad], block, expected[bad], where)  # type: ignore[arg-type]
            raise AssertionError(f"{where}: integrity.first_mismatch and verify_box disagree")  # never reached

    def _check_and_copy(
        self, key: str, chunk: ChunkRecord, s: Span, buf: torch.Tensor, dest: torch.Tensor | None
    ) -> None:
        """Verify ``buf`` (bytes ``s.lo`` to ``s.hi`` of ``chunk``) against the manifest's
        block hashes, then copy the box into ``dest`` (None: the bytes were read in place)."""
        if self.verify:
            self._verify(key, chunk, s, memoryview(buf.numpy()))  # type: ignore[arg-type]
        if dest is not None:
            _copy_box(buf, s, dest)

    def _verify(self, key: str, chunk: ChunkRecord, s: Span, data: memoryview) -> None:
        """Check ``data`` (bytes ``s.lo`` to ``s.hi`` of ``chunk``) against the manifest's
        block hashes, when verifying."""
        if self.verify:
            block = self.manifest.hash_block_bytes
            integrity.verify_blocks(
                data,
                first_block=s.lo // block,
                block_bytes=block,
                expected=chunk.block_hashes,
                where=lambda: self._where(key, chunk),  # formatted on a mismatch only (#18)
            )

    def _where(self, key: str, chunk: ChunkRecord) -> str:
        return f"{self.where}: file {self.files.describe(chunk.file)}, key {key!r}, chunk at {list(chunk.offsets)}"


class Span(NamedTuple):
    """What :meth:`BoxReader.span` finds: bytes ``lo`` to ``hi`` of the chunk hold the box,
    whose elements ``first`` to ``last`` (row-major in the chunk, ``strides``) are read as
    ``dtype`` into a box of ``lengths``."""

    lo: int
    hi: int
    first: int
    last: int
    lengths: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype


class RunBox(NamedTuple):
    """One box of :meth:`BoxReader.read_run`: tensor ``key``'s ``chunk`` and the ``span`` of
    it to read."""

    key: str
    chunk: ChunkRecord
    span: Span


class _RunReads:
    """The buffers one :meth:`BoxReader.read_run` fills with its one read, from byte
    ``begin`` of a data file, ``size`` bytes: ``views`` in file order; ``staged``: the boxes
    read into ``staging`` (the run's bytes, allocated at the first such box) at each offset."""

    def __init__(self, begin: int, size: int) -> None:
        self.begin, self.size = begin, size
        self.views: list[WriteBuffer] = []
        self.staged: list[tuple[RunBox, torch.Tensor, int]] = []
        self.staging = torch.empty(0, dtype=torch.uint8)
        self._staging_bytes = self.staging.numpy()

    def add(self, b: RunBox, dest: torch.Tensor) -> WriteBuffer | list[memoryview]:
        """Add box ``b`` of target ``dest`` (the next in file order); returns where its bytes go: its target's
        bytes, or those with the rest of its first and last checksum blocks (a list of
        pieces), or its staging slice."""
        s = b.span
        body = _target_bytes(s, dest)
        if body is None:
            if not self.staged:
                self.staging = torch.empty(self.size, dtype=torch.uint8)
                self._staging_bytes = self.staging.numpy()
            at = b.chunk.byte_offset + s.lo - self.begin
            self.staged.append((b, dest, at))
            body = self._staging_bytes[at : at + s.hi - s.lo]
            self.views.append(body)
            return body
        isz = s.dtype.itemsize
        head, tail = s.first * isz - s.lo, s.hi - (s.last + 1) * isz
        if not (head or tail):
            self.views.append(body)
            return body
        pieces = [memoryview(bytearray(head)), byte_view(body), memoryview(bytearray(tail))]
        self.views.extend(pieces)
        return pieces


def _copy_staged(staging: torch.Tensor, at: int, s: Span, dest: torch.Tensor) -> None:
    """Copy the box ``s``, staged at byte ``at`` of ``staging``, into ``dest``."""
    box = staging[at : at + s.hi - s.lo]
    if at % s.dtype.itemsize:  # a tensor's view needs its bytes aligned to its dtype
        box = box.clone()
    _copy_box(box, s, dest)


def _target_bytes(s: Span, dest: torch.Tensor) -> np.ndarray | None:
    """``dest`` as a writable array over its bytes, when the box ``s`` is one run of its
    chunk and ``dest`` a contiguous CPU tensor of the saved dtype (not requiring grad): the
    saved bytes can then be read straight into it. None otherwise (a cast, a strided or
    non-CPU target, a box of several runs)."""
    if (
        dest.dtype != s.dtype
        or not dest.is_cpu
        or dest.requires_grad
        or not dest.is_contiguous()
        or s.last - s.first + 1 != dest.numel()
    ):
        return None
    return dest.numpy() if s.dtype in _BYTE_COPY_DTYPES else dest.reshape(-1).view(torch.uint8).numpy()


_BYTE_COPY_DTYPES = frozenset(
    (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
)
"""Dtypes whose tensors ``Tensor.numpy()`` exposes as they are (not bf16, float8, complex)."""


def _copy_box(buf: torch.Tensor, s: Span, dest: torch.Tensor) -> None:
    """Copy the box ``s`` out of ``buf`` (bytes ``s.lo`` to ``s.hi`` of its chunk, aligned
    to the dtype) into ``dest``, converting dtype and device as ``copy_`` does."""
    isz = s.dtype.itemsize
    saved = buf.view(s.dtype)  # buf may be a slice of a joined read: offsets are from its start
    dest.copy_(saved.as_strided(s.lengths, s.strides, saved.storage_offset() + (s.first * isz - s.lo) // isz))


def _contiguous_strides(sizes: Sequence[int]) -> tuple[int, ...]:
    """Element strides of a row-major (C-contiguous) array of shape ``sizes``."""
    strides, acc = [], 1
    for s in reversed(sizes):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))
