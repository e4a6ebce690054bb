"""Fault injection: 59 cases (69 test items), injected for real where the kernel lets us; see docs/faults.md.

Every case asserts three things: the daemon or executor survives (no exception, a clean exit where it
runs), the audit record names the cause (structlog's capture_logs, or the journald fallback line when
journald itself is the fault), and the resulting state is right (CoreState, the host tree, the state
file). Errnos are real: chattr +i for EPERM, a remounted read-only tmpfs for EROFS, a proc write
handler for EINVAL, a directory for EISDIR, a FIFO for ENXIO. Subprocesses are real scripts in the
temporary host tree; signals are real signals to this process; sockets are real AF_UNIX sockets.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fakehost import MODULES, FakeHost, executable
from harness import ALL, FakeMonitor, Harness, Logs, cfg_for, events, run_daemon
from prereq import missing
from structlog.testing import capture_logs

from ctwatchd import audit, core
from ctwatchd import config as configmod
from ctwatchd import state as statefile
from ctwatchd.audit import get_logger
from ctwatchd.config import Config, ConfigError, DockerMode, LogFormat
from ctwatchd.core import CoreState, decide, record
from ctwatchd.daemon import Daemon
from ctwatchd.executor import Executor
from ctwatchd.kernel import KernelProbe
from ctwatchd.model import Outcome, RestorePlan, RestoreResult, Step, StepKind
from ctwatchd.runner import OUTPUT_LIMIT, TERM_GRACE, Completed, Runner
from ctwatchd.uevents import ModuleEvent

BRIDGE_KEY = "net.bridge.bridge-nf-call-iptables"


# -- helpers ------------------------------------------------------------------------------------

def restore_once(cfg: Config, host: FakeHost, *, state: CoreState | None = None,
                 runner: Runner | None = None) -> tuple[RestoreResult, Logs, CoreState]:
    """decide -> execute -> record once on the host tree, as the daemon's reconcile does."""
    probe = KernelProbe(host.root)
    obs = probe.observe(probe.facts(), cfg.modules, [k for k, _ in cfg.sysctls])
    now = time.monotonic()
    decision = decide(cfg, state or CoreState(), obs, now)
    with capture_logs() as logs:
        result = Executor(cfg, probe, runner or Runner(), get_logger()).execute(decision.plan)
    return result, logs, record(cfg, decision.state, result, time.monotonic())


def execute(cfg: Config, host: FakeHost, *steps: Step) -> tuple[RestoreResult, Logs]:
    with capture_logs() as logs:
        result = Executor(cfg, KernelProbe(host.root), Runner(), get_logger()).execute(
            RestorePlan(tuple(steps), "fault test"))
    return result, logs


def step_events(logs: Logs) -> list[MutableMapping[str, Any]]:
    return events(logs, "restore.step")


def assert_backing_off(cfg: Config, state: CoreState) -> None:
    """A failed restore is recorded: one failure, a retry time one backoff_initial away."""
    assert state.failures == 1
    assert state.retry_at is not None
    assert 0 < state.retry_at - time.monotonic() <= cfg.backoff_initial


def process_gone(pid: int, timeout: float = 5.0) -> bool:
    """The process no longer exists (or is a zombie waiting for its new parent to reap it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return True
        if fields[0] in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def hanging_script(path: Path, pidfile: Path, before: str = "") -> Path:
    """A command that starts a grandchild in its process group and waits for it forever."""
    return executable(path, f"#!/bin/sh\n{before}\nsleep 300 &\necho $! > {pidfile}\nwait\n")


def wrap_modprobe(host: FakeHost, after: str) -> Path:
    """A modprobe that loads like the fake one, then changes the tree (the kernel misbehaving)."""
    return executable(host.root / "bin/modprobe-then", f'#!/bin/sh\n"{host.modprobe}" "$@" || exit $?\n{after}\n')


def fake_systemctl(tmp_path: Path, is_active: str, try_restart: str, *, show: str = "true") -> tuple[Path, Path]:
    log = tmp_path / "systemctl.log"
    body = (f'#!/bin/sh\necho "$*" >> {log}\ncase "$1" in\n'
            f"is-active) {is_active} ;;\ntry-restart) {try_restart} ;;\nshow) {show} ;;\nesac\nexit 0\n")
    return executable(tmp_path / "systemctl", body), log


class StormMonitor(FakeMonitor):
    """FakeMonitor that keeps partial lines between reads, for floods larger than one pipe read."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = b""
        self.drained = 0

    def drain(self) -> list[ModuleEvent]:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.r, 65536):
                self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        out = [ModuleEvent(*line.decode().split()) for line in lines]
        self.drained += len(out)
        return out


# == modprobe ===================================================================================

def test_modprobe_missing(h: Harness) -> None:
    """modprobe not installed: the step fails naming the path and errno, the daemon backs off and stays up."""
    h.host.unload("nf_nat")
    missing = h.host.root / "sbin/modprobe"
    d = h.daemon(cfg_for(h.host, modprobe=str(missing), backoff_initial=60, backoff_max=60))

    def driver() -> None:
        h.wait_notify("READY=1")

    code, logs, _ = run_daemon(d, driver)
    assert code == 0
    step = step_events(logs)[0]
    assert step["result"] == "failed" and step["detail"] == f"cannot run {missing}: No such file or directory"
    finished = events(logs, "restore.finished")
    assert len(finished) == 1 and finished[0]["result"] == "failed" and finished[0]["retry_in"] > 50
    assert d.state.failures == 1 and not h.host.is_live("nf_nat")
    ready = next(m for m in h.messages if "READY=1" in m)
    assert "degraded: nf_nat absent" in ready


def test_modprobe_failing(loaded: FakeHost) -> None:
    """modprobe exits 1: its last line is the audit detail; later steps are skipped; backoff starts."""
    host = loaded
    host.unload("nf_nat")
    host.write_modprobe(exit_code=1, load=False,
                        extra="echo \"modprobe: ERROR: could not insert '$1': Unknown symbol in module\" >&2")
    cfg = Config(modprobe=str(host.modprobe), modules=("nf_nat",))
    result, logs, state = restore_once(cfg, host)
    assert result.failed is not None and result.failed.step.module == "nf_nat"
    assert step_events(logs)[0]["detail"] == (f"{host.modprobe} exited with status 1: modprobe: ERROR: could not "
                                              "insert 'nf_nat': Unknown symbol in module")
    assert [r.outcome for r in result.results] == [Outcome.FAILED, Outcome.SKIPPED]
    assert_backing_off(cfg, state)
    assert not host.is_live("nf_nat")


def test_modprobe_hanging_past_its_timeout(host: FakeHost, tmp_path: Path) -> None:
    """A modprobe that hangs is killed with its whole process group at module_timeout."""
    pidfile = tmp_path / "grandchild.pid"
    host.write_modprobe(extra=f"sleep 300 &\necho $! > {pidfile}\nwait")
    cfg = Config(modprobe=str(host.modprobe), modules=("nf_nat",), module_timeout=0.5)
    t0 = time.monotonic()
    _, logs, state = restore_once(cfg, host)
    assert time.monotonic() - t0 < 0.5 + TERM_GRACE + 1
    assert step_events(logs)[0]["detail"] == (f"{host.modprobe} did not finish within its timeout; "
                                              "its process group was killed")
    assert process_gone(int(pidfile.read_text()))
    assert_backing_off(cfg, state)


def test_modprobe_printing_garbage(host: FakeHost) -> None:
    """A megabyte of random bytes (NUL, escapes, invalid UTF-8) on one 'line': a short, one-line detail."""
    host.write_modprobe(exit_code=1, load=False, extra="head -c 1000000 /dev/urandom | tr -d '\\n'\nexit 1")
    cfg = Config(modprobe=str(host.modprobe), modules=("nf_nat",))
    _, logs, state = restore_once(cfg, host)
    detail = step_events(logs)[0]["detail"]
    assert isinstance(detail, str) and detail.startswith(f"{host.modprobe} exited with status 1: ")
    assert len(detail) < 400 and "\n" not in detail
    assert_backing_off(cfg, state)


