"""Reading and replacing files the daemon does not own: never block, never follow a planted link.

Every file ctwatchd reads from outside /proc and /sys (its configuration, the state file, modprobe.d,
modules.dep, modules.builtin, the kernel config) goes through read_regular(): a FIFO or a device where
such a file belongs fails at once with a sentence naming it, instead of blocking the daemon (and its
watchdog) forever. Every file it writes outside /proc/sys (state file, metrics) goes through
replace_atomically(): a fresh temporary name opened O_EXCL|O_NOFOLLOW, then rename().
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path


class FileProblem(OSError):
    """A file exists but is not something ctwatchd will read: the message says why, naming it."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} {reason}")
        self.name = name
        self.reason = reason  # "is not a regular file (a FIFO)"


def read_regular(path: Path | str, limit: int, *, follow: bool = True) -> tuple[bytes, os.stat_result]:
    """The whole content of a regular file (at most `limit` bytes) and its fstat.

    Raises FileNotFoundError when it is absent, FileProblem when it is not a regular file or larger
    than `limit`, other OSError as the kernel says. The type is checked before opening (opening a
    device can have effects) and again on the descriptor (the name may have changed in between);
    O_NONBLOCK makes even a FIFO swapped in at the last moment open and read at once. With
    follow=False a symlink is refused (ELOOP), for files only ctwatchd itself writes.
    """
    name = os.fspath(path)
    if "\0" in name:
        raise FileProblem(repr(name), "contains a NUL character")
    before = os.stat(name) if follow else os.lstat(name)
    if stat.S_ISLNK(before.st_mode):
        raise FileProblem(name, "is a symbolic link")
    if not stat.S_ISREG(before.st_mode):
        raise FileProblem(name, f"is not a regular file ({_kind(before.st_mode)})")
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | (0 if follow else os.O_NOFOLLOW))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileProblem(name, f"is not a regular file ({_kind(st.st_mode)})")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileProblem(name, f"is larger than {limit} bytes")
        return b"".join(chunks), st
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return word
    return "not a plain file"


def replace_atomically(path: Path, data: bytes, mode: int, *, fsync: bool = True) -> None:
    """Put `data` at `path` whole or not at all; raises OSError for the caller to report.

    The temporary file gets a random name and is created O_EXCL|O_NOFOLLOW relative to an O_NOFOLLOW
    descriptor of the directory, so a symlink planted in a directory someone else can write (a
    node_exporter textfile directory, say) is never followed; rename() then replaces the name
    itself, a planted link included, never what it points to.
    """
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = f".{path.name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dirfd)
        try:
            try:
                os.fchmod(fd, mode)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path.name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dirfd)
            raise
    finally:
        os.close(dirfd)
