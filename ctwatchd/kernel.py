"""Reading the kernel's module and sysctl state from /sys, /proc, /lib/modules and modprobe.d.

Every path comes from one injected root, so tests build a temporary tree and production passes "/".
Static facts (modules.builtin, modules.dep, the kernel config, modprobe.d) are read once per
KernelFacts; the live state (initstate, sysctls) on every observe().
"""

from __future__ import annotations

import gzip
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ctwatchd.model import (
    BR_NETFILTER,
    CONNTRACK,
    CONNTRACK_IPV4,
    NAT,
    NAT_IPV4,
    ModuleState,
    ModuleStatus,
    Observation,
    normalize_module,
)

# Kconfig symbols of the modules we know, for telling "built in" from "missing" via the kernel config.
KCONFIG = {
    CONNTRACK: "CONFIG_NF_CONNTRACK",
    NAT: "CONFIG_NF_NAT",
    BR_NETFILTER: "CONFIG_BRIDGE_NETFILTER",
    CONNTRACK_IPV4: "CONFIG_NF_CONNTRACK_IPV4",
    NAT_IPV4: "CONFIG_NF_NAT_IPV4",
}
# Files that exist only while a module's code is in the kernel: evidence when /sys/module says nothing.
EVIDENCE = {
    CONNTRACK: "proc/sys/net/netfilter/nf_conntrack_count",
    BR_NETFILTER: "proc/sys/net/bridge/bridge-nf-call-iptables",
}
# modprobe.d search order; a file name found earlier hides the same name later (modprobe.d(5)).
MODPROBE_DIRS = ("etc/modprobe.d", "run/modprobe.d", "usr/local/lib/modprobe.d", "usr/lib/modprobe.d",
                 "lib/modprobe.d")
NEUTERED = {"true", "false"}
TUNING_PREFIX = "nf_conntrack_"
TUNING_EXCLUDE = {"nf_conntrack_count"}


@dataclass(frozen=True)
class Blocker:
    rule: str  # e.g. "install nf_conntrack /bin/true"
    source: str  # "/etc/modprobe.d/protect.conf:1"

    def __str__(self) -> str:
        return f"'{self.rule}' in {self.source}"


@dataclass(frozen=True)
class KernelFacts:
    """What does not change while the kernel runs (re-read on SIGHUP)."""

    release: str
    module_support: bool  # /proc/modules exists
    modules_dir: bool  # /lib/modules/<release> exists
    builtin: frozenset[str] = frozenset()
    deps: dict[str, tuple[str, ...]] = field(default_factory=dict)  # modules.dep: every module on disk
    kconfig: dict[str, str] = field(default_factory=dict)  # CONFIG_X -> "y" | "m" for the symbols we know
    blockers: dict[str, Blocker] = field(default_factory=dict)
    conf_files: tuple[Path, ...] = ()  # the modprobe.d files read
    fingerprint: tuple[float, ...] = ()