def test_modprobe_printing_megabytes_then_loading(host: FakeHost) -> None:
    """Eight megabytes of output do not fail the load or grow the record: the step is ok."""
    host.write_modprobe(extra="head -c 8000000 /dev/zero | tr '\\0' x")
    cfg = Config(modprobe=str(host.modprobe), modules=("nf_nat",), sysctls=())
    result, logs, state = restore_once(cfg, host)
    assert result.ok, result
    assert step_events(logs)[0] == {**step_events(logs)[0], "result": "ok", "detail": "initstate live"}
    assert host.is_live("nf_nat") and state.failures == 0


# == module states ================================================================================

def test_module_unavailable_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nf_nat is not in modules.dep: reported unavailable, never modprobe'd, no restore loop."""
    host = FakeHost(tmp_path / "root", modules={k: v for k, v in MODULES.items() if k != "nf_nat"})
    host.load("nf_conntrack", "br_netfilter")
    host.log.unlink()
    h = Harness(host, tmp_path, monkeypatch)
    d = h.daemon(cfg_for(host, poll_interval=0.1))

    def driver() -> None:
        h.wait_notify("READY=1")
        time.sleep(0.5)

    code, logs, _ = run_daemon(d, driver)
    h.notify.close()
    h.monitor.close()
    assert code == 0 and host.modprobe_calls() == []
    state = next(e for e in events(logs, "module.state") if e["module"] == "nf_nat")
    assert state["state"] == "unavailable" and "modules.dep" in state["detail"]
    assert not events(logs, "restore.planned") and d.state.failures == 0
    assert "nf_nat unavailable" in d.last_status


