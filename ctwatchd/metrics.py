"""Prometheus metrics in node_exporter's textfile-collector format, written atomically.

Enabled by `[metrics] textfile = "/var/lib/node_exporter/textfile_collector/ctwatchd.prom"`.
prometheus_client is imported only then (it is an optional dependency: `ctwatchd[metrics]`).
node_exporter's own nf_conntrack metrics vanish when the module is gone; ctwatchd_conntrack_absent
says so explicitly.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from ctwatchd.files import replace_atomically
from ctwatchd.model import HoldSpec, ModuleState, Observation, RestoreResult, StepKind

HOLDABLE = HoldSpec(conntrack=True, nat=True, masquerade=True).modules

REMOVAL_UNITS = 16  # distinct unit labels; later ones count as "other" (a bounded label set)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class MetricsUnavailable(Exception):
    """prometheus_client is not installed but a metrics textfile is configured."""


class Metrics:
    def __init__(self, path: Path) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise MetricsUnavailable(
                f"[metrics] textfile = {str(path)!r} needs the Python package prometheus_client "
                "(pip install 'ctwatchd[metrics]', or Debian's python3-prometheus-client)") from exc
        self.path = path
        self._render = prom.generate_latest
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.module_state = prom.Gauge("ctwatchd_module_state", "1 for the state each watched module is in.",
                                       ["module", "state"], registry=r)
        self.restores = prom.Counter("ctwatchd_restores", "Module loads attempted by ctwatchd, by result.",
                                     ["module", "result"], registry=r)
        self.duration = prom.Histogram("ctwatchd_restore_duration_seconds",
                                       "Time from plan start to the end of a restore.",
                                       buckets=DURATION_BUCKETS, registry=r)
        self.breaker = prom.Gauge("ctwatchd_restart_breaker_open",
                                  "1 while docker/hook restarts are paused by the breaker.", registry=r)
        self.healthy = prom.Gauge("ctwatchd_healthy", "1 when every watched module and sysctl is as desired.",
                                  registry=r)
        self.absent = prom.Gauge("ctwatchd_conntrack_absent",
                                 "1 when /proc/sys/net/netfilter/nf_conntrack_count cannot be read.", registry=r)
        self.entries = prom.Gauge("ctwatchd_conntrack_entries", "nf_conntrack_count at the last check.",
                                  registry=r)
        self.removals = prom.Counter("ctwatchd_module_removals",
                                     "Removals of a watched module, by the systemd unit of the remover "
                                     "(unknown when not attributed) and how it was attributed.",
                                     ["unit", "attribution"], registry=r)
        self._units: set[str] = set()
        self.held = prom.Gauge("ctwatchd_module_held",
                               "1 while ctwatchd's nftables table holds the module loaded (rmmod fails).",
                               ["module"], registry=r)
        self.last_check = prom.Gauge("ctwatchd_last_check_timestamp_seconds",
                                     "Unix time of the last completed check.", registry=r)
        self.last_ok = prom.Gauge("ctwatchd_last_healthy_timestamp_seconds",
                                  "Unix time of the last check that found the host healthy.", registry=r)

    def observe(self, obs: Observation, modules: Iterable[str], healthy: bool, breaker_open: bool) -> None:
        for name in modules:
            status = obs.modules.get(name)
            for state in ModuleState:
                self.module_state.labels(name, state.value).set(
                    1 if status is not None and status.state is state else 0)
        self.healthy.set(1 if healthy else 0)
        self.breaker.set(1 if breaker_open else 0)
        self.absent.set(1 if obs.conntrack_count is None else 0)
        self.entries.set(obs.conntrack_count if obs.conntrack_count is not None else 0)
        # Prometheus timestamps are wall-clock by definition; no deadline is computed from them.
        now = time.time()
        self.last_check.set(now)
        if healthy:
            self.last_ok.set(now)

    def hold(self, held: Iterable[str]) -> None:
        """The modules the hold keeps loaded now; those it held before and no longer read 0."""
        now = set(held)
        for name in now | set(HOLDABLE):
            self.held.labels(name).set(1 if name in now else 0)

    def removal(self, unit: str | None, how: str) -> None:
        label = unit or "unknown"
        if label not in self._units:
            if len(self._units) >= REMOVAL_UNITS:
                label = "other"
            else:
                self._units.add(label)
        self.removals.labels(label, how).inc()

    def record(self, result: RestoreResult) -> None:
        for r in result.results:
            if r.step.kind is StepKind.LOAD_MODULE and r.step.module:
                self.restores.labels(r.step.module, r.outcome.value).inc()
        self.duration.observe(result.duration_ms / 1000)

    def write(self) -> None:
        """Atomic replace in prometheus_client's format; raises OSError to the caller.

        Not prometheus_client's write_to_textfile: it opens `<path>.<pid>.<tid>` with a plain open()
        as root, in a directory node_exporter's user often owns, so a planted symlink there would be
        followed. files.replace_atomically never follows one. Mode 0644 whatever the umask (the
        unit's UMask=0077): node_exporter runs as another user; the metrics hold nothing secret.
        """
        replace_atomically(self.path, self._render(self.registry), 0o644, fsync=False)
