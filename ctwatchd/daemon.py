"""The daemon: one selectors loop owning the clock, the uevent fd, the signal fd and the timers.

uevent or poll -> probe.observe() -> core.decide() -> executor.execute() -> core.record(), with an
audit record at each arrow. Signal handlers do nothing but wake the loop (set_wakeup_fd); the loop
dispatches them. WATCHDOG=1 is sent from this loop only, including while a step's subprocess runs.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable

from ctwatchd import __version__, core
from ctwatchd import state as statefile
from ctwatchd.config import Config, ConfigError
from ctwatchd.core import CoreState, core_state
from ctwatchd.executor import Executor
from ctwatchd.kernel import KernelFacts, KernelProbe
from ctwatchd.metrics import Metrics, MetricsUnavailable
from ctwatchd.model import AuditLog, ModuleState, Observation
from ctwatchd.notify import Notifier, watchdog_interval
from ctwatchd.runner import Runner
from ctwatchd.uevents import ModuleEvent, MonitorClosed, Overrun, UeventSource

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)
MONITOR_RETRY = 30.0


def _noop(_signum: int, _frame: object) -> None:
    """The handler only exists so the signal does not kill us; set_wakeup_fd carries the number."""


class Daemon:
    def __init__(self, cfg: Config, *, probe: KernelProbe, log: AuditLog,
                 reload_config: Callable[[], Config],
                 monitor_factory: Callable[[], UeventSource] | None,
                 notifier: Notifier | None = None,
                 env: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.probe = probe
        self.log = log
        self.reload_config = reload_config
        self.monitor_factory = monitor_factory
        self.env = dict(os.environ if env is None else env)
        self.notifier = notifier or Notifier(on_error=lambda d: log.warning("notify.failed", detail=d))
        self.clock = clock
        self.watchdog_every = watchdog_interval(self.env, os.getpid())
        self.state = CoreState()
        self.facts: KernelFacts = probe.facts()
        self.metrics = make_metrics(cfg)
        self._metrics_error: str | None = None
        self.executor = self._executor()
        self.sel = selectors.DefaultSelector()
        self.monitor: UeventSource | None = None
        self.monitor_retry_at: float | None = None
        self.pending_signals: list[int] = []
        self.stop_signal: int | None = None
        self.hint: str | None = "start"
        self.wake_at: float | None = None
        self.next_poll = 0.0
        self.next_watchdog: float | None = None
        self.last_status = ""
        self.last_states: dict[str, ModuleState] = {}
        self.last_breaker = False
        self.observation: Observation | None = None
        self.watched: tuple[str, ...] = cfg.modules  # desired + legacy, as of the last observation
        self.reconciles = 0
        self._wakeup_r: socket.socket | None = None
        self._wakeup_w: socket.socket | None = None
        self._saved: statefile.SavedState | None = None

    def _executor(self) -> Executor:
        return Executor(self.cfg, self.probe, Runner(tick=self._tick), self.log, clock=self.clock)

    # -- lifecycle ----------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        try:
            self.log.info("daemon.started", version=__version__, modules=" ".join(self.cfg.modules),
                          config=str(self.cfg.path) if self.cfg.path else "built-in defaults",
                          pid=os.getpid())
            self._open_monitor()
            self._load_state()
            self.reconcile()
            for _ in range(3):  # READY reports the verified state after a start-up restore
                if self.hint != "verify":
                    break
                self.reconcile()
            self.notifier.ready(self.last_status)
            self.log.info("daemon.ready", status=self.last_status)
            self._ping_watchdog()
            self._loop()
            return 0
        finally:
            self._restore_signals()
            if self.monitor is not None:
                self.monitor.close()
            self.sel.close()

    def _loop(self) -> None:
        while self.stop_signal is None:
            now = self.clock()
            deadlines = [d for d in (self.next_poll, self.wake_at, self.next_watchdog, self.monitor_retry_at)
                         if d is not None]
            timeout = 0.0 if self.hint or self.pending_signals else max(0.0, min(deadlines) - now)
            for key, _ in self.sel.select(timeout):
                key.data()
            self._dispatch_signals()
            if self.stop_signal is not None:
                break
            now = self.clock()
            self._maybe_watchdog(now)
            if self.monitor_retry_at is not None and now >= self.monitor_retry_at:
                self._open_monitor()
            if self.hint or now >= self.next_poll or (self.wake_at is not None and now >= self.wake_at):
                self.reconcile()
        self.notifier.stopping()
        self.log.info("daemon.stopping", signal=signal.Signals(self.stop_signal).name)

    # -- signals ------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        for s in (self._wakeup_r, self._wakeup_w):
            s.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        self._old_handlers = {s: signal.signal(s, _noop) for s in HANDLED_SIGNALS}
        self.sel.register(self._wakeup_r, selectors.EVENT_READ, self._read_signals)

    def _restore_signals(self) -> None:
        if self._wakeup_w is None:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        for sock in (self._wakeup_r, self._wakeup_w):
            if sock is not None:
                sock.close()
        self._wakeup_w = None

    def _read_signals(self) -> None:
        if self._wakeup_r is None:
            return
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while data := self._wakeup_r.recv(64):
                self.pending_signals.extend(data)

    def _dispatch_signals(self) -> None:
        while self.pending_signals:
            signum = self.pending_signals.pop(0)
            if signum in STOP_SIGNALS:
                self.stop_signal = signum
                self.pending_signals.clear()  # a reload queued behind a stop would only delay it
                return
            if signum == signal.SIGHUP:
                self.handle_reload()

    def _tick(self) -> bool:
        """Called while a step's subprocess runs: keep the watchdog fed and notice a stop request."""
        self._read_signals()
        self._maybe_watchdog(self.clock())
        return any(s in STOP_SIGNALS for s in self.pending_signals)

    def handle_reload(self) -> None:
        self.notifier.reloading(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        try:
            new = self.reload_config()
        except ConfigError as exc:
            self.log.error("config.rejected", error=str(exc))
        else:
            try:
                metrics = make_metrics(new) if new.metrics_textfile != self.cfg.metrics_textfile else self.metrics
            except MetricsUnavailable as exc:
                self.log.error("config.rejected", error=str(exc))
                new = self.cfg
                metrics = self.metrics
            self.metrics = metrics
            self.cfg = new
            self.facts = self.probe.facts()
            self.executor = self._executor()
            self.next_poll = 0.0
            self.log.info("config.loaded", path=str(new.path) if new.path else "built-in defaults")
        self.hint = "reload"
        self.reconcile()
        self.notifier.ready(self.last_status)

    # -- watchdog -----------------------------------------------------------------------------
    def _ping_watchdog(self) -> None:
        if self.watchdog_every is None:
            return
        self.notifier.watchdog()
        self.next_watchdog = self.clock() + self.watchdog_every

    def _maybe_watchdog(self, now: float) -> None:
        if self.next_watchdog is not None and now >= self.next_watchdog:
            self._ping_watchdog()

    # -- uevents ------------------------------------------------------------------------------
    def _open_monitor(self) -> None:
        self.monitor_retry_at = None
        if self.monitor_factory is None:
            return
        try:
            self.monitor = self.monitor_factory()
            self.sel.register(self.monitor.fileno(), selectors.EVENT_READ, self._on_uevents)
        except Exception as exc:
            self.monitor = None
            self.monitor_retry_at = self.clock() + MONITOR_RETRY
            self.log.warning("monitor.failed", detail=f"{type(exc).__name__}: {exc}",
                             poll_interval=self.cfg.poll_interval)

    def _on_uevents(self) -> None:
        if self.monitor is None:
            return
        try:
            events = self.monitor.drain()
        except Overrun as exc:
            self.log.warning("monitor.overrun", detail=str(exc))
            self.hint = "overrun"
            return
        except (MonitorClosed, OSError) as exc:
            self.log.error("monitor.failed", detail=f"{type(exc).__name__}: {exc}",
                           poll_interval=self.cfg.poll_interval)
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.monitor.fileno())
            self.monitor.close()
            self.monitor = None
            self.monitor_retry_at = self.clock() + MONITOR_RETRY
            self.hint = "monitor-failed"
            return
        for ev in events:
            if ev.module in self.watched:
                self._on_module_event(ev)

    def _on_module_event(self, ev: ModuleEvent) -> None:
        self.log.info("module.event", action=ev.action, module=ev.module, monotonic=round(self.clock(), 6))
        self.hint = f"uevent {ev.action} {ev.module}"

    # -- reconcile ----------------------------------------------------------------------------
    def observe(self) -> Observation:
        return self.probe.observe(self.facts, core.observed_modules(self.cfg.modules, self.facts.release),
                                  [k for k, _ in self.cfg.sysctls],
                                  with_tuning=self.cfg.keep_conntrack_tuning)

    def reconcile(self) -> None:
        self.reconciles += 1
        self.hint = None
        now = self.clock()
        self.next_poll = now + self.cfg.poll_interval
        obs = self.observe()
        decision = core.decide(self.cfg, self.state, obs, now)
        # modules.dep and modprobe.d only matter when something is missing, so a healthy poll does not
        # even stat them; otherwise a changed file (a lifted blocker, a depmod) is read before acting.
        if ((decision.plan or not decision.health.healthy)
                and self.probe.fingerprint(self.facts.release, self.facts.conf_files) != self.facts.fingerprint):
            self.facts = self.probe.facts()
            obs = self.observe()
            decision = core.decide(self.cfg, self.state, obs, now)
        self.state = decision.state
        self.wake_at = decision.wake_at
        self._report(obs, decision.health)
        self._save_state()
        self._write_metrics(obs, decision.health)
        plan = decision.plan
        if not plan:
            return
        self.log.info("restore.planned", reason=plan.reason, plan="; ".join(s.describe() for s in plan.steps),
                      modules=" ".join(plan.modules) or None, monotonic=round(now, 6),
                      restarts_skipped=plan.skipped_restarts or None)
        result = self.executor.execute(plan)
        self.state = core.record(self.cfg, self.state, result, self.clock())
        if self.metrics is not None:
            self.metrics.record(result)
        failed = result.failed
        log = self.log.info if result.ok else self.log.error
        log("restore.finished", result="ok" if result.ok else "failed", duration_ms=result.duration_ms,
            modules=" ".join(plan.modules) or None,
            detail=f"({failed.step.kind.value} {failed.step.module or ''}: {failed.detail})" if failed else None,
            retry_in=round(self.state.retry_at - self.clock(), 2) if self.state.retry_at else None)
        self._save_state()
        self.hint = "verify"  # read the kernel again now: confirm, and catch what changed meanwhile
        if self.stop_signal is None and any(s in STOP_SIGNALS for s in self.pending_signals):
            self.hint = None

    def _report(self, obs: Observation, health: core.Health) -> None:
        self.observation = obs
        self.watched = core.effective_modules(self.cfg.modules, obs)
        for name, st in obs.modules.items():
            prev = self.last_states.get(name)
            if prev is st.state:
                continue
            self.last_states[name] = st.state
            if name not in self.watched:
                continue
            if st.state is ModuleState.BLOCKED:
                self.log.warning("module.blocked", module=name, blocker=st.blocker, state=st.state.value)
            else:
                self.log.info("module.state", module=name, state=st.state.value, detail=st.detail,
                              previous=prev.value if prev else None)
        breaker = health.breaker_open
        if breaker != self.last_breaker:
            self.last_breaker = breaker
            if breaker:
                self.log.warning("breaker.open", restarts=self.cfg.max_restarts, window=self.cfg.restart_window)
            else:
                self.log.info("breaker.closed")
        status = health.summary(obs, self.watched)
        if status != self.last_status:
            self.last_status = status
            (self.log.info if health.healthy else self.log.warning)(
                "health.changed", status=status, healthy=health.healthy)
            self.notifier.status(status)

    def _write_metrics(self, obs: Observation, health: core.Health) -> None:
        if self.metrics is None:
            return
        self.metrics.observe(obs, self.watched, health.healthy, health.breaker_open)
        try:
            self.metrics.write()
        except OSError as exc:
            error = f"{exc.strerror or exc} ({self.metrics.path})"
            if error != self._metrics_error:  # once per distinct problem, not every poll
                self.log.warning("metrics.failed", path=str(self.metrics.path), detail=error)
            self._metrics_error = error
        else:
            self._metrics_error = None

    # -- state file ---------------------------------------------------------------------------
    def _load_state(self) -> None:
        path = self.cfg.state_file
        try:
            saved = statefile.load(path)
        except statefile.StateError as exc:
            self.log.warning("state.ignored", path=str(path), detail=str(exc))
            return
        if saved is not None:
            self.state = core_state(saved)
            self._saved = saved

    def _save_state(self) -> None:
        s = self.state
        saved = statefile.SavedState(dict(s.tuning), s.conntrack_reloaded, s.restarts, self.last_status,
                                     s.conntrack_instance, s.restarts_owed)
        if saved == self._saved:
            return
        self._saved = saved
        try:
            statefile.save(self.cfg.state_file, saved)
        except OSError as exc:
            self.log.warning("state.failed", path=str(self.cfg.state_file), detail=exc.strerror or str(exc))


def make_metrics(cfg: Config) -> Metrics | None:
    """The metrics writer the configuration asks for; MetricsUnavailable without prometheus_client."""
    return Metrics(cfg.metrics_textfile) if cfg.metrics_textfile is not None else None