def test_module_built_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All three compiled in (/sys/module/<m> without initstate): healthy, nothing loaded."""
    host = FakeHost(tmp_path / "root")
    for m in ALL:
        host.builtin_dir(m)
    host.write_sysctl("net.netfilter.nf_conntrack_count", "0", mode=0o444)
    host.write_sysctl(BRIDGE_KEY, "1")
    host.write_sysctl("net.bridge.bridge-nf-call-ip6tables", "1")
    h = Harness(host, tmp_path, monkeypatch)

    def driver() -> None:
        h.wait_notify("READY=1")

    code, logs, _ = run_daemon(h.daemon(cfg_for(host)), driver)
    h.notify.close()
    h.monitor.close()
    assert code == 0 and host.modprobe_calls() == []
    assert {e["module"]: e["state"] for e in events(logs, "module.state")} == dict.fromkeys(ALL, "built-in")
    assert not events(logs, "restore.planned")
    assert "STATUS=healthy (nf_conntrack built-in, nf_nat built-in, br_netfilter built-in)" in \
        next(m for m in h.messages if "READY=1" in m)


def test_module_blocked_in_modprobe_d(h: Harness) -> None:
    """`install br_netfilter /bin/false` in /usr/lib/modprobe.d: named once, never loaded; nf_nat is still
    restored."""
    h.host.block("install br_netfilter /bin/false", file="bl.conf", directory="usr/lib/modprobe.d")
    h.host.unload("br_netfilter")
    h.host.unload("nf_nat")

    def driver() -> None:
        h.wait_notify("READY=1")
        time.sleep(0.4)

    code, logs, _ = run_daemon(h.daemon(cfg_for(h.host, poll_interval=0.1)), driver)
    assert code == 0
    blocked = events(logs, "module.blocked")
    assert len(blocked) == 1
    assert blocked[0]["blocker"] == "'install br_netfilter /bin/false' in /usr/lib/modprobe.d/bl.conf:1"
    assert h.host.modprobe_calls() == ["nf_nat"] and not h.host.is_live("br_netfilter")
    assert events(logs, "restore.finished")[0]["result"] == "ok"


def test_blacklist_is_a_note_and_the_module_is_restored(h: Harness) -> None:
    """`blacklist br_netfilter` does not stop `modprobe br_netfilter` (modprobe(8)): one note naming the
    file and line, and the module comes back like any other."""
    h.host.block("blacklist br_netfilter", file="bl.conf", directory="usr/lib/modprobe.d")
    h.host.unload("br_netfilter")

    def driver() -> None:
        h.wait_notify("READY=1")
        time.sleep(0.4)

    code, logs, _ = run_daemon(h.daemon(cfg_for(h.host, poll_interval=0.1)), driver)
    assert code == 0 and h.host.is_live("br_netfilter") and h.host.modprobe_calls() == ["br_netfilter"]
    notes = events(logs, "module.note")
    assert len(notes) == 1 and "'blacklist br_netfilter' in /usr/lib/modprobe.d/bl.conf:1" in notes[0]["note"]
    assert not events(logs, "module.blocked")


@pytest.mark.parametrize("stuck", ["going", "coming"])
def test_module_stuck_in_transition(h: Harness, monkeypatch: pytest.MonkeyPatch, stuck: str) -> None:
    """A module stuck in going/coming is waited for, then reported, never raced by modprobe, not polled hot."""
    monkeypatch.setattr(core, "TRANSIENT_GRACE", 0.3)
    h.host.set_state("nf_nat", stuck)
    d = h.daemon(cfg_for(h.host, poll_interval=0.2))
    seen: dict[str, Any] = {}

    def driver() -> None:
        h.wait_notify("READY=1")
        before = d.reconciles
        time.sleep(1.0)
        seen["reconciles"] = d.reconciles - before
        seen["calls"] = h.host.modprobe_calls()
        seen["status"] = d.last_status
        if stuck == "going":
            h.host.unload("nf_nat")  # the removal finally completes: now it is restored
        else:
            h.host.set_state("nf_nat", "live")  # the load finally completes: nothing to do
        h.wait_for(lambda: h.host.is_live("nf_nat") and d.last_status.startswith("healthy"))

    code, logs, _ = run_daemon(d, driver)
    assert code == 0
    assert seen["calls"] == [] and seen["reconciles"] <= 10
    assert f"nf_nat {stuck}" in seen["status"]
    assert any(e["module"] == "nf_nat" and e["state"] == stuck for e in events(logs, "module.state"))
    assert h.host.modprobe_calls() == (["nf_nat"] if stuck == "going" else [])
    assert h.host.is_live("nf_nat")


# == sysctls ======================================================================================

@pytest.fixture
def drifted(loaded: FakeHost) -> FakeHost:
    """Modules live, bridge-nf-call-iptables drifted to 0: the plan is one sysctl write."""
    loaded.write_sysctl(BRIDGE_KEY, "0")
    return loaded


def sysctl_fault(host: FakeHost, cfg: Config | None = None) -> tuple[str, CoreState, Logs]:
    cfg = cfg or Config(modprobe=str(host.modprobe), sysctls=((BRIDGE_KEY, "1"),))
    result, logs, state = restore_once(cfg, host)
    assert result.failed is not None and result.failed.step.kind is StepKind.WRITE_SYSCTLS
    write = events(logs, "sysctl.write")
    assert len(write) == 1 and write[0]["result"] == "failed" and write[0]["key"] == BRIDGE_KEY
    step = next(e for e in step_events(logs) if e["action"] == "write-sysctls")
    assert step["result"] == "failed" and step["detail"] == write[0]["detail"]
    assert_backing_off(cfg, state)
    return str(write[0]["detail"]), state, logs


def test_sysctl_write_eperm_immutable_file(drifted: FakeHost) -> None:
    """chattr +i makes the kernel answer EPERM to the write; the value stays."""
    path = drifted.sysctl(BRIDGE_KEY)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode != 0:
        missing("chattr +i not supported on this filesystem")
    try:
        detail, _, _ = sysctl_fault(drifted)
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    assert detail == f"{BRIDGE_KEY}: cannot write {path}: permission denied (EPERM)"
    assert drifted.read_sysctl(BRIDGE_KEY) == "0"


@pytest.fixture
def ro_bridge(drifted: FakeHost) -> Iterator[FakeHost]:
    """proc/sys/net/bridge on a tmpfs remounted read-only, with the drifted file in it."""
    if os.geteuid() != 0:
        missing("mounting a tmpfs needs root")
    target = drifted.sysctl(BRIDGE_KEY).parent
    saved = {p.name: p.read_text() for p in target.iterdir()}
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "ctwatchd-test", str(target)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        missing(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        for name, text in saved.items():
            (target / name).write_text(text)
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        yield drifted
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_sysctl_write_erofs_read_only_mount(ro_bridge: FakeHost) -> None:
    """A read-only mount answers EROFS; named in the record, the value stays."""
    detail, _, _ = sysctl_fault(ro_bridge)
    assert detail == f"{BRIDGE_KEY}: cannot write {ro_bridge.sysctl(BRIDGE_KEY)}: read-only file system (EROFS)"
    assert ro_bridge.read_sysctl(BRIDGE_KEY) == "0"


def test_sysctl_write_einval_rejected_value(loaded: FakeHost) -> None:
    """A proc write handler rejecting the value (EINVAL): here /proc/self/oom_score_adj, whose kstrtoint
    fails on a non-number exactly as a sysctl handler does; nothing changes."""
    path = loaded.sysctl(BRIDGE_KEY)
    path.unlink()
    path.symlink_to("/proc/self/oom_score_adj")
    before = Path("/proc/self/oom_score_adj").read_text()
    cfg = Config(modprobe=str(loaded.modprobe), sysctls=((BRIDGE_KEY, "not-a-number"),))
    detail, _, _ = sysctl_fault(loaded, cfg)
    assert detail == f"{BRIDGE_KEY}: cannot write {path}: the kernel rejected the value 'not-a-number' (EINVAL)"
    assert Path("/proc/self/oom_score_adj").read_text() == before


def test_sysctl_file_missing_after_the_load(loaded: FakeHost) -> None:
    """br_netfilter loads but its sysctl files never appear: the write fails ENOENT, nothing is created."""
    loaded.unload("br_netfilter")
    wrapper = wrap_modprobe(loaded, f'rm -rf "{loaded.root}/proc/sys/net/bridge"')
    cfg = Config(modprobe=str(wrapper), sysctls=((BRIDGE_KEY, "1"),))
    detail, _, _ = sysctl_fault(loaded, cfg)
    assert detail == f"{BRIDGE_KEY}: cannot write {loaded.sysctl(BRIDGE_KEY)}: does not exist"
    assert loaded.is_live("br_netfilter") and not loaded.sysctl(BRIDGE_KEY).exists()


def test_sysctl_path_is_a_directory(loaded: FakeHost) -> None:
    """A directory where the file belongs (EISDIR): a failed step naming errno, not a traceback."""
    path = loaded.sysctl(BRIDGE_KEY)
    path.unlink()
    path.mkdir()
    cfg = Config(modprobe=str(loaded.modprobe), sysctls=((BRIDGE_KEY, "1"),))
    result, logs = execute(cfg, loaded, Step(StepKind.WRITE_SYSCTLS, sysctls=((BRIDGE_KEY, "1"),)))
    assert result.failed is not None
    assert result.failed.detail == f"{BRIDGE_KEY}: cannot write {path}: Is a directory"
    assert events(logs, "sysctl.write")[0]["result"] == "failed" and path.is_dir()


def test_sysctl_path_is_a_fifo_does_not_hang(loaded: FakeHost) -> None:
    """A FIFO nobody reads where a sysctl belongs: probe and write return at once (ENXIO), never block."""
    path = loaded.sysctl(BRIDGE_KEY)
    path.unlink()
    os.mkfifo(path)
    cfg = Config(modprobe=str(loaded.modprobe), sysctls=((BRIDGE_KEY, "1"),))
    out: list[tuple[RestoreResult, Logs, str | None]] = []

    def work() -> None:
        result, logs = execute(cfg, loaded, Step(StepKind.WRITE_SYSCTLS, sysctls=((BRIDGE_KEY, "1"),)))
        out.append((result, logs, KernelProbe(loaded.root).read_sysctl(BRIDGE_KEY)))

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "a FIFO blocked the executor or the probe"
    result, logs, read = out[0]
    assert read == ""
    assert result.failed is not None
    assert result.failed.detail == f"{BRIDGE_KEY}: cannot write {path}: {os.strerror(errno.ENXIO)}"
    assert events(logs, "sysctl.write")[0]["result"] == "failed"


def test_conntrack_count_unreadable(loaded: FakeHost) -> None:
    """nf_conntrack loads but nf_conntrack_count cannot be read (EISDIR): verification fails, sysctls skipped."""
    for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
        loaded.unload(m)
    count = loaded.root / "proc/sys/net/netfilter/nf_conntrack_count"
    wrapper = wrap_modprobe(loaded, f'rm -f "{count}"; mkdir -p "{count}"')
    cfg = Config(modprobe=str(wrapper))
    result, logs, state = restore_once(cfg, loaded)
    assert result.failed is not None and result.failed.step.kind is StepKind.VERIFY_CONNTRACK
    assert result.failed.detail == "/proc/sys/net/netfilter/nf_conntrack_count is not readable"
    assert step_events(logs)[-1]["action"] == "verify-conntrack" and step_events(logs)[-1]["result"] == "failed"
    assert [(r.step.kind, r.outcome) for r in result.results][-2:] == [
        (StepKind.VERIFY_CONNTRACK, Outcome.FAILED), (StepKind.WRITE_SYSCTLS, Outcome.SKIPPED)]
    assert_backing_off(cfg, state)
    probe = KernelProbe(loaded.root)
    health = core.assess(cfg, probe.observe(probe.facts(), cfg.modules, []), state, time.monotonic())
    assert "nf_conntrack_count unreadable" in health.problems


# == docker / systemctl ===========================================================================

@pytest.mark.parametrize(("is_active", "show", "why"), [
    # systemctl's answers for a unit that does not exist, and for an inactive one
    ("echo inactive; exit 4", "LoadState=not-found\nActiveState=inactive\nMainPID=0", "is not installed"),
    ("echo inactive; exit 3", "LoadState=loaded\nActiveState=inactive\nMainPID=0", "is not active (inactive)"),
], ids=["docker-absent", "docker-inactive"])
def test_docker_absent_or_inactive_is_skipped(loaded: FakeHost, tmp_path: Path, is_active: str, show: str,
                                              why: str) -> None:
    """No docker.service, or an inactive one: the step is skipped saying which, the restore is ok, no
    restart counted."""
    systemctl, log = fake_systemctl(tmp_path, is_active, "exit 0", show=f"printf '{show}\\n'")
    loaded.unload("nf_nat")
    cfg = Config(modprobe=str(loaded.modprobe), docker=DockerMode.IF_ACTIVE, systemctl=str(systemctl))
    result, logs, state = restore_once(cfg, loaded)
    assert result.ok, why
    docker = next(e for e in step_events(logs) if e["action"] == "restart-docker")
    assert (docker["result"], docker["detail"]) == ("skipped", f"docker.service {why}")
    assert log.read_text().splitlines() == ["is-active --quiet docker.service",
                                            "show -p LoadState -p ActiveState -p MainPID docker.service"]
    assert state.restarts == () and state.failures == 0 and loaded.is_live("nf_nat")


def test_docker_failing_to_restart(loaded: FakeHost, tmp_path: Path) -> None:
    """try-restart fails: the restore fails with systemctl's sentence; the attempt counts for the breaker."""
    systemctl, _ = fake_systemctl(tmp_path, "exit 0", "echo 'Job for docker.service failed because the "
                                                       "control process exited with error code.' >&2; exit 1")
    loaded.unload("nf_nat")
    cfg = Config(modprobe=str(loaded.modprobe), docker=DockerMode.IF_ACTIVE, systemctl=str(systemctl))
    result, logs, state = restore_once(cfg, loaded)
    assert result.failed is not None and result.failed.step.kind is StepKind.RESTART_DOCKER
    assert "exited with status 1: Job for docker.service failed" in step_events(logs)[-1]["detail"]
    assert step_events(logs)[-1]["detail"].endswith("(if-active: restarted after every module reload)")
    assert events(logs, "restore.step")[-1]["result"] == "failed"
    assert len(state.restarts) == 1
    assert_backing_off(cfg, state)
    assert loaded.is_live("nf_nat")  # nothing is undone


