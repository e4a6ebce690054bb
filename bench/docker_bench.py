"""Docker hosts: time from a module unload to container traffic back, ctwatchd vs the runbook by hand.

Usage: python bench/docker_bench.py [--repeats 3]
Boots the bookworm root with Debian's docker.io under systemd as PID 1 (QEMU/TCG; run
`bash tests/vm/prepare.sh` and `bash tests/vm/systemd/build-root.sh` first), with the same setup as
tests/vm/systemd/test_docker.py: live-restore on, `docker = "if-needed"`, a published port.
Two faults: `rmmod br_netfilter` (docker's rules intact) and a firewall clean-up (ruleset flushed,
the family unloaded). Two repairs on the same boot: ctwatchd, and the seed's chain typed at once
(modprobe x3, sysctl -w, systemctl restart docker) with ctwatchd stopped. Traffic = the published
port answers from the host and from a container. Absolute times are TCG's; compare the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

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
        "/etc/ctwatchd/ctwatchd.toml": td.CONFIG,
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
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
    print(f"docker.io (bookworm) under systemd, QEMU/TCG, {args.repeats} runs per case, medians; "
          f"boot {boot.elapsed:.0f} s")
    print(f"{'fault':<9} {'runbook':>9} {'ctwatchd':>9} {'ratio':>6}   docker restarts (ctwatchd/runbook)   "
          "web kept running (ctwatchd/runbook)")
    for kind in ("bridged", "cleanup"):
        by = {who: [r for r in runs if r["kind"] == kind and r["by"] == who] for who in ("ctwatchd", "runbook")}
        times = {who: [r["seconds"] for r in rs if r["seconds"] is not None] for who, rs in by.items()}
        med = {who: statistics.median(ts) if ts else float("nan") for who, ts in times.items()}
        restarts = "/".join(f"{sum(r['docker_restarted'] for r in by[w])}/{len(by[w])}" for w in by)
        kept = "/".join(f"{sum(r['web_kept_running'] for r in by[w])}/{len(by[w])}" for w in by)
        print(f"{kind:<9} {med['runbook']:>8.1f}s {med['ctwatchd']:>8.1f}s {med['ctwatchd'] / med['runbook']:>6.2f}"
              f"   {restarts:<36} {kept}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
