"""`ctwatchd protect`: an unload guard in modprobe.d, instead of the runbook's `install … /bin/true`.

`install nf_conntrack /bin/true` stops *loading* (and so stops ctwatchd's repair); what RHEL's
`service iptables stop` and clean-up scripts do is `modprobe -r`, which runs a module's `remove`
command instead of unloading it. So the guard is one `remove <module> /bin/false` line per watched
module: `modprobe -r` fails and the module stays. `rmmod` reads no modprobe.d and is not stopped by
it; the daemon repairs that case. firewalld is such a case: its clean-up (CleanupModulesOnExit=yes)
unloads with rmmod ("Use rmmod instead of modprobe -r (RHBZ#1031102)", firewall/core/modules.py),
so `firewalld_cleanup` names the setting for `check` and `protect`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ctwatchd.files import FileProblem, read_regular, replace_atomically
from ctwatchd.model import is_module_name

GUARD = "etc/modprobe.d/ctwatchd-protect.conf"
FIREWALLD_CONF = "etc/firewalld/firewalld.conf"
REFUSE = "/bin/false"
MARK = "# ctwatchd protect"


class ProtectError(Exception):
    """The guard cannot be written or removed; the message names the file."""


def guard_text(modules: Sequence[str]) -> str:
    lines = [f"{MARK}: `modprobe -r` of these modules runs {REFUSE} instead, so it fails and the module stays.",
             "# Written by `ctwatchd protect`; `ctwatchd protect --remove` takes it away. `rmmod` ignores",
             "# modprobe.d: ctwatchd itself restores what rmmod removes.",
             *(f"remove {m} {REFUSE}" for m in modules if is_module_name(m))]
    return "\n".join(lines) + "\n"


def guard_path(root: Path) -> Path:
    return root / GUARD


def _ours(path: Path) -> str | None:
    """The guard's text if the file there is one ctwatchd wrote; None when absent."""
    try:
        raw, _ = read_regular(path, 1 << 16, follow=False)
    except FileNotFoundError:
        return None
    except (FileProblem, OSError) as exc:
        raise ProtectError(f"{path}: {exc}") from None
    text = raw.decode("utf-8", "replace")
    if not text.startswith(MARK):
        raise ProtectError(f"{path} exists and was not written by ctwatchd protect; leaving it alone")
    return text


def apply(root: Path, modules: Sequence[str]) -> tuple[Path, bool]:
    """Write the guard; (path, changed)."""
    path = guard_path(root)
    text = guard_text(modules)
    if _ours(path) == text:
        return path, False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, text.encode(), 0o644)
    except OSError as exc:
        raise ProtectError(f"{path}: cannot write it: {exc.strerror or exc}") from None
    return path, True


def remove(root: Path) -> tuple[Path, bool]:
    """Take the guard away; (path, removed)."""
    path = guard_path(root)
    if _ours(path) is None:
        return path, False
    try:
        os.unlink(path)
    except OSError as exc:
        raise ProtectError(f"{path}: cannot remove it: {exc.strerror or exc}") from None
    return path, True


def firewalld_cleanup(root: Path) -> str | None:
    """'<file>:<line>' when firewalld.conf sets CleanupModulesOnExit=yes (firewalld takes the last
    assignment); None when it does not, or the file is absent or unreadable."""
    path = root / FIREWALLD_CONF
    try:
        raw, _ = read_regular(path, 1 << 16)
    except (FileProblem, OSError):
        return None
    where = None
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() == "CleanupModulesOnExit":
            yes = value.strip().strip('"').lower() in ("yes", "true")
            where = f"/{FIREWALLD_CONF}:{number}" if yes else None
    return where


def firewalld_note(root: Path) -> str | None:
    where = firewalld_cleanup(root)
    if where is None:
        return None
    return (f"{where} sets CleanupModulesOnExit=yes: stopping firewalld unloads the conntrack family with "
            "rmmod, which no modprobe.d guard refuses; the daemon's hold makes it fail for nf_conntrack and "
            "nf_nat while it runs (Linux 5.12+) and ctwatchd restores what goes (CleanupModulesOnExit=no keeps "
            "it all loaded)")
