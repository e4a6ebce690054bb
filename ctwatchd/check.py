"""`ctwatchd check`: the runbook's diagnosis, once, as a table or JSON.

It takes the daemon's own path (verdict.Inspector, resumed from the state file), so it shows exactly
what the daemon would do now: owed docker/hook restarts, the tuning snapshot, the breaker.
Exit codes follow node-problem-detector's plugin convention: 0 healthy, 1 degraded, 2 cannot tell.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctwatchd import core, protect
from ctwatchd.config import Config, DockerMode
from ctwatchd.docker import DockerProbe
from ctwatchd.executor import systemctl_path
from ctwatchd.kernel import KernelProbe
from ctwatchd.model import HOLD_TABLE, HoldView, clean
from ctwatchd.runner import Runner
from ctwatchd.verdict import Inspector, Look, Resumed

HEALTHY, DEGRADED, UNKNOWN = 0, 1, 2


@dataclass(frozen=True)
class Report:
    look: Look
    docker: dict[str, Any]
    daemon: dict[str, Any]
    errors: tuple[str, ...]  # reasons we cannot tell
    desired: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()  # worth knowing, not a problem: unreadable tree files, blacklist rules
    hold: HoldView | None = None  # the kernel's view of the hold; None when not read (another --root)
    holds: dict[str, str] | None = None  # per watched module: held, not held and why, cannot be held

    @property
    def exit_code(self) -> int:
        if self.errors:
            return UNKNOWN
        return HEALTHY if self.look.decision.health.healthy else DEGRADED

    @property
    def status(self) -> str:
        return {HEALTHY: "healthy", DEGRADED: "degraded", UNKNOWN: "unknown"}[self.exit_code]

    def as_json(self) -> dict[str, Any]:
        obs = self.look.observation
        return {
            "status": self.status,
            "kernel": obs.release,
            "modules": [
                {"name": n, "state": obs.modules[n].state.value, "detail": obs.modules[n].detail,
                 "blocker": obs.modules[n].blocker, "note": obs.modules[n].note, "guard": obs.modules[n].guard,
                 "hold": (self.holds or {}).get(n)}
                for n in self.look.watched
            ],
            "hold": None if self.hold is None else {
                "table": HOLD_TABLE, "exists": self.hold.exists, "owner_flag": self.hold.owner_flag,
                "dormant": self.hold.dormant, "owner_port": self.hold.owner,
                "held": list(self.hold.spec.modules), "error": self.hold.error},
            "conntrack_count": obs.conntrack_count,
            "sysctls": dict(obs.sysctls),
            "problems": list(self.look.decision.health.problems),
            "errors": list(self.errors),
            "notes": list(self.notes),
            "would_do": [s.describe() for s in self.look.decision.plan.steps],
            "conflicts": [str(c) for c in self.look.conflicts],
            "docker": self.docker,
            "daemon": self.daemon,
        }


def docker_view(cfg: Config, root: Path) -> dict[str, Any]:
    """docker.service as the restore's last step sees it: active, its rules, live-restore."""
    if not (root / "run/systemd/system").is_dir():
        return {"unit": "unknown (systemd is not running)", "mode": cfg.docker.value}
    probe = DockerProbe(Runner(), systemctl=systemctl_path(cfg), iptables=cfg.iptables, root=root)
    unit = probe.unit()
    out: dict[str, Any] = {"unit": unit.active, "mode": cfg.docker.value}
    if not unit.installed:
        return out
    if unit.active == "active":
        rules = probe.rules()
        out.update(rules_intact=rules.intact, rules=rules.reason)
    live = probe.live_restore(unit)
    out.update(live_restore=live.enabled, live_restore_source=live.source)
    if live.enabled is False and cfg.docker is not DockerMode.NEVER:
        out["warning"] = ("live-restore is off: restarting docker stops every running container"
                          + ("; docker = \"if-needed\" restarts it only when its rules are gone"
                             if cfg.docker is DockerMode.IF_NEEDED else
                             "; docker = \"if-active\" restarts it after every module reload"))
    return out


def daemon_state(cfg: Config, probe: KernelProbe, resumed: Resumed, now: float) -> dict[str, Any]:
    """What the daemon last recorded, and whether it is still the one saying it."""
    out: dict[str, Any] = {"state_file": clean(str(cfg.state_file))}
    saved = resumed.saved
    if resumed.problem:
        out["error"] = f"state file ignored: {resumed.problem}"
        return out
    if saved is None:
        out["running"] = "no state file (ctwatchd run has not run)"
        return out
    recent = core.recent_restarts(cfg, resumed.state, now)
    out.update({
        "status": clean(saved.status, 1000),  # what the file says, escaped: a lone surrogate or ESC too
        "breaker_open": core.breaker_open(cfg, resumed.state, now),
        "restarts_in_window": len(recent),
        "restarts_owed": resumed.state.restarts_owed,
        "tuning_snapshot": len(saved.tuning),
        "collateral": sorted(resumed.state.dependents),
        "pid": saved.pid,
    })
    ago = f"{now - saved.written_at:.0f} s ago" if saved.written_at is not None else "an unknown time ago"
    if saved.boot_id is None or saved.boot_id != probe.boot_id():
        out["running"] = "not running in this boot (the state file is from an earlier one)"
    elif saved.stopped:
        out["running"] = f"not running since {ago} (stopped)"
    elif saved.pid is None or not probe.process_alive(saved.pid):
        out["running"] = f"not running since at most {ago} (pid {saved.pid} is gone)"
    else:
        out["running"] = "yes"
    return out


