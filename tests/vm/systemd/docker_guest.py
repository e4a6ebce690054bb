"""Docker scenarios inside the booted bookworm root (systemd as PID 1, Debian's docker.io, ctwatchd's unit).

Run by the test unit as `python3 docker_guest.py RESULTS`; stdlib only (the guest's own python3).
Each scenario writes its facts into RESULTS/docker.json; the host test asserts on them. While a
scenario unloads modules, ctwatchd is held (SIGSTOP, well inside its 30 s watchdog) so the breakage
can be observed before the repair, never raced.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RESULTS = Path(sys.argv[1])
IMAGE = "local/busybox:1"
GATEWAY = "172.17.0.1"  # docker0
PUBLISHED = 8080
FAMILY = ("nf_conntrack", "nf_nat", "br_netfilter")
HIDDEN = Path("/root/hidden-docker-units")
out: dict[str, Any] = {}


def sh(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(argv, 124, "", f"timed out: {exc}")


def must(*argv: str, timeout: float = 180) -> str:
    p = sh(*argv, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {p.returncode}: {p.stdout}{p.stderr}")
    return p.stdout


def prop(unit: str, name: str) -> str:
    return sh("systemctl", "show", "-P", name, unit).stdout.strip()


def initstate(module: str) -> str | None:
    try:
        return Path(f"/sys/module/{module}/initstate").read_text().strip()
    except OSError:
        return None


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.2) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return round(time.monotonic() - t0, 2)
        time.sleep(step)
    return None


def fetch_from(container: str | None, url: str, timeout: int = 3, *, pid: str | None = None) -> bool:
    """GET url from the host or from inside a container's network namespace (the host's curl entered into
    it with nsenter: busybox-static's wget cannot resolve in an image without glibc's NSS modules).
    `pid`: the container's, looked up beforehand (a `docker inspect` can take seconds under TCG)."""
    argv = ["curl", "-s", "--max-time", str(timeout), url]
    if container is not None:
        pid = pid or container_pid(container)
        if not pid or pid == "0":
            return False
        argv = ["nsenter", "-t", pid, "-n", *argv]
    return "ctwatchd-test-page" in sh(*argv, timeout=timeout + 30).stdout


def journal(event: str, since: str) -> list[dict[str, Any]]:
    text = sh("journalctl", "-u", "ctwatchd", "-o", "json", "--since", since, f"CTWATCHD_EVENT={event}").stdout
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def now_stamp() -> str:
    return "@" + f"{time.time():.6f}"


def holders_first(modules: tuple[str, ...]) -> list[str]:
    order: list[str] = []

    def visit(m: str) -> None:
        holders = Path(f"/sys/module/{m}/holders")
        for h in sorted(os.listdir(holders)) if holders.is_dir() else []:
            visit(h)
        if m not in order and initstate(m) is not None:
            order.append(m)

    for m in modules:
        visit(m)
    return order


HOLD_MAX = 12.0  # seconds: well inside the unit's 30 s watchdog, even with the last ping 15 s ago


@contextlib.contextmanager
def held() -> Iterator[None]:
    """ctwatchd frozen while the fault is made and observed; thawed on the way out, or after HOLD_MAX
    whatever the scenario is still doing (a slow TCG moment must fail the scenario, not have systemd's
    watchdog kill the daemon)."""
    pid = int(prop("ctwatchd.service", "MainPID"))
    os.kill(pid, signal.SIGSTOP)
    thaw = threading.Timer(HOLD_MAX, os.kill, (pid, signal.SIGCONT))
    thaw.start()
    try:
        yield
    finally:
        thaw.cancel()
        os.kill(pid, signal.SIGCONT)


def docker_pid() -> str:
    return prop("docker.service", "MainPID")


def container_pid(name: str) -> str:
    return sh("docker", "inspect", "-f", "{{.State.Pid}}", name).stdout.strip()


