"""Real triggers and what they take along, inside the booted bookworm root (systemd, udevd, firewalld).

Run by the test unit as `python3 triggers_guest.py RESULTS`; stdlib only. Each phase writes its facts
into RESULTS/triggers.json for tests/vm/systemd/test_triggers.py. While a phase unloads modules by
hand, ctwatchd is held (SIGSTOP, well inside its watchdog) so nothing races its repair.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

RESULTS = Path(sys.argv[1])
FAMILY = ("nf_conntrack", "nf_nat", "br_netfilter")
HELPERS = ("nf_conntrack_ftp", "nf_nat_ftp")
BRIDGE = "/proc/sys/net/bridge/bridge-nf-call-iptables"
HASHSIZE = Path("/sys/module/nf_conntrack/parameters/hashsize")
SYSCTL_FILE = Path("/etc/sysctl.d/99-test.conf")
UDEV_RULE = Path("/etc/udev/rules.d/99-ctwatchd-test-bridge.rules")
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


def instance(module: str) -> int | None:
    try:
        return os.stat(f"/sys/module/{module}").st_ino
    except OSError:
        return None


def live(*modules: str) -> bool:
    return all(initstate(m) == "live" for m in modules)


def read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.2) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return round(time.monotonic() - t0, 2)
        time.sleep(step)
    return None


def journal(event: str, since: str) -> list[dict[str, Any]]:
    text = sh("journalctl", "-u", "ctwatchd", "-o", "json", "--since", since, f"CTWATCHD_EVENT={event}").stdout
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def stamp() -> str:
    return f"@{time.time():.6f}"


def check_json() -> dict[str, Any]:
    p = sh("ctwatchd", "check", "--json")
    return json.loads(p.stdout) if p.stdout.startswith("{") else {"raw": p.stdout + p.stderr}


def restored_since(since: str) -> bool:
    return live(*FAMILY) and bool(journal("restore.finished", since))


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


def netfilter_modules() -> dict[str, int]:
    """Every loaded netfilter-ish module and its /sys/module instance."""
    out_: dict[str, int] = {}
    for name in os.listdir("/sys/module"):
        if name.startswith(("nf_", "nft_", "xt_", "ip_tables", "ip6_tables", "iptable_", "ip6table_", "br_netfilter")) \
                and (ino := instance(name)) is not None and initstate(name) is not None:
            out_[name] = ino
    return out_


@contextlib.contextmanager
def held() -> Iterator[None]:
    pid = int(prop("ctwatchd.service", "MainPID"))
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def unload_family() -> tuple[int, str]:
    with held():
        p = sh("rmmod", *holders_first(FAMILY))
    return p.returncode, p.stderr


def learned(*modules: str) -> bool:
    return set(modules) <= set(check_json().get("daemon", {}).get("collateral", []))


def phase_helpers() -> None:
    """Helpers loaded by hand come back with the family; removed alone, they stay gone."""
    r: dict[str, Any] = out.setdefault("helpers", {})
    must("modprobe", "-a", *HELPERS)
    r["learned_after_s"] = wait_for(lambda: learned(*HELPERS), 30, 0.5)
    since = stamp()
    r["rmmod"], r["rmmod_err"] = unload_family()
    r["gone_after_unload"] = [m for m in (*FAMILY, *HELPERS) if initstate(m) is None]
    r["back_after_s"] = wait_for(lambda: live(*FAMILY, *HELPERS), 90)
    time.sleep(1)
    r["planned"] = [e.get("CTWATCHD_MODULES") for e in journal("restore.planned", since)]
    r["reasons"] = [e.get("CTWATCHD_REASON") for e in journal("restore.planned", since)]
    since = stamp()
    r["rmmod_alone"] = sh("rmmod", "nf_nat_ftp", "nf_conntrack_ftp").returncode
    time.sleep(7)  # three polls
    r["alone_still_gone"] = initstate("nf_nat_ftp") is None and initstate("nf_conntrack_ftp") is None
    r["planned_after_alone"] = [e.get("CTWATCHD_MODULES") for e in journal("restore.planned", since)]
    # forgotten once gone 30 s with the family untouched (the daemon's FORGET_AFTER): a later reload
    # of the family leaves them out
    r["forgotten_after_s"] = wait_for(lambda: not set(HELPERS) & set(
        check_json().get("daemon", {}).get("collateral", [])), 60, 1.0)


def phase_hashsize() -> None:
    """nf_conntrack's hashsize set at run time is back after a reload."""
    r: dict[str, Any] = out.setdefault("hashsize", {})
    default = int(read(HASHSIZE) or 0)
    wanted = default * 2
    HASHSIZE.write_text(f"{wanted}\n")
    r["default"], r["set"] = default, int(read(HASHSIZE) or 0)
    time.sleep(5)  # two polls: the snapshot learns it
    r["rmmod"], _ = unload_family()
    r["after_unload"] = read(HASHSIZE)
    r["back_after_s"] = wait_for(lambda: live(*FAMILY) and read(HASHSIZE) == str(wanted), 90)
    r["final"] = read(HASHSIZE)


