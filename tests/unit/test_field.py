"""What real hosts produce and a careful reviewer tries: Unicode where Latin-1 was assumed, values that
fight back, snapshots the kernel cannot take back, state from another boot, planted symlinks, modules
stuck in `going`, reloads that change where state and logs go, start-ups that outlast systemd's patience.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest
from fakehost import BOOT_ID, FakeHost
from harness import ALL, Harness, cfg_for, events
from structlog.testing import capture_logs

from ctwatchd import cli, core, files
from ctwatchd import state as statefile
from ctwatchd.config import Config, LogFormat
from ctwatchd.core import UNSETTLED_AFTER, CoreState, decide, record
from ctwatchd.metrics import Metrics
from ctwatchd.model import (
    ModuleState,
    ModuleStatus,
    Observation,
    Outcome,
    RestorePlan,
    RestoreResult,
    StepKind,
    StepResult,
)
from ctwatchd.notify import Notifier

BRIDGE = "net.bridge.bridge-nf-call-iptables"
MAX = "net.netfilter.nf_conntrack_max"


def live_obs(sysctls: Mapping[str, str | None], tuning: dict[str, str] | None = None,
             instance: int = 7) -> Observation:
    mods = {m: ModuleStatus(m, ModuleState.LIVE, "", None, instance if m == "nf_conntrack" else 1) for m in ALL}
    return Observation("6.1.0-28-amd64", mods, sysctls, 0, tuning or {})


def ok(plan: RestorePlan, dropped: tuple[str, ...] = ()) -> RestoreResult:
    return RestoreResult(plan, tuple(StepResult(s, Outcome.OK, 1.0, "", dropped) for s in plan.steps), 1.0)


# == 1: Unicode in STATUS= ========================================================================

def test_status_with_cyrillic_and_replacement_characters_reaches_systemd(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A STATUS= line naming /etc/modprobe.d/защита.conf, with U+FFFD and an escape in it, is sent as UTF-8
    (sdnotify's Latin-1 would raise), control characters escaped."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        n = Notifier()
        assert n.status("degraded: br_netfilter blocked by 'install' in /etc/modprobe.d/защита.conf:1 \ufffd\x1b[2J")
        got = sock.recv(4096).decode("utf-8")
    finally:
        sock.close()
    assert got == "STATUS=degraded: br_netfilter blocked by 'install' in /etc/modprobe.d/защита.conf:1 \ufffd\\x1b[2J"


def test_a_200_kb_status_is_one_short_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """STATUS= is capped: a huge text (echoed output, a long blocker) never makes a 200 KB datagram."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        assert Notifier().status("x" * 200_000)
        got = sock.recv(300_000)
    finally:
        sock.close()
    assert len(got) < 600 and got.endswith(b"more characters)")


def test_daemon_with_a_cyrillic_blocker_file_stays_up(h: Harness) -> None:
    """A blocker in a modprobe.d file with a Cyrillic name goes into STATUS= and the daemon carries on."""
    h.host.block("install br_netfilter /bin/false", file="защита.conf")
    h.host.unload("br_netfilter")

    def driver() -> None:
        h.wait_notify("READY=1")

    code, logs = h.run(h.daemon(cfg_for(h.host)), driver)
    assert code == 0
    ready = next(m for m in h.messages if "READY=1" in m)
    assert "/etc/modprobe.d/защита.conf:1" in ready
    assert not events(logs, "notify.failed")


