"""The runtime state file: the tuned conntrack snapshot, kept across a crash and restart.

Written atomically (temp file, fsync, rename) with mode 0600. Read back with suspicion: anything that
does not look exactly like what we write is ignored with a warning, never passed on to the kernel.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ctwatchd.files import FileProblem, read_regular, replace_atomically
from ctwatchd.model import clean

VERSION = 1
TUNING_KEY = re.compile(r"net\.netfilter\.nf_conntrack_[a-z0-9_]{1,64}|module\.nf_conntrack\.[a-z0-9_]{1,64}")
MODULE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,54}")
TUNING_VALUE = re.compile(r"[0-9 \t-]{1,64}")  # conntrack tunables are integers (some several)
BOOT_ID = re.compile(r"[0-9a-f-]{36}")
MAX_BYTES = 64 * 1024
# The schema's limits, for load() and save() alike: save() never writes what load() would refuse.
MAX_RESTARTS = 1000
MAX_STATUS = 1000
MAX_DEPENDENTS = 256
MAX_BASES = 16


class StateError(Exception):
    """The state file exists but cannot be trusted; the message says why."""


@dataclass(frozen=True)
class SavedState:
    tuning: dict[str, str]
    conntrack_reloaded: bool
    restarts: tuple[float, ...] = ()  # CLOCK_MONOTONIC times of docker/hook runs (valid within boot_id)
    status: str = ""  # the daemon's last STATUS= line, for `ctwatchd check`
    conntrack_instance: int | None = None  # so a reload while the daemon was down is noticed
    restarts_owed: bool = False  # docker/hooks still to run after the last reload
    boot_id: str | None = None  # /proc/sys/kernel/random/boot_id when written: monotonic times need it
    pid: int | None = None  # the daemon that wrote it
    written_at: float | None = None  # CLOCK_MONOTONIC when written
    stopped: bool = False  # written by a daemon on its way out
    dependents: dict[str, tuple[str, ...]] = field(default_factory=dict)  # remembered collateral -> its bases
    base_instances: dict[str, int] = field(default_factory=dict)  # watched modules' instances when learned


def load(path: Path) -> SavedState | None:
    """None when there is no state file; StateError when there is one we must not trust."""
    try:
        raw, st = read_regular(path, MAX_BYTES, follow=False)
    except FileNotFoundError:
        return None
    except FileProblem as exc:
        raise StateError(f"it {exc.reason}") from None
    except OSError as exc:
        raise StateError(f"cannot open it: {exc.strerror}") from None
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateError("owned by another user or writable by group or others")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise StateError(f"not valid JSON ({str(exc)[:200]})") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise StateError(f"not a version {VERSION} ctwatchd state file")
    tuning = data.get("tuning")
    reloaded = data.get("conntrack_reloaded")
    restarts = data.get("restarts", [])
    status = data.get("status", "")
    instance = data.get("conntrack_instance")
    owed = data.get("restarts_owed", False)
    boot_id = data.get("boot_id")
    pid = data.get("pid")
    written_at = data.get("written_at")
    stopped = data.get("stopped", False)
    dependents = data.get("dependents", {})
    bases = data.get("base_instances", {})
    if not isinstance(tuning, dict) or not isinstance(reloaded, bool):
        raise StateError("missing or mistyped 'tuning' / 'conntrack_reloaded'")
    if not isinstance(restarts, list) or len(restarts) > MAX_RESTARTS or not all(_time(t) for t in restarts):
        raise StateError("'restarts' is not a list of finite, non-negative numbers")
    if not isinstance(status, str) or len(status) > MAX_STATUS:
        raise StateError("'status' is not a short string")
    if instance is not None and not _int(instance):
        raise StateError("'conntrack_instance' is not an integer")
    if not isinstance(owed, bool) or not isinstance(stopped, bool):
        raise StateError("'restarts_owed' or 'stopped' is not true or false")
    if boot_id is not None and not (isinstance(boot_id, str) and BOOT_ID.fullmatch(boot_id)):
        raise StateError("'boot_id' is not a boot id")
    if pid is not None and not (_int(pid) and 0 < pid < 1 << 32):
        raise StateError("'pid' is not a process id")
    if written_at is not None and not _time(written_at):
        raise StateError("'written_at' is not a finite, non-negative number")
    _check_collateral(dependents, bases)
    for key, value in tuning.items():
        if not _tuning_ok(key, value):
            raise StateError(f"unexpected tuning entry {str(key)[:100]!r}")
    return SavedState(dict(tuning), reloaded, tuple(float(t) for t in restarts), status, instance, owed,
                      boot_id, pid, None if written_at is None else float(written_at), stopped,
                      {k: tuple(v) for k, v in dependents.items()}, dict(bases))


def _check_collateral(dependents: object, bases: object) -> None:
    if (not isinstance(dependents, dict) or len(dependents) > MAX_DEPENDENTS
            or not all(_module(k) and isinstance(v, list) and _bases_ok(v) for k, v in dependents.items())):
        raise StateError("'dependents' is not a table of module names")
    if not isinstance(bases, dict) or not all(_module(k) and _int(v) for k, v in bases.items()):
        raise StateError("'base_instances' is not a table of module instances")


def _module(name: object) -> bool:
    return isinstance(name, str) and MODULE.fullmatch(name) is not None


def _bases_ok(bases: Sequence[object]) -> bool:
    return len(bases) <= MAX_BASES and all(_module(b) for b in bases)


def _tuning_ok(key: object, value: object) -> bool:
    return (isinstance(key, str) and TUNING_KEY.fullmatch(key) is not None and isinstance(value, str)
            and TUNING_VALUE.fullmatch(value) is not None)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < 1 << 63


def _time(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def fit(state: SavedState) -> tuple[SavedState, tuple[str, ...]]:
    """What of `state` load() accepts, and a phrase for each thing left out (empty: nothing).

    A tuning value the kernel gave but that is no conntrack integer (a 1 MB value cut short, an empty
    read from a FIFO in a fake tree), more remembered dependents than the limit, a status too long:
    left out here, said by the caller, so the next start does not ignore the whole file."""
    dropped: list[str] = []
    tuning = {k: v for k, v in state.tuning.items() if _tuning_ok(k, v)}
    if len(tuning) < len(state.tuning):
        bad = sorted(clean(str(k), 80) for k in state.tuning if k not in tuning)
        dropped.append(f"tuning values that are not conntrack integers: {', '.join(bad[:5])}"
                       + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    dependents = {k: tuple(v) for k, v in sorted(state.dependents.items()) if _module(k) and _bases_ok(tuple(v))}
    if len(dependents) > MAX_DEPENDENTS:
        dependents = dict(list(dependents.items())[:MAX_DEPENDENTS])
    if len(dependents) < len(state.dependents):
        dropped.append(f"{len(state.dependents) - len(dependents)} of {len(state.dependents)} remembered "
                       f"dependents (at most {MAX_DEPENDENTS} are kept)")
    bases = {k: v for k, v in state.base_instances.items() if _module(k) and _int(v)}
    restarts = tuple(t for t in state.restarts if _time(t))[-MAX_RESTARTS:]
    status = state.status if len(state.status) <= MAX_STATUS else state.status[:MAX_STATUS - 1] + "…"
    boot_id = state.boot_id if state.boot_id is None or BOOT_ID.fullmatch(state.boot_id) else None
    pid = state.pid if state.pid is None or (_int(state.pid) and 0 < state.pid < 1 << 32) else None
    instance = state.conntrack_instance if state.conntrack_instance is None or _int(state.conntrack_instance) \
        else None
    written = state.written_at if state.written_at is None or _time(state.written_at) else None
    fitted = replace(state, tuning=tuning, dependents=dependents, base_instances=bases, restarts=restarts,
                     status=status, boot_id=boot_id, pid=pid, conntrack_instance=instance, written_at=written)
    return fitted, tuple(dropped)


def encode(state: SavedState) -> bytes:
    return json.dumps({"version": VERSION, "tuning": state.tuning, "conntrack_reloaded": state.conntrack_reloaded,
                       "restarts": list(state.restarts), "status": state.status,
                       "conntrack_instance": state.conntrack_instance, "restarts_owed": state.restarts_owed,
                       "boot_id": state.boot_id, "pid": state.pid, "written_at": state.written_at,
                       "stopped": state.stopped, "dependents": {k: list(v) for k, v in state.dependents.items()},
                       "base_instances": state.base_instances},
                      sort_keys=True).encode()


def save(path: Path, state: SavedState) -> tuple[str, ...]:
    """Replace the state file atomically (mode 0600) with what load() accepts of `state`; returns what
    was left out (see fit()). Raises OSError for the caller to report."""
    fitted, dropped = fit(state)
    data = encode(fitted)
    if len(data) > MAX_BYTES:  # only with hundreds of long names: the dependents go, the rest stays
        fitted = replace(fitted, dependents={}, base_instances={})
        dropped = (*dropped, f"all remembered dependents: the file would exceed {MAX_BYTES} bytes")
        data = encode(fitted)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    replace_atomically(path, data, 0o600)
    return dropped
