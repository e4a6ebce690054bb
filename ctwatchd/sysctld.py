"""What sysctl.d(5) would set, for telling the operator which file fights ctwatchd's desired values.

CentOS/RHEL ship `net.bridge.bridge-nf-call-iptables = 0`, and the udev rule in sysctl.d(5) reapplies
the /net/bridge keys right after br_netfilter loads: a file there that contradicts a desired value
undoes every restore. Files are read as systemd-sysctl reads them: /etc, /run, /usr/local/lib,
/usr/lib (and /lib) sysctl.d, a file name in an earlier directory hiding the same name later, all
sorted by file name, then /etc/sysctl.conf; the last assignment of a key wins. The parsing is pure.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from ctwatchd.files import read_regular
from ctwatchd.model import Conflict, Setting, clean, normalize_value

SYSCTL_DIRS = ("etc/sysctl.d", "run/sysctl.d", "usr/local/lib/sysctl.d", "usr/lib/sysctl.d", "lib/sysctl.d")
SYSCTL_CONF = "etc/sysctl.conf"
FILE_LIMIT = 1 << 20


def normalize_key(key: str) -> str:
    """sysctl.d takes '/' or '.' as the separator, whichever comes first; ours is '.'."""
    key = key.strip().lstrip("/")
    slash, dot = key.find("/"), key.find(".")
    if slash != -1 and (dot == -1 or slash < dot):
        return key.replace(".", "\0").replace("/", ".").replace("\0", "/")
    return key


def parse(text: str, source: str) -> Iterator[Setting]:
    """`key = value` lines; '#' and ';' comments; a leading '-' (ignore errors) does not matter here."""
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        key = normalize_key(key.lstrip("-"))
        if key:
            yield Setting(key, value, f"{source}:{lineno}")


def effective(files: Iterable[tuple[str, str]]) -> dict[str, Setting]:
    """The last assignment of each key over (shown path, text) pairs, in order."""
    out: dict[str, Setting] = {}
    for source, text in files:
        for setting in parse(text, source):
            out.pop(setting.key, None)  # keep "last wins" also in the dict's order
            out[setting.key] = setting
    return out


GLOB = frozenset("*?[")


def conflicts(desired: Iterable[tuple[str, str]], settings: Mapping[str, Setting]) -> list[Conflict]:
    """Desired values that sysctl.d would set otherwise, exact keys and globs alike.

    A plain key is found by lookup and only real globs are matched as patterns: a sysctl.d with tens of
    thousands of per-interface keys must not cost a pattern match per key and desired value."""
    order = {key: i for i, key in enumerate(settings)}  # the dict keeps "last wins" order
    globs = [s for s in settings.values() if not GLOB.isdisjoint(s.key)]
    found: list[Conflict] = []
    for key, want in desired:
        candidates = [s for s in globs if fnmatch.fnmatchcase(key, s.key)]
        if key in settings:
            candidates.append(settings[key])
        if not candidates:
            continue
        last = max(candidates, key=lambda s: order[s.key])  # a later matching assignment wins
        if normalize_value(last.value) != normalize_value(want):
            found.append(Conflict(key, want, last))
    return found


def sysctl_files(root: Path) -> list[Path]:
    """The files systemd-sysctl reads, in the order it applies them."""
    seen: dict[str, Path] = {}
    for d in SYSCTL_DIRS:
        try:
            names = sorted(n for n in os.listdir(root / d) if n.endswith(".conf"))
        except OSError:
            continue
        for name in names:
            seen.setdefault(name, root / d / name)
    ordered = [seen[n] for n in sorted(seen)]
    conf = root / SYSCTL_CONF
    if conf.exists() and not any(os.path.realpath(p) == os.path.realpath(conf) for p in ordered):
        ordered.append(conf)
    return ordered


def read_settings(root: Path, problems: list[str]) -> dict[str, Setting]:
    texts: list[tuple[str, str]] = []
    base = str(root).rstrip("/")
    for path in sysctl_files(root):
        shown = clean(str(path)[len(base):] if base and str(path).startswith(base + "/") else str(path))
        try:
            raw, _ = read_regular(path, FILE_LIMIT)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.append(f"{shown} was not read: {getattr(exc, 'reason', None) or exc.strerror or exc}")
            continue
        texts.append((shown, raw.decode("utf-8", "replace")))
    return effective(texts)
