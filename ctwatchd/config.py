"""The TOML configuration: parsed completely and validated before anything runs.

A configuration is either entirely valid or rejected with one ConfigError whose message names the
file and the key; there is no partial configuration.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ctwatchd.files import FileProblem, read_regular
from ctwatchd.model import BR_NETFILTER, CONNTRACK, MODULE_NAME_MAX, NAT, clean, is_module_name, normalize_module

DEFAULT_PATH = Path("/etc/ctwatchd/ctwatchd.toml")
MODPROBE_PATHS = ("/usr/sbin/modprobe", "/sbin/modprobe")
SYSTEMCTL_PATHS = ("/usr/bin/systemctl", "/bin/systemctl")
IPTABLES_PATHS = ("/usr/sbin/iptables", "/sbin/iptables")
JOURNALCTL_PATHS = ("/usr/bin/journalctl", "/bin/journalctl")
MAX_BYTES = 1 << 20  # a larger file is refused whole, never read in part

# A dotted sysctl name: components of letters, digits, '_' and '-' (no '/', no '..', no empty part).
# Always fullmatch: with match + "$", a trailing newline would pass.
SYSCTL_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+")
SYSCTL_KEY_MAX = 256
# Values written to /proc/sys: printable, one line. Kernel parsers reject the rest anyway.
SYSCTL_VALUE = re.compile(r"[\x20-\x7e\t]{0,256}")
# [sysctl] tables nest once per dot of an unquoted key; a real sysctl name has a handful.
SYSCTL_DEPTH = 16
ECHO = 80  # characters of a rejected value shown in an error


class ConfigError(Exception):
    """The configuration cannot be used; the message is one sentence naming file and key."""


class DockerMode(StrEnum):
    NEVER = "never"
    IF_ACTIVE = "if-active"  # restart an active docker after every module reload
    IF_NEEDED = "if-needed"  # only when it is active and its own iptables rules are gone


class LogFormat(StrEnum):
    AUTO = "auto"  # journald when stderr is the journal stream, else readable lines
    JOURNAL = "journal"
    CONSOLE = "console"
    JSON = "json"


@dataclass(frozen=True)
class Config:
    path: Path | None = None  # None: built-in defaults
    modules: tuple[str, ...] = (CONNTRACK, NAT, BR_NETFILTER)
    poll_interval: float = 5.0
    sysctls: tuple[tuple[str, str], ...] = (
        ("net.bridge.bridge-nf-call-iptables", "1"),
        ("net.bridge.bridge-nf-call-ip6tables", "1"),
    )
    docker: DockerMode = DockerMode.NEVER
    hooks: tuple[tuple[str, ...], ...] = ()
    modprobe: str | None = None  # None: the first of /usr/sbin/modprobe, /sbin/modprobe
    systemctl: str | None = None  # None: the first of /usr/bin/systemctl, /bin/systemctl
    iptables: str | None = None  # None: the first of /usr/sbin/iptables, /sbin/iptables (docker's rules)
    collateral: bool = True  # bring back the loaded modules that depended on a reloaded watched one
    never_restore: tuple[str, ...] = ()  # module names or globs collateral restore leaves alone
    module_timeout: float = 30.0
    hook_timeout: float = 60.0
    docker_timeout: float = 120.0
    keep_conntrack_tuning: bool = True
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    max_restarts: int = 3
    restart_window: float = 600.0
    state_file: Path = Path("/run/ctwatchd/state.json")
    log_format: LogFormat = LogFormat.AUTO
    attribution: bool = True  # name who removed a watched module (audit records via journalctl, /proc)
    journalctl: str | None = None  # None: the first of /usr/bin/journalctl, /bin/journalctl
    metrics_textfile: Path | None = None
    hold: bool = True  # keep nf_conntrack and nf_nat loaded with an nftables owner table (hold.py)
    hold_masquerade: bool = True  # also nft_masq, while it is loaded

    @property
    def sysctl_map(self) -> dict[str, str]:
        return dict(self.sysctls)


def _shown(key: str) -> str:
    """A key as written, or quoted with escapes when it holds a newline or another control character:
    messages stay one line, and short."""
    return clean(key, ECHO) if key.isprintable() else clean(repr(key), ECHO)


def _echo(value: object) -> str:
    """A rejected value as the error shows it: its repr, escaped and capped."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else "a huge integer"
    return clean(text, ECHO)