def test_config_error_with_a_non_latin1_character_is_exit_2(tmp_path: Path) -> None:
    """`docker = "if\u2011active"` (U+2011, a non-breaking hyphen) copied from a rendered man page: exit 2
    (RestartPreventExitStatus), and systemd gets the error in STATUS=, in UTF-8."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[restore]\ndocker = "if\u2011active"\n', encoding="utf-8")
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        r = subprocess.run([sys.executable, "-m", "ctwatchd", "run", "--config", str(cfg)], capture_output=True,
                           text=True, timeout=30, env={**os.environ, "NOTIFY_SOCKET": path}, check=False)
        status = sock.recv(4096).decode("utf-8")
    finally:
        sock.close()
    assert r.returncode == 2, r.stderr
    assert status.startswith("STATUS=configuration error:") and "if\u2011active" in status


# == 9: a restore that does not hold ==============================================================

def test_core_backs_off_when_successful_restores_do_not_hold() -> None:
    """The same drift after every successful restore: UNSETTLED_AFTER restores in a row, then exponential
    backoff; one look that needs nothing resets the count."""
    cfg = Config(backoff_initial=1.0, backoff_max=8.0)
    drifted = live_obs({BRIDGE: "0", "net.bridge.bridge-nf-call-ip6tables": "1"})
    state, now, gaps = CoreState(), 0.0, []
    last_restore = None
    for _ in range(12):
        d = decide(cfg, state, drifted, now)
        state = d.state
        if d.plan:
            if last_restore is not None:
                gaps.append(round(now - last_restore, 3))
            last_restore = now
            state = record(cfg, state, ok(d.plan), now)
        now = d.wake_at if d.wake_at is not None else now + 0.001
    assert gaps[:UNSETTLED_AFTER - 1] == [0.001] * (UNSETTLED_AFTER - 1)
    assert gaps[UNSETTLED_AFTER - 1:UNSETTLED_AFTER + 3] == [1.0, 2.0, 4.0, 8.0]
    healthy = live_obs({BRIDGE: "1", "net.bridge.bridge-nf-call-ip6tables": "1"})
    settled = decide(cfg, replace(state, retry_at=None), healthy, now)
    assert settled.state.unsettled == 0 and not settled.plan


def test_a_module_removed_again_and_again_is_restored_each_time_without_backoff() -> None:
    """Flapping removals are new faults, not a fight over a value: each reload is planned at once."""
    cfg = Config()
    obs = live_obs({BRIDGE: "1", "net.bridge.bridge-nf-call-ip6tables": "1"})
    gone = replace(obs, modules={**obs.modules, "br_netfilter": ModuleStatus("br_netfilter", ModuleState.ABSENT)},
                   sysctls={BRIDGE: None, "net.bridge.bridge-nf-call-ip6tables": None})
    state = CoreState()
    for i in range(3 * UNSETTLED_AFTER):
        d = decide(cfg, state, gone, float(i))
        assert d.plan.modules == ("br_netfilter",), (i, d.plan.reason)
        state = record(cfg, d.state, ok(d.plan), float(i))
        assert state.retry_at is None


def test_daemon_does_not_spin_on_two_keys_that_are_one_value(h: Harness) -> None:
    """Two desired keys that are one kernel value (as net.ipv4.ip_forward and conf.all.forwarding are),
    wanted 1 and 0: every restore succeeds and undoes itself. A handful of restores and a
    restore.unsettled record in 3 s, not thousands at full CPU."""
    arp = "net.bridge.bridge-nf-call-arptables"
    link = h.host.sysctl(arp)
    link.unlink()
    link.symlink_to(h.host.sysctl(BRIDGE))  # writing one writes the other, like coupled sysctls

    def driver() -> None:
        h.wait_notify("READY=1")
        time.sleep(3)

    cfg = cfg_for(h.host, sysctls=((BRIDGE, "1"), (arp, "0")), poll_interval=0.05, backoff_initial=0.25)
    cpu0 = time.process_time()
    code, logs = h.run(h.daemon(cfg), driver)
    cpu = time.process_time() - cpu0
    planned = events(logs, "restore.planned")
    assert code == 0
    assert UNSETTLED_AFTER <= len(planned) <= 12, len(planned)
    unsettled = events(logs, "restore.unsettled")
    assert unsettled and unsettled[0]["count"] == UNSETTLED_AFTER
    assert cpu < 2.5, cpu


# == 10: snapshot keys the reloaded module lacks ==================================================

def test_core_drops_snapshot_keys_the_reload_does_not_bring_back() -> None:
    """A tuned key missing after a reload is dropped (with a record), the reload settles, and the admin's
    later change is learned instead of reverted."""
    cfg = Config()
    bridge = {BRIDGE: "1", "net.bridge.bridge-nf-call-ip6tables": "1"}
    icmpv6 = "net.netfilter.nf_conntrack_icmpv6_timeout"
    state = decide(cfg, CoreState(), live_obs(bridge, {MAX: "1048576", icmpv6: "60"}, 7), 0.0).state
    reloaded = decide(cfg, state, live_obs(bridge, {MAX: "262144"}, 8), 1.0)  # new instance, defaults
    assert reloaded.state.dropped == (icmpv6,) and icmpv6 not in reloaded.state.tuning
    assert [dict(s.sysctls) for s in reloaded.plan.steps if s.kind is StepKind.RESTORE_TUNING] == [{MAX: "1048576"}]
    back = decide(cfg, record(cfg, reloaded.state, ok(reloaded.plan), 1.0), live_obs(bridge, {MAX: "1048576"}, 8),
                  2.0)
    assert not back.state.conntrack_reloaded and not back.plan
    admin = decide(cfg, back.state, live_obs(bridge, {MAX: "2000000"}, 8), 3.0)
    assert not admin.plan and admin.state.tuning[MAX] == "2000000"


def test_daemon_keeps_the_admins_change_after_a_reload_lost_a_key(h: Harness) -> None:
    """End to end: nf_conntrack_icmpv6_timeout does not come back with the module; the restore is ok, the
    key is dropped once, and `sysctl -w nf_conntrack_max=…` afterwards stays."""
    icmpv6 = "net.netfilter.nf_conntrack_icmpv6_timeout"
    h.host.write_sysctl(MAX, "1048576")
    h.host.write_sysctl(icmpv6, "60")

    def driver() -> None:
        h.wait_notify("READY=1")
        for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
            h.host.unload(m)
        h.monitor.send("remove nf_conntrack")
        h.wait_for(lambda: h.host.read_sysctl(MAX) == "1048576")
        time.sleep(0.3)
        h.host.write_sysctl(MAX, "2000000")
        time.sleep(0.5)

    code, logs = h.run(h.daemon(cfg_for(h.host, poll_interval=0.05)), driver)
    assert code == 0
    assert h.host.read_sysctl(MAX) == "2000000"
    assert [e["result"] for e in events(logs, "restore.finished")] == ["ok"]
    dropped = events(logs, "tuning.dropped")
    assert len(dropped) == 1 and dropped[0]["keys"] == icmpv6


def test_executor_drops_a_snapshot_key_the_kernel_refuses(loaded: FakeHost) -> None:
    """A snapshot value the new module rejects (EINVAL, here a real proc handler) is dropped, not retried
    forever as a failed restore."""
    from ctwatchd.executor import Executor
    from ctwatchd.kernel import KernelProbe
    from ctwatchd.model import Step
    from ctwatchd.runner import Runner

    target = loaded.sysctl("net.netfilter.nf_conntrack_tcp_loose")
    target.unlink()
    target.symlink_to("/proc/self/oom_score_adj")  # kstrtoint: "not-a-number" is EINVAL, nothing changes
    plan = RestorePlan((Step(StepKind.RESTORE_TUNING, sysctls=(("net.netfilter.nf_conntrack_tcp_loose", "x-1"),
                                                                (MAX, "1048576"))),), "test")
    from structlog.testing import capture_logs

    with capture_logs():
        result = Executor(Config(), KernelProbe(loaded.root), Runner(), __import__("structlog").get_logger()) \
            .execute(plan)
    assert result.ok and result.results[0].dropped == ("net.netfilter.nf_conntrack_tcp_loose",)
    assert loaded.read_sysctl(MAX) == "1048576"


# == 11: state from another boot ==================================================================

def saved_with(**kw: object) -> statefile.SavedState:
    base = statefile.SavedState({MAX: "1048576"}, True, (100.0,), "healthy", 7, True, BOOT_ID, 1234, 90.0)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_state_from_another_boot_keeps_only_the_snapshot() -> None:
    """Monotonic times and /sys inodes of another boot are dropped; so is a state file without a boot id."""
    for other in ("00000000-0000-0000-0000-000000000000", None):
        s = core.core_state(saved_with(boot_id=other), boot_id=BOOT_ID, now=200.0)
        assert s == CoreState(tuning={MAX: "1048576"})
    same = core.core_state(saved_with(), boot_id=BOOT_ID, now=200.0)
    assert same.restarts == (100.0,) and same.conntrack_instance == 7 and same.restarts_owed


def test_restart_times_in_the_future_are_refused() -> None:
    """A saved restart time after `now` (a corrupt or foreign file) never holds the breaker open."""
    s = core.core_state(saved_with(restarts=(150.0, 5e9)), boot_id=BOOT_ID, now=200.0)
    assert s.restarts == (150.0,)


@pytest.mark.parametrize("value", ["Infinity", "NaN", "-1", "1e400"])
def test_state_loader_refuses_non_finite_or_negative_times(tmp_path: Path, value: str) -> None:
    """`restarts: [Infinity]` would keep the breaker open forever: the whole file is refused."""
    path = tmp_path / "state.json"
    path.write_text('{"version": 1, "tuning": {}, "conntrack_reloaded": false, "restarts": [' + value + "]}")
    path.chmod(0o600)
    with pytest.raises(statefile.StateError, match="'restarts'"):
        statefile.load(path)


def test_breaker_from_a_previous_boot_does_not_hold_back_the_hook(h: Harness, tmp_path: Path) -> None:
    """A persistent state file whose breaker was full in the last boot: after a reboot the hook runs."""
    runs = tmp_path / "runs"
    state_path = h.host.root / "run/state.json"
    statefile.save(state_path, statefile.SavedState({}, False, (time.monotonic() - 1,), "", None, False,
                                                    "11111111-2222-3333-4444-555555555555", 1, 1.0))
    h.host.unload("nf_nat")

    def driver() -> None:
        h.wait_notify("READY=1")
        h.wait_for(runs.exists)

    cfg = cfg_for(h.host, hooks=(("/bin/sh", "-c", f"echo ran >> {runs}"),), max_restarts=1)
    code, logs = h.run(h.daemon(cfg), driver)
    assert code == 0 and runs.read_text() == "ran\n"
    assert any("another boot" in e["detail"] for e in events(logs, "state.ignored"))


# == 15: metrics through a planted symlink ========================================================

def test_metrics_write_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    """prometheus_client's temp name is <path>.<pid>.<tid>, predictable in a directory node_exporter's user
    owns: a symlink planted there must not make root write through it. Nor may the final name."""
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = textdir / "ctwatchd.prom"
    (textdir / f"ctwatchd.prom.{os.getpid()}.{threading.get_ident()}").symlink_to(victim)
    path.symlink_to(victim)
    m = Metrics(path)
    m.healthy.set(1)
    m.write()
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and "ctwatchd_healthy 1.0" in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_atomic_replace_refuses_a_planted_temporary_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a guessed temporary name is not followed: O_EXCL|O_NOFOLLOW fails instead."""
    monkeypatch.setattr("ctwatchd.files.secrets.token_hex", lambda _n: "guessed")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / ".out.guessed.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        files.replace_atomically(tmp_path / "out", b"data", 0o644)
    assert victim.read_text() == "precious\n" and not (tmp_path / "out").exists()


