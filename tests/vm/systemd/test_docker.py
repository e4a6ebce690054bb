"""Docker hosts with a real dockerd (Debian's docker.io) under systemd as PID 1, in one boot.

The root gets docker enabled at boot with live-restore and /var/lib/docker on a tmpfs (9p holds no
overlayfs), ctwatchd enabled with `docker = "if-needed"`, and an image imported offline from
busybox-static. docker_guest.py runs the scenarios in order: boot order, bridged traffic, isolation,
a firewall clean-up, and if-active / no docker; each test here checks one claim from its facts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sysguest  # noqa: E402

pytestmark = pytest.mark.vm

CONFIG = """\
[watch]
poll_interval = 2.0

[restore]
docker = "if-needed"
"""
DAEMON_JSON = '{"live-restore": true, "userland-proxy": false}\n'
TMPFS_MOUNT = """\
[Unit]
Description=%s on a tmpfs (the 9p root cannot hold overlayfs or containerd's metadata)
Before=docker.service containerd.service

[Mount]
What=tmpfs
Where=%s
Type=tmpfs
Options=mode=0711
"""
DOCKER_DROPIN = "[Unit]\nRequiresMountsFor=/var/lib/docker /var/lib/containerd\n"
WANTS = "/etc/systemd/system/multi-user.target.wants"
SCRIPT = "python3 /root/docker_guest.py results\n"


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    missing = sysguest.missing_prerequisites()
    root = sysguest.SYSROOT
    if not missing and not (root / "usr/sbin/dockerd").exists():
        missing.append(f"docker.io in {root} (run {HERE / 'build-root.sh'})")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"docker VM tier needs: {', '.join(missing)}", pytrace=False)
        pytest.skip(f"docker VM tier needs: {', '.join(missing)}")
    work = tmp_path_factory.mktemp("docker")
    files: dict[str, str | bytes | Path] = {
        "/etc/ctwatchd/ctwatchd.toml": CONFIG,
        "/etc/docker/daemon.json": DAEMON_JSON,
        "/etc/systemd/system/var-lib-docker.mount": TMPFS_MOUNT % ("docker's state", "/var/lib/docker"),
        "/etc/systemd/system/var-lib-containerd.mount": TMPFS_MOUNT % ("containerd's state", "/var/lib/containerd"),
        "/etc/systemd/system/docker.service.d/tmpfs.conf": DOCKER_DROPIN,
        "/root/docker_guest.py": HERE / "docker_guest.py",
    }
    links = {f"{WANTS}/ctwatchd.service": "/etc/systemd/system/ctwatchd.service",
             f"{WANTS}/docker.service": "/lib/systemd/system/docker.service",
             f"{WANTS}/containerd.service": "/lib/systemd/system/containerd.service"}
    with sysguest.ctwatchd_installed(root, work, files):
        for link, target in links.items():
            path = root / link.lstrip("/")
            path.unlink(missing_ok=True)
            path.symlink_to(target)
        try:
            boot = sysguest.boot_systemd(root, SCRIPT, timeout=1500, results=work / "results", memory="2G",
                                         append=("apparmor=0",))
        finally:
            for link in links:
                (root / link.lstrip("/")).unlink(missing_ok=True)
            hidden = root / "root/hidden-docker-units"  # put back if the guest died before it did
            for unit in hidden.glob("*") if hidden.is_dir() else []:
                home, name = ("etc/init.d", "docker") if unit.name == "init.d-docker" else \
                    ("etc/systemd/system", unit.name) if unit.name.endswith(".d") else ("lib/systemd/system", unit.name)
                shutil.move(str(unit), str(root / home / name))
            shutil.rmtree(hidden, ignore_errors=True)
    assert not boot.timed_out, boot.console[-3000:]
    data: dict[str, Any] = json.loads((work / "results/docker.json").read_text())
    data["boot_seconds"] = round(boot.elapsed, 1)
    print(json.dumps({k: v for k, v in data.items() if k != "setup"}, indent=2))
    return data


def no_errors(d: dict[str, Any], name: str) -> dict[str, Any]:
    assert name not in d.get("errors", {}), d["errors"][name]
    return dict(d[name])


def test_ready_before_dockerd_starts_and_docker_finds_everything_in_place(docker: dict[str, Any]) -> None:
    """4. Boot order: modules in no modules-load.d, ctwatchd READY (Before=docker.service) before dockerd
    is started; docker never had to load br_netfilter itself, its sysctl is 1 and traffic works."""
    b = no_errors(docker, "boot")
    assert b["docker_active"] == "active"
    assert not any(m in b["modules_load_d"] for m in ("nf_conntrack", "nf_nat", "br_netfilter"))
    assert 0 < b["ctwatchd_ready_us"] <= b["docker_exec_start_us"], b
    assert b["docker_modprobe_lines"] == [], b["docker_modprobe_lines"]
    assert b["bridge_sysctl"] == "1" and set(b["live"].values()) == {"live"}
    s = no_errors(docker, "setup")
    assert s["web_up_s"] is not None and s["live_restore"] == "true"


def test_bridged_traffic_comes_back_without_restarting_docker(docker: dict[str, Any]) -> None:
    """1. rmmod br_netfilter breaks the hairpin fetch through docker0; ctwatchd brings it back, and docker
    keeps its MainPID: its rules were intact, as the journal says."""
    r = no_errors(docker, "bridged")
    assert r["before"] and r["rmmod"] == 0 and not r["during"]
    assert r["back_after_s"] is not None
    assert r["docker_pid_same"]
    assert len(r["decisions"]) == 1 and r["decisions"][0]["restart"] == "False"
    assert r["decisions"][0]["mode"] == "if-needed" and r["decisions"][0]["reason"].startswith("rules intact")


def test_isolation_is_lost_without_br_netfilter_and_restored(docker: dict[str, Any]) -> None:
    """3. With enable_icc=false one container cannot reach another; without br_netfilter it silently can;
    ctwatchd restores the isolation within seconds."""
    r = no_errors(docker, "isolation")
    assert r["isolated_before"] and r["rmmod"] == 0
    assert r["leaked_while_gone"], "isolation should be gone while br_netfilter is unloaded"
    assert r["isolated_again_after_s"] is not None and r["unload_to_isolated_s"] < 30


def test_firewall_cleanup_restarts_docker_once_and_containers_survive(docker: dict[str, Any]) -> None:
    """2. Ruleset flushed and the family unloaded in one rmmod: modules and sysctls back, docker restarted
    exactly once (its DOCKER chain was gone), `web` still the same process (live-restore), traffic from
    the host and from a container to the published port works again."""
    r = no_errors(docker, "cleanup")
    assert r["before_host"] and r["before_container"]
    assert r["rmmod"] == 0 and set(r["gone"]) == {"nf_conntrack", "nf_nat", "br_netfilter"}, r
    assert not r["during_host"]
    assert r["back_after_s"] is not None and r["after_host"] and r["after_container"]
    restarts = [d for d in r["decisions"] if d["restart"] == "True"]
    assert len(restarts) == 1 and "missing in table nat" in restarts[0]["reason"], r["decisions"]
    assert r["docker_pid_changed"] and r["web_pid_same"]
    assert set(r["live"].values()) == {"live"} and r["bridge_sysctl"] == "1"


def test_if_active_still_restarts_and_no_docker_is_a_clear_skip(docker: dict[str, Any]) -> None:
    """5. if-active restarts an active docker after a reload even with its rules intact, skips a stopped
    one; with docker not installed the step is skipped saying so, never failed."""
    r = no_errors(docker, "modes")
    active, stopped, absent = r["active"], r["stopped"], r["absent"]
    assert active["pid_changed"] and [d["restart"] for d in active["decisions"]] == ["True"]
    assert not stopped["pid_changed"] and [d["restart"] for d in stopped["decisions"]] == ["False"]
    assert stopped["decisions"][0]["reason"].startswith("docker.service is not active")
    assert r["unit_load_state"] == "not-found", r["unit_fragment"]
    assert [d["reason"] for d in absent["decisions"]] == ["docker.service is not installed"]
    assert absent["steps"] == ["docker.service is not installed"]
    assert r["ctwatchd_state"] == "active"
