"""Docker hosts: time from a fault to container traffic back, ctwatchd vs the runbook by hand, traced.

Usage: python bench/docker_bench.py [--repeats 5] [--json runs.json]
Boots the bookworm root with Debian's docker.io under systemd as PID 1 (QEMU/TCG; run
`bash tests/vm/prepare.sh` and `bash tests/vm/systemd/build-root.sh` first), with the setup of
tests/vm/systemd/test_docker.py: live-restore on, `docker = "if-needed"`, a published port, the hold
off (this measures the repair; bench/hold_bench.py measures the hold). Two faults: `rmmod br_netfilter`
(docker's rules intact) and a firewall clean-up (ruleset flushed, the family unloaded holders-first).
Two repairs on the same boot, in alternating order: ctwatchd, and the seed's chain typed at once
(modprobe x3, sysctl -w, systemctl restart docker) with ctwatchd stopped. Traffic = the published
port answers from the host and from a container, probed the same way for both. Every run is printed
with its trace: when ctwatchd saw the fault, planned, had the modules back, decided about docker and
finished, when docker was started and active again. Absolute times are TCG's; compare the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SYSTEMD = HERE.parent / "tests" / "vm" / "systemd"
sys.path.insert(0, str(SYSTEMD))

import sysguest  # noqa: E402


def scenario_files() -> tuple[dict[str, str | bytes | Path], dict[str, str]]:
    spec = importlib.util.spec_from_file_location("test_docker", SYSTEMD / "test_docker.py")
    assert spec is not None and spec.loader is not None
    td = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(td)
    files: dict[str, str | bytes | Path] = {
        # Every run may restart docker: a breaker sized for the boot, not for the bench.
        "/etc/ctwatchd/ctwatchd.toml": td.CONFIG.replace("max_restarts = 10", "max_restarts = 1000"),
        "/etc/docker/daemon.json": td.DAEMON_JSON,
        "/etc/systemd/system/var-lib-docker.mount": td.TMPFS_MOUNT % ("docker's state", "/var/lib/docker"),
        "/etc/systemd/system/var-lib-containerd.mount": td.TMPFS_MOUNT % ("containerd's state", "/var/lib/containerd"),
        "/etc/systemd/system/docker.service.d/tmpfs.conf": td.DOCKER_DROPIN,
        "/root/docker_guest.py": SYSTEMD / "docker_guest.py",
        "/root/docker_bench_guest.py": HERE / "docker_bench_guest.py",
    }
    links = {f"{td.WANTS}/ctwatchd.service": "/etc/systemd/system/ctwatchd.service",
             f"{td.WANTS}/docker.service": "/lib/systemd/system/docker.service",
             f"{td.WANTS}/containerd.service": "/lib/systemd/system/containerd.service"}
    return files, links


def breakdown(run: dict[str, Any]) -> str:
    """Where the time went in one run, seconds from the fault's start."""
    def at(event: str, *, last: bool = False, **match: str) -> float | None:
        hits = [r["at"] for r in run["trace"] if r["event"] == event and all(r.get(k) == v for k, v in match.items())]
        return (hits[-1] if last else hits[0]) if hits else None

    marks: list[tuple[str, float | None]] = [("fault done", run["fault_s"])]
    if run["by"] == "ctwatchd":
        decisions = [r for r in run["trace"] if r["event"] == "docker.decision"]
        marks += [("uevent", at("module.event", action="remove")), ("planned", at("restore.planned")),
                  ("modules", at("restore.step", last=True, action="load-module")),
                  ("sysctls", at("restore.step", last=True, action="write-sysctls")),
                  ("decided", decisions[0]["at"] if decisions else None)]
        if decisions:
            marks.append((f"restart={decisions[0].get('restart')}", None))
        marks.append(("finished", at("restore.finished", last=True)))
    else:
        marks += [(name, t) for name, t in run["runbook_steps"]]
    if run["docker_restarted"]:
        marks += [("docker exec", run["docker_exec_start_s"]), ("docker active", run["docker_active_s"])]
    marks.append(("traffic", run["seconds"]))
    plans = sum(1 for r in run["trace"] if r["event"] == "restore.planned")
    text = "  ".join(f"{name} {t:.1f}" if t is not None else name for name, t in marks)
    return text + (f"  ({plans} plans)" if run["by"] == "ctwatchd" else "")


def rule_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("-A "))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write every run (trace and iptables-save texts) here")
    args = ap.parse_args()
    missing = sysguest.missing_prerequisites()
    root = sysguest.SYSROOT
    if missing or not (root / "usr/sbin/dockerd").exists():
        print("needs:", ", ".join(missing) or "docker.io in the root (tests/vm/systemd/build-root.sh)")
        return 2
    files, links = scenario_files()
    with tempfile.TemporaryDirectory(prefix="ctwatchd-docker-bench-") as tmp:
        work = Path(tmp)
        with sysguest.ctwatchd_installed(root, work, files):
            for link, target in links.items():
                path = root / link.lstrip("/")
                path.unlink(missing_ok=True)
                path.symlink_to(target)
            try:
                boot = sysguest.boot_systemd(root, f"python3 /root/docker_bench_guest.py results {args.repeats}\n",
                                             timeout=3600, results=work / "results", memory="2G",
                                             append=("apparmor=0",))
            finally:
                for link in links:
                    (root / link.lstrip("/")).unlink(missing_ok=True)
        result = work / "results/bench.json"
        if not result.exists():
            print(boot.output[-3000:])
            return 1
        runs = json.loads(result.read_text())["runs"]
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=2))
    print(f"docker.io (bookworm) under systemd, QEMU/TCG, {args.repeats} repeats per fault and side, "
          f"alternating order; boot {boot.elapsed:.0f} s")
    print("per run: seconds from the fault's start; rules = iptables -A lines before / after the fault / after "
          "the repair")
    for run in runs:
        took = f"{run['seconds']:.1f} s" if run["seconds"] is not None else "never"
        rules = "/".join(str(rule_lines(run["iptables"][k])) for k in ("before", "after_fault", "after_repair"))
        restarted, kept = ("yes" if run[k] else "no" for k in ("docker_restarted", "web_kept_running"))
        print(f"  {run['kind']:<8} {run['by']:<8} #{run['repeat']}  {took:>7}  docker restarted: {restarted:<3}  "
              f"web kept: {kept}  rules {rules}")
        print(f"      {breakdown(run)}")
    print(f"{'fault':<9} {'runbook':>9} {'ctwatchd':>9} {'ratio':>6}   per-run seconds (runbook | ctwatchd)   "
          "docker restarts (ctwatchd/runbook)")
    for kind in ("bridged", "cleanup"):
        by = {who: [r for r in runs if r["kind"] == kind and r["by"] == who] for who in ("ctwatchd", "runbook")}
        times = {who: [r["seconds"] for r in rs if r["seconds"] is not None] for who, rs in by.items()}
        med = {who: statistics.median(ts) if ts else float("nan") for who, ts in times.items()}
        restarts = "/".join(f"{sum(r['docker_restarted'] for r in by[w])} of {len(by[w])}" for w in by)
        each = " ".join(f"{t:.1f}" for t in times["runbook"]) + " | " + " ".join(f"{t:.1f}" for t in times["ctwatchd"])
        print(f"{kind:<9} {med['runbook']:>8.1f}s {med['ctwatchd']:>8.1f}s {med['ctwatchd'] / med['runbook']:>6.2f}"
              f"   {each}   {restarts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
