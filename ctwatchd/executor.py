"""Carrying out a RestorePlan: each step run, verified, audited; the first failure stops the rest.

Nothing is undone on failure: every step moves the host towards the desired state (a loaded module,
a desired sysctl), so "undo" would only make things worse. The executor never raises.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctwatchd.config import MODPROBE_PATHS, SYSTEMCTL_PATHS, Config, DockerMode
from ctwatchd.docker import DOCKER_UNIT, Baseline, DockerProbe
from ctwatchd.kernel import KernelProbe, tuning_path
from ctwatchd.model import (
    AuditLog,
    Outcome,
    RestorePlan,
    RestoreResult,
    Step,
    StepKind,
    StepResult,
    clean,
    is_module_name,
    normalize_value,
)
from ctwatchd.runner import Completed, Runner

LIVE_WAIT = 2.0  # modprobe returns after init; allow a little for initstate to read "live"
DEFERRED_DOCKER = ("deferred until ctwatchd is ready: the unit is Before=docker.service, so docker's start "
                   "job would wait for ctwatchd's own start")
DEFERRED_HOOK = "deferred with docker's restart: runs after it, once ctwatchd is ready"


def first_existing(candidates: tuple[str, ...]) -> str:
    for c in candidates:
        if os.path.exists(c):
            return c
    return candidates[0]


def modprobe_path(cfg: Config) -> str:
    return cfg.modprobe or first_existing(MODPROBE_PATHS)


def systemctl_path(cfg: Config) -> str:
    return cfg.systemctl or first_existing(SYSTEMCTL_PATHS)


@dataclass
class Executor:
    cfg: Config
    probe: KernelProbe
    runner: Runner
    log: AuditLog
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    # What traffic needed of docker's rules while healthy, or after docker's last restart: what
    # "if-needed" judges against. The daemon keeps it across reloads.
    docker_baseline: Baseline | None = None
    # Until READY: a docker restart, and the hooks after it, are left owed for the first look after it
    # (a try-restart now would deadlock on the ordering until docker_timeout).
    defer_restarts: bool = False

    def docker_probe(self) -> DockerProbe:
        return DockerProbe(self.runner, systemctl=systemctl_path(self.cfg), iptables=self.cfg.iptables,
                           root=self.probe.root)

    def take_docker_baseline(self, taken: str) -> Baseline | None:
        """Read docker's rules as the baseline, when docker is active and they can be read; never raises."""
        try:
            baseline = self.docker_probe().baseline(taken)
        except Exception:  # a courtesy: the judgement falls back to docker's minimum
            return None
        if baseline is not None:
            before, self.docker_baseline = self.docker_baseline, baseline
            if before is None or before.present != baseline.present:  # a refresh that changed nothing is quiet
                self.log.info("docker.baseline", taken=taken, present=" ".join(sorted(baseline.present)) or None)
        return baseline

    def execute(self, plan: RestorePlan) -> RestoreResult:
        start = self.clock()
        results: list[StepResult] = []
        stopped: StepResult | None = None
        deferring = False
        for step in plan.steps:
            if stopped is not None:
                results.append(StepResult(step, Outcome.SKIPPED, 0.0, f"not run: {_name(stopped.step)} "
                                                                      f"{stopped.outcome.value}"))
                continue
            t0 = self.clock()
            if step.kind is StepKind.RESTART_DOCKER and self.defer_restarts and self._docker_active():
                deferring = True
            if deferring and step.kind in (StepKind.RESTART_DOCKER, StepKind.RUN_HOOK):
                detail = DEFERRED_DOCKER if step.kind is StepKind.RESTART_DOCKER else DEFERRED_HOOK
                result = StepResult(step, Outcome.SKIPPED, 0.0, detail, deferred=True)
                results.append(result)
                self._audit(result, t0)
                continue
            dropped: tuple[str, ...] = ()
            try:
                if step.kind is StepKind.RESTORE_TUNING:
                    outcome, detail, dropped = self._tuning(step.sysctls)
                else:
                    outcome, detail = self._run(step)
            except Exception as exc:  # the executor never raises
                outcome, detail = Outcome.FAILED, f"internal error: {type(exc).__name__}: {clean(str(exc))}"
            result = StepResult(step, outcome, round((self.clock() - t0) * 1000, 1), detail, dropped)
            results.append(result)
            self._audit(result, t0)
            if outcome in (Outcome.FAILED, Outcome.INTERRUPTED):
                stopped = result
        return RestoreResult(plan, tuple(results), round((self.clock() - start) * 1000, 1))

    def _audit(self, r: StepResult, started: float) -> None:
        level = "info" if r.outcome in (Outcome.OK, Outcome.SKIPPED) else "error"
        getattr(self.log, level)(
            "restore.step", action=r.step.kind.value, module=r.step.module, result=r.outcome.value,
            duration_ms=r.duration_ms, detail=r.detail or None,
            argv=" ".join(r.step.argv) if r.step.argv else None,
            monotonic=round(started, 6),  # when the step began (CLOCK_MONOTONIC), for latency analysis
        )

    def _run(self, step: Step) -> tuple[Outcome, str]:
        if step.kind is StepKind.LOAD_MODULE:
            return self._load(step.module or "")
        if step.kind is StepKind.VERIFY_CONNTRACK:
            count = self.probe.conntrack_count()
            if count is None or count < 0:
                return Outcome.FAILED, "/proc/sys/net/netfilter/nf_conntrack_count is not readable"
            return Outcome.OK, f"nf_conntrack_count={count}"
        if step.kind is StepKind.WRITE_SYSCTLS:
            return self._sysctls(step.sysctls)
        if step.kind is StepKind.RESTART_DOCKER:
            return self._docker(DockerMode(step.when or DockerMode.IF_ACTIVE.value))
        return self._completed(self.runner.run(step.argv, self.cfg.hook_timeout))

    def _load(self, name: str) -> tuple[Outcome, str]:
        if not is_module_name(name):
            # Plans only name validated modules; this keeps an option or a path off modprobe's command
            # line even if a Config or plan is built some other way.
            return Outcome.FAILED, f"refusing to run modprobe for {name!r}: not a plain module name"
        done = self.runner.run([modprobe_path(self.cfg), name], self.cfg.module_timeout)
        if not done.ok:
            return self._completed(done)
        deadline = self.clock() + LIVE_WAIT
        while True:
            state = self.probe.initstate(name)
            if state == "live":
                return Outcome.OK, "initstate live"
            if self.clock() >= deadline:
                break
            self.sleep(0.01)
        if state is None:
            return Outcome.FAILED, (f"modprobe {name} exited 0 but {name} is not loaded: it was removed again "
                                    "at once, or an 'install' rule in modprobe.d replaced the load")
        return Outcome.FAILED, f"modprobe {name} succeeded but /sys/module/{name}/initstate is {clean(repr(state))}"

    def _sysctls(self, pairs: tuple[tuple[str, str], ...]) -> tuple[Outcome, str]:
        failures: list[str] = []
        written = 0
        for key, value in pairs:
            current = self.probe.read_sysctl(key)
            if current is not None and normalize_value(current) == normalize_value(value):
                continue  # already right: no write (a buckets write would even rehash the table)
            problem = write_sysctl(self.probe.root, key, value)
            written += 1
            self.log.info("sysctl.write", key=key, value=value, previous=current,
                          result="ok" if problem is None else "failed", detail=problem)
            if problem is not None:
                failures.append(problem)
        if failures:
            return Outcome.FAILED, "; ".join(failures)
        return Outcome.OK, f"{written} written and read back, {len(pairs) - written} already set"

    def _tuning(self, pairs: tuple[tuple[str, str], ...]) -> tuple[Outcome, str, tuple[str, ...]]:
        """The snapshot back after a reload. A key the new module does not have (ENOENT) or refuses
        (EINVAL) is dropped from the snapshot, not a failure: retrying cannot make it appear."""
        failures: list[str] = []
        dropped: list[str] = []
        written = 0
        for key, value in pairs:
            current = self.probe.read_sysctl(key)
            if current is not None and normalize_value(current) == normalize_value(value):
                continue
            problem = write_sysctl(self.probe.root, key, value)
            written += 1
            # Gone for good: a file the new module lacks, a value it refuses, a parameter the sandbox
            # keeps read-only (/sys is, under the unit; nf_conntrack_buckets carries the same value).
            gone = problem is not None and (current is None or "(EINVAL)" in problem
                                            or (key.startswith("module.") and "(EROFS)" in problem))
            self.log.info("sysctl.write", key=key, value=value, previous=current,
                          result="ok" if problem is None else "dropped" if gone else "failed", detail=problem)
            if gone:
                dropped.append(key)
            elif problem is not None:
                failures.append(problem)
        if failures:
            return Outcome.FAILED, "; ".join(failures), tuple(dropped)
        tail = f"; dropped from the snapshot: {', '.join(dropped)}" if dropped else ""
        return Outcome.OK, f"{written - len(dropped)} written and read back, " \
                           f"{len(pairs) - written} already set{tail}", tuple(dropped)

    def _docker_active(self) -> bool:
        done = self.runner.run([systemctl_path(self.cfg), "is-active", "--quiet", DOCKER_UNIT], 10.0)
        return done.ok

    def _docker(self, mode: DockerMode) -> tuple[Outcome, str]:
        """The runbook's last step: restart docker so it sets its chains up again. With "if-needed" only
        when what container traffic needs of its rules is gone: without live-restore a restart stops
        every container."""
        systemctl = systemctl_path(self.cfg)
        docker = self.docker_probe()
        active = self.runner.run([systemctl, "is-active", "--quiet", DOCKER_UNIT], 10.0)
        if active.error or active.timed_out or active.interrupted:
            return self._completed(active)
        if not active.ok:
            unit = docker.unit()
            why = "is not installed" if unit.installed is False else \
                f"is not active ({unit.active})" if unit.installed else "is not active"
            self._decided(mode, restart=False, reason=f"{DOCKER_UNIT} {why}")
            return Outcome.SKIPPED, f"{DOCKER_UNIT} {why}"
        compared = None
        if mode is DockerMode.IF_NEEDED:
            rules = docker.rules(self.docker_baseline)
            if rules.intact is None:
                return Outcome.FAILED, f"cannot tell whether docker's iptables rules are intact: {rules.reason}"
            compared = rules.compared or None
            if rules.intact:
                self._decided(mode, restart=False, reason=rules.reason, compared=compared)
                return Outcome.SKIPPED, f"{rules.reason}: {DOCKER_UNIT} not restarted"
            reason = rules.reason
        else:
            reason = "if-active: restarted after every module reload"
        self._decided(mode, restart=True, reason=reason, compared=compared)
        outcome, detail = self._completed(self.runner.run([systemctl, "try-restart", DOCKER_UNIT],
                                                          self.cfg.docker_timeout))
        if outcome is Outcome.OK and mode is DockerMode.IF_NEEDED:
            # What docker re-created is all a restart can give: the next fault is judged against it, so
            # a chain it never re-creates cannot make every later repair restart it again.
            self.take_docker_baseline("after docker's restart")
        return outcome, f"{detail} ({reason})"

    def _decided(self, mode: DockerMode, *, restart: bool, reason: str, compared: str | None = None) -> None:
        """One record per decision, so `journalctl CTWATCHD_EVENT=docker.decision` answers "why (not)"."""
        self.log.info("docker.decision", mode=mode.value, restart=restart, reason=reason, compared=compared)

    @staticmethod
    def _completed(done: Completed) -> tuple[Outcome, str]:
        if done.ok:
            return Outcome.OK, f"{os.path.basename(done.argv[0])} exited 0"
        return (Outcome.INTERRUPTED if done.interrupted else Outcome.FAILED), done.why()