def phase_sysctl_fight() -> None:
    """RHEL's sysctl.d value and the udev rule of sysctl.d(5): ctwatchd's value holds within 2 s."""
    r: dict[str, Any] = out.setdefault("sysctl", {})
    SYSCTL_FILE.write_text("net.bridge.bridge-nf-call-iptables = 0\n")
    UDEV_RULE.write_text('ACTION=="add", SUBSYSTEM=="module", KERNEL=="br_netfilter", '
                         'RUN+="/lib/systemd/systemd-sysctl --prefix=/net/bridge"\n')
    must("udevadm", "control", "--reload")
    since = stamp()
    # First a removal without ctwatchd's help: what udev alone makes of a load (the fight exists).
    with held():
        sh("rmmod", "br_netfilter")
        sh("modprobe", "br_netfilter")
        sh("udevadm", "settle", "--timeout=30")
        r["udev_alone_sets"] = read(BRIDGE)
    time.sleep(3)
    t0 = time.monotonic()
    r["rmmod"] = sh("rmmod", "br_netfilter").returncode
    samples: list[tuple[float, str | None]] = []
    ones_from = None  # start of the trailing run of 1s
    # Sample until 1 has held 30 s (udev's write can come late under TCG: a fixed 34 s window once
    # ended 29.7 s after it), at most 60 s.
    while (elapsed := time.monotonic() - t0) < 60:
        value = read(BRIDGE)
        samples.append((round(elapsed, 2), value))
        ones_from = (ones_from if ones_from is not None else round(elapsed, 2)) if value == "1" else None
        if ones_from is not None and elapsed - ones_from >= 30.5:
            break
        time.sleep(0.1)
    r["holds_1_from_s"] = ones_from
    zeros = [t for t, v in samples if v == "0"]
    r["udev_zero_from_s"], r["udev_zero_until_s"] = (zeros[0], zeros[-1]) if zeros else (None, None)
    r["module_back_s"] = next((t for t, v in samples if v is not None), None)
    r["saw_0_after_load"] = any(v == "0" for _, v in samples)
    r["held_for_s"] = round(samples[-1][0] - ones_from, 1) if ones_from is not None else 0
    r["conflict_records"] = [e.get("CTWATCHD_SOURCE") for e in journal("sysctl.conflict", since)]
    r["check_conflicts"] = check_json().get("conflicts")
    table = sh("ctwatchd", "check").stdout
    r["check_table_names_it"] = "conflict: /etc/sysctl.d/99-test.conf:1" in table
    SYSCTL_FILE.unlink()
    UDEV_RULE.unlink()
    sh("udevadm", "control", "--reload")
    sh("sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1")