def test_docker_restart_hanging(loaded: FakeHost, tmp_path: Path) -> None:
    """A try-restart that never returns is killed with its group at docker_timeout."""
    pidfile = tmp_path / "grandchild.pid"
    systemctl, _ = fake_systemctl(tmp_path, "exit 0", f"sleep 300 & echo $! > {pidfile}; wait")
    loaded.unload("nf_nat")
    cfg = Config(modprobe=str(loaded.modprobe), docker=DockerMode.IF_ACTIVE, systemctl=str(systemctl),
                 docker_timeout=0.5)
    t0 = time.monotonic()
    _, logs, state = restore_once(cfg, loaded)
    assert time.monotonic() - t0 < 0.5 + TERM_GRACE + 2
    assert step_events(logs)[-1]["detail"] == f"{systemctl} did not finish within its timeout; its process " \
                                               "group was killed (if-active: restarted after every module reload)"
    assert process_gone(int(pidfile.read_text()))
    assert len(state.restarts) == 1
    assert_backing_off(cfg, state)


def test_systemctl_missing(loaded: FakeHost, tmp_path: Path) -> None:
    """No systemctl at all: a failed step naming the path and errno."""
    loaded.unload("nf_nat")
    missing = tmp_path / "no/systemctl"
    cfg = Config(modprobe=str(loaded.modprobe), docker=DockerMode.IF_ACTIVE, systemctl=str(missing))
    result, logs, state = restore_once(cfg, loaded)
    assert result.failed is not None and result.failed.step.kind is StepKind.RESTART_DOCKER
    assert step_events(logs)[-1]["detail"] == f"cannot run {missing}: No such file or directory"
    assert_backing_off(cfg, state)


# == hooks ========================================================================================

def test_hook_failing_opens_the_breaker(h: Harness, tmp_path: Path) -> None:
    """A hook that always fails: the restore fails on it (modules and sysctls are back all the same), it is
    retried after the backoff but never beyond the breaker; once the breaker is open restores complete
    without it."""
    runs = tmp_path / "runs"
    hook = executable(tmp_path / "hook", f"#!/bin/sh\necho x >> {runs}\necho 'kube-proxy: unit not found'\nexit 3\n")
    cfg = cfg_for(h.host, hooks=((str(hook),),), max_restarts=2, restart_window=600, backoff_initial=0.05,
                  backoff_max=0.1, poll_interval=0.05)
    d = h.daemon(cfg)

    def remove_and_wait(restarts: int) -> None:
        time.sleep(0.3)  # past the backoff, and long enough to see that no loop re-runs the hook
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat") and len(d.state.restarts) == restarts
                   and d.reconciles > 0 and "healthy" in d.last_status)

    def driver() -> None:
        h.wait_notify("READY=1")
        remove_and_wait(1)
        remove_and_wait(2)
        remove_and_wait(2)
        h.wait_for(lambda: d.state.failures == 0)

    code, logs, _ = run_daemon(d, driver)
    assert code == 0
    assert runs.read_text().splitlines() == ["x", "x"]
    hook_steps = [e for e in step_events(logs) if e["action"] == "run-hook"]
    assert [e["result"] for e in hook_steps] == ["failed", "failed"]
    assert "exited with status 3: kube-proxy: unit not found" in hook_steps[0]["detail"]
    assert len(events(logs, "breaker.open")) == 1
    finished = [e["result"] for e in events(logs, "restore.finished")]
    # The failed hook is owed and retried once after the backoff (the second "failed"); then the breaker
    # holds it back and the next reloads complete without it.
    assert finished[:2] == ["failed", "failed"] and set(finished[2:]) == {"ok"}, finished
    assert events(logs, "restore.planned")[-1]["restarts_skipped"] is True
    assert core.breaker_open(cfg, d.state, time.monotonic()) and len(d.state.restarts) == 2


def test_hook_hanging(loaded: FakeHost, tmp_path: Path) -> None:
    """A hook that hangs is killed with the children it started at hook_timeout."""
    pidfile = tmp_path / "grandchild.pid"
    hook = hanging_script(tmp_path / "hook", pidfile)
    loaded.unload("nf_nat")
    cfg = Config(modprobe=str(loaded.modprobe), hooks=((str(hook),),), hook_timeout=0.5)
    result, logs, state = restore_once(cfg, loaded)
    assert result.failed is not None and result.failed.step.kind is StepKind.RUN_HOOK
    assert step_events(logs)[-1]["detail"] == f"{hook} did not finish within its timeout; its process group " \
                                               "was killed"
    assert process_gone(int(pidfile.read_text()))
    assert len(state.restarts) == 1
    assert_backing_off(cfg, state)


@pytest.mark.parametrize(("tail", "ok"), [
    ("echo; echo done", True),  # many megabytes, then success
    ("exit 4", False),  # one 4-MB line, then failure
    ("kill -9 $$", False),  # one 4-MB line, then killed by a signal
], ids=["ok", "exit", "signal"])
def test_hook_printing_megabytes(loaded: FakeHost, tmp_path: Path, tail: str, ok: bool) -> None:
    """Megabytes of output are read and dropped: the record stays one short line whatever the outcome."""
    hook = executable(tmp_path / "hook", f"#!/bin/sh\nhead -c 4000000 /dev/zero | tr '\\0' y\n{tail}\n")
    loaded.unload("nf_nat")
    cfg = Config(modprobe=str(loaded.modprobe), hooks=((str(hook),),))
    result, logs, state = restore_once(cfg, loaded)
    step = step_events(logs)[-1]
    assert step["action"] == "run-hook" and (step["result"] == "ok") is ok
    assert len(step["detail"]) < 400 and "\n" not in step["detail"]
    hook_result = result.results[-1]
    assert hook_result.step.kind is StepKind.RUN_HOOK
    assert state.failures == (0 if ok else 1) and len(state.restarts) == 1
    if tail.startswith("kill"):
        assert "was killed by signal 9" in step["detail"]


def test_output_of_a_killed_command_is_capped_in_its_reason() -> None:
    """The runner's own sentence for a signal death keeps at most 300 characters of the last line."""
    done = Completed(("/x",), -9, "z" * OUTPUT_LIMIT, 1.0)
    assert len(done.why()) < 400


# == sd_notify ====================================================================================

