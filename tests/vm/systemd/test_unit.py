"""The shipped unit under a real systemd (PID 1) on a real modular kernel, hardened sandbox and all.

ctwatchd is installed the way a user would from a checkout: a wheel into a venv that uses Debian's
own python3-pyudev, python3-structlog (22.x) and python3-sdnotify, /usr/bin/ctwatchd, the unit from
systemd/, the catalog, a config in /etc/ctwatchd. One boot runs the script below; each test checks
one claim from its results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sysguest  # noqa: E402

pytestmark = pytest.mark.vm
REPO = HERE.parents[2]

# The script unloads nf_nat and nf_conntrack: the hold (on by default) would refuse that.
CONFIG = """\
[watch]
poll_interval = 2.0

[hold]
enabled = false
"""
BROKEN = "[watch]\nmodules = ['nf_conntrack; reboot']\n"
# The unit's WatchdogSec=30s is the shipped default; the test shortens it with a drop-in so the
# freeze is caught within seconds instead of half a minute under emulation.
WATCHDOG_DROPIN = "[Service]\nWatchdogSec=6s\n"

SCRIPT = r"""
set -u
R=results
fact() { printf '%s\t%s\n' "$1" "$2" >> $R/facts; }
state() { cat "/sys/module/$1/initstate" 2>/dev/null; }
live() { for m in nf_conntrack nf_nat br_netfilter; do [ "$(state $m)" = live ] || return 1; done; }
wait_until() { local n=0; until eval "$1"; do n=$((n+1)); [ $n -gt $(( $2 * 10 )) ] && return 1; sleep 0.1; done; }
prop() { systemctl show -P "$1" ctwatchd.service; }

journalctl --update-catalog
fact before_start "$(cat /sys/module/nf_conntrack/initstate 2>/dev/null || echo none)"

# 1. start returns only after READY (the modules are live the moment it returns); STATUS shown.
t0=$(date +%s%N)
systemctl start ctwatchd.service; fact start_rc $?
fact start_ms $(( ($(date +%s%N) - t0) / 1000000 ))
live && fact live_at_start_return yes || fact live_at_start_return no
fact active "$(prop ActiveState)/$(prop SubState)"
fact status_text "$(prop StatusText)"
systemctl status --no-pager ctwatchd.service > $R/status.txt 2>&1

# 2. rmmod under the hardened sandbox -> restored, bridge sysctls back.
echo 0 > /proc/sys/net/bridge/bridge-nf-call-iptables
rmmod br_netfilter nf_nat nf_conntrack; fact rmmod_rc $?
wait_until live 90 && fact restored yes || fact restored no
wait_until '[ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables)" = 1 ]' 30
fact bridge_iptables "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables)"
fact bridge_ip6tables "$(cat /proc/sys/net/bridge/bridge-nf-call-ip6tables)"
sleep 1

# 3. journal records, queryable by field; the catalog explains them.
journalctl -u ctwatchd -o json CTWATCHD_EVENT=restore.finished > $R/finished.json
journalctl -u ctwatchd -o json CTWATCHD_EVENT=restore.step MODULE=nf_nat > $R/nf_nat_steps.json
journalctl -u ctwatchd -x --no-pager CTWATCHD_EVENT=restore.finished > $R/explained.txt

# 4. watchdog: freeze the daemon; systemd must kill it (Result=watchdog) and restart it.
pid=$(prop MainPID); fact pid_before "$pid"
kill -STOP "$pid"
wait_until '[ "$(prop NRestarts)" -ge 1 ] && [ "$(prop ActiveState)" = active ] && [ "$(prop MainPID)" != "$pid" ]' 60
fact nrestarts "$(prop NRestarts)"
fact pid_after "$(prop MainPID)"
journalctl -u ctwatchd --no-pager -o cat > $R/after_watchdog.txt
rmmod br_netfilter; wait_until live 60 && fact restored_after_restart yes || fact restored_after_restart no

# 5. reload: a valid config, then an invalid one (kept out); active throughout.
sed -i 's/poll_interval = 2.0/poll_interval = 3.0/' /etc/ctwatchd/ctwatchd.toml
systemctl reload ctwatchd.service; fact reload_valid_rc $?
wait_until 'journalctl -u ctwatchd -o cat CTWATCHD_EVENT=config.loaded | grep -q .' 30
cp /etc/ctwatchd/ctwatchd.toml /root/good.toml
cp /root/broken.toml /etc/ctwatchd/ctwatchd.toml
systemctl reload ctwatchd.service; fact reload_invalid_rc $?
wait_until 'journalctl -u ctwatchd -o cat CTWATCHD_EVENT=config.rejected | grep -q .' 30
sleep 1
fact active_after_reloads "$(prop ActiveState)/$(prop SubState)"
journalctl -u ctwatchd -o json CTWATCHD_EVENT=config.rejected > $R/rejected.json
rmmod nf_nat; wait_until live 60 && fact restored_after_bad_reload yes || fact restored_after_bad_reload no