# == 18: stale or wrong reports ===================================================================

def test_restore_gives_up_on_a_module_stuck_in_going(loaded: FakeHost, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`ctwatchd restore` waits the daemon's grace for a module in `going`, then says it is stuck and exits
    1, instead of exit 0 "waiting for nf_nat" forever."""
    monkeypatch.setattr(core, "TRANSIENT_GRACE", 0.4)
    loaded.set_state("nf_nat", "going")
    t0 = time.monotonic()
    code = cli.main(["restore", "--root", str(loaded.root), "--config", str(loaded.config())])
    out = capsys.readouterr().out
    assert code == 1 and time.monotonic() - t0 < 5
    assert "nf_nat going" in out and "waiting" not in out


def test_max_restarts_zero_means_no_restarts_not_an_open_breaker() -> None:
    """max_restarts = 0 turns docker and hooks off: nothing planned, and the breaker is never 'open'."""
    cfg = Config(hooks=(("/bin/true",),), max_restarts=0)
    obs = live_obs({BRIDGE: "1", "net.bridge.bridge-nf-call-ip6tables": "1"})
    absent = replace(obs, modules={**obs.modules, "nf_nat": ModuleStatus("nf_nat", ModuleState.ABSENT)})
    d = decide(cfg, CoreState(), absent, 0.0)
    assert StepKind.RUN_HOOK not in [s.kind for s in d.plan.steps] and not d.plan.skipped_restarts
    assert not d.health.breaker_open and not core.breaker_open(cfg, CoreState(restarts=(0.0,) * 5), 1.0)
    nothing = Config()  # no docker, no hooks: the breaker has nothing to limit
    assert not core.breaker_open(nothing, CoreState(restarts=(0.0,) * 5), 1.0)


def test_reload_moves_the_state_file_and_switches_the_log_format(h: Harness) -> None:
    """`systemctl reload` with a new state_file writes there from then on; a new log_format is applied."""
    new_state = h.host.root / "run/other/state.json"
    cfg = cfg_for(h.host)
    changed = replace(cfg, state_file=new_state, log_format=LogFormat.JSON)
    applied: list[LogFormat] = []
    d = h.daemon(cfg, reload_config=lambda: changed)
    d.on_log_format = lambda c: applied.append(c.log_format)

    def driver() -> None:
        h.wait_notify("READY=1")
        os.kill(os.getpid(), signal.SIGHUP)
        h.wait_for(new_state.exists)
        seen = len(h.read_notify())
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat"))
        h.wait_notify("STATUS=healthy", after=seen)

    code, _ = h.run(d, driver)
    assert code == 0 and applied == [LogFormat.JSON]
    saved = statefile.load(new_state)
    assert saved is not None and saved.stopped and saved.status.startswith("healthy")


# == 19: a start-up restore that takes long ========================================================

def test_slow_start_up_asks_systemd_for_more_time_before_ready(h: Harness) -> None:
    """While the start-up restore runs (3 slow modprobes, 6 s in all), EXTEND_TIMEOUT_USEC= goes out before
    READY=1: at once, and again every EXTEND_EVERY seconds while a step runs."""
    for m in ALL:
        h.host.unload(m)
    h.host.write_modprobe(extra="sleep 2")

    def driver() -> None:
        h.wait_notify("READY=1", timeout=20)

    code, _ = h.run(h.daemon(cfg_for(h.host)), driver)
    msgs = h.read_notify()
    ready = next(i for i, m in enumerate(msgs) if "READY=1" in m)
    extends = [i for i, m in enumerate(msgs) if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert code == 0 and extends and max(extends) < ready
    assert msgs[extends[0]] == "EXTEND_TIMEOUT_USEC=30000000"
    assert extends[0] == 0, msgs  # first of all: the interpreter's start may have used the timeout up
    assert len(extends) >= 2, msgs  # and again while the slow modprobes run


def test_check_json_shows_what_the_daemon_would_do_from_its_state(loaded: FakeHost) -> None:
    """check resumes from the state file like the daemon: docker/hooks still owed show in would_do."""
    cfgpath = loaded.config("[restore]\nhooks = [['/bin/true']]\n")
    statefile.save(loaded.root / "run/state.json",
                   statefile.SavedState({}, False, (), "healthy", None, True, BOOT_ID, 1, time.monotonic()))
    r = subprocess.run([sys.executable, "-m", "ctwatchd", "check", "--json", "--root", str(loaded.root),
                        "--config", str(cfgpath)], capture_output=True, text=True, timeout=30, check=False)
    data = json.loads(r.stdout)
    assert data["would_do"] == ["run hook /bin/true"] and data["daemon"]["restarts_owed"] is True


def test_an_unreadable_tree_file_is_logged_once(h: Harness) -> None:
    """modules.dep as a directory: one facts.problem record naming it, not one per look."""
    dep = h.host.moddir / "modules.dep"
    dep.unlink()
    dep.mkdir()

    def driver() -> None:
        h.wait_notify("READY=1")
        time.sleep(0.5)  # ten looks

    with capture_logs() as logs:
        d = h.daemon(cfg_for(h.host, poll_interval=0.05))
        code, _ = h.run(d, driver)
    problems = [e for e in logs if e["event"] == "facts.problem"]
    assert code == 0 and len(problems) == 1
    assert problems[0]["detail"] == f"/lib/modules/{h.host.release}/modules.dep was not read: " \
                                    "is not a regular file (a directory)"
