"""The daemon: one selectors loop owning the clock, the uevent fd, the signal fd and the timers.

uevent or poll -> Inspector.look() (observe + core.decide) -> Executor.execute() -> core.record(),
with an audit record at each arrow. Its parts, each with its own reason to change: SignalQueue
(signals.py), MonitorSupervisor (uevents.py), Reporter (report.py), StateKeeper (persist.py).
WATCHDOG=1 is sent from this loop only, including while a step's subprocess runs.
"""

from __future__ import annotations

import os
import selectors
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import replace

from ctwatchd import __version__, core
from ctwatchd.attribution import JOURNAL_TIMEOUT, Attributor, journal_argv
from ctwatchd.config import JOURNALCTL_PATHS, Config, ConfigError, DockerMode
from ctwatchd.core import CoreState
from ctwatchd.executor import Executor
from ctwatchd.hold import Hold
from ctwatchd.kernel import KernelProbe
from ctwatchd.metrics import Metrics, MetricsUnavailable
from ctwatchd.model import NFT_MASQ, AuditLog, Observation, clean
from ctwatchd.notify import WATCHDOG_FLOOR, Notifier, watchdog_interval
from ctwatchd.persist import StateKeeper
from ctwatchd.report import Reporter
from ctwatchd.runner import Runner, reap_children
from ctwatchd.signals import CHILD, RELOAD, STOP_SIGNALS, SignalQueue
from ctwatchd.uevents import ModuleEvent, MonitorSupervisor, UeventSource
from ctwatchd.verdict import Inspector

# How often to tell systemd "still starting, give me this much more" while the start-up restore
# works (modprobe timeouts, hooks and a docker restart can add up past TimeoutStartSec).
EXTEND_EVERY = 5.0
EXTEND_BY = 30.0
# After an unexpected exception in a reconcile, wait this long before the next: log, never spin.
INTERNAL_ERROR_PAUSE = 5.0
# While the hold holds, ask the journal this often for refused delete_module calls (the audit rule's
# records): one journalctl run per period, so an idle daemon stays cheap.
REFUSALS_EVERY = 30.0
# journald may write an audit record a moment after its time: each query reaches this far back,
# and what was already told is not told again.
REFUSALS_LAG = 5.0
# While no baseline of docker's rules is taken (docker not active yet: the unit starts before docker),
# a healthy look tries again at most this often: one systemctl call. Once taken, it is read again
# this much later, so containers whose published ports went away since do not count as a loss.
BASELINE_EVERY = 60.0
BASELINE_REFRESH = 300.0


