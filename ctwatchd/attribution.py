"""Who removed a module: the process, its parents, its user and its systemd unit, and how sure we are.

The remove uevent carries no PID. Sources, best first:

1. audit: with a `delete_module` audit rule loaded (packaging/audit/ctwatchd.rules), the kernel writes
   SYSCALL and KERN_MODULE records that journald collects (`_TRANSPORT=audit`); they are read with
   journalctl, argv only and with a timeout, matched by module name and time. They name even a
   process that exited at once.
2. proc: the uevent is sent from inside delete_module(2), and ctwatchd wakes within milliseconds, so
   the caller is often still there: /proc is scanned right at the uevent for a process inside
   delete_module (its /proc/<pid>/syscall, readable with ptrace rights only) or a kmod tool naming
   the module. A best guess, said so.
3. unknown, said plainly.

Everything read here is bounded, non-blocking (read_regular refuses FIFOs) and escaped: the process
table is someone else's input.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ctwatchd.files import FileProblem, read_regular
from ctwatchd.model import clean

# delete_module(2) by audit arch (AUDIT_ARCH_*) and by uname machine; i386 compat on x86_64 too
DELETE_MODULE_BY_ARCH = {"c000003e": 176, "40000003": 129, "c00000b7": 106, "80000016": 129,
                         "c00000f3": 106}
DELETE_MODULE_BY_MACHINE = {"x86_64": 176, "i686": 129, "aarch64": 106, "s390x": 129, "riscv64": 106}
KMOD_TOOLS = frozenset({"rmmod", "modprobe", "kmod"})
UNIT_SUFFIXES = (".service", ".scope", ".socket", ".mount", ".swap", ".timer")
NO_ID = 4294967295  # (uid_t)-1: loginuid/sessionid never set
SCAN_LIMIT = 4096  # processes looked at per scan
SCAN_BUDGET = 0.2  # seconds; a scan gives up after this, keeping what it found
PARENT_DEPTH = 16
CMDLINE_CAP = 256
AUDIT_TYPES = {"1300": "SYSCALL", "1327": "PROCTITLE", "1330": "KERN_MODULE"}
AUDIT_WINDOW = 10.0  # seconds around the removal in which an audit record may match it
JOURNAL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Proc:
    """What could be read of one process; None where it could not."""

    pid: int
    comm: str | None = None
    cmdline: str | None = None
    exe: str | None = None
    uid: int | None = None
    auid: int | None = None
    session: int | None = None
    unit: str | None = None
    ppid: int | None = None
    parents: tuple[tuple[str, int], ...] = ()  # (comm, pid) from the parent up to PID 1


@dataclass(frozen=True)
class Culprit:
    module: str
    how: str  # "audit" | "proc" | "unknown"
    proc: Proc | None = None
    user: str | None = None  # the audit login uid's name
    why: str = ""  # how the process was picked, one phrase

    def fields(self) -> dict[str, object]:
        """Journal fields (REMOVED_BY_*, ATTRIBUTION), values escaped and capped."""
        out: dict[str, object] = {"attribution": self.how, "module": self.module}
        p = self.proc
        if p is None:
            return out
        values: Mapping[str, object | None] = {
            "pid": p.pid, "comm": p.comm, "exe": p.exe, "cmdline": p.cmdline, "uid": p.uid,
            "auid": p.auid, "user": self.user, "session": p.session, "unit": p.unit,
            "parents": " < ".join(f"{c}[{n}]" for c, n in p.parents) or None,
        }
        for key, value in values.items():
            if value is not None:
                out[f"removed_by_{key}"] = value if isinstance(value, int) else clean(str(value), CMDLINE_CAP)
        return out

    def summary(self) -> str:
        """One phrase for STATUS=, check and the message: 'rmmod[812] in cleanup-job.service (audit)'."""
        p = self.proc
        if p is None:
            return "unknown (no audit record; the caller was gone from /proc)"
        who = f"{clean(p.comm or '?', 40)}[{p.pid}]"
        where = f" in {clean(p.unit, 120)}" if p.unit else ""
        user = f", login {clean(self.user, 40)}" if self.user else (f", auid {p.auid}" if p.auid is not None else "")
        return f"{who}{where}{user} ({self.how})"


def _int(text: str | None) -> int | None:
    try:
        value = int((text or "").strip())
    except ValueError:
        return None
    return None if value in (NO_ID, -1) or value < 0 else value


def unit_of(cgroup: str) -> str | None:
    """The innermost systemd unit in a /proc/<pid>/cgroup text (v2 '0::' line, or v1 name=systemd)."""
    path = None
    for line in cgroup.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, where = rest.partition(":")
        if (hier == "0" and controllers == "") or controllers == "name=systemd":
            path = where
    if not path:
        return None
    for part in reversed(path.split("/")):
        if part.endswith(UNIT_SUFFIXES):
            return part
    return None


class ProcScan:
    """Reads processes under `root`/proc; never raises, never blocks."""

    def __init__(self, root: Path = Path("/"), *, machine: str | None = None,
                 clock: Callable[[], float] = time.monotonic, self_pid: int | None = None) -> None:
        self.proc = root / "proc"
        self.delete_nr = DELETE_MODULE_BY_MACHINE.get(machine or platform.machine())
        self.clock = clock
        self.self_pid = os.getpid() if self_pid is None else self_pid

    def _read(self, pid: int, name: str, limit: int = 4096) -> str | None:
        try:
            raw, _ = read_regular(self.proc / str(pid) / name, limit)
        except (FileProblem, OSError):
            return None
        return raw.decode("utf-8", "replace")

    def _stat(self, pid: int) -> tuple[str, int] | None:
        """(comm, ppid) from /proc/<pid>/stat; comm may hold spaces and ')' so split at the last ')'."""
        text = self._read(pid, "stat")
        if text is None or "(" not in text or ")" not in text:
            return None
        comm = text[text.index("(") + 1:text.rindex(")")]
        rest = text[text.rindex(")") + 1:].split()
        ppid = _int(rest[1]) if len(rest) > 1 else None
        return comm, ppid if ppid is not None else 0

    def argv(self, pid: int) -> list[str]:
        text = self._read(pid, "cmdline", 8192)
        return [a for a in (text or "").split("\0") if a]

    def read(self, pid: int) -> Proc | None:
        """Everything about `pid` that /proc lets us see; None when it is gone."""
        stat = self._stat(pid)
        if stat is None:
            return None
        comm, ppid = stat
        uid = None
        for line in (self._read(pid, "status", 8192) or "").splitlines():
            if line.startswith("Uid:"):
                fields = line.split()
                uid = _int(fields[1]) if len(fields) > 1 else None
        try:
            exe: str | None = os.readlink(self.proc / str(pid) / "exe")
        except OSError:
            exe = None
        parents: list[tuple[str, int]] = []
        seen = {pid}
        up = ppid
        while up and up not in seen and len(parents) < PARENT_DEPTH:
            seen.add(up)
            s = self._stat(up)
            if s is None:
                break
            parents.append((s[0], up))
            up = s[1]
        argv = self.argv(pid)
        return Proc(pid=pid, comm=comm, cmdline=" ".join(argv) if argv else None, exe=exe, uid=uid,
                    auid=_int(self._read(pid, "loginuid")), session=_int(self._read(pid, "sessionid")),
                    unit=unit_of(self._read(pid, "cgroup", 16384) or ""), ppid=ppid or None,
                    parents=tuple(parents))

    def _score(self, pid: int, comm: str, module: str) -> tuple[int, str]:
        """3: inside delete_module; 2: a kmod tool naming the module; 1: a kmod tool removing; 0: no."""
        syscall = self._read(pid, "syscall", 512)
        if syscall and self.delete_nr is not None and syscall.split()[:1] == [str(self.delete_nr)]:
            return 3, "it was inside delete_module(2)"
        argv = self.argv(pid)
        if not argv:
            # a process that has just exited (a zombie) has no command line left, but its name
            return (1, "rmmod was exiting") if comm == "rmmod" else (0, "")
        tool = os.path.basename(argv[0])
        if tool not in KMOD_TOOLS:
            return 0, ""
        wanted = module.replace("-", "_")
        named = any(os.path.basename(a).removesuffix(".ko").replace("-", "_") == wanted for a in argv[1:])
        removing = tool == "rmmod" or any(a in ("-r", "--remove", "--remove-dependencies") or
                                          (a.startswith("-") and not a.startswith("--") and "r" in a)
                                          for a in argv[1:]) or argv[1:2] == ["rmmod"]
        if named and removing:
            return 2, f"{tool} naming {module} was running"
        if removing:
            return 1, f"{tool} removing modules was running"
        return 0, ""

    def scan(self, module: str, budget: float = SCAN_BUDGET) -> tuple[Proc, str] | None:
        """The likeliest remover of `module` still in /proc, with why it was picked; None if none."""
        deadline = self.clock() + budget
        try:
            pids = sorted((int(n) for n in os.listdir(self.proc) if n.isdigit()), reverse=True)
        except OSError:
            return None
        best: tuple[int, int, str] | None = None
        # newest first: the remover is usually the youngest process, and it is about to exit
        for n, pid in enumerate(pids):
            if n >= SCAN_LIMIT or self.clock() > deadline:
                break
            stat = self._stat(pid)  # once per process: (comm, ppid)
            if stat is None or pid == self.self_pid or stat[1] == self.self_pid:
                continue  # gone; or our own modprobe: a restore, never a removal
            score, why = self._score(pid, stat[0], module)
            if score and (best is None or score > best[0]):
                best = (score, pid, why)
                if score == 3:
                    break
        if best is None:
            return None
        proc = self.read(best[1])
        return (proc, best[2]) if proc is not None else None


# -- audit records, as journald keeps them ---------------------------------------------------------

def audit_fields(message: str) -> dict[str, str]:
    """key=value pairs of one audit record's text; quoted values unquoted, the rest as written."""
    out: dict[str, str] = {}
    i, n = 0, len(message)
    while i < n:
        while i < n and message[i] == " ":
            i += 1
        start = i
        while i < n and message[i] not in "= ":
            i += 1
        key = message[start:i]
        if i >= n or message[i] != "=":
            continue
        i += 1
        if i < n and message[i] == '"':
            end = message.find('"', i + 1)
            end = n if end < 0 else end
            value = message[i + 1:end]
            i = end + 1
        else:
            start = i
            while i < n and message[i] != " ":
                i += 1
            value = message[start:i]
        if key:
            out.setdefault(key, value)
    return out


