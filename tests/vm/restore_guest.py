"""Runs inside the guest (a real modular kernel): start `ctwatchd run`, remove modules, time the restores.

Usage: python restore_guest.py RESULTS_DIR. Writes RESULTS_DIR/restore.json; the host test asserts on
it. The daemon runs exactly as a user starts it, with a config file and JSON logs on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from guestlib import initstate, instance, json_log, read, stop_daemon, sysctl, wait_for

RESULTS = Path(sys.argv[1])
MODULES = ("nf_conntrack", "nf_nat", "br_netfilter")
SYSCTLS = {
    "net.bridge.bridge-nf-call-iptables": "1",
    "net.bridge.bridge-nf-call-ip6tables": "1",
    # Kernel default is 1: desiring 0 proves ctwatchd writes sysctls back after a reload.
    "net.bridge.bridge-nf-call-arptables": "0",
}
TUNED = {"net.netfilter.nf_conntrack_max": "131072",
         "net.netfilter.nf_conntrack_tcp_timeout_established": "3600"}
WAIT = 90.0


def sh(*argv: str) -> dict[str, Any]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    return {"argv": list(argv), "rc": p.returncode, "out": (p.stdout + p.stderr).strip()[-500:]}


EXPECT = dict(SYSCTLS)  # TUNED joins once the driver has tuned conntrack


def restored() -> bool:
    return (all(initstate(m) == "live" for m in MODULES)
            and read("/proc/sys/net/netfilter/nf_conntrack_count") is not None
            and all(sysctl(k) == v for k, v in EXPECT.items()))


def snapshot_taken(path: Path) -> bool:
    try:
        saved = json.loads(path.read_text()).get("tuning", {})
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in TUNED.items())


def snapshot() -> dict[str, Any]:
    return {"initstate": {m: initstate(m) for m in MODULES},
            "instance": {m: instance(m) for m in (*MODULES, "bridge")},
            "sysctls": {k: sysctl(k) for k in (*SYSCTLS, *TUNED)},
            "count": read("/proc/sys/net/netfilter/nf_conntrack_count")}


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    cfg = RESULTS / "ctwatchd.toml"
    cfg.write_text(
        "[watch]\npoll_interval = 5.0\n[sysctl]\n"
        + "".join(f'"{k}" = "{v}"\n' for k, v in SYSCTLS.items())
        + f'[daemon]\nstate_file = "{RESULTS}/state.json"\nlog_format = "json"\n'
        # The scenarios unload nf_nat and nf_conntrack: the hold (on by default) would refuse that.
        + "[hold]\nenabled = false\n")
    cfg.chmod(0o644)
    out: dict[str, Any] = {"uname": os.uname().release, "before_start": snapshot(), "scenarios": []}
    log = open(RESULTS / "daemon.log", "w")  # noqa: SIM115 - lives as long as the daemon
    t_start = time.monotonic()
    daemon = subprocess.Popen([sys.executable, "-m", "ctwatchd", "run", "--config", str(cfg)],
                              stdout=log, stderr=log)
    try:
        ready = wait_for(lambda: "daemon.ready" in (RESULTS / "daemon.log").read_text(), 180)
        out["ready_after_s"] = ready
        out["start_loaded"] = restored()
        out["after_start"] = snapshot()
        out["start_seconds"] = round(time.monotonic() - t_start, 3)
        # Tune conntrack while healthy; wait for one poll so the daemon snapshots the values.
        for k, v in TUNED.items():
            Path("/proc/sys/" + k.replace(".", "/")).write_text(v)
        EXPECT.update(TUNED)
        # The daemon persists its snapshot on the next poll; a fixed sleep lost that race on a slow host.
        out["tuning_snapshot_after_s"] = wait_for(lambda: snapshot_taken(RESULTS / "state.json"), 60, step=0.2)
        scenarios: list[tuple[str, list[list[str]]]] = [
            ("rmmod br_netfilter", [["rmmod", "br_netfilter"]]),
            ("rmmod nf_nat", [["rmmod", "nf_nat"]]),
            # One rmmod removes the holder and then conntrack, as an admin would type it.
            ("rmmod nf_conntrack (holder nf_nat first)", [["rmmod", "nf_nat", "nf_conntrack"]]),
            ("rmmod all three at once", [["rmmod", "br_netfilter", "nf_nat", "nf_conntrack"]]),
            ("modprobe -r all three", [["modprobe", "-r", "br_netfilter", "nf_nat", "nf_conntrack"]]),
        ]
        for name, commands in scenarios:
            before = snapshot()
            t0 = time.monotonic()
            results = [sh(*c) for c in commands]
            gone_after = {m: initstate(m) for m in MODULES}
            took = wait_for(restored, WAIT)
            out["scenarios"].append({
                "name": name, "commands": results, "state_right_after_removal": gone_after, "before": before,
                "restored_after_s": took, "removal_to_restored_s": round(time.monotonic() - t0, 3),
                "after": snapshot(),
            })
            time.sleep(1.0)  # let the daemon's verification pass settle before the next removal
    finally:
        out["daemon_exit"] = stop_daemon(daemon)
        log.close()
    out["log"] = json_log(RESULTS / "daemon.log")
    (RESULTS / "restore.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
