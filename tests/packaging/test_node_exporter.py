"""ctwatchd's metrics through a real node_exporter (Debian's prometheus-node-exporter 1.5).

`ctwatchd run` (the CLI, as a process) works on a fake host tree (tests/unit/fakehost.py: /sys, /proc,
/lib/modules and a modprobe standing in for the kernel) and writes its textfile; node_exporter reads
that directory with its textfile collector and the same tree's /proc with its conntrack collector, and
is scraped on the loopback. Healthy, degraded (conntrack blocked and unloaded) and restored, side by
side with node_exporter's own node_nf_conntrack_* series, which vanish when the module is gone.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pkgsupport import REPO, module, require_tools

sys.path.insert(0, str(REPO / "tests" / "unit"))
FakeHost: Any = importlib.import_module("fakehost").FakeHost  # the unit tier's host tree, shared

EXPORTER = "prometheus-node-exporter"
TRUSTED_BASE = Path("/run/ctwatchd-tests")  # root refuses a modprobe under a world-writable directory


@pytest.fixture
def host() -> Iterator[Any]:
    if os.geteuid() != 0:
        pytest.skip("ctwatchd run needs root for its file checks")
    TRUSTED_BASE.mkdir(mode=0o700, exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=TRUSTED_BASE))
    base.chmod(0o755)
    try:
        h = FakeHost(base / "root")
        h.load("nf_conntrack", "nf_nat", "br_netfilter")
        yield h
    finally:
        shutil.rmtree(base, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


class Scraper:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.parser = module("prometheus_client.parser")

    def text(self) -> str:
        with urllib.request.urlopen(self.url, timeout=5) as r:  # noqa: S310 - loopback, our own port
            return str(r.read().decode())

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in self.parser.text_string_to_metric_families(self.text()) for s in fam.samples}

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, tuple(sorted(labels.items()))))


def test_node_exporter_serves_ctwatchd_series_healthy_degraded_and_restored(host: Any, tmp_path: Path) -> None:
    require_tools(EXPORTER)
    textdir = host.root / "var/lib/node_exporter/textfile_collector"
    textdir.mkdir(parents=True)
    cfg = host.config(f'[watch]\npoll_interval = 0.5\n[metrics]\ntextfile = "{textdir}/ctwatchd.prom"\n')
    cfg.chmod(0o644)
    port = free_port()
    exporter = subprocess.Popen(
        [EXPORTER, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
         "--collector.textfile", f"--collector.textfile.directory={textdir}", "--collector.conntrack",
         f"--path.procfs={host.root / 'proc'}", f"--path.sysfs={host.root / 'sys'}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "exporter.log", "w"))  # noqa: SIM115
    daemon = subprocess.Popen([sys.executable, "-m", "ctwatchd", "run", "--no-uevents", "--root", str(host.root),
                               "--config", str(cfg)], stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "daemon.log", "w"))  # noqa: SIM115
    scrape = Scraper(port)
    try:
        def up() -> bool:
            try:
                return scrape.value("ctwatchd_healthy") is not None
            except OSError:
                return False

        # healthy: every series there, node_exporter's conntrack series too
        wait_for(up)
        s = scrape.samples()
        assert s[("ctwatchd_healthy", ())] == 1
        assert s[("ctwatchd_conntrack_absent", ())] == 0
        assert s[("ctwatchd_module_state", (("module", "nf_conntrack"), ("state", "live")))] == 1
        assert s[("ctwatchd_restart_breaker_open", ())] == 0
        assert s[("ctwatchd_last_check_timestamp_seconds", ())] > time.time() - 60
        assert s[("node_nf_conntrack_entries", ())] == 0
        assert s[("node_textfile_scrape_error", ())] == 0

        # degraded: conntrack blocked and unloaded; node_exporter's series vanish, ours say so
        host.block("install nf_conntrack /bin/true")
        for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
            host.unload(m)
        wait_for(lambda: scrape.value("ctwatchd_conntrack_absent") == 1)
        s = scrape.samples()
        assert s[("ctwatchd_healthy", ())] == 0
        assert s[("ctwatchd_module_state", (("module", "nf_conntrack"), ("state", "blocked")))] == 1
        assert ("node_nf_conntrack_entries", ()) not in s and ("node_nf_conntrack_entries_limit", ()) not in s
        # br_netfilter needs no conntrack: it is back already; conntrack and NAT are not even attempted
        wait_for(lambda: scrape.value("ctwatchd_restores_total", module="br_netfilter", result="ok") == 1)
        assert not [k for k in scrape.samples() if k[0] == "ctwatchd_restores_total" and "br_netfilter" not in str(k)]

        # restored: the block lifted, the daemon reloads on its next poll; the removal is counted
        (host.root / "etc/modprobe.d/protect.conf").unlink()
        wait_for(lambda: scrape.value("ctwatchd_healthy") == 1)
        s = scrape.samples()
        assert s[("ctwatchd_restores_total", (("module", "nf_conntrack"), ("result", "ok")))] == 1
        assert s[("ctwatchd_restores_total", (("module", "br_netfilter"), ("result", "ok")))] == 1
        assert s[("ctwatchd_conntrack_absent", ())] == 0
        assert s[("node_nf_conntrack_entries", ())] == 0
        assert s[("ctwatchd_restore_duration_seconds_count", ())] >= 1
    finally:
        for p in (daemon, exporter):
            p.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0, (tmp_path / "daemon.log").read_text()[-2000:]
        exporter.wait(timeout=20)