def phase_guard() -> None:
    """ctwatchd protect: modprobe -r refused while in place; removed, modprobe -r unloads again."""
    r: dict[str, Any] = out.setdefault("guard", {})
    r["protect"] = sh("ctwatchd", "protect").stdout.strip()
    before = instance("nf_nat")
    p = sh("modprobe", "-r", "nf_nat")
    r["modprobe_r_rc"], r["modprobe_r_err"] = p.returncode, p.stderr.strip()
    r["nf_nat_same_instance"] = instance("nf_nat") == before and before is not None
    r["check_guards"] = [m.get("guard") for m in check_json().get("modules", [])]
    r["remove"] = sh("ctwatchd", "protect", "--remove").stdout.strip()
    r["file_gone"] = not Path("/etc/modprobe.d/ctwatchd-protect.conf").exists()
    with held():
        p = sh("modprobe", "-r", "nf_nat")
        r["after_remove_rc"], r["after_remove_gone"] = p.returncode, initstate("nf_nat") is None
    r["restored_after_s"] = wait_for(lambda: live(*FAMILY), 60)


def phase_firewalld() -> None:
    """firewalld with CleanupModulesOnExit=yes and a masquerading zone: stop and restart unload the
    conntrack family (with rmmod, which modprobe.d cannot refuse); ctwatchd restores it."""
    r: dict[str, Any] = out.setdefault("firewalld", {})
    must("systemctl", "start", "firewalld.service", timeout=300)
    r["state"] = sh("firewall-cmd", "--state").stdout.strip()
    r["masquerade"] = sh("firewall-cmd", "--query-masquerade").stdout.strip()
    wait_for(lambda: learned("nft_ct"), 30, 0.5)  # firewalld's nft modules sit on nf_conntrack now
    r["remembered"] = check_json().get("daemon", {}).get("collateral", [])
    r["protect"] = sh("ctwatchd", "protect").returncode  # shows that rmmod ignores the guard
    r["check_notes"] = [n for n in check_json().get("notes", []) if "CleanupModulesOnExit" in n]
    for action in ("stop", "restart"):
        if prop("firewalld.service", "ActiveState") != "active":  # a stop under TCG can end "failed"
            sh("systemctl", "reset-failed", "firewalld.service")
            must("systemctl", "start", "firewalld.service", timeout=300)
            wait_for(lambda: live(*FAMILY), 120)
        before = netfilter_modules()
        since = stamp()
        must("systemctl", action, "firewalld.service", timeout=300)
        time.sleep(1)
        wait_for(partial(restored_since, since), 120)
        time.sleep(5)
        after = netfilter_modules()
        unloaded = sorted(m for m, ino in before.items() if after.get(m) != ino)
        r[action] = {
            "unloaded": unloaded,
            "back": sorted(m for m in unloaded if m in after),
            "still_gone": sorted(m for m in unloaded if m not in after),
            "watched_live": live(*FAMILY),
            "bridge": read(BRIDGE),
            "planned": [e.get("CTWATCHD_MODULES") for e in journal("restore.planned", since)],
            "firewalld": prop("firewalld.service", "ActiveState"),
        }
    r["state_after_restart"] = sh("firewall-cmd", "--state").stdout.strip()
    r["nft_has_firewalld"] = "table inet firewalld" in sh("nft", "list", "tables").stdout
    sh("ctwatchd", "protect", "--remove")
    must("systemctl", "stop", "firewalld.service", timeout=300)
    wait_for(lambda: live(*FAMILY), 120)


CONF = Path("/etc/ctwatchd/ctwatchd.toml")
HOLD_TABLE = ("ip", "ctwatchd")
# The clean-up's victims and a router's traffic: a client netns and a server netns on veth pairs, the
# host between them masquerading one port and DNAT-ing another (docker's two kinds of NAT).
NAT_RULES = """table ip ctnat {
    chain pre { type nat hook prerouting priority dstnat; iifname "vcli" tcp dport 8080 dnat to 10.77.2.2:8080; }
    chain post { type nat hook postrouting priority srcnat; oifname "vsrv" tcp dport 9000 masquerade; }
}
"""
SERVER = """
import socket, sys, threading, time, os
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", port)); s.listen()
    while True:
        c, _ = s.accept(); threading.Thread(target=talk, args=(c, port), daemon=True).start()
def talk(c, port):
    c.recv(16); c.sendall(b"ok")
    while not os.path.exists(f"/tmp/ct-send-{port}"):
        time.sleep(0.05)
    try:
        c.sendall(b"after"); c.settimeout(10); got = c.recv(16)
        res = "survived" if got == b"ack" else f"no ack: {got!r}"
    except OSError as e:
        res = f"broken: {type(e).__name__}"
    open(f"/tmp/ct-server-{port}", "w").write(res)
for p in (8080, 9000):
    threading.Thread(target=serve, args=(p,), daemon=True).start()
open("/tmp/ct-server-up", "w").write("up")
time.sleep(3600)
"""
CLIENT = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
c = socket.create_connection((host, port), timeout=20); c.sendall(b"hi"); assert c.recv(16) == b"ok"
print("connected", flush=True)
c.settimeout(15)  # the server sends at once after the put-back: silence this long is a broken connection
try:
    got = c.recv(16)
    if got == b"after":
        c.sendall(b"ack")
    print("survived" if got == b"after" else f"got {got!r}", flush=True)
