"""Measure what the daemon costs on this machine: start -> READY=1, import time, idle RSS and CPU.

Usage: python bench/daemon_costs.py [--starts 20] [--idle 60]
Prints a table. Runs the installed `ctwatchd` console script next to this interpreter, as systemd
would start it, with a real NOTIFY_SOCKET; the kernel is only read, never changed (a temp state file).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent / "ctwatchd"


def start_to_ready(cfg: Path, sock_path: str) -> tuple[float, subprocess.Popen[bytes]]:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(sock_path)
    server.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": sock_path}
    t0 = time.monotonic()
    proc = subprocess.Popen([str(BIN), "run", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while b"READY=1" not in server.recv(4096):
            pass
        return time.monotonic() - t0, proc
    finally:
        server.close()
        os.unlink(sock_path)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=20)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) if m else -1


def import_breakdown(top: int = 8) -> list[tuple[str, float]]:
    p = subprocess.run([sys.executable, "-X", "importtime", "-c",
                        "import ctwatchd.cli, ctwatchd.daemon, ctwatchd.uevents, ctwatchd.audit; "
                        "import pyudev, structlog, sdnotify"], capture_output=True, text=True, check=True)
    rows = []
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) <= 1:  # top-level imports only
            rows.append((m.group(3), int(m.group(1)) / 1000))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=20)
    ap.add_argument("--idle", type=float, default=60.0, help="seconds to sit idle before RSS/CPU are read")
    ap.add_argument("--poll-interval", type=float, default=5.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "ctwatchd.toml"
        cfg.write_text(f'[watch]\npoll_interval = {args.poll_interval}\n'
                       f'[daemon]\nstate_file = "{tmp}/state.json"\nlog_format = "console"\n')
        times = []
        for i in range(args.starts):
            took, proc = start_to_ready(cfg, f"{tmp}/notify{i}.sock")
            times.append(took * 1000)
            stop(proc)
        took, proc = start_to_ready(cfg, f"{tmp}/notify-idle.sock")
        time.sleep(2)  # past start-up
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.idle)
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        rss = rss_kib(proc.pid)
        stop(proc)
    per_hour = (cpu1 - cpu0) / (t1 - t0) * 3600
    print(f"machine: {os.uname().release}, {os.cpu_count()} cpus, python {sys.version.split()[0]}")
    print(f"{'measure':<40} {'value':>12}  goal")
    print(f"{'start -> READY=1, median of ' + str(args.starts):<40} {statistics.median(times):>9.1f} ms  <= 150 ms")
    print(f"{'start -> READY=1, min / max':<40} {min(times):>5.0f}/{max(times):<5.0f} ms")
    print(f"{'steady RSS after ' + format(args.idle, '.0f') + ' s idle':<40} {rss / 1024:>9.1f} MB  <= 25 MB")
    print(f"{'idle CPU (poll ' + str(args.poll_interval) + ' s)':<40} {per_hour:>9.3f} s/h  <= 0.2 s/h")
    print("\nimport time, top-level modules (cumulative ms):")
    for name, ms in import_breakdown():
        print(f"  {name:<30} {ms:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
