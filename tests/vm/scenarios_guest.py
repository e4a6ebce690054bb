"""Runs inside the guest: the harder scenarios against `ctwatchd run`, one phase per daemon start.

Usage: python scenarios_guest.py RESULTS_DIR PHASE... with PHASE in traffic, flapping, blocker.
Each phase writes RESULTS_DIR/<phase>.json; the host test asserts on them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from guestlib import initstate, instance, json_log, read, stop_daemon, sysctl, wait_for

RESULTS = Path(sys.argv[1])
# Hooks run as root, so ctwatchd refuses them below group/world-writable directories such as /tmp:
# they live on the guest's own /run.
HOOKDIR = Path("/run/ctwatchd-test")
MODULES = ("nf_conntrack", "nf_nat", "br_netfilter")
BRIDGE = {"net.bridge.bridge-nf-call-iptables": "1", "net.bridge.bridge-nf-call-ip6tables": "1"}
VIP, PORT = "10.233.9.9", 80  # the "published port": DNAT'ed to the server in its namespace
SERVER, CLIENT, GATEWAY = "10.233.0.2", "10.233.0.3", "10.233.0.1"


def sh(*argv: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"{argv}: {p.returncode}: {p.stdout}{p.stderr}")
    return p


def healthy() -> bool:
    return (all(initstate(m) == "live" for m in MODULES)
            and read("/proc/sys/net/netfilter/nf_conntrack_count") is not None
            and all(sysctl(k) == v for k, v in BRIDGE.items()))


def holders_first(modules: tuple[str, ...]) -> list[str]:
    """The modules and everything holding them, holders deepest first: one `rmmod` line for a reload."""
    out: list[str] = []

    def visit(module: str) -> None:
        holders = Path(f"/sys/module/{module}/holders")
        for h in sorted(os.listdir(holders)) if holders.is_dir() else []:
            visit(h)
        if module not in out and initstate(module) is not None:
            out.append(module)

    for m in modules:
        visit(m)
    return out


def hook(name: str, body: str) -> Path:
    HOOKDIR.mkdir(mode=0o700, exist_ok=True)
    path = HOOKDIR / name
    path.write_text("#!/bin/sh\nset -e\n" + body)
    path.chmod(0o755)
    return path


@contextmanager
def daemon(phase: str, extra: str) -> Iterator[dict[str, Any]]:
    """Start `ctwatchd run` with this phase's config; stop it with SIGTERM; collect its JSON log."""
    cfg = RESULTS / f"{phase}.toml"
    cfg.write_text(
        "[watch]\npoll_interval = 2.0\n[sysctl]\n"
        + "".join(f'"{k}" = "{v}"\n' for k, v in BRIDGE.items())
        + f'[daemon]\nstate_file = "{RESULTS}/{phase}-state.json"\nlog_format = "json"\n' + extra)
    cfg.chmod(0o644)
    logpath = RESULTS / f"{phase}-daemon.log"
    out: dict[str, Any] = {"config": cfg.read_text()}
    with open(logpath, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ctwatchd", "run", "--config", str(cfg)],
                                stdout=log, stderr=log)
        out["pid"] = proc.pid
        out["ready_after_s"] = wait_for(lambda: "daemon.ready" in logpath.read_text(), 180, 0.1)
        try:
            yield out
        finally:
            out["alive_at_end"] = proc.poll() is None
            out["exit"] = stop_daemon(proc)
    out["log"] = json_log(logpath)
    (RESULTS / f"{phase}.json").write_text(json.dumps(out, indent=2))


def check_json(phase: str) -> dict[str, Any]:
    p = sh(sys.executable, "-m", "ctwatchd", "check", "--json", "--config", str(RESULTS / f"{phase}.toml"))
    return {"exit": p.returncode, "report": json.loads(p.stdout) if p.stdout.startswith("{") else p.stdout}


# -- 8. real traffic through DNAT, MASQUERADE and a bridge --------------------------------------
RULES = f"""\
iptables -t nat -A OUTPUT -d {VIP} -p tcp --dport {PORT} -j DNAT --to-destination {SERVER}:8080
iptables -t nat -A POSTROUTING -s {GATEWAY}/32 -o br0 -j MASQUERADE
iptables -A FORWARD -s {CLIENT} -d {SERVER} -p tcp --dport 8080 -j ACCEPT
"""


def topology() -> None:
    """br0 in the root namespace, the server and a client in their own namespaces, both bridged."""
    for ns, addr, veth in (("srv", SERVER, "vsrv"), ("cli", CLIENT, "vcli")):
        sh("ip", "netns", "add", ns, check=True)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns, check=True)
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0", check=True)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up", check=True)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up", check=True)
        sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", GATEWAY, check=True)
    sh("ip", "link", "add", "br0", "type", "bridge", check=True)
    sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", "br0", check=True)
    for veth in ("vsrv", "vcli"):
        sh("ip", "link", "set", veth, "master", "br0", check=True)
        sh("ip", "link", "set", veth, "up", check=True)
    sh("ip", "link", "set", "br0", "up", check=True)
    # The published address must be routable before OUTPUT's DNAT rewrites it (the guest has no default route).
    sh("ip", "route", "add", f"{VIP}/32", "dev", "br0", check=True)


def request(url: str, netns: str | None = None, timeout: float = 2.0) -> bool:
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(timeout), url]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        return sh(*argv, timeout=timeout + 5).stdout.strip() == "200"
    except subprocess.TimeoutExpired:
        return False


def forward_packets() -> int:
    out = sh("iptables", "-L", "FORWARD", "-v", "-n", "-x").stdout
    return sum(int(line.split()[0]) for line in out.splitlines()[2:] if CLIENT in line)


