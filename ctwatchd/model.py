"""Small immutable values shared by the probe, the decision core and the executor."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

# A loadable module name as modprobe accepts it: no path, no option (no leading "-"), no glob. The
# kernel's limit is MODULE_NAME_LEN (64) less a pointer, NUL included: 55 characters on 64-bit.
MODULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,54}")
MODULE_NAME_MAX = 55


def is_module_name(name: object) -> bool:
    """fullmatch, never match + "$": "nf_nat\\n" must not pass."""
    return isinstance(name, str) and MODULE_NAME.fullmatch(name) is not None


# C0 and C1 controls, DEL, lone surrogates (from undecodable bytes), line/paragraph separators and the
# bidi overrides that reorder what a terminal shows.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
ECHO_LIMIT = 300


def clean(text: str, limit: int = ECHO_LIMIT) -> str:
    """Outside text (command output, file names and contents, config values) made safe to echo.

    Control characters are escaped (ESC becomes \\x1b), so nothing reaches a terminal, STATUS= or
    a journal MESSAGE as a control sequence, and the result is capped at about `limit` characters.
    """
    head = _UNSAFE.sub(_escape, text[:limit])
    if len(head) > limit:
        head = head[:limit]
    if len(text) > limit:
        head += f"… ({len(text) - limit} more characters)"
    return head


def _escape(m: re.Match[str]) -> str:
    return m.group().encode("unicode_escape", "backslashreplace").decode("ascii")


CONNTRACK = "nf_conntrack"
NAT = "nf_nat"
BR_NETFILTER = "br_netfilter"
CONNTRACK_IPV4 = "nf_conntrack_ipv4"
NAT_IPV4 = "nf_nat_ipv4"

# The order the seed's runbook loads them in; used where modules.dep says nothing.
CANONICAL_ORDER = (CONNTRACK, CONNTRACK_IPV4, NAT, NAT_IPV4, BR_NETFILTER)


class AuditLog(Protocol):
    """What the daemon and executor need of a structlog bound logger (kept here, free of structlog)."""

    def info(self, event: str, **fields: Any) -> Any: ...  # noqa: ANN401
    def warning(self, event: str, **fields: Any) -> Any: ...  # noqa: ANN401
    def error(self, event: str, **fields: Any) -> Any: ...  # noqa: ANN401


def normalize_module(name: str) -> str:
    """Modprobe treats '-' and '_' alike; we store the underscore form."""
    return name.replace("-", "_")


def normalize_value(value: str) -> str:
    """Sysctl values compare by their whitespace-separated fields ("4096\\t16384" == "4096 16384")."""
    return " ".join(value.split())


@dataclass(frozen=True)
class Blocker:
    """A modprobe.d rule about a module, and whether it stops an explicit `modprobe <module>`."""

    rule: str  # e.g. "install nf_conntrack /bin/true"
    source: str  # "/etc/modprobe.d/protect.conf:1"
    blocks: bool = True  # False: a note only ("blacklist" stops aliases, not an explicit modprobe)

    def __str__(self) -> str:
        return f"'{self.rule}' in {self.source}"


@dataclass(frozen=True)
class Setting:
    """One sysctl.d(5) assignment."""

    key: str  # dotted, or a glob such as net.ipv4.conf.*.rp_filter
    value: str
    source: str  # "/etc/sysctl.d/99-test.conf:1"


@dataclass(frozen=True)
class Conflict:
    """A desired sysctl that sysctl.d (and the udev rule reapplying it on module load) sets otherwise."""

    key: str
    want: str
    setting: Setting

    # A sysctl.d value is text from a file anyone with root wrote: every echo of it (check's table and
    # JSON, the journal record) goes through these, escaped and capped once.
    @property
    def value(self) -> str:
        return clean(self.setting.value, 80)

    @property
    def source(self) -> str:
        return clean(self.setting.source, 200)

    def __str__(self) -> str:
        return f"{self.source} sets {self.key} = {self.value}, ctwatchd wants {self.want}"


@dataclass(frozen=True)
class KernelFacts:
    """What does not change while the kernel runs (re-read on SIGHUP and when the files change)."""

    release: str
    module_support: bool  # /proc/modules exists
    modules_dir: bool  # /lib/modules/<release> exists
    builtin: frozenset[str] = frozenset()
    deps: dict[str, tuple[str, ...]] = field(default_factory=dict)  # modules.dep: every module on disk
    kconfig: dict[str, str] = field(default_factory=dict)  # CONFIG_X -> "y" | "m" for the symbols we know
    blockers: dict[str, Blocker] = field(default_factory=dict)  # rules that stop a load
    notes: dict[str, Blocker] = field(default_factory=dict)  # rules that do not (blacklist)
    guards: dict[str, Blocker] = field(default_factory=dict)  # `remove` rules that stop `modprobe -r`
    sysctl_d: dict[str, Setting] = field(default_factory=dict)  # what sysctl.d would set, last wins
    conf_files: tuple[Path, ...] = ()  # the modprobe.d and sysctl.d files read (their mtimes: fingerprint)
    fingerprint: tuple[float, ...] = ()
    problems: tuple[str, ...] = ()  # files that could not be read, one sentence each


@dataclass(frozen=True)
class ModuleEvidence:
    """The raw readings about one module; core.classify() turns them into a ModuleStatus."""

    name: str
    initstate: str | None  # /sys/module/<m>/initstate, None when it cannot be read
    sys_dir: bool  # /sys/module/<m> exists
    refcnt: bool  # /sys/module/<m>/refcnt exists: only loadable modules have it
    instance: int | None = None  # inode of /sys/module/<m>
    sign: bool = False  # a file only the module's code creates exists (e.g. nf_conntrack_count)
    sign_path: str | None = None  # that file, when the module has one


class ModuleState(StrEnum):
    LIVE = "live"
    COMING = "coming"
    GOING = "going"
    ABSENT = "absent"  # not loaded, loadable from disk
    BUILTIN = "built-in"
    UNAVAILABLE = "unavailable"  # neither loaded, nor built in, nor on disk
    BLOCKED = "blocked"  # not loaded and modprobe.d forbids loading it

    @property
    def satisfied(self) -> bool:
        return self in (ModuleState.LIVE, ModuleState.BUILTIN)

    @property
    def transient(self) -> bool:
        return self in (ModuleState.COMING, ModuleState.GOING)


@dataclass(frozen=True)
class ModuleStatus:
    name: str
    state: ModuleState
    detail: str = ""  # the evidence, as a sentence fragment
    blocker: str | None = None  # the modprobe.d rule, also reported when the module is live
    instance: int | None = None  # inode of /sys/module/<name>: a reload makes a new one
    note: str | None = None  # a rule that does not stop the load (blacklist), said once
    guard: str | None = None  # a `remove` rule that stops `modprobe -r` (ctwatchd protect)


@dataclass(frozen=True)
class Observation:
    """One reading of the kernel: what /sys and /proc say right now."""

    release: str
    modules: Mapping[str, ModuleStatus]  # desired modules and the legacy candidates
    sysctls: Mapping[str, str | None]  # desired keys -> current value, None when the file is missing
    conntrack_count: int | None  # None when /proc/sys/net/netfilter/nf_conntrack_count is unreadable
    tuning: Mapping[str, str] = field(default_factory=dict)  # writable nf_conntrack_* values now
    deps: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # from modules.dep
    # Loaded modules depending on a live watched one (/sys/module/*/holders, recursively) -> those
    # watched modules; None when not looked at.
    holders: Mapping[str, tuple[str, ...]] | None = None


class StepKind(StrEnum):
    LOAD_MODULE = "load-module"
    VERIFY_CONNTRACK = "verify-conntrack"
    WRITE_SYSCTLS = "write-sysctls"
    RESTORE_TUNING = "restore-tuning"  # the conntrack snapshot: a key the new module lacks is dropped
    RESTART_DOCKER = "restart-docker"
    RUN_HOOK = "run-hook"


@dataclass(frozen=True)
class Step:
    kind: StepKind
    module: str | None = None
    sysctls: tuple[tuple[str, str], ...] = ()
    argv: tuple[str, ...] = ()
    when: str = ""  # RESTART_DOCKER: "if-active" or "if-needed"

    def describe(self) -> str:
        if self.kind is StepKind.LOAD_MODULE:
            return f"modprobe {self.module}, then verify /sys/module/{self.module}/initstate is live"
        if self.kind is StepKind.VERIFY_CONNTRACK:
            return "verify /proc/sys/net/netfilter/nf_conntrack_count is readable"
        if self.kind is StepKind.WRITE_SYSCTLS:
            return "write and read back " + ", ".join(f"{k}={v}" for k, v in self.sysctls)
        if self.kind is StepKind.RESTORE_TUNING:
            return "write back the tuned conntrack values " + ", ".join(f"{k}={v}" for k, v in self.sysctls)
        if self.kind is StepKind.RESTART_DOCKER:
            if self.when == "if-needed":
                return "systemctl try-restart docker.service, if it is active and its iptables rules are gone"
            return "systemctl try-restart docker.service (if active)"
        return "run hook " + " ".join(self.argv)


@dataclass(frozen=True)
class RestorePlan:
    steps: tuple[Step, ...]
    reason: str  # why this plan exists, for the audit record
    skipped_restarts: bool = False  # docker/hooks left out because the breaker is open

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(s.module for s in self.steps if s.kind is StepKind.LOAD_MODULE and s.module)

    def __bool__(self) -> bool:
        return bool(self.steps)


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"  # not run: an earlier step failed, or nothing to do
    INTERRUPTED = "interrupted"  # stop requested while it ran


@dataclass(frozen=True)
class StepResult:
    step: Step
    outcome: Outcome
    duration_ms: float
    detail: str = ""
    dropped: tuple[str, ...] = ()  # snapshot keys the reloaded module does not have or refuses
    deferred: bool = False  # docker/hooks left for after READY: still owed


@dataclass(frozen=True)
class RestoreResult:
    plan: RestorePlan
    results: tuple[StepResult, ...]
    duration_ms: float

    @property
    def ok(self) -> bool:
        return all(r.outcome in (Outcome.OK, Outcome.SKIPPED) for r in self.results) and not self.failed

    @property
    def failed(self) -> StepResult | None:
        for r in self.results:
            if r.outcome in (Outcome.FAILED, Outcome.INTERRUPTED):
                return r
        return None

    def ran(self, kind: StepKind) -> bool:
        return any(r.step.kind is kind and r.outcome is Outcome.OK for r in self.results)


# -- the hold: an nftables table owned by the daemon keeps modules loaded (hold.py) ------------------
NFT_CHAIN_NAT = "nft_chain_nat"
NFT_CT = "nft_ct"
NFT_MASQ = "nft_masq"
HOLD_TABLE = "ip ctwatchd"


@dataclass(frozen=True)
class HoldSpec:
    """What the hold's table contains, each piece holding modules loaded while the table exists."""

    conntrack: bool = False  # a `notrack` rule in a regular chain: nft_ct -> nf_conntrack
    nat: bool = False  # a dormant `type nat hook postrouting` chain: nft_chain_nat -> nf_nat -> nf_conntrack
    masquerade: bool = False  # a `masquerade` rule in that chain: nft_masq (its unload flushes masqueraded flows)

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules this table keeps loaded, bases first."""
        out: list[str] = []
        if self.conntrack or self.nat:
            out.append(CONNTRACK)
        if self.nat:
            out += [NAT, NFT_CHAIN_NAT]
        if self.conntrack:
            out.append(NFT_CT)
        if self.masquerade:
            out.append(NFT_MASQ)
        return tuple(out)

    def __bool__(self) -> bool:
        return self.conntrack or self.nat

    def __or__(self, other: HoldSpec) -> HoldSpec:
        return HoldSpec(self.conntrack or other.conntrack, self.nat or other.nat,
                        self.masquerade or other.masquerade)


@dataclass(frozen=True)
class HoldView:
    """The hold as the kernel shows it to anyone who asks (`check`): table flags, chains, rules."""

    exists: bool
    owner_flag: bool = False
    dormant: bool = False
    owner: int | None = None  # the owning netlink socket's port id (the daemon's pid, normally)
    chain_types: tuple[str, ...] = ()  # the type of each base chain ("nat")
    expressions: tuple[str, ...] = ()  # the expression names of every rule ("notrack", "masq")
    error: str | None = None  # why it could not be read (not root, no nf_tables)

    @property
    def spec(self) -> HoldSpec:
        if not (self.exists and self.owner_flag):
            return HoldSpec()  # a table anyone can delete holds nothing for long
        nat = "nat" in self.chain_types
        return HoldSpec("notrack" in self.expressions, nat, nat and "masq" in self.expressions)
