"""Reading the kernel's module and sysctl state from /sys, /proc, /lib/modules and modprobe.d.

Every path comes from one injected root, so tests build a temporary tree and production passes "/".
Static facts (modules.builtin, modules.dep, the kernel config, modprobe.d) are read once per
KernelFacts; the live state (initstate, sysctls) on every observe().
"""

from __future__ import annotations

import os
import re
import stat
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from ctwatchd.core import KCONFIG, classify
from ctwatchd.files import FileProblem, read_regular
from ctwatchd.model import (
    BR_NETFILTER,
    CONNTRACK,
    Blocker,
    KernelFacts,
    ModuleEvidence,
    ModuleState,
    ModuleStatus,
    Observation,
    clean,
    is_module_name,
    normalize_module,
)
from ctwatchd.sysctld import SYSCTL_CONF, SYSCTL_DIRS, read_settings, sysctl_files

# Files that exist only while a module's code is in the kernel: evidence when /sys/module says nothing.
EVIDENCE = {
    CONNTRACK: "proc/sys/net/netfilter/nf_conntrack_count",
    BR_NETFILTER: "proc/sys/net/bridge/bridge-nf-call-iptables",
}
# modprobe.d search order; a file name found earlier hides the same name later (modprobe.d(5)).
MODPROBE_DIRS = ("etc/modprobe.d", "run/modprobe.d", "usr/local/lib/modprobe.d", "usr/lib/modprobe.d",
                 "lib/modprobe.d")
# Commands an `install` rule may run and still load the module it names; a `remove` rule, unload it.
LOADERS = {"modprobe", "insmod"}
UNLOADERS = {"modprobe", "rmmod"}
# A kernel release as uname prints it; anything else in osrelease (a NUL, a path) is not used in a path.
RELEASE = re.compile(r"[A-Za-z0-9._+~-]{1,64}")
BOOT_ID = re.compile(r"[0-9a-f-]{36}")
TREE_FILE_LIMIT = 16 << 20  # modules.dep of a distribution kernel is ~1 MB
CONF_FILE_LIMIT = 1 << 20
CONFIG_LIMIT = 8 << 20  # an uncompressed kernel config is ~300 KB
TUNING_PREFIX = "nf_conntrack_"
PARAM_PREFIX = f"module.{CONNTRACK}."  # snapshot keys of the module's own parameters
TUNING_EXCLUDE = {"nf_conntrack_count"}