def run_check(cfg: Config, root: Path = Path("/"),
              read_hold: Callable[[], HoldView] | None = None) -> Report:
    """`read_hold` asks the kernel for the hold's table; None (another --root) leaves it unread."""
    probe = KernelProbe(root)
    errors = [f"{p} is not readable; is /sys or /proc mounted?"
              for p in (root / "sys/module", root / "proc/sys/kernel") if not p.is_dir()]
    notes: list[str] = []
    inspector = Inspector(probe, on_problem=notes.append)
    now = time.monotonic()
    resumed = inspector.resume(cfg, now)
    look = inspector.look(cfg, resumed.state, now)
    notes += [f"{n}: {s.note}" for n, s in look.observation.modules.items() if s.note and n in look.watched]
    if (firewalld := protect.firewalld_note(root)) is not None:
        notes.append(firewalld)
    view = read_hold() if read_hold is not None and cfg.hold else None
    return Report(look, docker_view(cfg, root), daemon_state(cfg, probe, resumed, now), tuple(errors),
                  cfg.sysctls, tuple(dict.fromkeys(notes)), view,
                  core.hold_rows(cfg, look.observation, look.watched, view))


def format_table(report: Report) -> str:
    obs = report.look.observation
    lines = [f"kernel {obs.release}", "", f"{'MODULE':<20} {'STATE':<12} DETAIL"]
    for name in report.look.watched:
        st = obs.modules[name]
        detail = st.detail + (f"; blocker: {st.blocker}" if st.blocker and st.blocker not in st.detail else "")
        lines.append(f"{name:<20} {st.state.value:<12} {detail}")
    lines += ["", f"{'SYSCTL':<45} {'VALUE':<10} DESIRED"]
    count = "unreadable" if obs.conntrack_count is None else str(obs.conntrack_count)
    lines.append(f"{'net.netfilter.nf_conntrack_count':<45} {count:<10} readable")
    want = dict(report.desired)
    for key, value in obs.sysctls.items():
        shown = clean(value, 40) if value is not None else "missing"
        lines.append(f"{key:<45} {shown:<10} {want.get(key, '')}")
    guarded = [n for n in report.look.watched if obs.modules[n].guard]
    if guarded:
        where = {str(obs.modules[n].guard) for n in guarded}
        lines += ["", f"unload guard: modprobe -r refused for {', '.join(guarded)} ({'; '.join(sorted(where))})"]
    else:
        lines += ["", "unload guard: none (`ctwatchd protect` makes modprobe -r of the watched modules fail)"]
    lines += ["", f"{'HOLD':<20} (rmmod and modprobe -r of a held module fail while ctwatchd runs)"]
    for name, text in (report.holds or {}).items():
        lines.append(f"{name:<20} {text}")
    lines += ["", f"docker.service: {_docker_line(report.docker)}"]
    if report.docker.get("warning"):
        lines.append(f"warning: {report.docker['warning']}")
    d = report.daemon
    if "status" in d:
        breaker = "open (docker/hook restarts paused)" if d.get("breaker_open") else "closed"
        running = d.get("running")
        if running == "yes":
            lines.append(f"daemon: running (pid {d.get('pid')}): {d['status'] or 'no status yet'}; "
                         f"restart breaker {breaker}")
        else:
            lines.append(f"daemon: {running}; its last status: {d['status'] or 'none'}")
    else:
        lines.append(f"daemon: {d.get('error') or d.get('running')}")
    if d.get("collateral"):
        lines.append(f"remembered to come back with them: {', '.join(d['collateral'])}")
    plan = report.look.decision.plan
    if plan.steps:
        lines += ["", "ctwatchd restore would:"] + [f"  {i}. {s.describe()}" for i, s in enumerate(plan.steps, 1)]
    lines.append("")
    for conflict in report.look.conflicts:
        lines.append(f"conflict: {conflict} (written back after each module load)")
    for note in report.notes:
        lines.append(f"note: {note}")
    for err in report.errors:
        lines.append(f"cannot tell: {err}")
    lines.append(status_line(report))
    return "\n".join(lines)


# node-problem-detector keeps this many bytes of a plugin's output (max_output_length in
# packaging/node-problem-detector/ctwatchd-monitor.json; Go slices the string by bytes) as the
# node condition's message.
STATUS_LIMIT = 256


def status_line(report: Report) -> str:
    """The last line, which NPD and the liveness probe show: each problem without the detail the
    table above already gives (why a module is absent), so all of them fit in STATUS_LIMIT bytes."""
    obs = report.look.observation
    heads = [f"{n} {st.state.value}" for n in report.look.watched if (st := obs.modules.get(n)) is not None]
    brief = [next((h for h in heads if p.startswith(h + " (")), p) for p in report.look.decision.health.problems]
    line = clean(f"status: {report.status}" + (f" ({'; '.join(brief)})" if brief else ""), 4 * STATUS_LIMIT)
    raw = line.encode()
    if len(raw) <= STATUS_LIMIT:
        return line
    # cut at a character boundary, so a Cyrillic file name cannot end in half a UTF-8 sequence
    return raw[:STATUS_LIMIT - len("…".encode())].decode(errors="ignore") + "…"


def _docker_line(d: dict[str, Any]) -> str:
    parts = [str(d["unit"]), f"docker = \"{d['mode']}\""]
    if "rules" in d:
        parts.append(f"rules: {d['rules']}")
    if "live_restore" in d:
        state = {True: "on", False: "off", None: "unknown"}[d["live_restore"]]
        parts.append(f"live-restore {state} ({d['live_restore_source']})")
    return "; ".join(parts)


def format_json(report: Report) -> str:
    return json.dumps(report.as_json(), indent=2, sort_keys=True)