def test_no_notify_socket(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd: nothing is sent, nothing is reported, restores work."""
    monkeypatch.delenv("NOTIFY_SOCKET")
    d = h.daemon(cfg_for(h.host))

    def driver() -> None:
        h.wait_for(lambda: d.reconciles >= 1 and d.observation is not None)
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat") and "healthy" in d.last_status)

    code, logs, _ = run_daemon(d, driver)
    assert code == 0 and d.notifier.sent == 0 and not d.notifier.enabled
    assert not events(logs, "notify.failed") and events(logs, "daemon.ready")
    assert events(logs, "restore.finished")[0]["result"] == "ok"


def test_notify_socket_pointing_nowhere(h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFY_SOCKET names a path nobody listens on: one notify.failed record, the daemon goes on."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    d = h.daemon(cfg_for(h.host), env={"WATCHDOG_USEC": "200000"})  # a ping every 0.1 s: many failures

    def driver() -> None:
        h.wait_for(lambda: d.observation is not None)
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat"))
        time.sleep(0.5)

    code, logs, _ = run_daemon(d, driver)
    failed = events(logs, "notify.failed")
    assert code == 0 and len(failed) == 1 and "No such file or directory" in failed[0]["detail"]
    assert d.notifier.sent == 0 and events(logs, "restore.finished")[0]["result"] == "ok"


def fill_dgram(path: str) -> socket.socket:
    """A bound AF_UNIX datagram socket nobody reads, filled until the kernel says EAGAIN."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    client.setblocking(False)
    with contextlib.suppress(BlockingIOError), client:
        for _ in range(100_000):
            client.sendto(b"X" * 512, path)
    return server


def test_notify_socket_full(h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A notify receiver that stopped reading: each message waits SEND_TIMEOUT at most, then is given up;
    the loop, its restores and its stop are not blocked."""
    monkeypatch.setattr("ctwatchd.notify.SEND_TIMEOUT", 0.1)
    path = str(tmp_path / "full-notify.sock")
    server = fill_dgram(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    d = h.daemon(cfg_for(h.host))

    def driver() -> None:
        h.wait_for(lambda: d.observation is not None)
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat"))

    try:
        code, logs, stopped_in = run_daemon(d, driver, limit=20)
    finally:
        server.close()
    failed = events(logs, "notify.failed")
    assert code == 0 and stopped_in < 3
    assert len(failed) == 1 and "timed out" in failed[0]["detail"]
    assert events(logs, "restore.finished")[0]["result"] == "ok"


# == journald =====================================================================================

def test_journald_socket_missing(h: Harness, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """journald gone: every record falls back to one stderr line naming the journal error; work goes on."""
    audit.configure(LogFormat.JOURNAL, journal_socket=str(tmp_path / "no-journal.sock"))
    h.host.unload("nf_nat")

    def driver() -> None:
        h.wait_notify("READY=1")

    code, _, _ = run_daemon(h.daemon(cfg_for(h.host)), driver, capture=False)
    err = capfd.readouterr().err.splitlines()
    assert code == 0 and h.host.is_live("nf_nat")
    assert any(line.startswith("ctwatchd: restore ok in ") for line in err)
    assert all(line.endswith("[journal: No such file or directory]") for line in err if line.startswith("ctwatchd:"))
    assert any("ctwatchd stopping on SIGTERM" in line for line in err)


def test_journald_socket_full_and_stderr_stalled(h: Harness, tmp_path: Path) -> None:
    """journald stalled (its socket full, nobody reading) and stderr a full pipe nobody reads, as when
    the journal stops reading its stream: sends fail with EAGAIN at once, fallback lines are dropped
    and counted instead of blocking; the restore, the watchdog pings and the stop are all prompt."""
    path = str(tmp_path / "journal.sock")
    server = fill_dgram(path)
    r, w = os.pipe()
    os.set_blocking(w, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"x" * 65536)
    os.set_blocking(w, True)  # a blocking write to it now never returns
    saved_stderr = os.dup(2)
    os.dup2(w, 2)
    try:
        audit.configure(LogFormat.JOURNAL, journal_socket=path)
        h.host.unload("nf_nat")
        env = {"WATCHDOG_USEC": "200000"}

        def driver() -> None:
            h.wait_notify("READY=1")
            h.wait_for(lambda: h.host.is_live("nf_nat"))
            before = sum("WATCHDOG=1" in m for m in h.read_notify())
            time.sleep(0.5)
            assert sum("WATCHDOG=1" in m for m in h.read_notify()) - before >= 3

        t0 = time.monotonic()
        code, _, stopped_in = run_daemon(h.daemon(cfg_for(h.host), env=env), driver, capture=False)
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        server.close()
    os.set_blocking(r, False)
    with contextlib.suppress(BlockingIOError):
        while os.read(r, 1 << 20):
            pass
    os.close(r)
    os.close(w)
    assert code == 0 and h.host.is_live("nf_nat")
    assert time.monotonic() - t0 < 10 and stopped_in < 2


# == uevents ======================================================================================

def test_netlink_overrun_storm(h: Harness) -> None:
    """Twenty overruns in a row, with a removal hidden among them: each is logged, the state resynced,
    and the module restored exactly once."""

    def driver() -> None:
        h.wait_notify("READY=1")
        h.host.unload("nf_nat")
        for _ in range(20):
            h.monitor.send("OVERRUN")
            time.sleep(0.01)
        h.wait_for(lambda: h.host.is_live("nf_nat"))

    code, logs, _ = run_daemon(h.daemon(cfg_for(h.host)), driver)
    assert code == 0
    overruns = events(logs, "monitor.overrun")
    assert overruns and all(e["detail"] == "ENOBUFS (test)" for e in overruns)
    assert h.host.modprobe_calls() == ["nf_nat"]
    assert len(events(logs, "restore.planned")) == 1


def test_closed_monitor_polling_restores(h: Harness) -> None:
    """The monitor dies and is not reopened yet: the poll alone notices a removal and restores it."""

    def driver() -> None:
        h.wait_notify("READY=1")
        h.monitor.send("CLOSE")
        time.sleep(0.2)
        h.host.unload("br_netfilter")
        h.wait_for(lambda: h.host.is_live("br_netfilter"))

    d = h.daemon(cfg_for(h.host, poll_interval=0.2))
    code, logs, _ = run_daemon(d, driver)
    assert code == 0 and h.monitors == 1 and d.monitor.source is None and d.monitor.retry_at is not None
    failed = events(logs, "monitor.failed")
    assert len(failed) == 1 and failed[0]["detail"] == "MonitorClosed: socket closed (test)"
    assert not events(logs, "module.event") and h.host.modprobe_calls() == ["br_netfilter"]


def test_monitor_cannot_be_opened(h: Harness) -> None:
    """netlink refused at start (no CAP_NET_ADMIN, no netlink in the sandbox): warned, polling works."""

    def refuse() -> FakeMonitor:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    d = Daemon(cfg_for(h.host, poll_interval=0.2), probe=KernelProbe(h.host.root), log=get_logger(),
               reload_config=lambda: cfg_for(h.host), monitor_factory=refuse, env={})

    def driver() -> None:
        h.wait_notify("READY=1")
        h.host.unload("nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat"))

    code, logs, _ = run_daemon(d, driver)
    failed = events(logs, "monitor.failed")
    assert code == 0 and "PermissionError" in failed[0]["detail"] and failed[0]["poll_interval"] == 0.2
    assert h.host.modprobe_calls() == ["nf_nat"]


def test_event_storm_of_unrelated_uevents(h: Harness) -> None:
    """5000 uevents for other modules (some with look-alike names) cause no reconcile; the one that
    matters afterwards causes exactly one restore."""
    h.monitor.close()
    h.monitor = StormMonitor()
    d = h.daemon(cfg_for(h.host))
    seen: dict[str, int] = {}
    names = ["snd_dummy", "nf_conntrack_ftp", "nf_nat_sip", "br_netfilter2", "xt_conntrack"]

    def driver() -> None:
        h.wait_notify("READY=1")
        before = d.reconciles
        actions = itertools.cycle(["add", "remove", "change", "bind"])
        lines = "".join(f"{next(actions)} {names[i % len(names)]}{'' if i % 7 else i}\n" for i in range(5000))
        data = memoryview(lines.encode())  # ~100 kB: more than a pipe holds, so the daemon drains as we write
        while data:
            data = data[os.write(h.monitor.w, data[:4096]):]
        h.wait_for(lambda: isinstance(h.monitor, StormMonitor) and h.monitor.drained == 5000)
        time.sleep(0.1)
        seen["storm"] = d.reconciles - before
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat"))

    code, logs, _ = run_daemon(d, driver)
    assert code == 0 and seen["storm"] == 0
    assert [e["module"] for e in events(logs, "module.event")] == ["nf_nat"]
    assert len(events(logs, "restore.planned")) == 1 and h.host.modprobe_calls() == ["nf_nat"]


# == signals ======================================================================================

def test_sigterm_in_the_middle_of_a_hook(h: Harness, tmp_path: Path) -> None:
    """SIGTERM while a hook and its child hang: both killed, the stop is bounded, exit 0, STOPPING=1,
    and the state written before exit agrees with the daemon's."""
    pidfile = tmp_path / "grandchild.pid"
    hook = hanging_script(tmp_path / "hook", pidfile)
    d = h.daemon(cfg_for(h.host, hooks=((str(hook),),), hook_timeout=120))

    def driver() -> None:
        h.wait_notify("READY=1")
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "")

    code, logs, stopped_in = run_daemon(d, driver)
    assert code == 0 and stopped_in < TERM_GRACE + 2
    assert process_gone(int(pidfile.read_text()))
    hook_step = next(e for e in step_events(logs) if e["action"] == "run-hook")
    assert hook_step["result"] == "interrupted" and "stopped because ctwatchd is stopping" in hook_step["detail"]
    assert events(logs, "restore.finished")[0]["result"] == "failed"
    assert events(logs, "daemon.stopping")[0]["signal"] == "SIGTERM"
    assert any("STOPPING=1" in m for m in h.read_notify())
    saved = statefile.load(h.host.root / "run/state.json")
    assert saved is not None and saved.restarts == d.state.restarts and h.host.is_live("nf_nat")


@pytest.mark.parametrize(("broken", "message"), [
    (b"\xff\xfe[watch]\x00", "not valid UTF-8"),
    (b"[restore]\nhooks = [['/nonexistent/hook']]\n", "[restore] hooks[0][0] '/nonexistent/hook' does not exist"),
    (b"[restore]\nhooks = [['{tmp}/drop/hook']]\n", "drop' is writable by group or others (mode 0777)"),
], ids=["garbage-bytes", "missing-hook", "untrusted-hook"])
def test_sighup_with_a_broken_config_keeps_the_old_one(h: Harness, tmp_path: Path, broken: bytes,
                                                      message: str) -> None:
    """SIGHUP after the file was broken: rejected with the file named, old config kept and still in force."""
    executable(tmp_path / "drop/hook", "#!/bin/sh\nexit 0\n")
    (tmp_path / "drop").chmod(0o777)
    path = h.host.config('[sysctl]\n"net.bridge.bridge-nf-call-iptables" = "1"\n')
    old = configmod.load(path)
    d = h.daemon(old, reload_config=lambda: configmod.load(path))

    def driver() -> None:
        h.wait_notify("READY=1")
        path.write_bytes(broken.replace(b"{tmp}", str(tmp_path).encode()))
        n = len(h.read_notify())
        os.kill(os.getpid(), signal.SIGHUP)
        h.wait_notify("READY=1", after=h.wait_notify("RELOADING=1", after=n))
        h.host.write_sysctl(BRIDGE_KEY, "0")  # drift: the old config still says 1
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat") and h.host.read_sysctl(BRIDGE_KEY) == "1")

    code, logs, _ = run_daemon(d, driver)
    rejected = events(logs, "config.rejected")
    assert code == 0 and len(rejected) == 1
    assert rejected[0]["error"].startswith(f"{path}: ") and message in rejected[0]["error"]
    assert d.cfg is old and not events(logs, "config.loaded")


def test_two_sighups_at_once(h: Harness) -> None:
    """Two reload requests in the same instant: handled (one or two reloads), the daemon keeps running,
    and a later SIGINT stops it."""
    reloads: list[float] = []
    cfg = cfg_for(h.host)

    def reload() -> Config:
        reloads.append(time.monotonic())
        return cfg

    d = h.daemon(cfg, reload_config=reload)

    def driver() -> None:
        h.wait_notify("READY=1")
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGHUP)
        h.wait_for(lambda: len(reloads) >= 1)
        time.sleep(0.3)
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat"))
        os.kill(os.getpid(), signal.SIGINT)

    code, logs, stopped_in = run_daemon(d, driver, stop=False)
    assert code == 0 and 1 <= len(reloads) <= 2 and stopped_in < 2
    assert len(events(logs, "config.loaded")) == len(reloads)
    assert events(logs, "daemon.stopping") == [{**events(logs, "daemon.stopping")[0], "signal": "SIGINT"}]


