"""Smoke test: a real systemd (PID 1) on Debian's modular kernel under QEMU/TCG.

One boot (module-scoped) runs the guest script below; each test checks one fact.
Skipped when the VM prerequisites are missing, failed instead when $CI is set.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
import zipfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sysguest  # noqa: E402

pytestmark = pytest.mark.vm

NOTIFY_PY = """\
import os, socket, time
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\\0" + addr[1:]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    sock.connect(addr)
    sock.sendall(b"READY=1\\nSTATUS=smoke ready")
while True:
    time.sleep(60)
"""

NOTIFY_UNIT = """\
[Unit]
Description=smoke Type=notify service

[Service]
Type=notify
ExecStart=/usr/bin/python3 /usr/local/lib/smoke-notify.py
TimeoutStartSec=60
"""

# Each fact is one "key=value" line in results/facts.
SCRIPT = """\
fact() { echo "$1=$2" >> results/facts; }
fact pid1 "$(cat /proc/1/comm)"
fact virt "$(systemd-detect-virt)"
fact kernel "$(uname -r)"
modprobe nf_conntrack && fact modprobe ok
fact initstate "$(cat /sys/module/nf_conntrack/initstate)"
echo smoke-marker-42 | systemd-cat -t smoke
sleep 1
journalctl -b -t smoke --no-pager | grep -q smoke-marker-42 && fact journal ok
systemctl start smoke-notify.service && fact notify_start ok
fact notify_active "$(systemctl is-active smoke-notify.service)"
fact notify_status "$(systemctl show -P StatusText smoke-notify.service)"
fact wheel "$(/opt/smoke-venv/bin/python -c 'import smokewheel; print(smokewheel.VALUE)')"
cat results/facts
"""

GUEST_FILES = {
    "/usr/local/lib/smoke-notify.py": NOTIFY_PY,
    "/etc/systemd/system/smoke-notify.service": NOTIFY_UNIT,
}


def make_wheel(dest: Path) -> Path:
    """A minimal pure-Python wheel, built with the stdlib only."""
    files = {
        "smokewheel/__init__.py": b"VALUE = 'smoke-wheel-ok'\n",
        "smokewheel-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: smokewheel\nVersion: 1.0\n",
        "smokewheel-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = ""
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{name},sha256={digest},{len(data)}\n"
    record += "smokewheel-1.0.dist-info/RECORD,,\n"
    wheel = dest / "smokewheel-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("smokewheel-1.0.dist-info/RECORD", record)
    return wheel


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> sysguest.SystemdRun:
    missing = sysguest.missing_prerequisites()
    if missing:
        reason = "systemd VM prerequisites missing: " + "; ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    root = sysguest.build_root()  # cached: only refreshes config and module links
    written = sysguest.install_files(root, GUEST_FILES)
    wheel = make_wheel(tmp_path_factory.mktemp("wheel"))
    sysguest.install_wheel(root, wheel, find_links=(), venv="/opt/smoke-venv")
    try:
        result = sysguest.boot_systemd(root, SCRIPT, timeout=600, results=tmp_path_factory.mktemp("systemd-smoke"))
    finally:
        for path in written:
            path.unlink(missing_ok=True)
        sysguest.remove_tree(root, "/opt/smoke-venv")
    print(f"boot->poweroff {result.elapsed:.1f}s, script status {result.status}")
    return result


@pytest.fixture(scope="module")
def facts(run: sysguest.SystemdRun) -> dict[str, str]:
    path = run.results / "facts"
    assert path.exists(), f"guest wrote no facts; console tail:\n{run.console[-4000:]}"
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_guest_ran_and_powered_off(run: sysguest.SystemdRun) -> None:
    assert not run.timed_out, run.console[-4000:]
    assert run.status == 0, run.output


def test_systemd_is_pid1(facts: dict[str, str]) -> None:
    assert facts.get("pid1") == "systemd"


def test_detect_virt_is_qemu(facts: dict[str, str]) -> None:
    assert facts.get("virt") == "qemu"


def test_modprobe_nf_conntrack_live(facts: dict[str, str]) -> None:
    kernel = sysguest.find_kernel()
    assert kernel is not None and facts.get("kernel") == kernel[0]
    assert facts.get("modprobe") == "ok"
    assert facts.get("initstate") == "live"


def test_journalctl_works(facts: dict[str, str], run: sysguest.SystemdRun) -> None:
    assert facts.get("journal") == "ok"
    assert "smoke-marker-42" in run.journal


def test_type_notify_service_active(facts: dict[str, str]) -> None:
    assert facts.get("notify_start") == "ok"
    assert facts.get("notify_active") == "active"
    assert facts.get("notify_status") == "smoke ready"


def test_wheel_installed_offline_into_venv(facts: dict[str, str]) -> None:
    assert facts.get("wheel") == "smoke-wheel-ok"
