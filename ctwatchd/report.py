"""What the daemon tells, each thing once per change: module states, blockers and notes, the restart
breaker, the one-line STATUS=, and the metrics file."""

from __future__ import annotations

from ctwatchd import core
from ctwatchd.attribution import Culprit
from ctwatchd.config import Config
from ctwatchd.hold import HoldChange
from ctwatchd.metrics import Metrics
from ctwatchd.model import HOLD_TABLE, AuditLog, ModuleState, Observation, RestoreResult, clean
from ctwatchd.notify import Notifier
from ctwatchd.verdict import Look


class Reporter:
    def __init__(self, log: AuditLog, notifier: Notifier, metrics: Metrics | None) -> None:
        self.log = log
        self.notifier = notifier
        self.metrics = metrics
        self.status = ""
        self.health = ""  # the health part of STATUS=, logged when it changes
        self.removal: str | None = None  # the last removal and its culprit, appended to STATUS=
        self.states: dict[str, ModuleState] = {}
        self.notes: set[str] = set()
        self.conflicts: set[str] = set()
        self.breaker = False
        self.held = ""  # the hold's part of STATUS=
        self._hold_said: tuple[str, str | None] | None = None
        self._metrics_error: str | None = None

    def look(self, cfg: Config, look: Look) -> None:
        obs, health = look.observation, look.decision.health
        for name, st in obs.modules.items():
            if st.note and name in look.watched and st.note not in self.notes:
                self.notes.add(st.note)
                self.log.warning("module.note", module=name, note=st.note)
            prev = self.states.get(name)
            if prev is st.state:
                continue
            self.states[name] = st.state
            if name not in look.watched:
                continue
            if st.state is ModuleState.BLOCKED:
                self.log.warning("module.blocked", module=name, blocker=st.blocker, state=st.state.value)
            else:
                self.log.info("module.state", module=name, state=st.state.value, detail=st.detail,
                              previous=prev.value if prev else None)
        for conflict in look.conflicts:
            if str(conflict) not in self.conflicts:  # once per file, line and key: not drift at every load
                self.conflicts.add(str(conflict))
                self.log.warning("sysctl.conflict", key=conflict.key, want=conflict.want,
                                 value=conflict.value, source=conflict.source)
        if look.decision.state.dropped:
            self.log.warning("tuning.dropped", keys=" ".join(look.decision.state.dropped))
        if health.breaker_open != self.breaker:
            self.breaker = health.breaker_open
            if self.breaker:
                self.log.warning("breaker.open", restarts=cfg.max_restarts, window=cfg.restart_window)
            else:
                self.log.info("breaker.closed")
        summary = clean(health.summary(obs, look.watched), 400)
        if summary != self.health:
            self.health = summary
            (self.log.info if health.healthy else self.log.warning)(
                "health.changed", status=summary, healthy=health.healthy)
        self._send_status()
        self._write_metrics(obs, look.watched, health)

    def hold(self, change: HoldChange) -> None:
        """One record per change of the hold; a refusal repeated by each retry is said once."""
        modules = " ".join(change.held.modules)
        if change.held:
            self.held = f"held: {modules}"
        elif change.reason and change.reason != "released":
            self.held = f"not held: {change.reason}"
        else:
            self.held = ""
        if change.event is not None and (change.event, change.reason) != self._hold_said:
            self._hold_said = (change.event, change.reason)
            warn = change.event in ("hold.lost", "hold.unavailable")
            (self.log.warning if warn else self.log.info)(
                change.event, table=HOLD_TABLE, held=modules or None, reason=change.reason)
        if self.metrics is not None:
            self.metrics.hold(change.held.modules)
        self._send_status()

    def _send_status(self) -> None:
        parts = [self.health, self.held, f"last removal: {self.removal}" if self.removal else ""]
        status = clean("; ".join(p for p in parts if p), 400)
        if status != self.status:
            self.status = status
            self.notifier.status(status)

    def removed(self, culprit: Culprit) -> None:
        """One module.removed record per removal, with the REMOVED_BY_* fields; STATUS= names it."""
        self.log.info("module.removed", culprit=culprit.summary(), why=culprit.why or None, **culprit.fields())
        self.removal = f"{culprit.module} by {culprit.summary()}"
        if self.metrics is not None:
            self.metrics.removal(culprit.proc.unit if culprit.proc else None, culprit.how)
        self._send_status()

    def restored(self, result: RestoreResult, state: core.CoreState, *, retry_in: float | None) -> None:
        if self.metrics is not None:
            self.metrics.record(result)
        failed = result.failed
        plan = result.plan
        log = self.log.info if result.ok else self.log.error
        log("restore.finished", result="ok" if result.ok else "failed", duration_ms=result.duration_ms,
            modules=" ".join(plan.modules) or None,
            detail=f"({failed.step.kind.value} {failed.step.module or ''}: {failed.detail})" if failed else None,
            retry_in=retry_in)
        if state.dropped:
            self.log.warning("tuning.dropped", keys=" ".join(state.dropped))
        for name in state.given_up:
            why = next((r.detail for r in reversed(result.results) if r.step.module == name and r.detail),
                       "its modprobe failed")
            self.log.warning("collateral.given_up", module=name, tries=core.COURTESY_TRIES, detail=why)
        if result.ok and state.unsettled >= core.UNSETTLED_AFTER:
            self.log.warning("restore.unsettled", count=state.unsettled, reason=plan.reason, retry_in=retry_in)

    def _write_metrics(self, obs: Observation, watched: tuple[str, ...], health: core.Health) -> None:
        if self.metrics is None:
            return
        self.metrics.observe(obs, watched, health.healthy, health.breaker_open)
        try:
            self.metrics.write()
        except OSError as exc:
            error = f"{exc.strerror or exc} ({self.metrics.path})"
            if error != self._metrics_error:  # once per distinct problem, not every poll
                self.log.warning("metrics.failed", path=str(self.metrics.path), detail=error)
            self._metrics_error = error
        else:
            self._metrics_error = None