class Daemon:
    def __init__(self, cfg: Config, *, probe: KernelProbe, log: AuditLog,
                 reload_config: Callable[[], Config],
                 monitor_factory: Callable[[], UeventSource] | None,
                 udev_factory: Callable[[], UeventSource] | None = None,
                 notifier: Notifier | None = None,
                 env: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_log_format: Callable[[Config], object] | None = None,
                 hold: Hold | None = None) -> None:
        self.cfg = cfg
        self.hold = hold  # None: no nftables hold (tests, and where the caller has none to offer)
        self.probe = probe
        self.log = log
        self.reload_config = reload_config
        self.on_log_format = on_log_format
        self.env = dict(os.environ if env is None else env)
        self.notifier = notifier or Notifier(on_error=lambda d: log.warning("notify.failed", detail=d))
        self.clock = clock
        self.watchdog_asked = watchdog_interval(self.env, os.getpid())
        self.watchdog_every = None if self.watchdog_asked is None else max(self.watchdog_asked, WATCHDOG_FLOOR)
        self.inspector = Inspector(probe, on_problem=lambda text: log.warning("facts.problem", detail=text))
        self.state = CoreState()
        self.reporter = Reporter(log, self.notifier, make_metrics(cfg))
        self.keeper = StateKeeper(cfg.state_file, log, probe.boot_id(), clock)
        self.executor = self._executor()
        self.attributor = self._attributor()
        self.sel = selectors.DefaultSelector()
        self.signals = SignalQueue()
        self.monitor = MonitorSupervisor(monitor_factory, self.sel, log, clock, lambda: self.cfg.poll_interval)
        self.monitor.on_readable = self._on_uevents
        # udevd's announcements: "done with this module's add, its rules have run" (the sysctl.d rule
        # reapplying /net/bridge among them), so a value udev put back is looked at right then.
        self.udev = MonitorSupervisor(udev_factory, self.sel, log, clock, lambda: self.cfg.poll_interval)
        self.udev.on_readable = self._on_udev_events
        self.stop_signal: int | None = None
        self.hint: str | None = "start"
        self.wake_at: float | None = None
        self.next_poll = 0.0
        self.next_watchdog: float | None = None
        self.ready = False
        self._next_extend = 0.0
        self.refusals_every = REFUSALS_EVERY
        self.next_refusals: float | None = None  # monotonic; None while nothing is held
        self.refusals_since = 0.0  # wall clock: the journal's timestamps are wall clock
        self._refusals_told: dict[tuple[float, int, str], float] = {}
        self.observation: Observation | None = None
        self.watched: tuple[str, ...] = cfg.modules  # desired + legacy, as of the last look
        self.reconciles = 0
        self.next_baseline = 0.0  # monotonic: the next healthy look that may take docker's baseline

    def _executor(self) -> Executor:
        old = getattr(self, "executor", None)
        return Executor(self.cfg, self.probe, Runner(tick=self._tick), self.log, clock=self.clock,
                        docker_baseline=old.docker_baseline if old is not None else None,
                        defer_restarts=not getattr(self, "ready", False))

    def _attributor(self) -> Attributor | None:
        if not self.cfg.attribution:
            return None
        journalctl = self.cfg.journalctl or next((p for p in JOURNALCTL_PATHS if os.path.exists(p)), None)
        if journalctl is None:
            return Attributor(self.probe.root, None, clock=self.clock)
        runner, exe = Runner(tick=self._tick), journalctl

        def query(since_wall: float) -> str | None:
            done = runner.run(journal_argv(exe, since_wall), JOURNAL_TIMEOUT)
            return done.output if done.ok else None

        return Attributor(self.probe.root, query, clock=self.clock)

    @property
    def last_status(self) -> str:
        return self.reporter.status

    # -- lifecycle ----------------------------------------------------------------------------
    def run(self) -> int:
        self.sel.register(self.signals.install(), selectors.EVENT_READ, self.signals.read)
        # The interpreter's own start may have used most of TimeoutStartSec on a loaded boot; the
        # time from here to READY is ours, so ask for it now, not only once a step runs.
        self.notifier.extend_timeout(EXTEND_BY)
        self._next_extend = self.clock() + EXTEND_EVERY
        try:
            self.log.info("daemon.started", version=__version__, modules=" ".join(self.cfg.modules),
                          config=clean(str(self.cfg.path)) if self.cfg.path else "built-in defaults",
                          pid=os.getpid())
            if self.watchdog_asked is not None and self.watchdog_asked < WATCHDOG_FLOOR:
                self.log.warning("watchdog.floored", watchdog_usec=clean(self.env.get("WATCHDOG_USEC", "")),
                                 asked_s=self.watchdog_asked, every_s=WATCHDOG_FLOOR)
            self.monitor.open()
            self.udev.open()
            self._resume()
            self.reconcile()
            for _ in range(3):  # READY reports the verified state after a start-up restore
                if self.hint != "verify" or self.stop_signal is not None or self.signals.stop_requested():
                    break
                self.reconcile()
            self.ready = True
            self.executor.defer_restarts = False
            self.notifier.ready(self.last_status)
            self.log.info("daemon.ready", status=self.last_status)
            self._ping_watchdog()
            self._loop()
            return 0
        finally:
            self.signals.restore()
            self.monitor.close()
            self.udev.close()
            self.sel.close()

    def _loop(self) -> None:
        while self.stop_signal is None:
            now = self.clock()
            deadlines = [d for d in (self.next_poll, self.wake_at, self.next_watchdog, self.monitor.deadline,
                                     self.udev.deadline, self.attributor.deadline if self.attributor else None,
                                     self.next_refusals)
                         if d is not None]
            timeout = 0.0 if self.hint or self.signals.pending else max(0.0, min(deadlines) - now)
            for key, _ in self.sel.select(timeout):
                key.data()
            self._dispatch_signals()
            if self.stop_signal is not None:
                break
            now = self.clock()
            self._maybe_watchdog(now)
            self.monitor.tick(now)
            self.udev.tick(now)
            if self.hint or now >= self.next_poll or (self.wake_at is not None and now >= self.wake_at):
                self.reconcile()
            self._attribute()
            self._refusals()
        if self.hold is not None:  # said before it happens: closing the socket deletes the table
            self.reporter.hold(self.hold.release())
        self.keeper.save(self.state, self.last_status, stopped=True)
        self.notifier.stopping()
        self.log.info("daemon.stopping", signal=signal.Signals(self.stop_signal).name)

    # -- signals ------------------------------------------------------------------------------
    def _dispatch_signals(self) -> None:
        while True:
            self.signals.read()  # before each pop: a stop that arrived while a reload ran wins over the rest
            signum = self.signals.pop()
            if signum is None:
                return
            if signum in STOP_SIGNALS:
                self.stop_signal = signum
                return
            if signum == RELOAD:
                self.handle_reload()
            elif signum == CHILD:
                # Only between steps, when the runner has reaped its own child: what is left are
                # orphans handed to us (as PID 1 in a container, a hook's background children).
                reap_children()

    def _tick(self) -> bool:
        """Called while a step's subprocess runs: keep the watchdog fed and notice a stop request."""
        self.signals.read()
        now = self.clock()
        self._maybe_watchdog(now)
        if not self.ready and now >= self._next_extend:
            self._next_extend = now + EXTEND_EVERY
            self.notifier.extend_timeout(EXTEND_BY)
        return self.signals.stop_requested()

    def handle_reload(self) -> None:
        self.notifier.reloading(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        try:
            new = self.reload_config()
            metrics = make_metrics(new) if new.metrics_textfile != self.cfg.metrics_textfile \
                else self.reporter.metrics
        except (ConfigError, MetricsUnavailable) as exc:
            self.log.error("config.rejected", error=clean(str(exc), 2000))
        else:
            old = self.cfg
            self.cfg = new
            self.reporter.metrics = metrics
            self.keeper.move(new.state_file)
            if new.log_format != old.log_format and self.on_log_format is not None:
                self.on_log_format(new)
            self.inspector.refresh()
            self.executor = self._executor()
            if self.hold is not None:
                self.hold.reset()
            if (new.attribution, new.journalctl) != (old.attribution, old.journalctl):
                self.attributor = self._attributor()
            self.next_poll = 0.0
            self.log.info("config.loaded", path=clean(str(new.path)) if new.path else "built-in defaults")
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
    def _on_uevents(self) -> None:
        events, resync = self.monitor.drain()
        if resync:
            self.hint = resync
        for ev in events:
            if ev.action == "remove" and (ev.module in self.watched or ev.module in self.state.dependents):
                self.state = core.removal_seen(self.state, self.clock())  # plan once they are quiet
            if ev.module in self.watched:
                if ev.action == "remove" and self.attributor is not None:
                    self.attributor.removed(ev.module)  # first: the remover may be gone in milliseconds
                self._on_module_event(ev)

    def _on_udev_events(self) -> None:
        events, _ = self.udev.drain()  # an overrun here costs nothing: the settle looks are still due
        for ev in events:
            if ev.action == "add" and ev.module in self.watched:
                self._on_module_event(ev, source="udev")

    def _on_module_event(self, ev: ModuleEvent, source: str = "kernel") -> None:
        self.log.info("module.event", action=clean(ev.action, 40), module=ev.module, source=source,
                      monotonic=round(self.clock(), 6))
        self.hint = f"{source} {ev.action} {ev.module}"

    def _attribute(self) -> None:
        """Name the remover of each removal now due; after the restore it triggered, never before."""
        if self.attributor is None or self.hint:
            return
        deadline = self.attributor.deadline
        if deadline is None or deadline > self.clock():
            return
        try:
            culprits = self.attributor.resolve(self.clock())
        except Exception as exc:  # attribution is a courtesy: it must never cost the repair
            self.attributor.pending.clear()
            self.log.error("daemon.internal_error", detail=f"{type(exc).__name__}: {clean(str(exc))}",
                           location="attribution", retry_in=0)
            return
        for culprit in culprits:
            self.reporter.removed(culprit)
        if culprits:
            self.keeper.save(self.state, self.last_status)

    def _refusals(self) -> None:
        """Who tried to unload a held module: one module.refused record per refused delete_module the
        audit rule recorded (nothing without it), asked of the journal every refusals_every seconds."""
        attributor, hold = self.attributor, self.hold
        if attributor is None or hold is None or not hold.held:
            self.next_refusals = None
            return
        now = self.clock()
        if self.next_refusals is None:  # just held: refusals count from now
            self.next_refusals = now + self.refusals_every
            self.refusals_since = attributor.wall()
            return
        if now < self.next_refusals or self.hint:
            return
        self.next_refusals = now + self.refusals_every
        since, self.refusals_since = self.refusals_since, attributor.wall()
        try:
            found = attributor.refusals(since - REFUSALS_LAG, hold.held.modules)
        except Exception as exc:  # a courtesy, like attribution: never the repair's cost
            self.log.error("daemon.internal_error", detail=f"{type(exc).__name__}: {clean(str(exc))}",
                           location="refusals", retry_in=self.refusals_every)
            return
        for when, culprit in found:
            key = (when, culprit.proc.pid if culprit.proc else 0, culprit.module)
            if key in self._refusals_told:
                continue
            self._refusals_told[key] = when
            self.log.warning("module.refused", culprit=culprit.summary(), why=culprit.why or None,
                             **culprit.fields())
        horizon = since - 2 * REFUSALS_LAG  # forget what no later query can return again
        self._refusals_told = {k: t for k, t in self._refusals_told.items() if t >= horizon}

    # -- reconcile ----------------------------------------------------------------------------
    def reconcile(self) -> None:
        """One look and, when needed, one restore. Whatever goes wrong in here is logged and paced,
        never the end of the daemon: the repairer must not be the fault."""
        try:
            self._reconcile()
        except Exception as exc:  # last line of defence; causes are fixed where found
            self.hint = None
            self.next_poll = self.clock() + INTERNAL_ERROR_PAUSE
            self.wake_at = None
            where = traceback.extract_tb(exc.__traceback__)[-1]
            self.log.error("daemon.internal_error", detail=f"{type(exc).__name__}: {clean(str(exc))}",
                           location=f"{os.path.basename(where.filename)}:{where.lineno}",
                           retry_in=INTERNAL_ERROR_PAUSE)

    def _reconcile(self) -> None:
        self.reconciles += 1
        self.hint = None
        now = self.clock()
        self.next_poll = now + self.cfg.poll_interval
        look = self.inspector.look(self.cfg, self.state, now)
        decision = look.decision
        self.state = decision.state
        self.wake_at = decision.wake_at
        self.observation = look.observation
        self.watched = look.watched
        self.reporter.look(self.cfg, look)
        plan = decision.plan
        if not plan:
            self._keep_hold(look.observation)
            self._docker_baseline(look.observation, now)
            self.keeper.save(self.state, self.last_status)
            return
        self.keeper.save(self.state, self.last_status)
        self.log.info("restore.planned", reason=plan.reason, plan="; ".join(s.describe() for s in plan.steps),
                      modules=" ".join(plan.modules) or None, monotonic=round(now, 6),
                      restarts_skipped=plan.skipped_restarts or None)
        result = self.executor.execute(plan)
        self.state = core.record(self.cfg, self.state, result, self.clock())
        retry_in = round(self.state.retry_at - self.clock(), 2) if self.state.retry_at else None
        self.reporter.restored(result, self.state, retry_in=retry_in)
        self.state = replace(self.state, dropped=(), given_up=())
        self._keep_hold(look.observation)  # after the restore: re-creating a lost hold needs the modules back
        self.keeper.save(self.state, self.last_status)
        self.hint = "verify"  # read the kernel again now: confirm, and catch what changed meanwhile
        if any(r.deferred for r in result.results):
            self.hint = "ready"  # docker/hooks owed: the first look after READY runs them, not the start-up loop
        if self.signals.stop_requested():
            self.hint = None

    def _keep_hold(self, obs: Observation) -> None:
        """Verify the hold, and make, re-make, grow or drop it to what the configuration and the
        loaded modules ask for. A courtesy beside the repair: its failure is told, never raised."""
        if self.hold is None:
            return
        try:
            want = core.hold_target(self.cfg, obs, self.hold.held,
                                    masq_loaded=self.probe.initstate(NFT_MASQ) == "live")
            change = self.hold.ensure(want)
        except Exception as exc:  # a netlink surprise must not cost the repair
            self.log.error("daemon.internal_error", detail=f"{type(exc).__name__}: {clean(str(exc))}",
                           location="hold", retry_in=self.cfg.poll_interval)
            return
        self.reporter.hold(change)

    def _docker_baseline(self, obs: Observation, now: float) -> None:
        """docker = "if-needed" judges docker's rules against what they were while healthy: read them at
        a look with every watched module in place and docker active, every BASELINE_REFRESH (restarts
        retake it at once). A clean-up flushing rules before it unloads can shrink it only to MINIMUM."""
        if (self.cfg.docker is not DockerMode.IF_NEEDED or not core.restarts_wanted(self.cfg)
                or now < self.next_baseline):
            return
        if not all(m.state.satisfied for name, m in obs.modules.items() if name in self.cfg.modules):
            return
        taken = self.executor.take_docker_baseline("while healthy")
        self.next_baseline = now + (BASELINE_EVERY if taken is None else BASELINE_REFRESH)

    def _resume(self) -> None:
        resumed = self.inspector.resume(self.cfg, self.clock())
        if resumed.problem:
            self.log.warning("state.ignored", path=clean(str(self.cfg.state_file)), detail=resumed.problem)
        elif resumed.saved is not None and resumed.saved.boot_id != self.keeper.boot_id:
            self.log.info("state.ignored", path=clean(str(self.cfg.state_file)),
                          detail="written in another boot: only its tuning snapshot is kept")
        self.state = resumed.state


def make_metrics(cfg: Config) -> Metrics | None:
    """The metrics writer the configuration asks for; MetricsUnavailable without prometheus_client."""
    return Metrics(cfg.metrics_textfile) if cfg.metrics_textfile is not None else None