def write_sysctl(root: Path, key: str, value: str) -> str | None:
    """Write one sysctl (or nf_conntrack parameter) and read it back; None on success, else a sentence
    naming key and cause."""
    try:
        path = tuning_path(root, key)
    except ValueError as exc:
        return str(exc)
    try:
        # No O_CREAT: a missing /proc/sys file is an error, never created. O_NONBLOCK: /proc/sys ignores
        # it, but a FIFO where a sysctl file belongs must fail (ENXIO), not hang the daemon.
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode() + b"\n")
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            back = os.read(fd, 4096).decode("ascii", "replace")
        finally:
            os.close(fd)
    except OSError as exc:
        reason = {errno.ENOENT: "does not exist", errno.EPERM: "permission denied (EPERM)",
                  errno.EACCES: "permission denied (EACCES)", errno.EROFS: "read-only file system (EROFS)",
                  errno.EINVAL: f"the kernel rejected the value {clean(repr(value), 80)} (EINVAL)"}.get(
                      exc.errno or 0, exc.strerror or str(exc))
        return f"{key}: cannot write {path}: {reason}"
    if normalize_value(back) != normalize_value(value):
        return f"{key}: wrote {clean(repr(value), 80)} but read back {clean(repr(normalize_value(back)), 80)}"
    return None


def _name(step: Step) -> str:
    return f"{step.kind.value} {step.module}" if step.module else step.kind.value