def make_image() -> None:
    """busybox-static and a page, imported offline: no registry needed."""
    img = Path("/tmp/img")
    (img / "bin").mkdir(parents=True, exist_ok=True)
    (img / "www").mkdir(exist_ok=True)
    (img / "bin/busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (img / "bin/busybox").chmod(0o755)
    for tool in ("sh", "httpd", "sleep"):
        link = img / "bin" / tool
        if not link.exists():
            link.symlink_to("busybox")
    (img / "www/index.html").write_text("ctwatchd-test-page\n")
    tar = subprocess.Popen(["tar", "-C", str(img), "-c", "."], stdout=subprocess.PIPE)
    imported = subprocess.run(["docker", "import", "-", IMAGE], stdin=tar.stdout, capture_output=True, text=True,
                              timeout=300, check=False)
    tar.wait()
    if imported.returncode != 0:
        raise RuntimeError(f"docker import: {imported.stderr}")


def httpd(name: str, *extra: str) -> None:
    must("docker", "run", "-d", "--name", name, *extra, IMAGE, "/bin/httpd", "-f", "-p", "80", "-h", "/www")


def sleeper(name: str, *extra: str) -> None:
    must("docker", "run", "-d", "--name", name, *extra, IMAGE, "/bin/sleep", "100000")


def scenario_boot_order() -> None:
    """4. Docker enabled, modules in no modules-load.d: ctwatchd READY before dockerd starts."""
    r: dict[str, Any] = out.setdefault("boot", {})
    wait_for(lambda: prop("docker.service", "ActiveState") == "active", 300, 1)
    r["docker_active"] = prop("docker.service", "ActiveState")
    r["ctwatchd_ready_us"] = int(prop("ctwatchd.service", "ActiveEnterTimestampMonotonic") or 0)
    r["docker_exec_start_us"] = int(prop("docker.service", "ExecMainStartTimestampMonotonic") or 0)
    r["modules_load_d"] = sh("sh", "-c", "cat /etc/modules-load.d/*.conf /usr/lib/modules-load.d/*.conf "
                                         "2>/dev/null | grep -v '^#'").stdout
    docker_log = sh("journalctl", "-b", "-u", "docker", "--no-pager", "-o", "cat").stdout
    r["docker_modprobe_lines"] = [line for line in docker_log.splitlines()
                                  if "br_netfilter" in line or "bridge-nf-call" in line]
    r["bridge_sysctl"] = Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip()
    r["live"] = {m: initstate(m) for m in FAMILY}


def scenario_bridged(key: str = "bridged") -> None:
    """1. Published port reached through the docker0 gateway (hairpin DNAT on the bridge)."""
    r: dict[str, Any] = out.setdefault(key, {})
    r["docker_user"] = sh("iptables", "-S", "DOCKER-USER").returncode  # 0: the chain is there
    url = f"http://{GATEWAY}:{PUBLISHED}/"
    r["before"] = fetch_from("client", url)
    pid0 = docker_pid()
    since = now_stamp()
    client = container_pid("client")
    with held():
        r["rmmod"] = sh("rmmod", "br_netfilter").returncode
        r["during"] = fetch_from("client", url, pid=client)
    t0 = time.monotonic()
    r["back_after_s"] = wait_for(lambda: fetch_from("client", url, pid=client), 90, 0.1)
    r["unload_to_traffic_s"] = round(time.monotonic() - t0, 2)
    time.sleep(2)
    r["docker_pid_same"] = docker_pid() == pid0
    r["decisions"] = [{k: e.get(f"CTWATCHD_{k.upper()}") for k in ("mode", "restart", "reason", "compared")}
                      for e in journal("docker.decision", since)]


def scenario_isolation() -> None:
    """3. enable_icc=false: a container cannot reach another directly, unless br_netfilter is gone."""
    r: dict[str, Any] = out.setdefault("isolation", {})
    must("docker", "network", "create", "-o", "com.docker.network.bridge.enable_icc=false", "isolated")
    httpd("iso-a", "--network", "isolated")
    sleeper("iso-b", "--network", "isolated")
    ip = sh("docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", "iso-a") \
        .stdout.strip()
    url = f"http://{ip}/"
    r["ip"] = ip
    r["isolated_before"] = not fetch_from("iso-b", url, 2)
    iso_b = container_pid("iso-b")
    with held():
        r["rmmod"] = sh("rmmod", "br_netfilter").returncode
        r["leaked_while_gone"] = fetch_from("iso-b", url, 2, pid=iso_b)
    t0 = time.monotonic()
    r["isolated_again_after_s"] = wait_for(lambda: not fetch_from("iso-b", url, 2, pid=iso_b), 60, 0.2)
    r["unload_to_isolated_s"] = round(time.monotonic() - t0, 2)
    # Containers on a user-defined network carry nat rules in their own netns (docker's embedded DNS):
    # they would keep nf_nat in use and the clean-up below could not unload it.
    sh("docker", "rm", "-f", "iso-a", "iso-b")
    sh("docker", "network", "rm", "isolated")


def scenario_firewall_cleanup() -> None:
    """2. A firewall clean-up: ruleset flushed, the conntrack family unloaded holders first, in one go."""
    firewall_cleanup(out.setdefault("cleanup", {}))


def scenario_bridged_after_cleanup() -> None:
    """2a. br_netfilter again, after the clean-up's docker restart: docker 20.10 with live-restore and
    running containers never re-creates DOCKER-USER, and that must not restart docker again."""
    scenario_bridged("bridged_after_cleanup")
    r = out["bridged_after_cleanup"]
    r["baselines"] = [e.get("CTWATCHD_TAKEN") for e in journal("docker.baseline", "@0")]


def scenario_cleanup_with_the_hold() -> None:
    """2b. The same clean-up with the hold on: nf_conntrack and nf_nat refuse to go, so only
    br_netfilter (and what nothing holds) is unloaded and the conntrack entries stay."""
    r: dict[str, Any] = out.setdefault("cleanup_hold", {})
    base = Path("/etc/ctwatchd/ctwatchd.toml").read_text()
    since = now_stamp()
    reload_config(base.replace("enabled = false", "enabled = true"))
    r["held_after_s"] = wait_for(lambda: bool(journal("hold.acquired", since)), 60, 0.5)
    r["held"] = [e.get("CTWATCHD_HELD") for e in journal("hold.acquired", since)]
    try:
        firewall_cleanup(r)
    finally:
        reload_config(base)
        r["released"] = wait_for(lambda: "table ip ctwatchd" not in sh("nft", "list", "tables").stdout, 60, 0.5)


def firewall_cleanup(r: dict[str, Any]) -> None:
    url = f"http://{GATEWAY}:{PUBLISHED}/"
    r["before_host"] = fetch_from(None, url)
    r["before_container"] = fetch_from("client", url)
    web0, docker0 = container_pid("web"), docker_pid()
    instances = {m: _instance(m) for m in FAMILY}
    r["count_before"] = _read("/proc/sys/net/netfilter/nf_conntrack_count")
    since = now_stamp()
    with held():
        for argv in (["iptables", "-t", "nat", "-F"], ["iptables", "-t", "nat", "-X"], ["iptables", "-F"],
                     ["iptables", "-X"], ["nft", "flush", "ruleset"]):
            sh(*argv)
        names = holders_first(FAMILY)
        r["unloaded"] = names
        r["lsmod"] = sh("lsmod").stdout
        removed = sh("rmmod", *names)
        r["rmmod"], r["rmmod_err"] = removed.returncode, removed.stderr
        r["gone"] = [m for m in FAMILY if initstate(m) is None]
        r["during_host"] = fetch_from(None, url, 2)
    t0 = time.monotonic()
    r["back_after_s"] = wait_for(lambda: fetch_from(None, url) and fetch_from("client", url), 240, 0.5)
    r["unload_to_traffic_s"] = round(time.monotonic() - t0, 2)
    time.sleep(3)
    r["after_host"] = fetch_from(None, url)
    r["after_container"] = fetch_from("client", url)
    r["web_pid_same"] = container_pid("web") == web0 and web0 not in ("", "0")
    r["docker_pid_changed"] = docker_pid() != docker0
    r["decisions"] = [{k: e.get(f"CTWATCHD_{k.upper()}") for k in ("mode", "restart", "reason", "compared")}
                      for e in journal("docker.decision", since)]
    r["live"] = {m: initstate(m) for m in FAMILY}
    r["same_instance"] = {m: _instance(m) == instances[m] for m in FAMILY}
    r["count_after"] = _read("/proc/sys/net/netfilter/nf_conntrack_count")
    r["bridge_sysctl"] = Path("/proc/sys/net/bridge/bridge-nf-call-iptables").read_text().strip()


def _instance(module: str) -> int | None:
    try:
        return os.stat(f"/sys/module/{module}").st_ino
    except OSError:
        return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def reload_config(text: str) -> None:
    Path("/etc/ctwatchd/ctwatchd.toml").write_text(text)
    since = now_stamp()
    must("systemctl", "reload", "ctwatchd.service")
    wait_for(lambda: bool(journal("config.loaded", since)), 60)


def removal_decision(label: str) -> dict[str, Any]:
    since = now_stamp()
    pid0 = docker_pid()
    sh("rmmod", "br_netfilter")
    # The whole restore, docker's try-restart included, must be over before the next step of the script
    # touches docker (a `systemctl stop` would cancel the restart job).
    wait_for(lambda: initstate("br_netfilter") == "live" and bool(journal("docker.decision", since))
             and bool(journal("restore.finished", since)), 300)
    time.sleep(2)
    decisions = journal("docker.decision", since)
    return {"label": label, "pid_changed": docker_pid() != pid0,
            "decisions": [{k: e.get(f"CTWATCHD_{k.upper()}") for k in ("mode", "restart", "reason", "compared")}
                          for e in decisions],
            "steps": [e.get("CTWATCHD_DETAIL") for e in journal("restore.step", since)
                      if e.get("ACTION") == "restart-docker"]}


def startup_with_docker_active() -> dict[str, Any]:
    """ctwatchd started with br_netfilter gone and docker active (a crash restart, an admin's stop and
    start): its start-up restore must not wait on a docker restart whose start waits on ctwatchd."""
    must("systemctl", "stop", "ctwatchd.service")
    pid0 = docker_pid()
    sh("rmmod", "br_netfilter")
    since = now_stamp()
    t0 = time.monotonic()
    started = sh("systemctl", "start", "ctwatchd.service", timeout=300)
    start_s = round(time.monotonic() - t0, 2)
    restarted = wait_for(lambda: docker_pid() not in (pid0, "", "0") and prop("docker.service", "ActiveState")
                         == "active" and bool(journal("restore.finished", since)), 180)
    time.sleep(2)
    return {"start_rc": started.returncode, "start_err": started.stderr[-500:], "start_s": start_s,
            "docker_restarted_after_start_s": restarted, "br_netfilter": initstate("br_netfilter"),
            "docker_state": prop("docker.service", "ActiveState"),
            "decisions": [{k: e.get(f"CTWATCHD_{k.upper()}") for k in ("mode", "restart", "reason")}
                          for e in journal("docker.decision", since)],
            "steps": [(e.get("RESULT"), e.get("CTWATCHD_DETAIL")) for e in journal("restore.step", since)
                      if e.get("ACTION") == "restart-docker"]}


def scenario_if_active_and_absent() -> None:
    """5. if-active restarts after a reload when docker is active; a host without docker: a clear skip."""
    r: dict[str, Any] = out.setdefault("modes", {})
    base = Path("/etc/ctwatchd/ctwatchd.toml").read_text()
    reload_config(base.replace('docker = "if-needed"', 'docker = "if-active"'))
    r["active"] = removal_decision("if-active, docker active")
    r["startup"] = startup_with_docker_active()
    must("systemctl", "stop", "docker.service", "docker.socket")
    r["stopped"] = removal_decision("if-active, docker stopped")
    HIDDEN.mkdir(exist_ok=True)
    for unit in ("docker.service", "docker.socket"):
        src = Path("/lib/systemd/system") / unit
        if src.exists():
            src.rename(HIDDEN / unit)
    dropins = Path("/etc/systemd/system/docker.service.d")
    if dropins.exists():  # a unit with drop-ins alone still loads: hide them too
        dropins.rename(HIDDEN / "docker.service.d")
    sysv = Path("/etc/init.d/docker")
    if sysv.exists():  # or systemd-sysv-generator makes a docker.service of docker.io's init script
        sysv.rename(HIDDEN / "init.d-docker")
    must("systemctl", "daemon-reload")
    r["unit_load_state"] = prop("docker.service", "LoadState")
    r["unit_fragment"] = prop("docker.service", "FragmentPath") + " " + prop("docker.service", "SourcePath")
    reload_config(base)
    r["absent"] = removal_decision("if-needed, docker not installed")
    for unit in ("docker.service", "docker.socket"):
        if (HIDDEN / unit).exists():
            (HIDDEN / unit).rename(Path("/lib/systemd/system") / unit)
    if (HIDDEN / "docker.service.d").exists():
        (HIDDEN / "docker.service.d").rename("/etc/systemd/system/docker.service.d")
    if (HIDDEN / "init.d-docker").exists():
        (HIDDEN / "init.d-docker").rename("/etc/init.d/docker")
    must("systemctl", "daemon-reload")
    r["ctwatchd_state"] = prop("ctwatchd.service", "ActiveState")


def setup() -> None:
    r: dict[str, Any] = out.setdefault("setup", {})
    make_image()
    httpd("web", "-p", f"{PUBLISHED}:80")
    sleeper("client")
    r["web_up_s"] = wait_for(lambda: fetch_from("client", f"http://{GATEWAY}:{PUBLISHED}/"), 120, 0.5)
    r["live_restore"] = sh("docker", "info", "-f", "{{.LiveRestoreEnabled}}").stdout.strip()
    r["check"] = sh("ctwatchd", "check", "--json").stdout


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name, step in (("boot", scenario_boot_order), ("setup", setup), ("bridged", scenario_bridged),
                       ("isolation", scenario_isolation), ("cleanup", scenario_firewall_cleanup),
                       ("bridged_after_cleanup", scenario_bridged_after_cleanup),
                       ("cleanup_hold", scenario_cleanup_with_the_hold), ("modes", scenario_if_active_and_absent)):
        t0 = time.monotonic()
        try:
            step()
        except Exception as exc:
            failed += 1
            out.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        out.setdefault("seconds", {})[name] = round(time.monotonic() - t0, 1)
        (RESULTS / "docker.json").write_text(json.dumps(out, indent=2))
    sh("sh", "-c", "journalctl -b -u docker --no-pager -o short-monotonic > results/docker-journal.txt")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