def unhex(value: str) -> str:
    """Audit writes untrusted strings as hex (a space, a quote, a control character inside)."""
    if value and len(value) % 2 == 0 and all(c in "0123456789ABCDEFabcdef" for c in value):
        try:
            return bytes.fromhex(value).replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except ValueError:
            return value
    return value


@dataclass
class _Event:
    syscall: dict[str, str] = field(default_factory=dict)
    module: str | None = None
    cmdline: str | None = None
    when: float = 0.0


def audit_removals(entries: Iterable[Mapping[str, object]], *,
                   refused: bool = False) -> list[tuple[float, str, Proc]]:
    """(wall time, module, process) for each delete_module in journald's audit entries (JSON objects
    as `journalctl -o json` prints them), grouped by their audit serial: the ones that succeeded, or
    with `refused` the ones the kernel refused (a held module "in use")."""
    events: dict[str, _Event] = {}
    for entry in entries:
        kind = AUDIT_TYPES.get(str(entry.get("_AUDIT_TYPE", "")))
        serial = str(entry.get("_AUDIT_ID", ""))
        message = entry.get("MESSAGE")
        if kind is None or not serial or not isinstance(message, str):
            continue
        ev = events.setdefault(serial, _Event())
        with contextlib.suppress(ValueError):
            ev.when = max(ev.when, int(str(entry.get("__REALTIME_TIMESTAMP", "0"))) / 1e6)
        f = audit_fields(message)
        if kind == "SYSCALL":
            ev.syscall = f
        elif kind == "KERN_MODULE":
            ev.module = unhex(f.get("name", "")) or None
        elif kind == "PROCTITLE":
            ev.cmdline = unhex(f.get("proctitle", "")) or None
    out: list[tuple[float, str, Proc]] = []
    for ev in events.values():
        s = ev.syscall
        pid = _int(s.get("pid"))
        nr = DELETE_MODULE_BY_ARCH.get(s.get("arch", "").lower())
        if ev.module is None or pid is None or nr is None or s.get("syscall") != str(nr):
            continue
        if s.get("success") != "no" if refused else s.get("success") not in (None, "yes"):
            continue
        out.append((ev.when, ev.module, Proc(
            pid=pid, comm=unhex(s["comm"]) if "comm" in s else None,
            exe=unhex(s["exe"]) if "exe" in s else None, cmdline=ev.cmdline, uid=_int(s.get("uid")),
            auid=_int(s.get("auid")), session=_int(s.get("ses")), ppid=_int(s.get("ppid")))))
    return out


