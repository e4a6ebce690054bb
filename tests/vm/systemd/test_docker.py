"""Docker hosts with a real dockerd (Debian's docker.io) under systemd as PID 1, in one boot.

The root gets docker enabled at boot with live-restore and /var/lib/docker on a tmpfs (9p holds no
overlayfs), ctwatchd enabled with `docker = "if-needed"`, and an image imported offline from
busybox-static. docker_guest.py runs the scenarios in order: boot order, bridged traffic, isolation,
a firewall clean-up, and if-active / no docker; each test here checks one claim from its facts.
Then, in the same boot, daemonset_guest.py builds the DaemonSet's image offline (a base from
packaging/kubernetes/build-base.sh, the wheels from this checkout, `docker build --network none`) and
runs it as the manifest declares, with the host's ctwatchd.service stopped.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ctwatchd import __version__

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sysguest  # noqa: E402

pytestmark = pytest.mark.vm

# The firewall clean-up unloads the conntrack family: the hold (on by default) would refuse that.
CONFIG = """\
[watch]
poll_interval = 2.0

[restore]
docker = "if-needed"
# Two clean-ups (hold off, then on) and the modes scenario (start-up included) restart docker up to
# six times in the boot.
max_restarts = 10

[hold]
enabled = false
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
SCRIPT = "python3 /root/docker_guest.py results; python3 /root/daemonset_guest.py results\n"
K8S = sysguest.REPO / "packaging/kubernetes"
BASE_TAR = sysguest.CACHE / "ctwatchd-base.tar"  # made by packaging/kubernetes/build-base.sh (make vm)
# Debian's node_exporter from packaging/install-build-deps.sh (the packaging tier), run in the guest:
# the same bookworm libc.
NODE_EXPORTER = Path("/usr/bin/prometheus-node-exporter")


def daemonset_spec() -> dict[str, Any]:
    """The container as daemonset.yaml and configmap.yaml declare it, for the guest's `docker run`."""
    yaml: Any = importlib.import_module("yaml")  # the test extra's PyYAML (untyped), on the host only
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = []
    for vm in c["volumeMounts"]:
        vol = volumes[vm["name"]]
        kind = next(k for k in ("configMap", "emptyDir", "hostPath") if k in vol)
        mounts.append({"kind": kind, "path": vm["mountPath"], "readOnly": bool(vm.get("readOnly")),
                       "host": vol.get("hostPath", {}).get("path"),
                       "size": str(vol.get("emptyDir", {}).get("sizeLimit", "")).lower().rstrip("i")})
    caps = re.search(r"#\s+capabilities: \{drop: \[\"ALL\"\], add: \[([^]]*)\]\}", (K8S / "daemonset.yaml").read_text())
    assert caps, "daemonset.yaml no longer documents the unprivileged variant"
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    return {"image": c["image"], "args": c["args"], "env": {e["name"]: e["value"] for e in c.get("env", [])},
            "privileged": c["securityContext"]["privileged"],
            "readOnlyRootFilesystem": c["securityContext"]["readOnlyRootFilesystem"],
            "hostNetwork": pod["hostNetwork"], "grace": pod["terminationGracePeriodSeconds"],
            "liveness": c["livenessProbe"]["exec"]["command"], "mounts": mounts,
            "unprivileged_caps": re.findall(r'"([A-Z_]+)"', caps.group(1)),
            "config": cm["data"]["ctwatchd.toml"]}