def _where(path: Path | None, section: str, key: str | None = None) -> str:
    name = str(path) if path else "built-in configuration"
    return f"{name}: [{section}] {key}" if key else f"{name}: [{section}]"


class _Reader:
    """Takes keys out of one TOML table, checking types; leftovers are unknown keys."""

    def __init__(self, path: Path | None, section: str, table: object) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"{_where(path, section)} must be a table, not {_type(table)}.")
        self.path, self.section, self.table = path, section, dict(table)

    def where(self, key: str) -> str:
        return _where(self.path, self.section, key)

    def take(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:  # noqa: ANN401
        if key not in self.table:
            return default
        value = self.table.pop(key)
        # bool is an int in Python, but `poll_interval = true` is a mistake, not 1 second.
        if isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"{self.where(key)} must be {_kind_name(kind)}, not a boolean.")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.where(key)} must be {_kind_name(kind)}, not {_type(value)}.")
        return value

    def number(self, key: str, default: float, *, low: float, high: float) -> float:
        raw = self.take(key, (int, float), default)
        try:
            value = float(raw)
        except OverflowError:  # an integer beyond any float
            value = math.inf
        if not (math.isfinite(value) and low <= value <= high):
            shown = f"{value:g}" if math.isfinite(value) else _echo(raw) if isinstance(raw, float) else "a huge integer"
            raise ConfigError(f"{self.where(key)} must be between {low:g} and {high:g} seconds, not {shown}.")
        return value

    def choice(self, key: str, kind: type[StrEnum], default: StrEnum) -> Any:  # noqa: ANN401
        raw = self.take(key, str, default.value)
        try:
            return kind(raw)
        except ValueError:
            choices = " or ".join(f'"{c.value}"' for c in kind)
            raise ConfigError(f"{self.where(key)} must be {choices}, not {_echo(raw)}.") from None

    def done(self) -> None:
        if self.table:
            unknown = ", ".join(_shown(k) for k in sorted(self.table))
            raise ConfigError(f"{_where(self.path, self.section)} has unknown key(s): {unknown}.")


