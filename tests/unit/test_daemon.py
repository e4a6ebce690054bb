"""The daemon loop end to end in-process: a fake host tree, a fake monitor on a real pipe, a real
notify socket and real signals. The loop does not know it is under test."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from fakehost import FakeHost
from harness import ALL, FakeMonitor, Harness, cfg_for, events, run_daemon

from ctwatchd import config as configmod
from ctwatchd import state as statefile
from ctwatchd.config import Config


def test_start_loads_missing_modules_before_ready(host: FakeHost, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The desired set is loaded at start; READY=1 comes after the first reconcile, with a STATUS."""
    h = Harness(host, tmp_path, monkeypatch)
    seen_live_at_ready: list[bool] = []

    def driver() -> None:
        h.wait_notify("READY=1")
        seen_live_at_ready.append(all(host.is_live(m) for m in ALL))

    code, logs = h.run(h.daemon(cfg_for(host)), driver)
    assert code == 0
    assert seen_live_at_ready == [True]
    assert host.modprobe_calls() == list(ALL)
    ready = next(m for m in h.messages if "READY=1" in m)
    assert "STATUS=healthy (nf_conntrack live, nf_nat live, br_netfilter live)" in ready
    assert any("STOPPING=1" in m for m in h.read_notify())
    assert [e["event"] for e in logs][-1] == "daemon.stopping"


def test_a_clean_up_removing_one_module_after_another_gets_one_plan(h: Harness) -> None:
    """br_netfilter, then nf_nat, then nf_conntrack, 0.15 s apart, as a clean-up script rmmods them:
    one restore for all three, planned once the removals are quiet, not one per removal."""

    def driver() -> None:
        h.wait_notify("READY=1")
        for module in ("br_netfilter", "nf_nat", "nf_conntrack"):
            h.host.unload(module)
            h.monitor.send(f"remove {module}")
            time.sleep(0.15)
        h.wait_for(lambda: all(h.host.is_live(m) for m in ALL))
        h.wait_notify("STATUS=healthy", after=len(h.messages))

    _, logs = h.run(h.daemon(cfg_for(h.host)), driver)
    planned = events(logs, "restore.planned")
    assert [p["modules"] for p in planned] == ["nf_conntrack nf_nat br_netfilter"], planned


def test_uevent_triggers_restore_with_full_audit_trail(h: Harness) -> None:
    """remove uevent -> re-read /sys -> plan -> steps -> finished, each one audit record."""

    def driver() -> None:
        h.wait_notify("READY=1")
        h.host.unload("br_netfilter")
        h.monitor.send("remove br_netfilter")
        h.wait_for(lambda: h.host.is_live("br_netfilter")
                   and h.host.read_sysctl("net.bridge.bridge-nf-call-iptables") == "1")
        h.wait_notify("STATUS=healthy", after=len(h.messages))

    _, logs = h.run(h.daemon(cfg_for(h.host)), driver)
    names = [e["event"] for e in logs]
    i = names.index("module.event")
    assert names[i:i + 3] == ["module.event", "module.state", "health.changed"]
    assert logs[i]["module"] == "br_netfilter" and logs[i]["action"] == "remove"
    planned = events(logs, "restore.planned")
    assert len(planned) == 1 and planned[0]["modules"] == "br_netfilter"
    assert [(e["action"], e["result"]) for e in events(logs, "restore.step")] == [
        ("load-module", "ok"), ("write-sysctls", "ok")]
    assert events(logs, "restore.finished")[0]["result"] == "ok"
    assert h.host.modprobe_calls() == ["br_netfilter"]


def test_unrelated_module_events_are_ignored(h: Harness) -> None:
    """Events for modules we do not watch cause no reconcile work."""
    d = h.daemon(cfg_for(h.host))

    def driver() -> None:
        h.wait_notify("READY=1")
        before = d.reconciles
        for i in range(200):
            h.monitor.send(f"add snd_dummy{i}")
        time.sleep(0.3)
        assert d.reconciles == before

    _, logs = h.run(d, driver)
    assert not events(logs, "module.event")


