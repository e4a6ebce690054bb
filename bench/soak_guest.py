"""Soak, inside a VM guest with a real modular kernel: `ctwatchd run`, then rmmod/restore cycles.

Usage (in the guest, as root): python bench/soak_guest.py RESULTS_DIR --seconds N

Starts `ctwatchd run` with a config in RESULTS_DIR (`log_format = "json"`, log in daemon.log). Then,
for as many cycles as fit in N seconds: one `rmmod br_netfilter nf_nat nf_conntrack`, then wait until
all three are live again (and the bridge sysctls and nf_conntrack_count are back). A cycle not
restored within 60 s is a missed restore. The daemon's RSS (/proc/PID/status VmRSS) and open fds
(/proc/PID/fd) are taken after READY, after the first cycle (warm) and at the end. Writes
RESULTS_DIR/soak.json; bench/soak.py prints it as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "vm"))

from guestlib import read, stop_daemon, wait_for

MODULES = ("nf_conntrack", "nf_nat", "br_netfilter")
SYSCTLS = {"net.bridge.bridge-nf-call-iptables": "1", "net.bridge.bridge-nf-call-ip6tables": "1"}
MISS_AFTER = 60.0
SETTLE = 0.3  # after a restore, let the daemon's verification pass finish before the next removal




def all_live() -> bool:
    return all(read(f"/sys/module/{m}/initstate") == "live" for m in MODULES)


def restored() -> bool:
    return (all_live() and read("/proc/sys/net/netfilter/nf_conntrack_count") is not None
            and all(read("/proc/sys/" + k.replace(".", "/")) == v for k, v in SYSCTLS.items()))




def usage(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return {"rss_kib": int(m.group(1)) if m else -1, "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None, "p95": None, "max": None, "mean": None}
    ordered = sorted(values)
    return {"min": round(ordered[0], 4), "median": round(statistics.median(ordered), 4),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 4),
            "max": round(ordered[-1], 4), "mean": round(statistics.fmean(ordered), 4)}


def cycles(daemon: subprocess.Popen[bytes], seconds: float, out: dict[str, Any]) -> None:
    """rmmod all three at once, wait for the restore; again, until `seconds` have passed.

    Times are from the start of the rmmod: the daemon starts restoring while rmmod is still removing
    the later modules (each removal takes a while under TCG), so "after rmmod returned" would flatter it.
    """
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline and daemon.poll() is None:
        t0 = time.monotonic()
        rm = subprocess.run(["rmmod", *reversed(MODULES)], capture_output=True, text=True, check=False)
        cycle: dict[str, Any] = {"rmmod_rc": rm.returncode, "rmmod_s": round(time.monotonic() - t0, 4)}
        if rm.returncode != 0:
            cycle["rmmod_err"] = (rm.stdout + rm.stderr).strip()[-300:]
        live = wait_for(all_live, MISS_AFTER - (time.monotonic() - t0))
        cycle["live_s"] = None if live is None else round(time.monotonic() - t0, 4)
        full = wait_for(restored, max(0.0, MISS_AFTER - (time.monotonic() - t0)))
        cycle["restored_s"] = None if full is None else round(time.monotonic() - t0, 4)
        cycle["missed"] = live is None or full is None
        out["cycles"].append(cycle)
        n = len(out["cycles"])
        if n == 1:
            out["usage_after_first_cycle"] = usage(daemon.pid)
        if n % 10 == 0:
            out["usage_samples"].append({"cycle": n, "t_s": round(time.monotonic() - start, 1), **usage(daemon.pid)})
        time.sleep(SETTLE)


def finish(out: dict[str, Any], log_path: Path) -> None:
    """Summaries of the cycles and of the daemon's own records."""
    done = out["cycles"]
    ok = [c for c in done if not c["missed"]]
    out["count"] = len(done)
    out["missed"] = sum(1 for c in done if c["missed"])
    out["rmmod_failed"] = sum(1 for c in done if c["rmmod_rc"] != 0)
    out["live_s"] = summary([c["live_s"] for c in ok])
    out["restored_s"] = summary([c["restored_s"] for c in ok])
    out["rmmod_s"] = summary([c["rmmod_s"] for c in done])
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    finished = [r for r in records if r.get("event") == "restore.finished"]
    out["restores"] = {"ok": sum(1 for r in finished if r.get("result") == "ok"),
                       "failed": sum(1 for r in finished if r.get("result") != "ok")}
    out["failed_details"] = sorted({str(r.get("detail")) for r in finished if r.get("result") != "ok"})[:20]
    out["log_lines"] = len(records)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--seconds", type=float, default=600.0)
    args = ap.parse_args()
    results: Path = args.results
    results.mkdir(parents=True, exist_ok=True)
    cfg = results / "ctwatchd.toml"
    cfg.write_text("[watch]\npoll_interval = 5.0\n[sysctl]\n"
                   + "".join(f'"{k}" = "{v}"\n' for k, v in SYSCTLS.items())
                   + f'[daemon]\nstate_file = "{results}/state.json"\nlog_format = "json"\n'
                   + "[hold]\nenabled = false\n")  # the soak unloads the family: the repair is what it soaks
    cfg.chmod(0o644)
    out: dict[str, Any] = {"uname": os.uname().release, "seconds": args.seconds, "cycles": [],
                           "usage_samples": [], "miss_after_s": MISS_AFTER}
    log_path = results / "daemon.log"
    log = log_path.open("w")
    daemon = subprocess.Popen([sys.executable, "-m", "ctwatchd", "run", "--config", str(cfg)],
                              stdout=log, stderr=log)
    try:
        out["ready_after_s"] = wait_for(lambda: "daemon.ready" in log_path.read_text(), 300, 0.05)
        if out["ready_after_s"] is None or not wait_for(restored, 60):
            out["error"] = "daemon not ready, or the modules not loaded at start"
        else:
            out["usage_start"] = usage(daemon.pid)
            cycles(daemon, args.seconds, out)
            out["usage_end"] = usage(daemon.pid) if daemon.poll() is None else None
    finally:
        out["daemon_exit"] = stop_daemon(daemon)
        log.close()
        finish(out, log_path)
        (results / "soak.json").write_text(json.dumps(out, indent=2))
    return 0 if out["missed"] == 0 and "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main())
