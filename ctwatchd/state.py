"""The runtime state file: the tuned conntrack snapshot, kept across a crash and restart.

Written atomically (temp file, fsync, rename) with mode 0600. Read back with suspicion: anything that
does not look exactly like what we write is ignored with a warning, never passed on to the kernel.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

VERSION = 1
TUNING_KEY = re.compile(r"^net\.netfilter\.nf_conntrack_[a-z0-9_]{1,64}$")
TUNING_VALUE = re.compile(r"^[0-9 \t-]{1,64}$")  # conntrack tunables are integers (some several)
MAX_BYTES = 64 * 1024


class StateError(Exception):
    """The state file exists but cannot be trusted; the message says why."""


@dataclass(frozen=True)
class SavedState:
    tuning: dict[str, str]
    conntrack_reloaded: bool
    restarts: tuple[float, ...] = ()  # CLOCK_MONOTONIC times of docker/hook runs (system-wide clock)
    status: str = ""  # the daemon's last STATUS= line, for `ctwatchd check`
    conntrack_instance: int | None = None  # so a reload while the daemon was down is noticed
    restarts_owed: bool = False  # docker/hooks still to run after the last reload


def load(path: Path) -> SavedState | None:
    """None when there is no state file; StateError when there is one we must not trust."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot open it: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise StateError("not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise StateError("owned by another user or writable by group or others")
        raw = fh.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise StateError(f"larger than {MAX_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateError(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise StateError(f"not a version {VERSION} ctwatchd state file")
    tuning = data.get("tuning")
    reloaded = data.get("conntrack_reloaded")
    restarts = data.get("restarts", [])
    status = data.get("status", "")
    instance = data.get("conntrack_instance")
    owed = data.get("restarts_owed", False)
    if not isinstance(tuning, dict) or not isinstance(reloaded, bool):
        raise StateError("missing or mistyped 'tuning' / 'conntrack_reloaded'")
    if (not isinstance(restarts, list) or len(restarts) > 1000
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in restarts)):
        raise StateError("'restarts' is not a list of numbers")
    if not isinstance(status, str) or len(status) > 1000:
        raise StateError("'status' is not a short string")
    if instance is not None and (not isinstance(instance, int) or isinstance(instance, bool)):
        raise StateError("'conntrack_instance' is not an integer")
    if not isinstance(owed, bool):
        raise StateError("'restarts_owed' is not true or false")
    for key, value in tuning.items():
        if not (isinstance(key, str) and TUNING_KEY.match(key) and isinstance(value, str)
                and TUNING_VALUE.match(value)):
            raise StateError(f"unexpected tuning entry {key!r}")
    return SavedState(dict(tuning), reloaded, tuple(float(t) for t in restarts), status, instance, owed)


def save(path: Path, state: SavedState) -> None:
    """Replace the state file atomically; raises OSError for the caller to report."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = json.dumps({"version": VERSION, "tuning": state.tuning, "conntrack_reloaded": state.conntrack_reloaded,
                       "restarts": list(state.restarts), "status": state.status,
                       "conntrack_instance": state.conntrack_instance, "restarts_owed": state.restarts_owed},
                      sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
        raise