def test_poll_is_the_safety_net_without_events(h: Harness) -> None:
    """With no uevent at all, the poll notices the removal and restores."""

    def driver() -> None:
        h.wait_notify("READY=1")
        h.host.unload("nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat"), timeout=5)

    _, logs = h.run(h.daemon(cfg_for(h.host, poll_interval=0.2), monitor=False), driver)
    assert h.host.modprobe_calls() == ["nf_nat"]
    assert not events(logs, "module.event")


def test_overrun_resyncs_from_sys(h: Harness) -> None:
    """A lost-events error is logged and the state is re-read, so a removal hidden in it is restored."""

    def driver() -> None:
        h.wait_notify("READY=1")
        h.host.unload("nf_nat")
        h.monitor.send("OVERRUN")
        h.wait_for(lambda: h.host.is_live("nf_nat"))

    _, logs = h.run(h.daemon(cfg_for(h.host)), driver)
    assert events(logs, "monitor.overrun")[0]["detail"] == "ENOBUFS (test)"
    assert h.host.modprobe_calls() == ["nf_nat"]


def test_closed_monitor_falls_back_to_polling_and_reopens(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead monitor is dropped, polling goes on, and a new monitor is opened later."""
    monkeypatch.setattr("ctwatchd.uevents.MONITOR_RETRY", 0.3)

    def driver() -> None:
        h.wait_notify("READY=1")
        h.monitor.send("CLOSE")
        h.wait_for(lambda: h.monitors == 2)
        h.host.unload("br_netfilter")
        h.monitor.send("remove br_netfilter")
        h.wait_for(lambda: h.host.is_live("br_netfilter"))

    _, logs = h.run(h.daemon(cfg_for(h.host)), driver)
    assert "socket closed (test)" in events(logs, "monitor.failed")[0]["detail"]
    assert events(logs, "module.event")


def test_sighup_applies_a_valid_config_and_keeps_the_old_one_on_error(h: Harness) -> None:
    """RELOADING=1 then READY=1 each time; a broken file is rejected and the old config stays."""
    path = h.host.config('[sysctl]\n"net.bridge.bridge-nf-call-iptables" = "1"\n')

    def reload() -> Config:
        return configmod.load(path)

    def driver() -> None:
        h.wait_notify("READY=1")
        path.write_text(path.read_text().replace('"net.bridge.bridge-nf-call-iptables" = "1"',
                                                 '"net.bridge.bridge-nf-call-iptables" = "0"'))
        n = len(h.read_notify())
        os.kill(os.getpid(), signal.SIGHUP)
        r = h.wait_notify("RELOADING=1", after=n)
        h.wait_notify("READY=1", after=r)
        h.wait_for(lambda: h.host.read_sysctl("net.bridge.bridge-nf-call-iptables") == "0")
        path.write_text("[watch]\nmodules = ['bad name']\n")
        n = len(h.read_notify())
        os.kill(os.getpid(), signal.SIGHUP)
        r = h.wait_notify("RELOADING=1", after=n)
        h.wait_notify("READY=1", after=r)

    d = h.daemon(reload(), reload_config=reload)
    code, logs = h.run(d, driver)
    assert code == 0
    assert len(events(logs, "config.loaded")) == 1
    rejected = events(logs, "config.rejected")
    assert len(rejected) == 1 and "modules[0] must be a plain module name" in rejected[0]["error"]
    assert d.cfg.sysctl_map == {"net.bridge.bridge-nf-call-iptables": "0"}


def test_watchdog_pings_continue_during_a_slow_step(h: Harness) -> None:
    """WATCHDOG=1 is sent every half WATCHDOG_USEC, also while modprobe runs for a while."""
    h.host.write_modprobe(extra="sleep 2.5")

    def driver() -> None:
        h.wait_notify("READY=1")
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat"), timeout=10)

    t0 = time.monotonic()
    h.run(h.daemon(cfg_for(h.host), env={"WATCHDOG_USEC": "1000000"}), driver)
    elapsed = time.monotonic() - t0
    pings = sum(1 for m in h.read_notify() if m == "WATCHDOG=1")
    # 2.5 s of modprobe alone needs 5 pings at 0.5 s; a loop blocked by the step would send 1 or 2.
    assert pings >= 5, (pings, elapsed)


def test_a_tiny_watchdog_usec_is_floored_not_a_flood(h: Harness) -> None:
    """WATCHDOG_USEC=1 (a drop-in's mistake): pings at the floor, said once, instead of a hot loop of
    datagrams (116,003 in 2 s before the floor)."""
    def driver() -> None:
        h.wait_notify("READY=1")
        time.sleep(1.0)

    code, logs = h.run(h.daemon(cfg_for(h.host), env={"WATCHDOG_USEC": "1"}), driver)
    pings = sum(1 for m in h.read_notify() if m == "WATCHDOG=1")
    assert code == 0 and 5 <= pings <= 40, pings  # ~1 s at 0.1 s, with the start and the stop around it
    floored = events(logs, "watchdog.floored")
    assert [(e["watchdog_usec"], e["every_s"]) for e in floored] == [("1", 0.1)]


def test_sigterm_during_a_restore_stops_promptly(h: Harness) -> None:
    """A stop in the middle of a hanging modprobe kills it and exits 0, bounded in time."""
    h.host.write_modprobe(extra="sleep 60")
    t_stop: list[float] = []

    def driver() -> None:
        h.wait_notify("READY=1")  # the start itself is healthy (all loaded)
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: "nf_nat" in h.host.modprobe_calls())
        t_stop.append(time.monotonic())

    code, logs = h.run(h.daemon(cfg_for(h.host)), driver)
    assert code == 0
    assert time.monotonic() - t_stop[0] < 8
    step = events(logs, "restore.step")[0]
    assert step["result"] == "interrupted"
    assert events(logs, "daemon.stopping")[0]["signal"] == "SIGTERM"


def test_blocked_module_is_reported_once_and_never_loaded(h: Harness) -> None:
    """A modprobe.d blocker is named in the journal and the daemon does not loop on it."""
    h.host.block("install nf_conntrack /bin/true")
    h.host.unload("nf_nat")
    h.host.unload("nf_conntrack")

    def driver() -> None:
        h.wait_notify("READY=1")
        time.sleep(1.0)  # five polls

    _, logs = h.run(h.daemon(cfg_for(h.host, poll_interval=0.2)), driver)
    blocked = events(logs, "module.blocked")
    assert len(blocked) == 1 and blocked[0]["module"] == "nf_conntrack"
    assert "/etc/modprobe.d/protect.conf:1" in blocked[0]["blocker"]
    assert h.host.modprobe_calls() == []  # nf_nat needs nf_conntrack: not loaded either
    ready = next(m for m in h.messages if "READY=1" in m)
    assert "degraded" in ready and "nf_conntrack blocked by" in ready


def test_tuned_conntrack_values_survive_a_reload_and_a_daemon_restart(h: Harness) -> None:
    """Tuned nf_conntrack_max is back after conntrack reloads, also across a daemon crash/restart."""
    host = h.host
    host.write_sysctl("net.netfilter.nf_conntrack_max", "1048576")
    host.write_sysctl("net.netfilter.nf_conntrack_tcp_timeout_established", "7200")

    def driver() -> None:
        h.wait_notify("READY=1")
        for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
            host.unload(m)
        h.monitor.send("remove nf_conntrack")
        h.wait_for(lambda: host.read_sysctl("net.netfilter.nf_conntrack_max") == "1048576")

    h.run(h.daemon(cfg_for(host)), driver)
    assert host.read_sysctl("net.netfilter.nf_conntrack_tcp_timeout_established") == "7200"
    saved = statefile.load(host.root / "run/state.json")
    assert saved is not None and saved.tuning["net.netfilter.nf_conntrack_max"] == "1048576"

    # "Crash": the daemon is gone, conntrack is removed meanwhile, a new daemon starts.
    for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
        host.unload(m)
    h.messages.clear()

    def driver2() -> None:
        h.wait_notify("READY=1")

    h.monitor = FakeMonitor()
    h.run(h.daemon(cfg_for(host)), driver2)
    assert host.read_sysctl("net.netfilter.nf_conntrack_max") == "1048576"
    assert host.read_sysctl("net.netfilter.nf_conntrack_tcp_timeout_established") == "7200"


def test_hostile_state_file_is_ignored_with_a_warning(h: Harness) -> None:
    """A state file with a command-line-looking value is refused and nothing of it is written."""
    path = h.host.root / "run/state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"version": 1, "conntrack_reloaded": true, '
                    '"tuning": {"net.netfilter.nf_conntrack_max": "$(reboot)"}}')
    path.chmod(0o600)

    def driver() -> None:
        h.wait_notify("READY=1")

    _, logs = h.run(h.daemon(cfg_for(h.host)), driver)
    assert "unexpected tuning entry" in events(logs, "state.ignored")[0]["detail"]
    assert h.host.read_sysctl("net.netfilter.nf_conntrack_max") == "262144"


def test_two_signals_at_once_stop_cleanly(h: Harness) -> None:
    """HUP and TERM together (and no TERM from the harness): the stop wins promptly, the reload never
    runs, exit 0."""
    cfg = cfg_for(h.host)
    reloads: list[float] = []

    def reload() -> Config:
        reloads.append(time.monotonic())
        return cfg

    def driver() -> None:
        h.wait_notify("READY=1")
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)

    code, logs, stopped_in = run_daemon(h.daemon(cfg, reload_config=reload), driver, stop=False)
    assert code == 0 and stopped_in < 2
    assert reloads == [] and not events(logs, "config.loaded")
    assert [e["signal"] for e in events(logs, "daemon.stopping")] == ["SIGTERM"]
    assert not any("RELOADING=1" in m for m in h.read_notify())


def test_failing_restore_backs_off_instead_of_spinning(h: Harness) -> None:
    """A module that cannot be loaded is retried with growing delays, not in a hot loop."""
    h.host.write_modprobe(exit_code=1, load=False, extra="echo 'modprobe: ERROR: could not insert' >&2")
    h.host.unload("nf_nat")

    def driver() -> None:
        h.wait_notify("READY=1")
        time.sleep(1.6)

    _, logs = h.run(h.daemon(cfg_for(h.host, poll_interval=0.05, backoff_initial=0.2, backoff_max=10)), driver)
    calls = len(h.host.modprobe_calls())
    assert 2 <= calls <= 5, calls  # 0, 0.2, 0.6, 1.4 s: four tries in 1.6 s, not thirty
    finished = events(logs, "restore.finished")
    assert finished[0]["result"] == "failed" and "could not insert" in finished[0]["detail"]


def test_a_burst_of_removal_events_makes_one_restore(h: Harness) -> None:
    """Fifty queued events for the same removal are drained together: one plan, one modprobe."""

    def driver() -> None:
        h.wait_notify("READY=1")
        h.host.unload("br_netfilter")
        os.write(h.monitor.w, b"remove br_netfilter\n" * 50)
        h.wait_for(lambda: h.host.is_live("br_netfilter"))
        time.sleep(0.3)

    _, logs = h.run(h.daemon(cfg_for(h.host)), driver)
    assert len(events(logs, "restore.planned")) == 1
    assert h.host.modprobe_calls() == ["br_netfilter"]


def test_metrics_textfile_is_written_and_parses(h: Harness) -> None:
    """With [metrics] textfile, every check rewrites a valid node_exporter textfile."""
    from prometheus_client.parser import text_string_to_metric_families

    prom = h.host.root / "metrics/ctwatchd.prom"
    prom.parent.mkdir()

    def driver() -> None:
        h.wait_notify("READY=1")
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat"))
        h.wait_for(lambda: 'result="ok"' in prom.read_text())

    h.run(h.daemon(cfg_for(h.host, metrics_textfile=prom)), driver)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(prom.read_text()) for s in fam.samples}
    assert samples[("ctwatchd_module_state", (("module", "nf_nat"), ("state", "live")))] == 1
    assert samples[("ctwatchd_module_state", (("module", "nf_nat"), ("state", "absent")))] == 0
    assert samples[("ctwatchd_restores_total", (("module", "nf_nat"), ("result", "ok")))] == 1
    assert samples[("ctwatchd_restore_duration_seconds_count", ())] == 1
    assert samples[("ctwatchd_restart_breaker_open", ())] == 0
    assert samples[("ctwatchd_conntrack_absent", ())] == 0
    assert samples[("ctwatchd_healthy", ())] == 1
    assert samples[("ctwatchd_last_check_timestamp_seconds", ())] > 1_600_000_000
    assert [p.name for p in prom.parent.iterdir()] == ["ctwatchd.prom"]  # no temp files left


def test_metrics_file_is_world_readable_under_a_strict_umask(h: Harness) -> None:
    """The unit's UMask=0077 must not make the textfile unreadable for node_exporter."""
    prom = h.host.root / "ctwatchd.prom"
    def driver() -> None:
        h.wait_notify("READY=1")

    old = os.umask(0o077)
    try:
        h.run(h.daemon(cfg_for(h.host, metrics_textfile=prom)), driver)
    finally:
        os.umask(old)
    assert prom.stat().st_mode & 0o777 == 0o644


def test_conntrack_absent_is_an_explicit_metric(h: Harness) -> None:
    """node_exporter's conntrack metrics vanish with the module; ctwatchd_conntrack_absent says 1."""
    from prometheus_client.parser import text_string_to_metric_families

    prom = h.host.root / "ctwatchd.prom"
    h.host.block("install nf_conntrack /bin/true")
    for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
        h.host.unload(m)

    def driver() -> None:
        h.wait_notify("READY=1")

    h.run(h.daemon(cfg_for(h.host, metrics_textfile=prom)), driver)
    values = {s.name: s.value for fam in text_string_to_metric_families(prom.read_text()) for s in fam.samples
              if not s.labels}
    assert values["ctwatchd_conntrack_absent"] == 1
    assert values["ctwatchd_healthy"] == 0


def test_unwritable_metrics_file_is_reported_once_and_harmless(h: Harness) -> None:
    """A metrics directory that does not exist is logged once; restores go on."""
    prom = h.host.root / "missing-dir/ctwatchd.prom"

    def driver() -> None:
        h.wait_notify("READY=1")
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat"))

    _, logs = h.run(h.daemon(cfg_for(h.host, metrics_textfile=prom, poll_interval=0.1)), driver)
    assert len(events(logs, "metrics.failed")) == 1
    assert h.host.is_live("nf_nat")


def test_removing_a_blocker_is_noticed_without_a_reload(h: Harness) -> None:
    """When the admin deletes the modprobe.d rule, the next poll restores the module."""
    rule = h.host.block("install nf_conntrack /bin/true")
    for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
        h.host.unload(m)

    def driver() -> None:
        h.wait_notify("READY=1")
        assert h.host.modprobe_calls() == ["br_netfilter"]
        rule.unlink()
        h.wait_for(lambda: h.host.is_live("nf_conntrack") and h.host.is_live("nf_nat"), timeout=5)

    h.run(h.daemon(cfg_for(h.host, poll_interval=0.2)), driver)
    assert h.host.modprobe_calls() == ["br_netfilter", "nf_conntrack", "nf_nat"]


def test_editing_a_blocker_file_in_place_is_noticed(h: Harness) -> None:
    """A rule commented out inside the same file (no rename) is also picked up at the next poll."""
    rule = h.host.block("install nf_conntrack /bin/true")
    for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
        h.host.unload(m)

    def driver() -> None:
        h.wait_notify("READY=1")
        rule.write_text("# install nf_conntrack /bin/true\n")
        os.utime(rule, (time.time() + 5, time.time() + 5))  # coarse-mtime filesystems
        h.wait_for(lambda: h.host.is_live("nf_conntrack"), timeout=5)

    h.run(h.daemon(cfg_for(h.host, poll_interval=0.2)), driver)


def test_conntrack_reloaded_by_our_own_nf_nat_restore_gets_its_tuning_back(h: Harness) -> None:
    """`rmmod nf_nat nf_conntrack`: the daemon wakes on nf_nat's removal and modprobes nf_nat while rmmod
    takes nf_conntrack; modprobe then loads a fresh conntrack (kernel defaults) as nf_nat's dependency.
    That reload happened inside our own restore, never seen absent: only its new instance tells, and
    its tuned values must still come back."""
    host = h.host
    host.write_sysctl("net.netfilter.nf_conntrack_max", "1048576")
    # modprobe nf_nat finds rmmod's second half done: conntrack is gone (its old /sys dir kept aside so
    # the new one cannot reuse the inode), and the fake loads it again with the defaults.
    host.write_modprobe(extra='case " $* " in *" nf_nat "*) mv "$root/sys/module/nf_conntrack" "$root/old-ct"; '
                              'rm -rf "$root/proc/sys/net/netfilter";; esac')

    def driver() -> None:
        h.wait_notify("READY=1")
        h.wait_for(lambda: bool(statefile.load(host.root / "run/state.json").tuning))  # type: ignore[union-attr]
        host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: host.is_live("nf_nat") and (host.root / "old-ct").exists())
        for event in ("remove nf_conntrack", "add nf_conntrack", "add nf_nat"):  # queued during the restore
            h.monitor.send(event)
        h.wait_for(lambda: host.read_sysctl("net.netfilter.nf_conntrack_max") == "1048576", timeout=10)

    h.run(h.daemon(cfg_for(host)), driver)
    assert host.read_sysctl("net.netfilter.nf_conntrack_max") == "1048576"


def test_reloads_queued_behind_a_slow_step_do_not_delay_a_stop(h: Harness, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd's notify queue full (a stalled receiver), six SIGHUPs during a 3 s modprobe, SIGTERM when it
    ends: the reloads are one, the stop wins over it, and no notify message waits once one timed out
    (before: 26 s to stop, past TimeoutStopSec, each reload spending two 2 s sends)."""
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stalled.bind(str(tmp_path / "stalled.sock"))
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            filler.sendto(b"x" * 512, str(tmp_path / "stalled.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "stalled.sock"))
    h.host.write_modprobe(extra="sleep 3")
    reloads: list[float] = []
    cfg = cfg_for(h.host)

    def reload() -> Config:
        reloads.append(time.monotonic())
        return cfg

    d = h.daemon(cfg, reload_config=reload)

    def driver() -> None:
        h.wait_for(lambda: d.ready, timeout=15)
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: "nf_nat" in h.host.modprobe_calls())
        for _ in range(6):
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
        h.wait_for(lambda: h.host.is_live("nf_nat"), timeout=10)
        time.sleep(0.1)  # the step is over: the reloads are being handled
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        code, _, stopped_in = run_daemon(d, driver, stop=False, limit=60)
    finally:
        stalled.close()
        filler.close()
    assert code == 0 and len(reloads) <= 1, reloads
    assert stopped_in < 3, stopped_in  # one reload at most, and its notify messages do not wait
    assert d.notifier.stalled