class KernelProbe:
    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self.sys_module = root / "sys/module"
        self.proc_sys = root / "proc/sys"
        # The poll runs these every few seconds for the daemon's whole life: plain strings, not pathlib.
        self._root = str(root).rstrip("/")
        self._sm = str(self.sys_module)
        self._sysctl_paths: dict[str, str] = {}

    def shown(self, path: Path | str) -> str:
        """A path as the host sees it (without the injected root), safe to echo."""
        text = os.fspath(path)
        if self._root and text.startswith(self._root + "/"):
            text = text[len(self._root):]
        return clean(text)

    # -- static facts -------------------------------------------------------------------------
    def fingerprint(self, release: str, files: Iterable[Path | str] = ()) -> tuple[float, ...]:
        """Cheap change detector for the static facts: mtimes of modules.dep, the modprobe.d dirs
        (a file added or removed) and the .conf files in them (a file edited in place).

        An admin removing a modprobe.d blocker, or depmod after a kernel package upgrade, is noticed
        at the next poll for the price of a few stat() calls.
        """
        paths = [f"{self._root}/lib/modules/{release}/modules.dep", *(f"{self._root}/{d}" for d in MODPROBE_DIRS),
                 *(f"{self._root}/{d}" for d in SYSCTL_DIRS), f"{self._root}/{SYSCTL_CONF}", *files]
        out: list[float] = []
        for p in paths:
            try:
                out.append(os.stat(p).st_mtime)
            except (OSError, ValueError):
                out.append(-1.0)
        return tuple(out)

    def release(self, problems: list[str] | None = None) -> str:
        """The running kernel's release; never raises (a NUL or garbage in osrelease is refused)."""
        raw = _read(self.proc_sys / "kernel/osrelease")
        if raw and RELEASE.fullmatch(raw):
            return raw
        fallback = os.uname().release
        if problems is not None:
            problems.append(f"{self.shown(self.proc_sys / 'kernel/osrelease')} holds no kernel release "
                            f"({clean(repr(raw), 80)}); using uname's {clean(fallback, 80)}")
        return fallback if RELEASE.fullmatch(fallback) else "unknown"

    def boot_id(self) -> str | None:
        """This boot's id: saved monotonic times and /sys inode numbers mean something only within it."""
        raw = _read(self.proc_sys / "kernel/random/boot_id")
        return raw if raw and BOOT_ID.fullmatch(raw) else None

    def process_alive(self, pid: int, word: str = "ctwatchd") -> bool:
        """Is `pid` a running process whose command line mentions `word` (not a recycled pid)?"""
        try:
            raw, _ = read_regular(f"{self._root}/proc/{int(pid)}/cmdline", 1 << 16)
        except (OSError, ValueError):
            return False
        return word.encode() in raw

    def facts(self) -> KernelFacts:
        """Read the static facts. Never raises: a file that cannot be read is a sentence in `problems`
        and counts as absent, so a corrupt tree degrades what ctwatchd knows, not whether it runs."""
        problems: list[str] = []
        release = self.release(problems)
        moddir = self.root / "lib/modules" / release
        builtin_text = self._text(moddir / "modules.builtin", problems, limit=TREE_FILE_LIMIT)
        builtin = frozenset(_module_names(builtin_text.splitlines())) if builtin_text else frozenset()
        deps = _parse_deps(self._text(moddir / "modules.dep", problems, limit=TREE_FILE_LIMIT) or "")
        conf_files = self._conf_files()
        sysctl_d = read_settings(self.root, problems)
        blockers: dict[str, Blocker] = {}
        notes: dict[str, Blocker] = {}
        guards: dict[str, Blocker] = {}
        for name, directive, rule in self._rules(conf_files, problems):
            if directive == "remove":
                if rule.blocks:
                    guards.setdefault(name, rule)
            else:
                (blockers if rule.blocks else notes).setdefault(name, rule)
        return KernelFacts(
            release=release,
            module_support=os.path.exists(self.root / "proc/modules"),
            modules_dir=os.path.isdir(moddir),
            builtin=builtin,
            deps=deps,
            kconfig=self._kconfig(release, problems),
            blockers=blockers,
            notes=notes,
            guards=guards,
            sysctl_d=sysctl_d,
            conf_files=(*conf_files, *sysctl_files(self.root)),
            fingerprint=self.fingerprint(release, (*conf_files, *sysctl_files(self.root))),
            problems=tuple(problems),
        )

    def _text(self, path: Path, problems: list[str], *, limit: int) -> str | None:
        """A tree file as text (undecodable bytes replaced), None when absent or unreadable."""
        try:
            raw, _ = read_regular(path, limit)
        except FileNotFoundError:
            return None
        except OSError as exc:
            problems.append(f"{self.shown(path)} was not read: {_why(exc)}")
            return None
        return raw.decode("utf-8", "replace")

    def _kconfig(self, release: str, problems: list[str]) -> dict[str, str]:
        wanted = set(KCONFIG.values()) | {"CONFIG_MODULES"}
        for path in (self.root / "proc/config.gz", self.root / "boot" / f"config-{release}"):
            try:
                raw, _ = read_regular(path, CONFIG_LIMIT)
                if path.suffix == ".gz":
                    raw = _gunzip(raw, CONFIG_LIMIT)
            except FileNotFoundError:
                continue
            except (OSError, EOFError, zlib.error) as exc:
                problems.append(f"{self.shown(path)} was not read: {_why(exc)}")
                continue
            return _parse_kconfig(raw.decode("utf-8", "replace").splitlines(), wanted)
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

    def _rules(self, files: Iterable[Path], problems: list[str]) -> Iterator[tuple[str, str, Blocker]]:
        for path in files:
            text = self._text(path, problems, limit=CONF_FILE_LIMIT)
            if text is None:
                continue
            shown = self.shown(path)
            for lineno, words in _conf_lines(text):
                rule = classify_rule(words)
                if rule is not None:
                    name, directive, effective = rule
                    yield name, directive, Blocker(clean(" ".join(words), 200), f"{shown}:{lineno}", effective)

    # -- live state ---------------------------------------------------------------------------
    def initstate(self, name: str) -> str | None:
        return _read(f"{self._sm}/{name}/initstate")

    def instance(self, name: str) -> int | None:
        """The inode of /sys/module/<name>: kernfs numbers never repeat, so a reload shows as a new one."""
        try:
            return os.stat(f"{self._sm}/{name}").st_ino
        except OSError:
            return None

    def evidence(self, name: str) -> ModuleEvidence:
        """What /sys/module and the module's own /proc files say about it, uninterpreted."""
        mod_dir = f"{self._sm}/{name}"
        state = self.initstate(name)
        sign = EVIDENCE.get(name)
        if state is not None:  # the common, healthy case: one read
            return ModuleEvidence(name, state, True, True, self.instance(name), sign_path=f"/{sign}" if sign else None)
        return ModuleEvidence(
            name=name,
            initstate=None,
            sys_dir=os.path.isdir(mod_dir),
            refcnt=os.path.exists(f"{mod_dir}/refcnt"),
            sign=sign is not None and os.path.exists(f"{self._root}/{sign}"),
            sign_path=f"/{sign}" if sign else None,
        )

    def status(self, name: str, facts: KernelFacts) -> ModuleStatus:
        return classify(self.evidence(name), facts)

    def read_sysctl(self, key: str) -> str | None:
        path = self._sysctl_paths.get(key)
        if path is None:
            try:
                path = str(tuning_path(self.root, key))
            except ValueError:
                return None  # not a sysctl name: nothing to read (config and state file refuse these)
            self._sysctl_paths[key] = path
        return _read(path)

    def holders(self, bases: Iterable[str], limit: int = 256) -> dict[str, tuple[str, ...]]:
        """Every loaded module that depends on one of `bases`, directly or not -> the bases it needs.

        /sys/module/<m>/holders lists the modules using <m>; walked breadth first, at most `limit`
        modules (a loop or a hostile tree cannot make it unbounded).
        """
        out: dict[str, set[str]] = {}
        for base in bases:
            queue, seen = [base], {base}
            while queue and len(out) < limit:
                current = queue.pop(0)
                try:
                    names = sorted(os.listdir(f"{self._sm}/{current}/holders"))
                except OSError:
                    continue
                for name in names:
                    if len(out) >= limit:
                        break
                    if name in seen or not is_module_name(name):
                        continue
                    seen.add(name)
                    out.setdefault(normalize_module(name), set()).add(base)
                    queue.append(name)
        return {m: tuple(sorted(b)) for m, b in sorted(out.items())}

    def tuning(self) -> dict[str, str]:
        """The tuned conntrack values a reload resets to defaults: the writable nf_conntrack_* sysctls, and
        the module's hashsize parameter (module.nf_conntrack.hashsize) where nf_conntrack_buckets, the
        same table, is not writable (older kernels)."""
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
        if out and "net.netfilter.nf_conntrack_buckets" not in out:
            hashsize = f"{self._sm}/{CONNTRACK}/parameters/hashsize"
            try:
                writable = bool(os.stat(hashsize).st_mode & stat.S_IWUSR)
            except OSError:
                writable = False
            value = _read(hashsize) if writable else None
            if value is not None:
                out[f"{PARAM_PREFIX}hashsize"] = value
        return out

    def conntrack_count(self) -> int | None:
        raw = _read(f"{self._root}/proc/sys/net/netfilter/nf_conntrack_count")
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            return None

    def observe(self, facts: KernelFacts, modules: Sequence[str], sysctl_keys: Iterable[str], *,
                with_tuning: bool = True, holders_of: Sequence[str] = ()) -> Observation:
        statuses = {n: self.status(n, facts) for n in dict.fromkeys(modules)}
        conntrack = statuses.get(CONNTRACK)
        tuning: dict[str, str] = {}
        if with_tuning and conntrack is not None and conntrack.state is ModuleState.LIVE:
            tuning = self.tuning()
            if (conntrack.instance is None or self.instance(CONNTRACK) != conntrack.instance
                    or self.initstate(CONNTRACK) != "live"):
                # Going, gone or reloaded while we read: a going module unregisters its sysctls under
                # us (seen: 8 of 48 keys), a reload mixes the old module's values with the new defaults.
                tuning = {}
        return Observation(
            release=facts.release,
            modules=statuses,
            sysctls={k: self.read_sysctl(k) for k in sysctl_keys},
            conntrack_count=self.conntrack_count(),
            tuning=tuning,
            deps=facts.deps,
            holders=self.holders([m for m in holders_of if statuses.get(m) is not None
                                  and statuses[m].state is ModuleState.LIVE]) if holders_of else None,
        )