# 6. a broken config at start: fails once, clear status, no restart loop.
systemctl stop ctwatchd.service
systemctl reset-failed ctwatchd.service 2>/dev/null
systemctl start ctwatchd.service; fact broken_start_rc $?
sleep 8
fact broken_state "$(prop ActiveState)/$(prop Result)"
fact broken_restarts "$(prop NRestarts)"
fact broken_status "$(prop StatusText)"
systemctl status --no-pager ctwatchd.service > $R/broken_status.txt 2>&1
fact exit_status "$(prop ExecMainStatus)"
cp /root/good.toml /etc/ctwatchd/ctwatchd.toml

# 7. pidfd_open denied, as on kernels before 5.3 (or under a stricter seccomp policy): the runner
#    falls back to polling for its children, and a restore still works.
printf '[Service]\nSystemCallFilter=~pidfd_open:ENOSYS\n' \
    > /etc/systemd/system/ctwatchd.service.d/test-nopidfd.conf
systemctl daemon-reload
systemctl reset-failed ctwatchd.service 2>/dev/null
systemctl start ctwatchd.service; fact nopidfd_start_rc $?
fact nopidfd_in_filter "$(prop SystemCallFilter | tr ' ' '\n' | grep -c '^pidfd_open$')"
fact nopidfd_probe "$(systemd-run --wait --pipe --quiet -p SystemCallFilter=~pidfd_open:ENOSYS \
    /opt/ctwatchd/bin/python3 -c 'import os
try:
    os.pidfd_open(os.getpid()); print("allowed")
except OSError as e:
    print(e.errno)' 2>&1 | tail -n1)"
since=$(date +%s)
rmmod br_netfilter nf_nat; fact nopidfd_rmmod_rc $?
wait_until live 60 && fact restored_without_pidfd yes || fact restored_without_pidfd no
sleep 1
journalctl -u ctwatchd -o json --since "@$since" CTWATCHD_EVENT=restore.step > $R/nopidfd_steps.json
rm -f /etc/systemd/system/ctwatchd.service.d/test-nopidfd.conf
true
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    missing = sysguest.missing_prerequisites()
    if missing:
        import os

        if os.environ.get("CI"):
            pytest.fail(f"systemd VM tier needs: {', '.join(missing)}", pytrace=False)
        pytest.skip(f"systemd VM tier needs: {', '.join(missing)} (bash tests/vm/systemd/build-root.sh)")
    root = sysguest.SYSROOT
    out = tmp_path_factory.mktemp("systemd-unit")
    wheels = out / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels),
                    str(REPO)], check=True, timeout=300)
    venv = sysguest.install_wheel(root, next(wheels.glob("ctwatchd-*.whl")), find_links=(),
                                  system_site_packages=True)
    written = sysguest.install_files(root, {
        "/etc/systemd/system/ctwatchd.service": REPO / "systemd/ctwatchd.service",
        "/etc/systemd/system/ctwatchd.service.d/test-watchdog.conf": WATCHDOG_DROPIN,
        "/usr/lib/systemd/catalog/ctwatchd.catalog": REPO / "systemd/ctwatchd.catalog",
        "/etc/ctwatchd/ctwatchd.toml": CONFIG,
        "/root/broken.toml": BROKEN,
    })
    link = root / "usr/bin/ctwatchd"
    link.unlink(missing_ok=True)
    link.symlink_to(f"{venv}/bin/ctwatchd")
    script = SCRIPT
    try:
        boot = sysguest.boot_systemd(root, script, timeout=600, results=out / "results")
    finally:
        for path in written:
            path.unlink(missing_ok=True)
        link.unlink(missing_ok=True)
        sysguest.remove_tree(root, venv)
    assert not boot.timed_out, boot.console[-3000:]
    res = out / "results"
    facts = dict(line.split("\t", 1) for line in (res / "facts").read_text().splitlines() if "\t" in line)
    data: dict[str, Any] = {"facts": facts, "boot_seconds": round(boot.elapsed, 1), "dir": res}
    print(json.dumps({k: v for k, v in data.items() if k != "dir"}, indent=2, default=str))
    return data


