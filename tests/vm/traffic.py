"""Runs inside the guest: real traffic through DNAT, MASQUERADE and a bridge, and the "firewall reload"
that breaks it until ctwatchd has repaired it. Shared by scenarios_guest.py (6.1) and bullseye_guest.py (5.10).

    rules = hook("rules.sh", RULES)  # the daemon's hook: it re-creates the NAT rules after a reload
    with network(rules) as res, daemon(..., f'[restore]\\nhooks = [["{rules}"]]\\n...') as d:
        reload_check(d["pid"], res)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from guestlib import BRIDGE, HOOKDIR, MODULES, healthy, holders_first, initstate, instance, sh, sysctl, wait_for

VIP, PORT = "10.233.9.9", 80  # the "published port": DNAT'ed to the server in its namespace
SERVER, CLIENT, GATEWAY = "10.233.0.2", "10.233.0.3", "10.233.0.1"
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


@contextmanager
def network(rules: Path) -> Iterator[dict[str, Any]]:
    """The topology, an HTTP server in the server's namespace and the `rules` script run once (the watched
    modules must be loaded). Yields the result dict (server_up_s); then stops the server, flushes the ruleset."""
    topology()
    server = subprocess.Popen(["ip", "netns", "exec", "srv", sys.executable, "-m", "http.server", "8080",
                               "--bind", SERVER, "--directory", str(HOOKDIR.parent)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res: dict[str, Any] = {}
    try:
        sh("sh", str(rules), check=True)
        res["server_up_s"] = wait_for(lambda: request(f"http://{SERVER}:8080/", "cli"), 120, 0.2)
        yield res
    finally:
        server.terminate()
        server.wait(timeout=30)
        sh("nft", "flush", "ruleset")


def reload_check(pid: int, res: dict[str, Any]) -> None:
    """Into `res`: DNAT'ed and bridged requests work, fail while the family is unloaded, and work again once
    the daemon `pid` (its hook re-creating the rules) has repaired it."""
    before = forward_packets()
    res["dnat_before"] = request(f"http://{VIP}:{PORT}/")
    res["bridged_before"] = request(f"http://{SERVER}:8080/", "cli")
    res["forward_counter_rose"] = forward_packets() > before
    # The "firewall reload": the ruleset goes (releasing nft_chain_nat), then the modules, holders
    # first, in one rmmod. The daemon is held (SIGSTOP) meanwhile, so the test never races its
    # restore: every module is judged removed by its new /sys/module instance, not by timing.
    before_inst = {m: instance(m) for m in MODULES}
    os.kill(pid, signal.SIGSTOP)
    try:
        res["flush"] = sh("nft", "flush", "ruleset").returncode
        names = holders_first(MODULES)
        res["rmmod"] = sh("rmmod", *names).returncode
        res["removed"] = [m for m in names if initstate(m) is None]
        res["dnat_during"] = request(f"http://{VIP}:{PORT}/", timeout=1.0)
    finally:
        t0 = time.monotonic()
        os.kill(pid, signal.SIGCONT)
    res["removal_to_request_ok_s"] = wait_for(lambda: request(f"http://{VIP}:{PORT}/", timeout=1.0), 120, 0.05)
    if res["removal_to_request_ok_s"] is not None:
        res["removal_to_request_ok_s"] = round(time.monotonic() - t0, 3)
    res["restored"] = healthy()
    res["new_instances"] = all(instance(m) not in (None, before_inst[m]) for m in MODULES)
    before = forward_packets()
    res["bridged_after"] = request(f"http://{SERVER}:8080/", "cli")
    res["forward_counter_rose_after"] = forward_packets() > before
    res["bridge_sysctls"] = {k: sysctl(k) for k in BRIDGE}