def parse_journal(output: str) -> list[dict[str, object]]:
    """`journalctl -o json` lines; a torn or foreign line is skipped."""
    entries = []
    for line in output.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            entries.append(value)
    return entries


def journal_argv(journalctl: str, since_wall: float) -> list[str]:
    return [journalctl, "--output=json", "--no-pager", "--quiet", f"--since=@{int(since_wall)}",
            "--output-fields=MESSAGE,_AUDIT_TYPE,_AUDIT_ID", "_TRANSPORT=audit",
            *(f"_AUDIT_TYPE={t}" for t in AUDIT_TYPES)]


def user_name(root: Path, uid: int | None) -> str | None:
    """The login name of `uid` from root/etc/passwd (no NSS: a daemon must not hang on LDAP)."""
    if uid is None:
        return None
    try:
        raw, _ = read_regular(root / "etc/passwd", 1 << 20)
    except (FileProblem, OSError):
        return None
    for line in raw.decode("utf-8", "replace").splitlines():
        parts = line.split(":")
        if len(parts) > 2 and parts[2] == str(uid):
            return parts[0]
    return None


def pick_audit(found: list[tuple[float, str, Proc]], module: str, when_wall: float) -> Proc | None:
    """The delete_module of `module` closest to the removal's time, within AUDIT_WINDOW."""
    wanted = module.replace("-", "_")
    near = [(abs(t - when_wall), p) for t, m, p in found
            if m.replace("-", "_") == wanted and abs(t - when_wall) <= AUDIT_WINDOW]
    return min(near, key=lambda x: x[0])[1] if near else None