def _type(value: object) -> str:
    return {
        str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "an array",
             dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if set(kinds) == {int, float}:
        return "a number"
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _absolute_exe(where: str, value: str) -> str:
    if not value.startswith("/") or "\0" in value or "/../" in f"{value}/" or not value.isprintable():
        raise ConfigError(f"{where} must be an absolute path without '..' or control characters, "
                          f"not {_echo(value)}.")
    return value


def parse(data: Mapping[str, Any], path: Path | None = None) -> Config:
    """Validate a parsed TOML document into a Config, or raise one ConfigError."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        name = str(path) if path else "configuration"
        raise ConfigError(f"{name}: unknown section or key(s): {', '.join(_shown(k) for k in unknown)} "
                          f"(known sections: {', '.join(sorted(_SECTIONS))}).")
    fields: dict[str, Any] = {"path": path}
    for section, reader in _SECTIONS.items():
        if section in data:
            fields.update(reader(path, data[section]))
    cfg = Config(**fields)
    if cfg.backoff_max < cfg.backoff_initial:
        raise ConfigError(f"{_where(path, 'restore', 'backoff_max')} must not be smaller than backoff_initial.")
    return cfg


def _watch(path: Path | None, table: object) -> dict[str, Any]:
    w = _Reader(path, "watch", table)
    out: dict[str, Any] = {}
    raw_modules = w.take("modules", list, None)
    if raw_modules is not None:
        seen: list[str] = []
        for i, m in enumerate(raw_modules):
            if not is_module_name(m):
                raise ConfigError(f"{w.where('modules')}[{i}] must be a plain module name "
                                  f"(letters, digits, '_' or '-', at most {MODULE_NAME_MAX}), not {_echo(m)}.")
            name = normalize_module(m)
            if name not in seen:
                seen.append(name)
        out["modules"] = tuple(seen)
    out["poll_interval"] = w.number("poll_interval", DEFAULTS.poll_interval, low=0.1, high=3600)
    w.done()
    return out


def _sysctl(path: Path | None, table: object) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{_where(path, 'sysctl')} must be a table of \"key\" = \"value\", not {_type(table)}.")
    sysctls: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value in _flatten(path, table):
        where = _where(path, "sysctl", f'"{_shown(key)}"' if key.isprintable() else _shown(key))
        if len(key) > SYSCTL_KEY_MAX or not SYSCTL_KEY.fullmatch(key):
            raise ConfigError(f"{where} is not a dotted sysctl name under /proc/sys "
                              "(letters, digits, '_', '-' separated by '.'; no '/' or '..').")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ConfigError(f"{where} must be a string or an integer, not {_type(value)}.")
        if isinstance(value, int) and not -(1 << 63) <= value < 1 << 64:
            raise ConfigError(f"{where} must fit in 64 bits, not a huge integer.")
        text = str(value)
        if not SYSCTL_VALUE.fullmatch(text):
            raise ConfigError(f"{where} value must be one printable line of at most 256 characters.")
        # The same file named twice ("a.b" = 1 and [sysctl.a] b = 0) would be written back and forth
        # forever: refuse it here, with both spellings meaning one key.
        if key in seen:
            raise ConfigError(f"{where} is given twice (as a quoted key and as a table, or twice in one).")
        seen.add(key)
        sysctls.append((key, text))
    return {"sysctls": tuple(sysctls)}


def _hooks(r: _Reader) -> tuple[tuple[str, ...], ...]:
    hooks: list[tuple[str, ...]] = []
    for i, argv in enumerate(r.take("hooks", list, [])):
        where = f"{r.where('hooks')}[{i}]"
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ConfigError(f"{where} must be a non-empty array of strings (an argv list), not {_echo(argv)}.")
        if any("\0" in a for a in argv):
            raise ConfigError(f"{where} contains a NUL character.")
        _absolute_exe(f"{where}[0]", argv[0])
        hooks.append(tuple(argv))
    return tuple(hooks)


def _restore(path: Path | None, table: object) -> dict[str, Any]:
    r = _Reader(path, "restore", table)
    d = DEFAULTS
    out: dict[str, Any] = {
        "docker": r.choice("docker", DockerMode, d.docker),
        "hooks": _hooks(r),
        "module_timeout": r.number("module_timeout", d.module_timeout, low=0.1, high=600),
        "hook_timeout": r.number("hook_timeout", d.hook_timeout, low=0.1, high=3600),
        "docker_timeout": r.number("docker_timeout", d.docker_timeout, low=0.1, high=3600),
        "keep_conntrack_tuning": r.take("keep_conntrack_tuning", bool, d.keep_conntrack_tuning),
        "backoff_initial": r.number("backoff_initial", d.backoff_initial, low=0.01, high=3600),
        "backoff_max": r.number("backoff_max", d.backoff_max, low=0.01, high=86400),
        "max_restarts": _restarts(r, d.max_restarts),
        "collateral": r.take("collateral", bool, d.collateral),
        "never_restore": _globs(r, "never_restore"),
        "restart_window": r.number("restart_window", d.restart_window, low=1, high=86400),
    }
    for key in ("modprobe", "systemctl", "iptables"):
        value = r.take(key, str, None)
        out[key] = None if value is None else _absolute_exe(r.where(key), value)
    r.done()
    return out


def _daemon(path: Path | None, table: object) -> dict[str, Any]:
    r = _Reader(path, "daemon", table)
    out = {
        "state_file": Path(_absolute_exe(r.where("state_file"),
                                         r.take("state_file", str, str(DEFAULTS.state_file)))),
        "log_format": r.choice("log_format", LogFormat, DEFAULTS.log_format),
        "attribution": r.take("attribution", bool, DEFAULTS.attribution),
    }
    journalctl = r.take("journalctl", str, None)
    out["journalctl"] = None if journalctl is None else _absolute_exe(r.where("journalctl"), journalctl)
    r.done()
    return out


def _metrics(path: Path | None, table: object) -> dict[str, Any]:
    r = _Reader(path, "metrics", table)
    textfile = r.take("textfile", str, None)
    r.done()
    return {"metrics_textfile": Path(_absolute_exe(r.where("textfile"), textfile)) if textfile else None}


def _hold(path: Path | None, table: object) -> dict[str, Any]:
    r = _Reader(path, "hold", table)
    out = {"hold": r.take("enabled", bool, DEFAULTS.hold),
           "hold_masquerade": r.take("masquerade", bool, DEFAULTS.hold_masquerade)}
    r.done()
    return out


DEFAULTS = Config()
_SECTIONS: dict[str, Callable[[Path | None, object], dict[str, Any]]] = {
    "watch": _watch, "sysctl": _sysctl, "restore": _restore, "hold": _hold, "daemon": _daemon,
    "metrics": _metrics,
}


MODULE_GLOB = re.compile(r"[A-Za-z0-9_*?\[][A-Za-z0-9_*?\[\]-]{0,63}")  # no leading "-"


def _globs(r: _Reader, key: str) -> tuple[str, ...]:
    out: list[str] = []
    for i, item in enumerate(r.take(key, list, [])):
        if not isinstance(item, str) or not MODULE_GLOB.fullmatch(item):
            raise ConfigError(f"{r.where(key)}[{i}] must be a module name or a glob such as \"xt_*\", "
                              f"not {_echo(item)}.")
        out.append(normalize_module(item))
    return tuple(out)


def _restarts(r: _Reader, default: int) -> int:
    value = r.take("max_restarts", int, default)
    if not 0 <= value <= 1000:
        raise ConfigError(f"{r.where('max_restarts')} must be between 0 and 1000, not {_echo(value)}.")
    return int(value)


def _flatten(path: Path | None, table: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Accept both `"net.x.y" = "1"` and the unquoted form, which TOML turns into nested tables.

    Iterative, with a depth limit: `a.a.a.…b = 1` with thousands of dots must be an error, not a
    RecursionError.
    """
    out: list[tuple[str, Any]] = []
    stack: list[tuple[str, Iterator[tuple[str, Any]], int]] = [("", iter(table.items()), 0)]
    while stack:
        prefix, items, depth = stack[-1]
        entry = next(items, None)
        if entry is None:
            stack.pop()
            continue
        key, value = entry
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            if depth + 1 > SYSCTL_DEPTH:
                raise ConfigError(f"{_where(path, 'sysctl')} nests deeper than {SYSCTL_DEPTH} levels "
                                  f"(at {_shown(full)}); no sysctl name has that many parts.")
            stack.append((full, iter(value.items()), depth + 1))
        else:
            out.append((full, value))
    return out


def check_trust(path: Path, st: os.stat_result, euid: int) -> None:
    """A root daemon must not take orders from a file someone else can change (sshd's rule)."""
    if euid != 0:
        return
    if st.st_uid != 0:
        raise ConfigError(f"{path} is owned by uid {st.st_uid}, not root; refusing it because ctwatchd runs "
                          "its hooks as root.")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                          "refusing it because ctwatchd runs as root and takes orders from it.")