class KernelProbe:
    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self.sys_module = root / "sys/module"
        self.proc_sys = root / "proc/sys"
        # The poll runs these every few seconds for the daemon's whole life: plain strings, not pathlib.
        self._root = str(root).rstrip("/")
        self._sm = str(self.sys_module)
        self._sysctl_paths: dict[str, str] = {}

    # -- static facts -------------------------------------------------------------------------
    def fingerprint(self, release: str, files: Iterable[Path | str] = ()) -> tuple[float, ...]:
        """Cheap change detector for the static facts: mtimes of modules.dep, the modprobe.d dirs
        (a file added or removed) and the .conf files in them (a file edited in place).

        An admin removing a modprobe.d blocker, or depmod after a kernel package upgrade, is noticed
        at the next poll for the price of a few stat() calls.
        """
        paths = [f"{self._root}/lib/modules/{release}/modules.dep", *(f"{self._root}/{d}" for d in MODPROBE_DIRS),
                 *files]
        out: list[float] = []
        for p in paths:
            try:
                out.append(os.stat(p).st_mtime)
            except OSError:
                out.append(-1.0)
        return tuple(out)

    def facts(self) -> KernelFacts:
        release = _read(self.proc_sys / "kernel/osrelease") or os.uname().release
        moddir = self.root / "lib/modules" / release
        builtin = frozenset(_module_names((moddir / "modules.builtin").read_text().splitlines())) \
            if (moddir / "modules.builtin").is_file() else frozenset()
        deps = _parse_deps(moddir / "modules.dep")
        conf_files = self._conf_files()
        return KernelFacts(
            release=release,
            module_support=(self.root / "proc/modules").exists(),
            modules_dir=moddir.is_dir(),
            builtin=builtin,
            deps=deps,
            kconfig=self._kconfig(release),
            blockers=dict(self._blockers(conf_files)),
            conf_files=conf_files,
            fingerprint=self.fingerprint(release, conf_files),
        )

    def _kconfig(self, release: str) -> dict[str, str]:
        wanted = set(KCONFIG.values()) | {"CONFIG_MODULES"}
        for path in (self.root / "proc/config.gz", self.root / "boot" / f"config-{release}"):
            try:
                opener = gzip.open if path.suffix == ".gz" else open
                with opener(path, "rt", errors="replace") as fh:
                    return _parse_kconfig(fh, wanted)
            except (OSError, EOFError):
                continue
        return {}

    def _conf_files(self) -> tuple[Path, ...]:
        seen: dict[str, Path] = {}
        for d in MODPROBE_DIRS:
            try:
                names = sorted(p for p in os.listdir(self.root / d) if p.endswith(".conf"))
            except OSError:
                continue
            for name in names:
                seen.setdefault(name, self.root / d / name)
        return tuple(seen[name] for name in sorted(seen))

    def _blockers(self, files: Iterable[Path]) -> Iterator[tuple[str, Blocker]]:
        for path in files:
            shown = "/" + str(path.relative_to(self.root))
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            for lineno, words in _conf_lines(text):
                if (len(words) >= 2 and words[0] == "blacklist") or (len(words) >= 3 and words[0] == "install"
                      and os.path.basename(words[2]) in NEUTERED):
                    yield normalize_module(words[1]), Blocker(" ".join(words), f"{shown}:{lineno}")

    # -- live state ---------------------------------------------------------------------------
    def initstate(self, name: str) -> str | None:
        return _read(f"{self._sm}/{name}/initstate")

    def instance(self, name: str) -> int | None:
        """The inode of /sys/module/<name>: kernfs numbers never repeat, so a reload shows as a new one."""
        try:
            return os.stat(f"{self._sm}/{name}").st_ino
        except OSError:
            return None

    def status(self, name: str, facts: KernelFacts) -> ModuleStatus:
        blocker = facts.blockers.get(name)
        state = self.initstate(name)
        if state in ("live", "coming", "going"):
            return ModuleStatus(name, ModuleState(state), f"/sys/module/{name}/initstate", _s(blocker),
                                self.instance(name))
        mod_dir = f"{self._sm}/{name}"
        if state is None and os.path.isdir(mod_dir) and not os.path.exists(f"{mod_dir}/refcnt"):
            # Built-in code with parameters gets /sys/module/<name> but never an initstate or refcnt.
            return ModuleStatus(name, ModuleState.BUILTIN, f"/sys/module/{name} has no initstate", _s(blocker))
        if name in facts.builtin:
            return ModuleStatus(name, ModuleState.BUILTIN, "listed in modules.builtin", _s(blocker))
        symbol = KCONFIG.get(name)
        if symbol and facts.kconfig.get(symbol) == "y":
            return ModuleStatus(name, ModuleState.BUILTIN, f"{symbol}=y in the kernel config", _s(blocker))
        evidence = EVIDENCE.get(name)
        if not facts.module_support:
            if evidence and os.path.exists(f"{self._root}/{evidence}"):
                return ModuleStatus(name, ModuleState.BUILTIN, f"/{evidence} exists", _s(blocker))
            return ModuleStatus(name, ModuleState.UNAVAILABLE,
                                "the kernel has no module support and shows no sign of it", _s(blocker))
        if blocker is not None:
            return ModuleStatus(name, ModuleState.BLOCKED, str(blocker), str(blocker))
        if name in facts.deps:
            return ModuleStatus(name, ModuleState.ABSENT, "not loaded")
        if not facts.deps and facts.modules_dir:
            # No modules.dep to consult (depmod never ran): let modprobe be the judge.
            return ModuleStatus(name, ModuleState.ABSENT, "not loaded (no modules.dep to check the disk)")
        return ModuleStatus(name, ModuleState.UNAVAILABLE, f"not in /lib/modules/{facts.release}/modules.dep")

    def read_sysctl(self, key: str) -> str | None:
        path = self._sysctl_paths.get(key)
        if path is None:
            path = self._sysctl_paths[key] = str(sysctl_path(self.proc_sys, key))
        return _read(path)

    def tuning(self) -> dict[str, str]:
        """The writable nf_conntrack_* sysctls: the tuned values a reload resets to defaults."""
        out: dict[str, str] = {}
        base = self.proc_sys / "net/netfilter"
        try:
            entries = os.scandir(base)
        except OSError:
            return out
        with entries:
            for e in entries:
                if not e.name.startswith(TUNING_PREFIX) or e.name in TUNING_EXCLUDE:
                    continue
                try:
                    if not e.stat().st_mode & stat.S_IWUSR:
                        continue
                except OSError:
                    continue
                value = _read(Path(e.path))
                if value is not None:
                    out[f"net.netfilter.{e.name}"] = value
        return out

    def conntrack_count(self) -> int | None:
        raw = _read(f"{self._root}/proc/sys/net/netfilter/nf_conntrack_count")
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            return None

    def observe(self, facts: KernelFacts, modules: Sequence[str], sysctl_keys: Iterable[str], *,
                with_tuning: bool = True) -> Observation:
        statuses = {n: self.status(n, facts) for n in dict.fromkeys(modules)}
        conntrack = statuses.get(CONNTRACK)
        tuning: dict[str, str] = {}
        if with_tuning and conntrack is not None and conntrack.state is ModuleState.LIVE:
            tuning = self.tuning()
            if self.instance(CONNTRACK) != conntrack.instance:
                # Reloaded while we read: the values mix the old module's and the new one's defaults.
                tuning = {}
        return Observation(
            release=facts.release,
            modules=statuses,
            sysctls={k: self.read_sysctl(k) for k in sysctl_keys},
            conntrack_count=self.conntrack_count(),
            tuning=tuning,
            deps=facts.deps,
        )