def merge(audit: Proc, seen: Proc | None, live: Proc | None) -> Proc:
    """The audit record's facts, completed from /proc: what the scan saw of the same pid at the
    uevent (unit, parents of a process that exited since), else the process if it is still alive."""
    extra = seen if seen is not None and seen.pid == audit.pid else live
    if extra is None:
        return audit
    return replace(audit, unit=audit.unit or extra.unit, parents=audit.parents or extra.parents,
                   exe=audit.exe or extra.exe, cmdline=audit.cmdline or extra.cmdline,
                   comm=audit.comm or extra.comm)


# -- the daemon's side: scan at the uevent, ask the journal a moment later ----------------------------

AUDIT_DELAY = 1.0  # seconds after the uevent: kauditd and journald have written the records by then
BATCH_SLACK = 0.5  # removals due this much later are resolved with the one due now


@dataclass
class Pending:
    module: str
    wall: float  # wall-clock time of the uevent, to match journal timestamps
    due: float  # monotonic
    scan: threading.Thread
    seen: list[tuple[Proc, str] | None]


class Attributor:
    """Turns remove uevents into Culprits. The /proc scan runs in a short-lived thread started at the
    uevent, so it never delays the restore that the same uevent triggers; the journal is asked once
    per batch of due removals, through the runner (argv only, timeout)."""

    def __init__(self, root: Path, query: Callable[[float], str | None] | None, *,
                 scan: ProcScan | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.root = root
        self.query = query
        self.scanner = scan or ProcScan(root, clock=clock)
        self.clock = clock
        self.wall = wall
        self.pending: list[Pending] = []

    def removed(self, module: str) -> None:
        box: list[tuple[Proc, str] | None] = []
        thread = threading.Thread(target=lambda: box.append(self.scanner.scan(module)),
                                  name="ctwatchd-attribution", daemon=True)
        thread.start()
        self.pending.append(Pending(module, self.wall(), self.clock() + AUDIT_DELAY, thread, box))

    @property
    def deadline(self) -> float | None:
        return min((p.due for p in self.pending), default=None)

    def refusals(self, since_wall: float, modules: Iterable[str]) -> list[tuple[float, Culprit]]:
        """Refused delete_module calls of `modules` since `since_wall`, from the audit records (none
        without the audit rule or a journal): (wall time, who tried), oldest first."""
        if self.query is None:
            return []
        output = self.query(since_wall)
        if not output:
            return []
        wanted = {m.replace("-", "_") for m in modules}
        out = []
        for when, module, audited in sorted(audit_removals(parse_journal(output), refused=True), key=lambda x: x[0]):
            if when >= since_wall and module.replace("-", "_") in wanted:
                proc = merge(audited, None, self.scanner.read(audited.pid))  # its unit, while it still runs
                out.append((when, Culprit(module, "audit", proc, user_name(self.root, proc.auid),
                                          "the kernel's audit record of a refused delete_module")))
        return out

    def resolve(self, now: float) -> list[Culprit]:
        """The Culprits of the removals now due (their scans done), oldest first."""
        for p in self.pending:
            if p.due <= now and p.scan.is_alive():
                p.due = now + 0.05
        if not any(p.due <= now for p in self.pending):
            return []
        # a burst (the family unloaded in one go) is answered by one journal query
        ready = [p for p in self.pending if p.due <= now + BATCH_SLACK and not p.scan.is_alive()]
        self.pending = [p for p in self.pending if p not in ready]
        found: list[tuple[float, str, Proc]] = []
        if self.query is not None:
            output = self.query(min(p.wall for p in ready) - AUDIT_WINDOW)
            if output:
                found = audit_removals(parse_journal(output))
        out = []
        for p in ready:
            seen = p.seen[0] if p.seen else None
            audit = pick_audit(found, p.module, p.wall)
            if audit is not None:
                live = self.scanner.read(audit.pid) if seen is None or seen[0].pid != audit.pid else None
                proc = merge(audit, seen[0] if seen else None, live)
                out.append(Culprit(p.module, "audit", proc, user_name(self.root, proc.auid),
                                   "the kernel's audit record of delete_module"))
            elif seen is not None:
                out.append(Culprit(p.module, "proc", seen[0], user_name(self.root, seen[0].auid), seen[1]))
            else:
                out.append(Culprit(p.module, "unknown"))
        return out