def test_sigterm_and_sigint_at_once(h: Harness) -> None:
    """Two stop signals together: one stop, exit 0, one daemon.stopping record."""

    def driver() -> None:
        h.wait_notify("READY=1")
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)

    code, logs, stopped_in = run_daemon(h.daemon(cfg_for(h.host)), driver, stop=False)
    assert code == 0 and stopped_in < 2
    assert len(events(logs, "daemon.stopping")) == 1
    assert sum("STOPPING=1" in m for m in h.read_notify()) == 1


# == clocks =======================================================================================

def test_wall_clock_jumps_do_not_matter(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """time.time() leaping ten years back and forth changes nothing: no ctwatchd code reads it, and the
    backoff schedule (measured on the daemon's monotonic clock) is exactly the configured one."""
    real = time.time
    callers: list[str] = []
    jumps = itertools.cycle([10 * 365 * 86400.0, -10 * 365 * 86400.0, 86400.0])

    def leaping() -> float:
        name = str(sys._getframe(1).f_globals.get("__name__", ""))
        if name.startswith("ctwatchd"):
            callers.append(name)
        return real() + next(jumps)

    monkeypatch.setattr(time, "time", leaping)
    h.host.write_modprobe(exit_code=1, load=False, extra="echo 'modprobe: ERROR: could not insert' >&2")
    h.host.unload("nf_nat")

    def driver() -> None:
        h.wait_notify("READY=1")
        time.sleep(1.7)

    code, logs, _ = run_daemon(h.daemon(cfg_for(h.host, poll_interval=0.05, backoff_initial=0.2,
                                                backoff_max=10)), driver)
    assert code == 0 and callers == []
    at = [e["monotonic"] for e in events(logs, "restore.planned")]
    gaps = [b - a for a, b in itertools.pairwise(at)]
    assert len(at) >= 3
    for i, gap in enumerate(gaps):
        assert 0.2 * 2 ** i <= gap < 0.2 * 2 ** i + 0.5, gaps
    assert all(e["result"] == "failed" for e in events(logs, "restore.finished"))


def test_injected_monotonic_clock_drives_every_deadline(h: Harness) -> None:
    """The daemon's injected monotonic clock alone decides: a 30 s backoff holds while it stands still
    and is over as soon as it moves past, whatever the real time."""
    offset = [0.0]
    h.host.write_modprobe(exit_code=1, load=False, extra="echo 'modprobe: ERROR: could not insert' >&2")
    h.host.unload("nf_nat")
    cfg = cfg_for(h.host, poll_interval=0.1, backoff_initial=30, backoff_max=60)
    d = Daemon(cfg, probe=KernelProbe(h.host.root), log=get_logger(), reload_config=lambda: cfg,
               monitor_factory=lambda: h.monitor, env={}, clock=lambda: time.monotonic() + offset[0])
    seen: dict[str, Any] = {}

    def driver() -> None:
        h.wait_notify("READY=1")
        time.sleep(0.6)
        seen["before_jump"] = len(h.host.modprobe_calls())
        offset[0] += 31.0
        h.wait_for(lambda: len(h.host.modprobe_calls()) == 2, timeout=3)

    code, logs, _ = run_daemon(d, driver)
    assert code == 0 and seen["before_jump"] == 1
    first, second = (e["monotonic"] for e in events(logs, "restore.planned"))
    assert second - first >= 30
    assert d.state.failures == 2 and d.state.retry_at is not None
    assert d.state.retry_at - (time.monotonic() + offset[0]) > 50  # the second backoff: 60 s from then


# == crash and restart, state file ================================================================

def start_daemon(cfg: Path, host: FakeHost, notify: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen([sys.executable, "-m", "ctwatchd", "run", "--no-uevents", "--root",
                                 str(host.root), "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "NOTIFY_SOCKET": notify})


def wait_ready(sock: socket.socket, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            if b"READY=1" in sock.recv(4096):
                return
    raise AssertionError("no READY=1")


def wait_until(pred: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_crash_and_restart_recovers_snapshot_and_breaker(loaded: FakeHost, tmp_path: Path) -> None:
    """SIGKILL (no clean stop), conntrack reloaded while the daemon is down: the restarted daemon resumes
    from the state file: tuned values come back, the hook's restart still counts for the breaker."""
    runs = tmp_path / "hook.runs"
    state_path = loaded.root / "run/state.json"
    cfg = loaded.root / "ctwatchd.toml"
    cfg.write_text(f'[watch]\npoll_interval = 0.1\n[restore]\nmodprobe = "{loaded.modprobe}"\n'
                   f'hooks = [["/bin/sh", "-c", "echo ran >> {runs}"]]\nmax_restarts = 1\n'
                   f'[daemon]\nstate_file = "{state_path}"\nlog_format = "json"\n')
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(0.2)
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"

    def saved() -> statefile.SavedState | None:
        try:
            return statefile.load(state_path)
        except statefile.StateError:
            return None

    first = start_daemon(cfg, loaded, notify_path, log1)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(sock)
        loaded.write_sysctl("net.netfilter.nf_conntrack_max", "1048576")
        wait_until(lambda: (s := saved()) is not None and s.tuning.get("net.netfilter.nf_conntrack_max") == "1048576")
        loaded.unload("nf_nat")
        wait_until(lambda: (s := saved()) is not None and len(s.restarts) == 1 and loaded.is_live("nf_nat"))
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        for m in ("br_netfilter", "nf_nat", "nf_conntrack"):  # removed while nobody watched
            loaded.unload(m)
        second = start_daemon(cfg, loaded, notify_path, log2)
        wait_ready(sock)
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        sock.close()
    assert loaded.read_sysctl("net.netfilter.nf_conntrack_max") == "1048576"
    assert all(loaded.is_live(m) for m in ALL)
    assert runs.read_text().splitlines() == ["ran"]  # the breaker survived the crash
    records = [json.loads(line) for line in log2.read_text().splitlines() if line.startswith("{")]
    planned = [r for r in records if r["event"] == "restore.planned"]
    assert planned[0]["restarts_skipped"] is True
    assert "net.netfilter.nf_conntrack_max=1048576" in planned[0]["plan"]
    assert not [r for r in records if r["event"] == "state.ignored"]
    final = saved()
    assert final is not None and final.tuning["net.netfilter.nf_conntrack_max"] == "1048576"
    assert len(final.restarts) == 1


def test_state_file_cannot_be_written(h: Harness) -> None:
    """The state directory is a regular file: state.failed names the path, restores go on."""
    blocker = h.host.root / "run-is-a-file"
    blocker.write_text("")
    h.host.unload("nf_nat")

    def driver() -> None:
        h.wait_notify("READY=1")

    d = h.daemon(cfg_for(h.host, state_file=blocker / "state.json"))
    code, logs, _ = run_daemon(d, driver)
    failed = events(logs, "state.failed")
    assert code == 0 and failed and failed[0]["path"] == str(blocker / "state.json")
    assert failed[0]["detail"] == os.strerror(errno.EEXIST)
    assert h.host.is_live("nf_nat") and blocker.read_text() == ""


def test_state_file_torn_to_zero_bytes(h: Harness) -> None:
    """An empty state file (a torn write by something else): ignored with the reason, then rewritten whole."""
    path = h.host.root / "run/state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    path.chmod(0o600)

    def driver() -> None:
        h.wait_notify("READY=1")

    code, logs, _ = run_daemon(h.daemon(cfg_for(h.host)), driver)
    ignored = events(logs, "state.ignored")
    assert code == 0 and "not valid JSON" in ignored[0]["detail"]
    saved = statefile.load(path)
    assert saved is not None and saved.tuning["net.netfilter.nf_conntrack_max"] == "262144"


# == trust boundary: hooks, module names, the state file ==========================================

def fake_stat(table: dict[str, tuple[int, int]]) -> Callable[[str], os.stat_result]:
    """A stat seam: path -> (uid, mode); anything else does not exist."""

    def stat_fn(path: str) -> os.stat_result:
        if path not in table:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        uid, mode = table[path]
        return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))

    return stat_fn


ROOT_DIRS = {"/": (0, stat.S_IFDIR | 0o755), "/opt": (0, stat.S_IFDIR | 0o755),
             "/opt/hooks": (0, stat.S_IFDIR | 0o755)}
HOOK = "/opt/hooks/kick"


def hook_config(tmp_path: Path, exe: str) -> Path:
    p = tmp_path / "hooks.toml"
    p.write_text(f"[restore]\nhooks = [[{json.dumps(exe)}, \"--now\"]]\n")
    p.chmod(0o644)
    return p


@pytest.mark.parametrize(("table", "message"), [
    ({**ROOT_DIRS, HOOK: (1000, stat.S_IFREG | 0o755)}, "refused: it is owned by uid 1000, not root"),
    ({**ROOT_DIRS, HOOK: (0, stat.S_IFREG | 0o775)}, "refused: it is writable by group or others (mode 0775)"),
    ({**ROOT_DIRS, "/opt/hooks": (0, stat.S_IFDIR | 0o777), HOOK: (0, stat.S_IFREG | 0o755)},
     "refused: its directory '/opt/hooks' is writable by group or others (mode 0777)"),
    ({**ROOT_DIRS, "/opt": (1000, stat.S_IFDIR | 0o755), HOOK: (0, stat.S_IFREG | 0o755)},
     "refused: its directory '/opt' is owned by uid 1000, not root"),
    ({**ROOT_DIRS, HOOK: (0, stat.S_IFREG | 0o644)}, "is not executable"),
    ({**ROOT_DIRS, HOOK: (0, stat.S_IFDIR | 0o755)}, "is not a regular file"),
    (ROOT_DIRS, "does not exist"),
], ids=["owner", "file-mode", "dir-mode", "dir-owner", "not-executable", "directory", "missing"])
def test_root_refuses_hooks_others_could_change(tmp_path: Path, table: dict[str, tuple[int, int]],
                                               message: str) -> None:
    """As root, a hook executable (and every directory above it) must be root's and not group/other
    writable, like sudo's and sshd's rule; the error is one line naming the file and the key."""
    p = hook_config(tmp_path, HOOK)
    with pytest.raises(ConfigError) as exc:
        configmod.load(p, euid=0, stat_fn=fake_stat(table))
    text = str(exc.value)
    assert text.startswith(f"{p}: [restore] hooks[0][0] '{HOOK}' ") and message in text and "\n" not in text


def test_trusted_hook_and_unprivileged_rules(tmp_path: Path) -> None:
    """Root's own files pass as root; without root only existence is checked."""
    good = {**ROOT_DIRS, HOOK: (0, stat.S_IFREG | 0o755)}
    assert configmod.load(hook_config(tmp_path, HOOK), euid=0, stat_fn=fake_stat(good)).hooks == ((HOOK, "--now"),)
    lax = {**ROOT_DIRS, "/opt/hooks": (1000, stat.S_IFDIR | 0o777), HOOK: (1000, stat.S_IFREG | 0o777)}
    assert configmod.load(hook_config(tmp_path, HOOK), euid=1000, stat_fn=fake_stat(lax)).hooks
    with pytest.raises(ConfigError, match="does not exist"):
        configmod.load(hook_config(tmp_path, HOOK), euid=1000, stat_fn=fake_stat(ROOT_DIRS))


def test_hook_trust_on_the_real_filesystem(tmp_path: Path) -> None:
    """Real stat: /bin/sh (via the /bin -> usr/bin symlink on merged-/usr systems) is trusted; a hook in
    a world-writable directory is refused, and so is one anywhere below /tmp (sticky or not)."""
    if os.geteuid() != 0:
        missing("the root rules apply to root only")
    assert configmod.load(hook_config(tmp_path, "/bin/sh"), euid=0).hooks == (("/bin/sh", "--now"),)
    hook = executable(tmp_path / "drop/hook", "#!/bin/sh\n")
    (tmp_path / "drop").chmod(0o777)
    with pytest.raises(ConfigError, match=r"refused: its directory '.*/drop' is writable by group or others "
                                          r"\(mode 0777\)"):
        configmod.load(hook_config(tmp_path, str(hook)), euid=0)
    (tmp_path / "drop").chmod(0o755)
    if tmp_path.is_relative_to("/tmp") and stat.S_IMODE(os.stat("/tmp").st_mode) == 0o1777:
        with pytest.raises(ConfigError, match=r"refused: its directory '/tmp' is writable by group or others "
                                              r"\(mode 1777\)"):
            configmod.load(hook_config(tmp_path, str(hook)), euid=0)


def test_symlinked_hook_is_checked_along_both_paths() -> None:
    """A root-owned link in a root dir pointing into a user's dir, and a link in a user's dir pointing at
    a root binary, are both refused: whoever controls either path controls what runs."""
    table = {**ROOT_DIRS, "/home": (0, stat.S_IFDIR | 0o755), "/home/eve": (1000, stat.S_IFDIR | 0o755),
             "/home/eve/kick": (0, stat.S_IFREG | 0o755), HOOK: (0, stat.S_IFREG | 0o755),
             "/usr": (0, stat.S_IFDIR | 0o755), "/usr/bin": (0, stat.S_IFDIR | 0o755),
             "/usr/bin/true": (0, stat.S_IFREG | 0o755)}
    check = configmod.check_executable_trust
    with pytest.raises(ConfigError, match=r"its directory '/home/eve' is owned by uid 1000"):
        check("k", HOOK, 0, fake_stat(table), realpath=lambda p: "/home/eve/kick")
    with pytest.raises(ConfigError, match=r"its directory '/home/eve' is owned by uid 1000"):
        check("k", "/home/eve/kick", 0, fake_stat(table), realpath=lambda p: "/usr/bin/true")
    check("k", HOOK, 0, fake_stat(table), realpath=lambda p: "/usr/bin/true")


class RecordingRunner(Runner):
    def __init__(self) -> None:
        super().__init__()
        self.argvs: list[tuple[str, ...]] = []

    def run(self, argv: Any, timeout: float) -> Completed:
        self.argvs.append(tuple(argv))
        return super().run(argv, timeout)


@pytest.mark.parametrize("name", ["-r", "--remove", "nf_nat; reboot", "../../tmp/evil", "nf_nat\nbr", "",
                                  "a" * 65, "nf nat", "$(reboot)"])
def test_module_names_reaching_the_runner_are_plain(loaded: FakeHost, name: str) -> None:
    """Even from a Config built in code (no loader) or a hand-made plan, only plain module names reach
    modprobe's command line; anything else is a failed step naming it."""
    runner = RecordingRunner()
    cfg = Config(modprobe=str(loaded.modprobe), modules=(name,))
    probe = KernelProbe(loaded.root)
    plan = RestorePlan((Step(StepKind.LOAD_MODULE, module=name), Step(StepKind.LOAD_MODULE, module="nf_nat")), "x")
    loaded.unload("nf_nat")
    with capture_logs() as logs:
        result = Executor(cfg, probe, runner, get_logger()).execute(plan)
    assert runner.argvs == [] and loaded.modprobe_calls() == []
    assert result.failed is not None and result.failed.detail == (
        f"refusing to run modprobe for {name!r}: not a plain module name")
    assert [e["result"] for e in step_events(logs)] == ["failed"]  # skipped steps are not audited
    assert [r.outcome for r in result.results] == [Outcome.FAILED, Outcome.SKIPPED]
    # The probe never reports such a name as loadable either, so decide() never plans it.
    obs = probe.observe(probe.facts(), cfg.modules, [])
    assert name not in decide(cfg, CoreState(), obs, 0.0).plan.modules


def test_hostile_state_key_never_reaches_a_sysctl(h: Harness) -> None:
    """A state file naming kernel.modprobe (which would make every module load run the attacker's
    program) is refused whole: the file is not written, no sysctl.write names it, modprobe's argv is ours."""
    modprobe_sysctl = h.host.sysctl("kernel.modprobe")
    modprobe_sysctl.write_text("/sbin/modprobe\n")
    path = h.host.root / "run/state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "conntrack_reloaded": True, "restarts": [],
                                "tuning": {"net.netfilter.nf_conntrack_max": "1048576",
                                           "kernel.modprobe": "/tmp/evil"}}))
    path.chmod(0o600)
    for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
        h.host.unload(m)

    def driver() -> None:
        h.wait_notify("READY=1")

    code, logs, _ = run_daemon(h.daemon(cfg_for(h.host)), driver)
    assert code == 0
    assert "unexpected tuning entry 'kernel.modprobe'" in events(logs, "state.ignored")[0]["detail"]
    assert modprobe_sysctl.read_text() == "/sbin/modprobe\n"
    assert all(e["key"].startswith(("net.bridge.", "net.netfilter.nf_conntrack_")) for e in
               events(logs, "sysctl.write"))
    assert h.host.modprobe_calls() == list(ALL)
    assert h.host.read_sysctl("net.netfilter.nf_conntrack_max") == "262144"  # nothing of the file was used


def test_hostile_saved_state_bypassing_the_loader_stays_under_proc_sys(loaded: FakeHost) -> None:
    """Even a SavedState built without the loader's checks cannot write outside /proc/sys: a traversal
    key is refused by the path check, and the audit names it."""
    outside = loaded.root / "proc/evil"
    saved = statefile.SavedState({"net.netfilter.nf_conntrack_max/../../../evil": "1",
                                  "net.netfilter.nf_conntrack_max": "999"}, True)
    for m in ("br_netfilter", "nf_nat", "nf_conntrack"):  # a conntrack load writes the whole snapshot back
        loaded.unload(m)
    cfg = replace(Config(modprobe=str(loaded.modprobe)), sysctls=())
    result, logs, _ = restore_once(cfg, loaded, state=core.CoreState(tuning=saved.tuning, conntrack_reloaded=True))
    assert not outside.exists()
    bad = [e for e in events(logs, "sysctl.write") if "evil" in e["key"]]
    assert len(bad) == 1 and bad[0]["result"] == "dropped" and "is not a dotted sysctl name" in bad[0]["detail"]
    tuning = next(r for r in result.results if r.step.kind is StepKind.RESTORE_TUNING)
    assert tuning.dropped == ("net.netfilter.nf_conntrack_max/../../../evil",)
    assert loaded.read_sysctl("net.netfilter.nf_conntrack_max") == "999"