def _chain(path: str) -> list[str]:
    """The path and every directory above it, up to and including '/'."""
    out = [path]
    while path != "/":
        path = os.path.dirname(path) or "/"
        out.append(path)
    return out


def check_executable_trust(where: str, exe: str, euid: int, stat_fn: Callable[[str], os.stat_result] = os.stat,
                           realpath: Callable[[str], str] = os.path.realpath) -> None:
    """An executable ctwatchd will run must exist; as root it must be root's alone (sudo's and sshd's rule).

    The file and every directory above it, both along the path as written and along the path with its
    symlinks resolved, must be owned by root and not writable by group or others: anyone who could
    change one of them could make ctwatchd run their code as root.
    """
    try:
        st = stat_fn(exe)
    except FileNotFoundError:
        raise ConfigError(f"{where} {_echo(exe)} does not exist.") from None
    except OSError as exc:
        raise ConfigError(f"{where} {_echo(exe)} cannot be checked: {exc.strerror or exc}.") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where} {_echo(exe)} is not a regular file.")
    if not st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
        raise ConfigError(f"{where} {_echo(exe)} is not executable.")
    if euid != 0:
        return
    try:
        resolved = realpath(exe)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where} {_echo(exe)} cannot be resolved: {exc}.") from None
    checked: set[str] = set()
    for item in (*_chain(exe), *_chain(resolved)):
        if item in checked:
            continue
        checked.add(item)
        try:
            st = stat_fn(item)
        except OSError as exc:
            raise ConfigError(f"{where} {_echo(exe)}: {_echo(item)} cannot be checked: "
                              f"{exc.strerror or exc}.") from None
        what = "it" if item in (exe, resolved) else f"its directory {_echo(item)}"
        if st.st_uid != 0:
            raise ConfigError(f"{where} {_echo(exe)} refused: {what} is owned by uid {st.st_uid}, not root, "
                              "and ctwatchd runs it as root.")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"{where} {_echo(exe)} refused: {what} is writable by group or others "
                              f"(mode {stat.S_IMODE(st.st_mode):04o}), and ctwatchd runs it as root.")


