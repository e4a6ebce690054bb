"""`ctwatchd check`: the runbook's diagnosis, once, as a table or JSON.

Exit codes follow node-problem-detector's plugin convention: 0 healthy, 1 degraded, 2 cannot tell.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctwatchd import core
from ctwatchd import state as statefile
from ctwatchd.config import Config
from ctwatchd.executor import DOCKER_UNIT, systemctl_path
from ctwatchd.kernel import KernelProbe
from ctwatchd.model import Observation, RestorePlan
from ctwatchd.runner import Runner

HEALTHY, DEGRADED, UNKNOWN = 0, 1, 2


@dataclass(frozen=True)
class Report:
    observation: Observation
    health: core.Health
    plan: RestorePlan
    modules: tuple[str, ...]
    docker: str
    daemon: dict[str, Any]
    errors: tuple[str, ...]  # reasons we cannot tell
    desired: tuple[tuple[str, str], ...] = ()

    @property
    def exit_code(self) -> int:
        if self.errors:
            return UNKNOWN
        return HEALTHY if self.health.healthy else DEGRADED

    @property
    def status(self) -> str:
        return {HEALTHY: "healthy", DEGRADED: "degraded", UNKNOWN: "unknown"}[self.exit_code]

    def as_json(self) -> dict[str, Any]:
        obs = self.observation
        return {
            "status": self.status,
            "kernel": obs.release,
            "modules": [
                {"name": n, "state": obs.modules[n].state.value, "detail": obs.modules[n].detail,
                 "blocker": obs.modules[n].blocker}
                for n in self.modules
            ],
            "conntrack_count": obs.conntrack_count,
            "sysctls": dict(obs.sysctls),
            "problems": list(self.health.problems),
            "errors": list(self.errors),
            "would_do": [s.describe() for s in self.plan.steps],
            "docker": self.docker,
            "daemon": self.daemon,
        }


def docker_state(cfg: Config, root: Path) -> str:
    if not (root / "run/systemd/system").is_dir():
        return "unknown (systemd is not running)"
    done = Runner().run([systemctl_path(cfg), "is-active", DOCKER_UNIT], 5.0)
    if done.error:
        return f"unknown ({done.error})"
    word = done.output.strip().splitlines()[-1:] or ["unknown"]
    return word[0]


def daemon_state(cfg: Config, now: float) -> tuple[dict[str, Any], tuple[float, ...]]:
    """What the running daemon last recorded (status line, breaker), from its state file."""
    try:
        saved = statefile.load(cfg.state_file)
    except statefile.StateError as exc:
        return {"state_file": str(cfg.state_file), "error": f"state file ignored: {exc}"}, ()
    if saved is None:
        return {"state_file": str(cfg.state_file), "running": "no state file (ctwatchd run has not run)"}, ()
    recent = tuple(t for t in saved.restarts if now - t < cfg.restart_window)
    return {
        "state_file": str(cfg.state_file),
        "status": saved.status,
        "breaker_open": len(recent) >= cfg.max_restarts,
        "restarts_in_window": len(recent),
        "tuning_snapshot": len(saved.tuning),
    }, recent


def run_check(cfg: Config, root: Path = Path("/")) -> Report:
    probe = KernelProbe(root)
    errors = [f"{p} is not readable; is /sys or /proc mounted?"
              for p in (root / "sys/module", root / "proc/sys/kernel") if not p.is_dir()]
    facts = probe.facts()
    obs = probe.observe(facts, core.observed_modules(cfg.modules, facts.release), [k for k, _ in cfg.sysctls])
    now = time.monotonic()
    daemon, restarts = daemon_state(cfg, now)
    decision = core.decide(cfg, core.CoreState(restarts=restarts), obs, now)
    modules = core.effective_modules(cfg.modules, obs)
    return Report(obs, decision.health, decision.plan, modules, docker_state(cfg, root), daemon, tuple(errors),
                  cfg.sysctls)


def format_table(report: Report) -> str:
    obs = report.observation
    lines = [f"kernel {obs.release}", "", f"{'MODULE':<20} {'STATE':<12} DETAIL"]
    for name in report.modules:
        st = obs.modules[name]
        detail = st.detail + (f"; blocker: {st.blocker}" if st.blocker and st.blocker not in st.detail else "")
        lines.append(f"{name:<20} {st.state.value:<12} {detail}")
    lines += ["", f"{'SYSCTL':<45} {'VALUE':<10} DESIRED"]
    count = "unreadable" if obs.conntrack_count is None else str(obs.conntrack_count)
    lines.append(f"{'net.netfilter.nf_conntrack_count':<45} {count:<10} readable")
    want = dict(report.desired)
    for key, value in obs.sysctls.items():
        lines.append(f"{key:<45} {value if value is not None else 'missing':<10} {want.get(key, '')}")
    lines += ["", f"docker.service: {report.docker}"]
    d = report.daemon
    if "status" in d:
        breaker = "open (docker/hook restarts paused)" if d.get("breaker_open") else "closed"
        lines.append(f"daemon: {d['status'] or 'no status yet'}; restart breaker {breaker}")
    else:
        lines.append(f"daemon: {d.get('error') or d.get('running')}")
    if report.plan.steps:
        lines += ["", "ctwatchd restore would:"] + [f"  {i}. {s.describe()}"
                                                   for i, s in enumerate(report.plan.steps, 1)]
    lines.append("")
    for err in report.errors:
        lines.append(f"cannot tell: {err}")
    problems = "; ".join(report.health.problems)
    lines.append(f"status: {report.status}" + (f" ({problems})" if problems else ""))
    return "\n".join(lines)


def format_json(report: Report) -> str:
    return json.dumps(report.as_json(), indent=2, sort_keys=True)