def phase_traffic() -> None:
    for m in MODULES:
        sh("modprobe", m, check=True)
    topology()
    server = subprocess.Popen(["ip", "netns", "exec", "srv", sys.executable, "-m", "http.server", "8080",
                               "--bind", SERVER, "--directory", str(HOOKDIR.parent)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rules = hook("rules.sh", RULES)
    sh("sh", str(rules), check=True)
    res: dict[str, Any] = {}
    try:
        res["server_up_s"] = wait_for(lambda: request(f"http://{SERVER}:8080/", "cli"), 120, 0.2)
        with daemon("traffic", f'[restore]\nhooks = [["{rules}"]]\n') as d:
            d["result"] = res
            before = forward_packets()
            res["dnat_before"] = request(f"http://{VIP}:{PORT}/")
            res["bridged_before"] = request(f"http://{SERVER}:8080/", "cli")
            res["forward_counter_rose"] = forward_packets() > before
            # The "firewall reload": the ruleset goes (releasing nft_chain_nat), then the modules, holders
            # first, in one rmmod. The daemon is held (SIGSTOP) meanwhile, so the test never races its
            # restore: every module is judged removed by its new /sys/module instance, not by timing.
            before_inst = {m: instance(m) for m in MODULES}
            os.kill(d["pid"], signal.SIGSTOP)
            try:
                res["flush"] = sh("nft", "flush", "ruleset").returncode
                names = holders_first(MODULES)
                res["rmmod"] = sh("rmmod", *names).returncode
                res["removed"] = [m for m in names if initstate(m) is None]
                res["dnat_during"] = request(f"http://{VIP}:{PORT}/", timeout=1.0)
            finally:
                t0 = time.monotonic()
                os.kill(d["pid"], signal.SIGCONT)
            res["removal_to_request_ok_s"] = wait_for(lambda: request(f"http://{VIP}:{PORT}/", timeout=1.0),
                                                      120, 0.05)
            if res["removal_to_request_ok_s"] is not None:
                res["removal_to_request_ok_s"] = round(time.monotonic() - t0, 3)
            res["restored"] = healthy()
            res["new_instances"] = all(instance(m) not in (None, before_inst[m]) for m in MODULES)
            before = forward_packets()
            res["bridged_after"] = request(f"http://{SERVER}:8080/", "cli")
            res["forward_counter_rose_after"] = forward_packets() > before
            res["bridge_sysctls"] = {k: sysctl(k) for k in BRIDGE}
    finally:
        server.terminate()
        server.wait(timeout=30)
        sh("nft", "flush", "ruleset")


# -- 7. flapping: 50 removals in quick succession -----------------------------------------------
def phase_flapping() -> None:
    for m in MODULES:
        sh("modprobe", m, check=True)
    counter = RESULTS / "hook-runs.txt"
    run_hook = hook("count.sh", f"date +%s.%N >> {counter}\n")
    removals = 0
    with daemon("flapping", f'[restore]\nhooks = [["{run_hook}"]]\nmax_restarts = 3\nrestart_window = 600\n') as d:
        t0 = time.monotonic()
        for _ in range(50):
            if wait_for(lambda: initstate("br_netfilter") == "live", 60, 0.005) is None:
                break
            if sh("rmmod", "br_netfilter").returncode == 0:
                removals += 1
        d["removals"] = removals
        d["removal_seconds"] = round(time.monotonic() - t0, 2)
        d["restored_at_end_s"] = wait_for(healthy, 60)
        d["hook_runs"] = len(counter.read_text().splitlines()) if counter.exists() else 0
        d["check"] = check_json("flapping")


# -- 5 and 6. a modprobe.d blocker; no legacy modules on this kernel ---------------------------
def phase_blocker() -> None:
    for m in MODULES:
        sh("modprobe", m, check=True)
    # /etc is the host's, read-only: lay a writable copy of modprobe.d over it for this guest.
    shadow = Path("/run/modprobe.d-shadow")
    shutil.copytree("/etc/modprobe.d", shadow, dirs_exist_ok=True)
    sh("mount", "--bind", str(shadow), "/etc/modprobe.d", check=True)
    Path("/etc/modprobe.d/protect-conntrack.conf").write_text("install nf_conntrack /bin/true\n")
    with daemon("blocker", "") as d:
        os.kill(d["pid"], signal.SIGSTOP)  # held: the unload cannot race a restore
        try:
            names = holders_first(MODULES)
            d["rmmod"] = sh("rmmod", *names).returncode
            d["removed"] = [m for m in names if initstate(m) is None]
        finally:
            os.kill(d["pid"], signal.SIGCONT)
        d["br_netfilter_back_s"] = wait_for(lambda: initstate("br_netfilter") == "live", 90)
        time.sleep(7)  # three polls: the daemon must not loop on the blocked module
        d["states_while_blocked"] = {m: initstate(m) for m in MODULES}
        d["check"] = check_json("blocker")
        Path("/etc/modprobe.d/protect-conntrack.conf").unlink()
        d["released_restored_s"] = wait_for(healthy, 90)
        time.sleep(2)  # let the daemon finish verifying before it is stopped
    sh("umount", "/etc/modprobe.d")


PHASES = {"traffic": phase_traffic, "flapping": phase_flapping, "blocker": phase_blocker}


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in sys.argv[2:]:
        try:
            PHASES[name]()
        except Exception as exc:
            failed += 1
            (RESULTS / f"{name}.error").write_text(f"{type(exc).__name__}: {exc}\n")
        finally:
            shutil.rmtree(HOOKDIR, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