def tuning_path(root: Path, key: str) -> Path:
    """A snapshot key's file: a sysctl under /proc/sys, or module.nf_conntrack.<param> under /sys/module."""
    if key.startswith(PARAM_PREFIX):
        name = key[len(PARAM_PREFIX):]
        if not is_module_name(name):
            raise ValueError(f"{key!r} is not a parameter of {CONNTRACK}")
        return root / "sys/module" / CONNTRACK / "parameters" / name
    return sysctl_path(root / "proc/sys", key)


def sysctl_path(proc_sys: Path, key: str) -> Path:
    """net.bridge.bridge-nf-call-iptables -> <proc_sys>/net/bridge/bridge-nf-call-iptables, never outside."""
    parts = key.split(".")
    if len(parts) < 2 or any(p in ("", ".", "..") or "/" in p or "\0" in p for p in parts):
        raise ValueError(f"{key!r} is not a dotted sysctl name")
    return proc_sys.joinpath(*parts)


def _read(path: Path | str) -> str | None:
    # O_NONBLOCK: /proc and /sys ignore it, but a FIFO where such a file belongs must not hang the probe.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):  # ValueError: a NUL in a path built from outside text
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
            name = base.split(".ko", 1)[0]
            if is_module_name(name):
                yield normalize_module(name)


