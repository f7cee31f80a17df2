"""Local data-file writes that bypass the page cache (``O_DIRECT``), for
``IOOptions(direct_writes=True)`` (issue #18).

A buffered write copies every byte into the page cache, and the save's fsync then waits
for the kernel's writeback of those dirty pages, which competes with the ranks for the
CPU: on the 2-core VM of docs/benchmarks.md, 4 ranks writing 256 MiB each took 5-10 s
buffered and 0.7-1.1 s through ``O_DIRECT`` while other jobs ran. Here each write goes
through an aligned buffer straight to the device; the file's last piece is padded to the
alignment, then the file is cut to its real size. The bytes on disk are the same.
"""

from __future__ import annotations

import errno
import mmap
import os

ALIGN = 4096
"""Offsets, lengths and buffer addresses of every direct write are multiples of this
(the largest logical block size of common disks; a 512-byte disk accepts it too)."""
STAGE_BYTES = 8 * 2**20
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; absent on macOS: every write is buffered there


class DirectWriteStream:
    """A :class:`~shardckpt.storage.base.WriteStream` into the new file ``path``. The file is
    created exclusively by a plain descriptor, then opened a second time with ``O_DIRECT``;
    a filesystem that refuses it (EINVAL: tmpfs before Linux 6.6, some network mounts) gets
    the plain descriptor's buffered writes instead. One writer thread; not thread-safe."""

    def __init__(self, path: str, stage_bytes: int = STAGE_BYTES) -> None:
        if stage_bytes <= 0 or stage_bytes % ALIGN:
            raise ValueError(f"stage_bytes must be a positive multiple of {ALIGN}, got {stage_bytes}")
        self._path = path
        self._buf: mmap.mmap | None = None
        self._direct: int | None = None
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            if _O_DIRECT:
                self._direct = os.open(path, os.O_WRONLY | os.O_CLOEXEC | _O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                self.abort()
                raise
        self.direct = self._direct is not None
        """Whether the bytes bypass the page cache (False: the filesystem refused O_DIRECT)."""
        self._buf = mmap.mmap(-1, stage_bytes) if self.direct else None  # page-aligned
        self._used = 0
        self._pos = 0  # where the buffer's first byte goes in the file

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        try:
            if self._buf is None:
                assert self._fd is not None, "written after finish or abort"
                while view:
                    view = view[os.write(self._fd, view) :]
                return
            cap = len(self._buf)
            while view:
                k = min(len(view), cap - self._used)
                self._buf[self._used : self._used + k] = view[:k]
                self._used += k
                view = view[k:]
                if self._used == cap:
                    self._flush(cap)
        except OSError as e:
            e.filename = e.filename or self._path
            raise

    def _flush(self, length: int) -> None:
        """Write the buffer's first ``length`` bytes (a multiple of ALIGN) at ``_pos``. An
        unaligned rest after a short direct write goes through the plain descriptor; so does
        everything once a direct write is refused (EINVAL: a device whose blocks are larger
        than ALIGN, a filesystem that accepted the open only)."""
        assert self._buf is not None and self._fd is not None
        with memoryview(self._buf) as whole:
            done = 0
            while done < length:
                piece = whole[done:length]
                fd = self._fd if self._direct is None or done % ALIGN else self._direct
                try:
                    n = os.pwrite(fd, piece, self._pos + done)
                except OSError as e:
                    if fd != self._direct or e.errno != errno.EINVAL:
                        raise
                    os.close(self._direct)
                    self._direct, self.direct = None, False
                    continue
                if n <= 0:
                    raise OSError(errno.EIO, f"pwrite wrote {n} bytes", self._path)
                done += n
        self._pos += done
        self._used = 0

    def finish(self) -> None:
        """The last piece padded to ALIGN and written, the file cut to its size, fsynced."""
        assert self._fd is not None, "finished after finish or abort"
        try:
            if self._buf is not None and self._used:
                size = self._pos + self._used
                padded = -(-self._used // ALIGN) * ALIGN
                self._buf[self._used : padded] = bytes(padded - self._used)
                self._flush(padded)
                os.ftruncate(self._fd, size)
                self._pos = size
            os.fsync(self._fd)
        except OSError as e:
            e.filename = e.filename or self._path
            raise
        finally:
            self._close()

    def abort(self) -> None:
        self._close()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass

    def _close(self) -> None:
        for fd in (self._direct, self._fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._direct = self._fd = None
        if self._buf is not None:
            self._buf.close()
            self._buf = None