except OSError as e:
    print(f"broken: {type(e).__name__}", flush=True)
"""


def set_hold(on: bool) -> None:
    text = CONF.read_text()
    CONF.write_text(text.replace(f"enabled = {str(not on).lower()}", f"enabled = {str(on).lower()}"))


def timed_restart() -> float:
    t0 = time.monotonic()
    must("systemctl", "restart", "ctwatchd.service", timeout=300)
    return round(time.monotonic() - t0, 2)


def hold_view() -> dict[str, Any]:
    return dict(check_json().get("hold") or {})


def holds(*modules: str) -> bool:
    return set(modules) <= set(hold_view().get("held") or [])


def table_exists() -> bool:
    return sh("nft", "list", "table", *HOLD_TABLE).returncode == 0


def refused(attempts: list[list[str]]) -> dict[str, Any]:
    return {" ".join(a): [(p := sh(*a)).returncode, p.stderr.strip()[-200:]] for a in attempts}


def net_setup() -> None:
    for ns in ("ctcli", "ctsrv"):
        must("ip", "netns", "add", ns)
        must("ip", "-n", ns, "link", "set", "lo", "up")
    for ns, dev, net in (("ctcli", "vcli", "10.77.1"), ("ctsrv", "vsrv", "10.77.2")):
        must("ip", "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns)
        must("ip", "addr", "add", f"{net}.1/24", "dev", dev)
        must("ip", "link", "set", dev, "up")
        must("ip", "-n", ns, "addr", "add", f"{net}.2/24", "dev", "eth0")
        must("ip", "-n", ns, "link", "set", "eth0", "up")
        must("ip", "-n", ns, "route", "add", "default", "via", f"{net}.1")
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    Path("/root/ct-server.py").write_text(SERVER)
    Path("/root/ct-client.py").write_text(CLIENT)
    subprocess.Popen(["ip", "netns", "exec", "ctsrv", "python3", "/root/ct-server.py"],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: Path("/tmp/ct-server-up").exists(), 60, 0.1)


def connections(label: str) -> dict[str, Any]:
    """Two established connections, one DNAT-ed (to 10.77.1.1:8080) and one masqueraded (10.77.2.2:9000);
    then a firewall clean-up: ruleset flushed, everything on nf_conntrack unloaded holders first, the
    family and the NAT rules put back; then the server sends next. Survived: the client got it."""
    r: dict[str, Any] = {}
    for f in Path("/tmp").glob("ct-s*-*"):
        f.unlink()
    Path("/root/ctnat.nft").write_text(NAT_RULES)
    must("nft", "-f", "/root/ctnat.nft")
    clients = {}
    for kind, (host, port) in (("dnat", ("10.77.1.1", 8080)), ("masquerade", ("10.77.2.2", 9000))):
        proc = subprocess.Popen(["ip", "netns", "exec", "ctcli", "python3", "/root/ct-client.py", host, str(port)],
                                stdout=subprocess.PIPE, text=True)
        clients[kind] = proc
        r[f"{kind}_connected"] = proc.stdout.readline().strip() if proc.stdout else None
    if label == "hold on":  # the masquerade rule loaded nft_masq: the next look holds it too
        r["masq_held_after_s"] = wait_for(lambda: holds("nft_masq"), 30, 0.5)
    r["count_before"] = read("/proc/sys/net/netfilter/nf_conntrack_count")
    before = {m: instance(m) for m in ("nf_conntrack", "nf_nat", "nft_masq")}
    with held():
        r["flush"] = sh("nft", "flush", "ruleset").returncode
        victims = holders_first(("nf_conntrack",))
        r["rmmod"] = sh("rmmod", *victims).returncode
        r["unloaded"] = sorted(m for m in victims if initstate(m) is None)
        sh("modprobe", "-a", "nf_conntrack", "nf_nat", "br_netfilter")
        r["put_back"] = sh("nft", "-f", "/root/ctnat.nft").returncode
        r["count_after"] = read("/proc/sys/net/netfilter/nf_conntrack_count")
    r["same_instance"] = {m: instance(m) == before[m] for m in before}
    for port in (8080, 9000):
        Path(f"/tmp/ct-send-{port}").write_text("go")
    for kind, proc in clients.items():
        try:
            outp, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            outp = "timeout"
        r[kind] = outp.strip().splitlines()[-1] if outp.strip() else "no output"
    r["server"] = {p: read(f"/tmp/ct-server-{p}") for p in (8080, 9000)}
    sh("nft", "delete", "table", "ip", "ctnat")
    wait_for(lambda: live(*FAMILY) and read(BRIDGE) == "1", 60)
    return r


def phase_hold() -> None:
    """The hold under the shipped unit: unloads refused, firewalld's clean-up survived, connections kept;
    released on stop and SIGKILL, made again by the restart; hooks nothing."""
    r: dict[str, Any] = out.setdefault("hold", {})
    t0 = time.monotonic()
    laps: dict[str, float] = {}

    def lap(name: str) -> None:
        laps[name] = round(time.monotonic() - t0, 1)

    r["ready_off_s"] = timed_restart()
    set_hold(True)
    since = stamp()
    r["ready_on_s"] = timed_restart()
    r["acquired"] = [e.get("CTWATCHD_HELD") for e in journal("hold.acquired", since)]
    r["status"] = prop("ctwatchd.service", "StatusText")
    r["table"] = sh("nft", "list", "table", *HOLD_TABLE).stdout
    c = check_json()
    r["check_holds"] = {m["name"]: m.get("hold") for m in c.get("modules", [])}
    r["check_hold"] = c.get("hold")
    # 1. the unloads the clean-ups use all fail, also after someone else's flush
    before = {m: instance(m) for m in ("nf_conntrack", "nf_nat")}
    attempts = [["rmmod", "nf_conntrack"], ["rmmod", "nf_nat"], ["modprobe", "-r", "nf_nat"],
                ["modprobe", "-r", "--remove-holders", "nf_conntrack"], ["rmmod", "nft_chain_nat"],
                ["rmmod", "nft_ct"]]
    r["refused"] = refused(attempts)
    r["other_delete"] = [(p := sh("nft", "delete", "table", *HOLD_TABLE)).returncode, p.stderr.strip()[-200:]]
    r["flush"] = sh("nft", "flush", "ruleset").returncode
    r["table_after_flush"] = table_exists()
    r["refused_after_flush"] = refused(attempts[:4])
    r["same_instances"] = all(instance(m) == before[m] and before[m] is not None for m in before)
    # br_netfilter cannot be held: its rmmod still works, and the repair brings it back
    since = stamp()
    r["br_rmmod"] = sh("rmmod", "br_netfilter").returncode
    r["br_back_s"] = wait_for(lambda: live("br_netfilter") and read(BRIDGE) == "1", 60)
    lap("refused")
    # 2. firewalld's clean-up on stop, with its masquerading zone: nothing of the family goes
    sh("modprobe", "-a", *HELPERS)  # hand-loaded helpers sit on the family; remembered by now
    must("systemctl", "start", "firewalld.service", timeout=300)
    r["firewalld_masq_held_s"] = wait_for(lambda: holds("nft_masq"), 30, 0.5)
    fw_before = netfilter_modules()
    t0 = time.monotonic()
    r["firewalld_stop"] = sh("systemctl", "stop", "firewalld.service", timeout=300).returncode
    r["firewalld_stop_s"] = round(time.monotonic() - t0, 2)
    fw_after = netfilter_modules()
    r["firewalld_unloaded"] = sorted(m for m, ino in fw_before.items() if fw_after.get(m) != ino)
    r["firewalld_family_kept"] = all(fw_after.get(m) == fw_before.get(m) for m in ("nf_conntrack", "nf_nat",
                                                                                 "nft_masq"))
    r["firewalld_start"] = sh("systemctl", "start", "firewalld.service", timeout=300).returncode
    r["firewalld_state"] = sh("firewall-cmd", "--state").stdout.strip()
    r["firewalld_table"] = "table inet firewalld" in sh("nft", "list", "tables").stdout
    must("systemctl", "stop", "firewalld.service", timeout=300)
    lap("firewalld")
    # 3. connections through a clean-up, with the hold and without it
    net_setup()
    r["connections_on"] = connections("hold on")
    lap("connections on")
    set_hold(False)
    since = stamp()
    must("systemctl", "reload", "ctwatchd.service")
    r["released_on_reload_s"] = wait_for(lambda: not table_exists(), 30, 0.2)
    r["connections_off"] = connections("hold off")
    lap("connections off")
    # 4. released by a stop and a SIGKILL, made again by systemd's restart
    set_hold(True)
    must("systemctl", "reload", "ctwatchd.service")
    r["table_before_stop"] = wait_for(table_exists, 30, 0.2) is not None
    must("systemctl", "stop", "ctwatchd.service", timeout=120)
    r["table_after_stop"] = table_exists()
    victims = holders_first(("nf_nat",))
    r["rmmod_after_stop"] = [sh("rmmod", *victims).returncode, victims]
    r["nf_nat_gone_after_stop"] = initstate("nf_nat") is None
    must("systemctl", "start", "ctwatchd.service", timeout=300)
    r["nf_nat_back"] = live("nf_nat")
    r["table_after_start"] = table_exists()
    port_before = hold_view().get("owner_port")
    since = stamp()
    sh("systemctl", "kill", "-s", "KILL", "ctwatchd.service")
    r["table_gone_after_kill_s"] = wait_for(lambda: not table_exists(), 10, 0.05)
    r["reheld_after_kill_s"] = wait_for(lambda: prop("ctwatchd.service", "ActiveState") == "active"
                                        and bool(journal("hold.acquired", since)), 120, 0.5)
    r["owner_port_changed"] = hold_view().get("owner_port") not in (None, port_before)
    lap("stop and kill")
    # 5. hooks nothing: the kernel reports the table dormant (its listing above; Debian's kernel has no
    # nfnetlink_hook, so `nft list hooks` cannot show hooks), and in a network namespace that had no
    # conntrack a hold without the masquerade rule turns none on: loopback TCP there leaves
    # nf_conntrack_count at 0 (with the rule, which needs conntrack, the same traffic is tracked)
    venv_python = os.path.join(os.path.dirname(os.readlink("/usr/bin/ctwatchd")), "python")
    for variant in ("plain", "masq"):
        must("ip", "netns", "add", "cthold")
        must("ip", "-n", "cthold", "link", "set", "lo", "up")
        p = sh("ip", "netns", "exec", "cthold", venv_python, "-c", NETNS_HOLD, variant)
        lines = p.stdout.splitlines()
        r[f"netns_{variant}"] = {"event": lines[0] if lines else p.stderr[-300:],
                                 "count": lines[1] if len(lines) > 1 else None}
        sh("ip", "netns", "del", "cthold")
    lap("hooks")
    r["seconds"] = laps


NETNS_HOLD = """
import socket, sys
from ctwatchd import hold
from ctwatchd.model import HoldSpec
h = hold.Hold()
print(h.ensure(HoldSpec(True, True, sys.argv[1] == "masq")).event, flush=True)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
c = socket.create_connection(srv.getsockname()); a, _ = srv.accept(); c.sendall(b"x"); a.recv(1); c.close(); a.close()
print(open("/proc/sys/net/netfilter/nf_conntrack_count").read().strip(), flush=True)
"""


REMOVERS: dict[str, Callable[[str], list[str]]] = {
    # an admin's clean-up job: systemd-run starts rmmod as the unit's main process, which exits at once
    "job": lambda n: ["systemd-run", f"--unit=cleanup-job-{n}", "rmmod", "br_netfilter"],
    # a login-like session: loginuid 1000 set, then a transient scope running modprobe -r
    "scope": lambda n: ["sh", "-c", "echo 1000 > /proc/self/loginuid && exec systemd-run --scope "
                        f"--unit=admin-scope-{n} modprobe -r br_netfilter"],
    # a long-lived daemon calling delete_module(2) itself (ctypes), then idling in its unit
    "daemon": lambda n: ["systemd-run", f"--unit=py-remover-{n}", "python3", "-c",
                         "import ctypes, time; libc = ctypes.CDLL(None, use_errno=True); "
                         "libc.delete_module(b'br_netfilter', 0o4000); time.sleep(30)"],
}
TRIALS = 2  # per remover and round: 12 removals in all, each asserted; the attribution phase is the boot's longest


def removal_record(since: str) -> dict[str, Any] | None:
    found = [e for e in journal("module.removed", since) if e.get("MODULE") == "br_netfilter"]
    return found[-1] if found else None


def recorded(since: str) -> bool:
    return removal_record(since) is not None


def attribution_round(label: str) -> dict[str, Any]:
    """TRIALS removals of br_netfilter by each kind of remover; what each module.removed record says."""
    r: dict[str, Any] = {}
    for kind, argv in REMOVERS.items():
        trials = []
        for n in range(TRIALS):
            wait_for(lambda: live(*FAMILY) and read(BRIDGE) == "1", 60)
            since = stamp()
            p = sh(*argv(f"{label}-{n}"))
            rec = None
            if wait_for(partial(recorded, since), 30, 0.5) is not None:
                rec = removal_record(since)
            trials.append({"rc": p.returncode, "err": p.stderr.strip()[-300:],
                           **{k: (rec or {}).get(k) for k in (
                               "ATTRIBUTION", "REMOVED_BY_UNIT", "REMOVED_BY_COMM", "REMOVED_BY_AUID",
                               "REMOVED_BY_USER", "REMOVED_BY_PID", "REMOVED_BY_CMDLINE", "REMOVED_BY_PARENTS",
                               "MESSAGE")}})
            sh("systemctl", "stop", f"py-remover-{label}-{n}.service")
        r[kind] = trials
    r["status"] = prop("ctwatchd.service", "StatusText")
    return r


def phase_attribution() -> None:
    """Who removed it: first without the audit rule (/proc at the uevent, or unknown), then with the
    shipped rule loaded (the kernel's audit records, via journald)."""
    r: dict[str, Any] = out.setdefault("attribution", {})
    r["audit_enabled_before"] = sh("auditctl", "-s").stdout
    r["without_rule"] = attribution_round("plain")
    must("auditctl", "-e", "1")
    must("auditctl", "-R", "/root/ctwatchd.rules")
    r["rules"] = sh("auditctl", "-l").stdout.strip()
    r["with_rule"] = attribution_round("audit")
    sh("auditctl", "-D")
    sh("auditctl", "-e", "0")
    r["check_table"] = [line for line in sh("ctwatchd", "check").stdout.splitlines() if "last removal" in line]


PHASES: tuple[tuple[str, Callable[[], None]], ...] = (
    ("helpers", phase_helpers), ("hashsize", phase_hashsize), ("sysctl", phase_sysctl_fight),
    ("guard", phase_guard), ("attribution", phase_attribution), ("firewalld", phase_firewalld),
    ("hold", phase_hold),
)


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    wait_for(lambda: prop("ctwatchd.service", "ActiveState") == "active" and live(*FAMILY), 120)
    failed = 0
    for name, phase in PHASES:
        t0 = time.monotonic()
        try:
            phase()
        except Exception as exc:
            failed += 1
            out.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        out.setdefault("seconds", {})[name] = round(time.monotonic() - t0, 1)
        (RESULTS / "triggers.json").write_text(json.dumps(out, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