def image_files(work: Path) -> dict[str, str | bytes | Path]:
    """/root/image in the guest: the base's tar, the build context (Containerfile, the wheel and the
    wheels of its dependencies, made here where PyPI is reachable) and the pod spec."""
    wheels = work / "image-wheels"
    subprocess.run([str(sysguest.VENV_BIN / "python"), "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels),
                    f"{sysguest.REPO}[metrics]"], check=True, timeout=600)
    files: dict[str, str | bytes | Path] = {
        "/root/image/ctwatchd-base.tar": BASE_TAR,
        "/root/image/spec.json": json.dumps(daemonset_spec()),
        "/root/image/prometheus-node-exporter": NODE_EXPORTER,
        "/root/image/ctx/packaging/kubernetes/Containerfile": K8S / "Containerfile",
        "/root/daemonset_guest.py": HERE / "daemonset_guest.py",
    }
    for whl in wheels.glob("*.whl"):
        where = "dist" if whl.name.startswith("ctwatchd-") else "dist/wheels"
        files[f"/root/image/ctx/{where}/{whl.name}"] = whl
    return files


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    missing = sysguest.missing_prerequisites()
    root = sysguest.SYSROOT
    if not missing and not (root / "usr/sbin/dockerd").exists():
        missing.append(f"docker.io in {root} (run {HERE / 'build-root.sh'})")
    if not BASE_TAR.exists():
        missing.append(f"the image base {BASE_TAR} (run packaging/kubernetes/build-base.sh {BASE_TAR})")
    if not NODE_EXPORTER.exists():
        missing.append(f"{NODE_EXPORTER} (packaging/install-build-deps.sh)")
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
        **image_files(work),
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
            boot = sysguest.boot_systemd(root, SCRIPT, timeout=2700, results=work / "results", memory="2G",
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
            for left in ("/root/image", "/root/ds", "/var/lib/node_exporter"):
                sysguest.remove_tree(root, left)  # what the build and the pod's mounts left behind
    assert not boot.timed_out, boot.console[-3000:]
    data: dict[str, Any] = json.loads((work / "results/docker.json").read_text())
    data["boot_seconds"] = round(boot.elapsed, 1)
    ds = work / "results/daemonset.json"
    data["daemonset"] = json.loads(ds.read_text()) if ds.exists() else {"errors": {"all": "no daemonset.json"}}
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


def test_after_the_cleanups_restart_br_netfilter_comes_back_without_restarting_docker(
        docker: dict[str, Any]) -> None:
    """2a. The issue's phase C: after the clean-up's restart DOCKER-USER is gone for good (docker 20.10,
    live-restore, running containers); the next rmmod br_netfilter is judged against the baseline
    retaken after that restart, so traffic comes back and docker keeps its MainPID."""
    r = no_errors(docker, "bridged_after_cleanup")
    print(f"\nphase C: DOCKER-USER listed rc {r['docker_user']}, traffic back {r['unload_to_traffic_s']} s, "
          f"decision {r['decisions']}, baselines {r['baselines']}")
    assert docker["bridged"]["docker_user"] == 0 and r["docker_user"] != 0, "DOCKER-USER should be gone after B"
    assert r["before"] and r["rmmod"] == 0 and not r["during"] and r["back_after_s"] is not None
    assert r["docker_pid_same"]
    assert len(r["decisions"]) == 1 and r["decisions"][0]["restart"] == "False", r["decisions"]
    assert r["decisions"][0]["reason"].startswith("rules intact; DOCKER-USER absent in table filter")
    # judged against what docker re-created after B's restart (docker.baseline is recorded only when the
    # set changed, and here it did not: DOCKER-USER is no need), not against the first boot's rules
    assert r["decisions"][0]["compared"].startswith("the baseline taken after docker's restart"), r["decisions"]
    assert r["baselines"] and r["baselines"][0] == "while healthy"


def test_with_the_hold_a_cleanup_takes_only_br_netfilter_and_keeps_the_conntrack_entries(
        docker: dict[str, Any]) -> None:
    """2b. The same clean-up with the hold on: nf_conntrack and nf_nat refuse to go (the same modules
    after it), only br_netfilter and docker's rules do; traffic comes back. Its time is printed beside
    the clean-up with the hold off."""
    r = no_errors(docker, "cleanup_hold")
    off = no_errors(docker, "cleanup")
    assert r["held_after_s"] is not None and r["held"] and "nf_conntrack nf_nat" in r["held"][0], r
    assert r["rmmod"] != 0 and r["gone"] == ["br_netfilter"], r
    assert r["same_instance"]["nf_conntrack"] and r["same_instance"]["nf_nat"], r
    assert not r["same_instance"]["br_netfilter"]
    assert r["back_after_s"] is not None and r["after_host"] and r["after_container"]
    assert set(r["live"].values()) == {"live"} and r["bridge_sysctl"] == "1"
    assert r["web_pid_same"] and r["released"] is not None
    print(f"clean-up to traffic back: hold off {off['unload_to_traffic_s']} s (conntrack entries "
          f"{off['count_before']} -> {off['count_after']}), hold on {r['unload_to_traffic_s']} s "
          f"({r['count_before']} -> {r['count_after']}); docker restarted: off {off['docker_pid_changed']}, "
          f"on {r['docker_pid_changed']}")


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


def test_a_start_up_restore_does_not_wait_on_docker_and_restarts_it_after_ready(docker: dict[str, Any]) -> None:
    """5b. `systemctl stop ctwatchd; rmmod br_netfilter; systemctl start ctwatchd` with docker = "if-active"
    and docker active: the unit is Before=docker.service, so a try-restart inside the start-up restore
    would wait for a docker start job that waits for ctwatchd's own start, until docker_timeout (120 s).
    The start returns within seconds; docker is restarted right after READY, one decision."""
    s = no_errors(docker, "modes")["startup"]
    print(f"\nstart-up with docker active: systemctl start {s['start_s']} s, docker restarted "
          f"{s['docker_restarted_after_start_s']} s after it; steps {s['steps']}")
    assert s["start_rc"] == 0, s["start_err"]
    assert s["start_s"] < 60, s
    assert s["docker_restarted_after_start_s"] is not None and s["docker_state"] == "active", s
    assert s["br_netfilter"] == "live"
    assert [d["restart"] for d in s["decisions"]] == ["True"], s["decisions"]
    assert [r for r, _ in s["steps"]] == ["skipped", "ok"], s["steps"]
    assert s["steps"][0][1].startswith("deferred until ctwatchd is ready")


# -- the DaemonSet's shape (daemonset_guest.py, same boot) ---------------------------------------------


def pod(docker: dict[str, Any], step: str) -> dict[str, Any]:
    d = docker["daemonset"]
    assert step not in d.get("errors", {}), d["errors"][step]
    return dict(d[step])


def test_the_image_builds_with_no_network_from_the_imported_base(docker: dict[str, Any]) -> None:
    """`docker build --network none` of the Containerfile on build-base.sh's root and the checkout's wheels;
    the image runs `ctwatchd --version`, and the venv layer on top of the base stays small."""
    b = pod(docker, "build")
    assert b["build_rc"] == 0, b["build_tail"]
    assert pod(docker, "privileged")["version"] == f"ctwatchd {__version__}"
    mib = 1024 * 1024
    print(f"image: {b['image_bytes'] / mib:.1f} MiB ({b['base_bytes'] / mib:.1f} MiB base); "
          f"import {b['import_s']} s, build {b['build_s']} s")
    assert b["image_bytes"] - b["base_bytes"] < 40 * mib, b


def test_the_pod_loads_the_family_and_repairs_the_hosts_modules_and_sysctls(docker: dict[str, Any]) -> None:
    """Privileged, host network, the host's /lib/modules and modprobe.d read-only, the ConfigMap's config:
    started with the family unloaded it loads it and the host's bridge sysctl is 1; after each host rmmod
    it is back; ctwatchd is the container's PID 1."""
    r = pod(docker, "privileged")
    assert r["absent_before_start"] and r["start_to_restored_s"] is not None, r
    assert r["pid1"] == "ctwatchd"
    print(f"pod: started to restored {r['start_to_restored_s']} s; host rmmod to restored "
          f"{[x['restored_s'] for x in r['removals']]} s")
    assert [x["restored_s"] is not None for x in r["removals"]] == [True, True], r["removals"]


def test_liveness_passes_healthy_and_degraded_and_fails_only_when_check_cannot_tell(docker: dict[str, Any]) -> None:
    """The manifest's liveness command: `ctwatchd check` exits 0 healthy, 1 degraded (a host modprobe.d
    blocker, nf_nat removed: the probe still passes), 2 on a broken config (the probe fails)."""
    r = pod(docker, "privileged")
    assert (r["check_healthy"], r["liveness_healthy"]) == (0, 0)
    assert (r["check_degraded"], r["liveness_degraded"]) == (1, 0) and r["conntrack_while_blocked"] is None, r
    assert r["unblocked_to_restored_s"] is not None
    c = pod(docker, "cannot_tell")
    assert (c["check_rc"], c["liveness_rc"]) == (2, 1), c


def test_json_log_lines_metrics_and_sigterm_within_the_grace_period(docker: dict[str, Any]) -> None:
    """Every container log line is JSON, on stderr as the ConfigMap says; the textfile on the host has the
    metrics; SIGTERM to the container's PID 1 ends it with exit 0 inside the grace period."""
    r = pod(docker, "privileged")
    logs = r["logs"]
    assert logs["not_json"] == [] and logs["json_lines"]["stdout"] == 0 and logs["json_lines"]["stderr"] > 10, logs
    assert {"daemon.ready", "restore.planned", "restore.finished", "daemon.stopping"} <= set(logs["events"])
    assert {"ctwatchd_healthy", "ctwatchd_restores_total", "ctwatchd_conntrack_absent"} <= set(r["metrics"])
    print(f"pod: SIGTERM to exit {r['sigterm_to_exit_s']} s (terminationGracePeriodSeconds 30), "
          f"'stopping' logged after {r['stopping_logged_after_s']} s")
    # exit 0: it ended on SIGTERM by itself, inside the grace after which the runtime would SIGKILL it
    assert r["exit_code"] == "0" and r["sigterm_to_exit_s"] is not None and r["sigterm_to_exit_s"] < 30, r


def test_hook_grandchildren_handed_to_pid_1_are_reaped(docker: dict[str, Any]) -> None:
    """20 restores, each running a hook that leaves a background `sleep 5` behind: the orphans become
    ctwatchd's children (seen) and none is left a zombie."""
    h = pod(docker, "hooks")
    assert h["restores"] == 20 and h["hook_runs"] == 20, h
    assert h["orphans_seen"] > 0 and h["zombies"] == [], h


def test_the_pod_holds_the_hosts_modules_and_releases_them_when_removed(docker: dict[str, Any]) -> None:
    """The DaemonSet's image on the ConfigMap's defaults (privileged, host network): its hold is made in
    the host's namespace, the host's `rmmod nf_nat` fails, and removing the pod releases the table."""
    h = pod(docker, "hooks")
    assert h["held_after_s"] is not None, h
    assert h["host_rmmod_nf_nat"] != 0 and h["nf_nat_same"], h
    assert h["released_after_s"] is not None, h


def test_the_unprivileged_variant_loads_modules_but_cannot_write_sysctls(docker: dict[str, Any]) -> None:
    """SYS_MODULE + NET_ADMIN, not privileged, as the manifest's comment documents: modules come back;
    a sysctl set behind its back and a tuned value a reload reset stay wrong (/proc/sys is read-only)."""
    u = pod(docker, "unprivileged")
    print(f"unprivileged: {json.dumps({k: v for k, v in u.items() if k != 'logs'})}")
    assert u["ready_s"] is not None and u["module_back_s"] is not None and u["conntrack_back_s"] is not None, u
    assert u["bridge_after_drift"] == "0" and u["conntrack_max_after"] != "131072", u
    assert u["check_rc"] == 1 and u["failed_steps"], u


def test_node_exporter_scrapes_the_pods_metrics_on_the_real_kernel(docker: dict[str, Any]) -> None:
    """Debian's node_exporter on the host, textfile collector on the pod's hostPath and its own conntrack
    collector: healthy; degraded with nf_conntrack blocked and gone (ctwatchd_conntrack_absent 1 while
    node_nf_conntrack_entries is simply missing); restored, the reloads counted."""
    r = pod(docker, "privileged")
    healthy, degraded, back = r["scrape_healthy"], r["scrape_degraded"], r["scrape_restored"]
    assert healthy.get("ctwatchd_healthy") == 1 and healthy.get("ctwatchd_conntrack_absent") == 0, healthy
    assert "node_nf_conntrack_entries" in healthy
    assert degraded.get("ctwatchd_conntrack_absent") == 1 and degraded.get("ctwatchd_healthy") == 0, degraded
    assert "node_nf_conntrack_entries" not in degraded
    assert back.get("ctwatchd_healthy") == 1 and "node_nf_conntrack_entries" in back, back
    ok = [v for k, v in back.items() if k.startswith("ctwatchd_restores_total{")
          and 'module="nf_conntrack"' in k and 'result="ok"' in k]
    assert ok and ok[0] >= 2, back  # the host rmmod earlier, and the reload once unblocked
