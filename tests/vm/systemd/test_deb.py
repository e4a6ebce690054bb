"""The .deb as an operator installs it: dpkg -i into a bookworm root, boot it with systemd as PID 1.

The package pulls only Debian's own python3-pyudev, python3-structlog (22.x) and python3-sdnotify
(already in the root, as apt would have installed them); its unit must be enabled and running after
boot, `ctwatchd check` must say healthy, and a removed module must come back.
"""

from __future__ import annotations

import os
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

SCRIPT = r"""
set -u
fact() { printf '%s\t%s\n' "$1" "$2" >> results/facts; }
state() { cat "/sys/module/$1/initstate" 2>/dev/null; }
live() { for m in nf_conntrack nf_nat br_netfilter; do [ "$(state $m)" = live ] || return 1; done; }
wait_until() { local n=0; until eval "$1"; do n=$((n+1)); [ $n -gt $(( $2 * 10 )) ] && return 1; sleep 0.1; done; }

wait_until '[ "$(systemctl show -P ActiveState ctwatchd.service)" = active ]' 60
fact enabled "$(systemctl is-enabled ctwatchd.service)"
fact active "$(systemctl is-active ctwatchd.service)"
fact status_text "$(systemctl show -P StatusText ctwatchd.service)"
fact exec "$(systemctl show -P ExecStart ctwatchd.service | tr -s ' ' | cut -c1-200)"
ctwatchd check > results/check.txt 2>&1; fact check_rc $?
fact structlog "$(python3 -c 'import structlog; print(structlog.__version__)')"
rmmod br_netfilter; fact rmmod_rc $?
wait_until live 60 && fact restored yes || fact restored no
[ -e /usr/share/man/man5/ctwatchd.toml.5.gz ] && [ -e /usr/share/man/man8/ctwatchd.8.gz ] && fact man yes || fact man no
journalctl -x -u ctwatchd --no-pager CTWATCHD_EVENT=restore.finished > results/explained.txt 2>&1
true
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    missing = sysguest.missing_prerequisites()
    build_tools = [t for t in ("dpkg-buildpackage", "lintian") if subprocess.run(
        ["sh", "-c", f"command -v {t}"], capture_output=True, check=False).returncode]
    if missing or build_tools:
        what = ", ".join([*missing, *build_tools])
        if os.environ.get("CI"):
            pytest.fail(f"deb install test needs: {what}", pytrace=False)
        pytest.skip(f"deb install test needs: {what} (packaging/install-build-deps.sh, "
                    "tests/vm/systemd/build-root.sh)")
    out = tmp_path_factory.mktemp("deb")
    subprocess.run(["bash", str(REPO / "packaging/build-deb.sh"), str(out / "dist")], check=True, timeout=900,
                   capture_output=True)
    deb = next((out / "dist").glob("ctwatchd_*.deb"))
    root = sysguest.SYSROOT
    stage = root / "tmp" / deb.name
    stage.write_bytes(deb.read_bytes())
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C"}
    # In the chroot nothing runs: invoke-rc.d sees no running systemd and only records the enablement.
    done = subprocess.run(["chroot", str(root), "dpkg", "-i", f"/tmp/{deb.name}"], capture_output=True,
                          text=True, timeout=300, env=env, check=False)
    stage.unlink()
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        boot = sysguest.boot_systemd(root, SCRIPT, timeout=600, results=out / "results")
    finally:
        subprocess.run(["chroot", str(root), "dpkg", "--purge", "ctwatchd"], capture_output=True, timeout=300,
                       env=env, check=False)
    assert not boot.timed_out, boot.console[-3000:]
    res = out / "results"
    facts = dict(line.split("\t", 1) for line in (res / "facts").read_text().splitlines() if "\t" in line)
    print(facts)
    return {"facts": facts, "dir": res}


def test_packaged_unit_is_enabled_and_running_after_boot(run: dict[str, Any]) -> None:
    """dpkg -i enables the unit; at boot it starts from /usr/bin/ctwatchd and reports healthy."""
    f = run["facts"]
    assert f["enabled"] == "enabled" and f["active"] == "active"
    assert "path=/usr/bin/ctwatchd" in f["exec"]
    assert f["status_text"].startswith("healthy (nf_conntrack live, nf_nat live, br_netfilter live)")


def test_packaged_check_and_restore_work_with_debians_libraries(run: dict[str, Any]) -> None:
    """`ctwatchd check` exits 0 on Debian's python3-structlog 22.x; a removal is restored; man pages there."""
    f = run["facts"]
    assert f["structlog"].startswith("22."), f["structlog"]
    assert f["check_rc"] == "0", (run["dir"] / "check.txt").read_text()
    assert f["rmmod_rc"] == "0" and f["restored"] == "yes"
    assert f["man"] == "yes"
    assert "Subject: ctwatchd restore finished" in (run["dir"] / "explained.txt").read_text()
