"""DirectWriteStream (issue #18): O_DIRECT writes through an aligned buffer give the same
file as plain writes, whatever the pieces; a filesystem that refuses O_DIRECT gets plain
writes; the file is created exclusively and removed on abort; errors name the file."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from shardckpt.storage import direct
from shardckpt.storage.direct import ALIGN, DirectWriteStream


def _write(path: Path, pieces: list[bytes], stage_bytes: int = 2 * ALIGN) -> DirectWriteStream:
    stream = DirectWriteStream(str(path), stage_bytes=stage_bytes)
    for p in pieces:
        stream.write(memoryview(p))
    stream.finish()
    return stream


@pytest.mark.parametrize(
    "sizes",
    [
        [],  # an empty file
        [1],
        [ALIGN],  # exactly one aligned block
        [2 * ALIGN],  # exactly the buffer
        [2 * ALIGN + 1],  # one byte past it
        [3, 5000, 7, 8192, 1, 12289],  # pieces across buffer boundaries
        [5 * ALIGN + 17],  # one piece larger than the buffer
        [1] * 9000,  # many tiny pieces
    ],
)
def test_the_file_holds_exactly_the_bytes_written(tmp_path: Path, sizes: list[int]) -> None:
    pieces = [os.urandom(n) for n in sizes]
    path = tmp_path / "f.bin"
    stream = _write(path, pieces)
    assert path.read_bytes() == b"".join(pieces)
    assert os.path.getsize(path) == sum(sizes)
    assert stream.direct == _accepts_o_direct(tmp_path)


def _needs_o_direct(folder: Path) -> None:
    if not _accepts_o_direct(folder):
        pytest.skip(f"{folder}'s filesystem refuses O_DIRECT: every write is plain there")


def _accepts_o_direct(folder: Path) -> bool:
    """Whether ``folder``'s filesystem opens files with O_DIRECT (ext4 and xfs do; tmpfs
    before Linux 6.6 does not)."""
    if not direct._O_DIRECT:
        return False
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | direct._O_DIRECT, 0o644))
    except OSError:
        return False
    finally:
        (folder / "probe").unlink(missing_ok=True)
    return True


def _o_direct_open_fails(monkeypatch: Any, code: int) -> None:
    """Every open with O_DIRECT fails with ``code`` (other opens work)."""
    real_open = os.open

    def failing(path: str, flags: int, *args: Any) -> int:
        if flags & direct._O_DIRECT:
            raise OSError(code, os.strerror(code))
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct, "_O_DIRECT", direct._O_DIRECT or 0x4000)
    monkeypatch.setattr(os, "open", failing)


def test_a_filesystem_that_refuses_o_direct_gets_plain_writes(tmp_path: Path, monkeypatch: Any) -> None:
    _o_direct_open_fails(monkeypatch, errno.EINVAL)
    data = os.urandom(3 * ALIGN + 5)
    stream = _write(tmp_path / "f.bin", [data[:7], data[7:]])
    assert not stream.direct and (tmp_path / "f.bin").read_bytes() == data


def test_another_open_error_removes_the_file_it_created(tmp_path: Path, monkeypatch: Any) -> None:
    _o_direct_open_fails(monkeypatch, errno.EACCES)
    with pytest.raises(PermissionError):
        DirectWriteStream(str(tmp_path / "f.bin"))
    assert not (tmp_path / "f.bin").exists()


def test_an_existing_file_is_never_opened_for_writing(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"the user's")
    with pytest.raises(FileExistsError):
        DirectWriteStream(str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == b"the user's"


def test_abort_removes_the_partial_file(tmp_path: Path) -> None:
    stream = DirectWriteStream(str(tmp_path / "f.bin"), stage_bytes=ALIGN)
    stream.write(os.urandom(3 * ALIGN))
    stream.abort()
    assert not (tmp_path / "f.bin").exists()


def test_a_short_direct_write_is_finished_by_plain_writes(tmp_path: Path, monkeypatch: Any) -> None:
    """pwrite may write less than asked: an unaligned rest goes through the plain descriptor."""
    _needs_o_direct(tmp_path)
    real_pwrite = os.pwrite
    calls: list[int] = []

    def short(fd: int, data: Any, offset: int) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return _partial(data, offset)
        return real_pwrite(fd, data, offset)

    def _partial(data: Any, offset: int) -> int:
        # What a device could do: 1.5 blocks land (written here through a plain descriptor).
        plain = os.open(str(tmp_path / "f.bin"), os.O_WRONLY)
        try:
            return real_pwrite(plain, memoryview(data)[: ALIGN + ALIGN // 2], offset)
        finally:
            os.close(plain)

    monkeypatch.setattr(os, "pwrite", short)
    data = os.urandom(4 * ALIGN + 3)
    _write(tmp_path / "f.bin", [data], stage_bytes=2 * ALIGN)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert calls[:2] == [2 * ALIGN, ALIGN // 2]  # the rest of the first buffer, unaligned


def test_a_direct_write_refused_mid_file_goes_on_with_plain_writes(tmp_path: Path, monkeypatch: Any) -> None:
    """A filesystem may accept the O_DIRECT open and refuse the write (EINVAL): the file is
    still written whole, through the plain descriptor."""
    _needs_o_direct(tmp_path)
    real_pwrite = os.pwrite
    calls = [0]

    def refusing_second(fd: int, data: Any, offset: int) -> int:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refusing_second)
    data = os.urandom(7 * ALIGN + 123)
    stream = _write(tmp_path / "f.bin", [data], stage_bytes=2 * ALIGN)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert not stream.direct


def test_an_fsync_error_names_the_file(tmp_path: Path, monkeypatch: Any) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    stream = DirectWriteStream(str(tmp_path / "f.bin"))
    stream.write(b"x" * 10)
    with pytest.raises(OSError) as e:
        stream.finish()
    assert e.value.filename == str(tmp_path / "f.bin")


def test_the_buffer_must_be_aligned() -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        DirectWriteStream("/nonexistent/never-created", stage_bytes=ALIGN + 1)
