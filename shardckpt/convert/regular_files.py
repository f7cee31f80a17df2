"""The source files of an import: regular files only.

Every file an import opens itself (safetensors files, the HF index,
the first bytes read to detect a format) is checked with ``os.stat`` to be a regular
file, then opened with ``O_NONBLOCK`` and checked again with ``fstat`` on the opened
descriptor, so what is read is what was checked: a FIFO in a file's place would block
the import forever, a device (``/dev/zero``) would never end, and both are refused with
a StorageError naming the file. Symlinks are followed wherever they point, because the
user names the source and Hugging Face caches are made of them (a snapshot folder's
files link into ``../../blobs/``); the target must be a regular file, and an error
about a linked file names the link and its target. The contents stay hostile input,
so a link to an unrelated host file is refused by the header checks, and nothing of
it is echoed. ``torch.load`` and DCP open their files by path themselves: those are
checked by ``os.stat`` first (every file of a DCP folder), which catches a file
planted before the import, not one swapped during it.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

from shardckpt.errors import StorageError


def check_regular(path: str) -> os.stat_result:
    """``os.stat(path)`` (symlinks followed) if it is a regular file; StorageError naming
    it (and a link's target) if it is a FIFO, a device, a socket or a folder.
    FileNotFoundError, PermissionError... pass through as raised."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st)
    return st


def open_regular(path: str) -> BinaryIO:
    """``path`` opened for reading, provided it is a regular file (see the module docstring).

    Checked twice: ``os.stat`` before opening, so that opening a device has no side
    effect; ``fstat`` on the descriptor opened with ``O_NONBLOCK``, so that a FIFO
    swapped in between cannot block the open and cannot be read. O_NONBLOCK changes
    nothing for a regular file."""
    check_regular(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_folder_files(folder: str) -> None:
    """Every file under ``folder`` (file links followed) is a regular file. Sub-folders
    are entered, symlinked ones are not: DCP reads the files its metadata names, which
    FileSystemWriter puts at the top level."""
    for parent, _dirs, files in os.walk(folder, onerror=_raise):
        for name in files:
            check_regular(os.path.join(parent, name))


def _raise(e: OSError) -> None:
    raise e


def _not_regular(path: str, st: os.stat_result) -> StorageError:
    mode = st.st_mode
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a folder"
        if stat.S_ISDIR(mode)
        else "a character device"
        if stat.S_ISCHR(mode)
        else "a block device"
        if stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a special file"
    )
    return StorageError(
        f"{display_path(path)}: is {kind}, not a regular file; import reads regular files only (a FIFO or a device "
        "would block it or never end). Replace it with the file it stands for, or remove it from the source."
    )


def display_path(path: str) -> str:
    """``path``, and where it leads when a symlink on the way changes it."""
    real = os.path.realpath(path)
    return path if real == os.path.abspath(path) else f"{path} (a symlink to {real})"