def sysctl_path(proc_sys: Path, key: str) -> Path:
    """net.bridge.bridge-nf-call-iptables -> <proc_sys>/net/bridge/bridge-nf-call-iptables, never outside."""
    parts = key.split(".")
    if len(parts) < 2 or any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts):
        raise ValueError(f"{key!r} is not a dotted sysctl name")
    return proc_sys.joinpath(*parts)


def _s(blocker: Blocker | None) -> str | None:
    return str(blocker) if blocker else None


def _read(path: Path | str) -> str | None:
    # O_NONBLOCK: /proc and /sys ignore it, but a FIFO where such a file belongs must not hang the probe.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)


def _module_names(paths: Iterable[str]) -> Iterator[str]:
    for p in paths:
        base = os.path.basename(p.strip().rstrip(":"))
        if ".ko" in base:
            yield normalize_module(base.split(".ko", 1)[0])


def _parse_deps(path: Path) -> dict[str, tuple[str, ...]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    deps: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        head, sep, tail = line.partition(":")
        if not sep:
            continue
        for name in _module_names([head]):
            deps[name] = tuple(_module_names(tail.split()))
    return deps


_KCONFIG_LINE = re.compile(r"^(CONFIG_[A-Z0-9_]+)=(.*)$")


def _parse_kconfig(lines: Iterable[str], wanted: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        m = _KCONFIG_LINE.match(line)
        if m and m.group(1) in wanted:
            out[m.group(1)] = m.group(2)
    return out


def _conf_lines(text: str) -> Iterator[tuple[int, list[str]]]:
    """modprobe.d lines with '\\' continuations joined and comments dropped, with their first line number."""
    buf, start = "", 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if not buf:
            start = lineno
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        full, buf = buf + line, ""
        words = full.split("#", 1)[0].split()
        if words:
            yield start, words