def _parse_deps(text: str) -> dict[str, tuple[str, ...]]:
    deps: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        head, sep, tail = line.partition(":")
        if not sep:
            continue
        for name in _module_names([head]):
            deps[name] = tuple(_module_names(tail.split()))
    return deps


def _gunzip(raw: bytes, limit: int) -> bytes:
    """Decompress at most `limit` bytes: a gzip bomb where /proc/config.gz belongs stays small."""
    d = zlib.decompressobj(wbits=31)
    out = d.decompress(raw, limit)
    if not d.eof and not d.unconsumed_tail and len(out) < limit:
        raise EOFError("truncated gzip data")
    return out


def _why(exc: BaseException) -> str:
    if isinstance(exc, FileProblem):
        return exc.reason
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return clean(str(exc)) or type(exc).__name__


def classify_rule(words: Sequence[str]) -> tuple[str, str, bool] | None:
    """(module, directive, effective) for a modprobe.d line about loading or unloading a module.

    modprobe(8) ignores `blacklist` for a module named on its command line, as ctwatchd names them:
    never effective, a note. An `install` rule replaces the load with its command, so it blocks unless
    that command itself runs modprobe or insmod on the module (the usual --ignore-install wrapper). A
    `remove` rule replaces `modprobe -r` the same way: effective (a guard against unloading) unless it
    runs modprobe or rmmod on the module.
    """
    if len(words) < 2 or not is_module_name(words[1]) or words[0] not in ("blacklist", "install", "remove"):
        return None
    name = normalize_module(words[1])
    if words[0] == "blacklist":
        return name, "blacklist", False
    command = words[2:]
    tools = LOADERS if words[0] == "install" else UNLOADERS
    runs_it = any(os.path.basename(w) in tools for w in command) and any(
        normalize_module(w) == name for w in command)
    return name, words[0], not runs_it


_KCONFIG_LINE = re.compile(r"(CONFIG_[A-Z0-9_]+)=(.*)")


def _parse_kconfig(lines: Iterable[str], wanted: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        m = _KCONFIG_LINE.fullmatch(line)
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