def jlines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_start_returns_after_ready_with_status(run: dict[str, Any]) -> None:
    """`systemctl start` returns once READY=1 is sent: the modules are already live; STATUS is shown."""
    f = run["facts"]
    assert f["before_start"] == "none"
    assert f["start_rc"] == "0" and f["live_at_start_return"] == "yes"
    assert f["active"] == "active/running"
    assert f["status_text"].startswith("healthy (nf_conntrack live, nf_nat live, br_netfilter live)")
    assert "Status: \"healthy" in (run["dir"] / "status.txt").read_text()


def test_restore_works_inside_the_hardened_sandbox(run: dict[str, Any]) -> None:
    """rmmod of all three is undone by the sandboxed service; the bridge sysctls are back at 1."""
    f = run["facts"]
    assert f["rmmod_rc"] == "0" and f["restored"] == "yes"
    assert f["bridge_iptables"] == "1" and f["bridge_ip6tables"] == "1"


def test_journal_records_are_queryable_by_field_and_explained(run: dict[str, Any]) -> None:
    """journalctl finds the records by CTWATCHD_EVENT and MODULE; -x shows the catalog text."""
    finished = jlines(run["dir"] / "finished.json")
    assert finished and all(r["RESULT"] == "ok" for r in finished)
    assert all(r["MESSAGE_ID"] == "2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b0b" for r in finished)
    assert all(float(r["DURATION_MS"]) > 0 and r["SYSLOG_IDENTIFIER"] == "ctwatchd" for r in finished)
    steps = jlines(run["dir"] / "nf_nat_steps.json")
    assert steps and {r["ACTION"] for r in steps} == {"load-module"} and {r["MODULE"] for r in steps} == {"nf_nat"}
    explained = (run["dir"] / "explained.txt").read_text()
    assert "Subject: ctwatchd restore finished" in explained
    assert "the sysctls (including a tuned conntrack snapshot) are back" in explained


def test_watchdog_kills_a_frozen_daemon_and_the_restart_reconciles(run: dict[str, Any]) -> None:
    """SIGSTOP -> systemd's watchdog kills and restarts it; the new daemon restores again."""
    f = run["facts"]
    assert int(f["nrestarts"]) >= 1 and f["pid_after"] != f["pid_before"]
    text = (run["dir"] / "journal.txt").read_text()
    assert "Watchdog timeout" in text and "ctwatchd.service: Failed with result 'watchdog'" in text
    assert f["restored_after_restart"] == "yes"


def test_reload_valid_then_invalid_keeps_running_and_logs_why(run: dict[str, Any]) -> None:
    """systemctl reload applies a good file; a bad one is rejected, logged, and the service stays up."""
    f = run["facts"]
    assert f["reload_valid_rc"] == "0" and f["reload_invalid_rc"] == "0"
    assert f["active_after_reloads"] == "active/running"
    rejected = jlines(run["dir"] / "rejected.json")
    assert rejected and "modules[0] must be a plain module name" in rejected[0]["CTWATCHD_ERROR"]
    assert f["restored_after_bad_reload"] == "yes"


def test_restore_works_when_pidfd_open_is_denied(run: dict[str, Any]) -> None:
    """With pidfd_open denied (ENOSYS, as before Linux 5.3) the runner polls for its children: modprobe's
    exit is still seen and the sandboxed daemon restores."""
    f = run["facts"]
    assert f["nopidfd_start_rc"] == "0" and f["nopidfd_in_filter"] == "0"
    assert f["nopidfd_probe"] == "38"  # ENOSYS: the drop-in's filter really denies it
    assert f["nopidfd_rmmod_rc"] == "0" and f["restored_without_pidfd"] == "yes"
    steps = jlines(run["dir"] / "nopidfd_steps.json")
    loads = [r for r in steps if r.get("ACTION") == "load-module"]
    assert {r["MODULE"] for r in loads} == {"nf_nat", "br_netfilter"} and all(r["RESULT"] == "ok" for r in loads)


def test_broken_config_at_start_fails_once_with_a_clear_status(run: dict[str, Any]) -> None:
    """Exit 2 is not restarted (RestartPreventExitStatus=2); the reason is in the status."""
    f = run["facts"]
    assert f["broken_start_rc"] != "0"
    assert f["broken_state"] == "failed/exit-code"
    assert f["exit_status"] == "2"
    assert f["broken_restarts"] == "0"
    assert f["broken_status"].startswith("configuration error: /etc/ctwatchd/ctwatchd.toml: [watch] modules[0]")
    status = (run["dir"] / "broken_status.txt").read_text()
    assert "modules[0] must be a plain module name" in status  # stderr, in the status's journal excerpt