def check_executables(cfg: Config, euid: int, stat_fn: Callable[[str], os.stat_result] = os.stat,
                      realpath: Callable[[str], str] = os.path.realpath) -> None:
    """Every executable ctwatchd runs as root passes the same trust rule: the hooks, and modprobe,
    systemctl, (for docker = "if-needed") iptables and (for attribution) journalctl whether configured
    or the defaults (a default
    that does not exist fails later, at use)."""
    for i, argv in enumerate(cfg.hooks):
        check_executable_trust(_where(cfg.path, "restore", f"hooks[{i}][0]"), argv[0], euid, stat_fn, realpath)
    tools = [("restore", "modprobe", cfg.modprobe, MODPROBE_PATHS),
             ("restore", "systemctl", cfg.systemctl, SYSTEMCTL_PATHS)]
    if cfg.docker is DockerMode.IF_NEEDED:
        tools.append(("restore", "iptables", cfg.iptables, IPTABLES_PATHS))
    if cfg.attribution:
        tools.append(("daemon", "journalctl", cfg.journalctl, JOURNALCTL_PATHS))
    for section, key, configured, defaults in tools:
        where = _where(cfg.path, section, key)
        if configured is not None:
            check_executable_trust(where, configured, euid, stat_fn, realpath)
            continue
        for default in defaults:
            try:
                stat_fn(default)
            except OSError:
                continue
            check_executable_trust(f"{where} (default)", default, euid, stat_fn, realpath)
            break


def load(path: Path | None, *, euid: int | None = None,
         opener: Callable[[Path], tuple[bytes, os.stat_result]] | None = None,
         stat_fn: Callable[[str], os.stat_result] | None = None) -> Config:
    """Load the configuration at `path`; None means the default path, which may be absent.

    `euid`, `opener` and `stat_fn` are seams for tests: whose rules apply, how the file is read, and
    how hook executables and their directories are looked at.
    """
    explicit = path is not None
    target = path if path is not None else DEFAULT_PATH
    uid = os.geteuid() if euid is None else euid
    try:
        raw, st = (opener or _read)(target)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{_shown(str(target))}: no such configuration file.") from None
        if os.path.islink(target):
            # A link to a file that is gone is a configuration someone meant to have, not "no file".
            raise ConfigError(f"{target} is a symbolic link to {_shown(os.readlink(target))}, which does not "
                              "exist; remove the link to use the built-in defaults.") from None
        return Config()
    except FileProblem as exc:
        raise ConfigError(f"{clean(str(exc), 300)}; refusing to read it as the configuration.") from None
    except OSError as exc:
        raise ConfigError(f"{_shown(str(target))}: cannot read the configuration: {exc.strerror or exc}.") from None
    check_trust(target, st, uid)
    if len(raw) > MAX_BYTES:
        raise ConfigError(f"{target}: larger than {MAX_BYTES} bytes; refusing it rather than reading part of it.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{target}: not valid UTF-8 (byte {exc.start}).") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{target}: malformed TOML: {clean(str(exc), 200)}.") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and inline tables
        raise ConfigError(f"{target}: malformed TOML: arrays or inline tables nested too deeply.") from None
    except ValueError as exc:  # e.g. an integer of thousands of digits (int-max-str-digits)
        raise ConfigError(f"{target}: malformed TOML: {clean(str(exc), 200)}.") from None
    cfg = parse(data, target)
    check_executables(cfg, uid, stat_fn or os.stat)
    return cfg


def _read(path: Path) -> tuple[bytes, os.stat_result]:
    # The stat is of the descriptor we read, so the trust check and the content are one file; a FIFO
    # or device in the config's place fails at once instead of blocking (read_regular).
    try:
        return read_regular(path, MAX_BYTES)
    except FileProblem as exc:
        if "larger than" in str(exc):
            raise ConfigError(f"{path}: larger than {MAX_BYTES} bytes; refusing it rather than reading part "
                              "of it.") from None
        raise
