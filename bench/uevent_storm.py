"""CPU spent by `ctwatchd run` during a storm of unrelated kernel uevents, next to `udevadm monitor --kernel`.

Usage: python bench/uevent_storm.py [--events 20000]   (root; needs udevadm: Debian package `udev`)
Both listen to the same kernel uevent netlink group; the storm writes "change" to
/sys/class/net/*/uevent, which makes the kernel emit one uevent per write. The module-event half of
the claim (none missed inside a storm) needs loadable modules: bench/vm_bench.py measures it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent / "ctwatchd"


def cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20000)
    args = ap.parse_args()
    udevadm = shutil.which("udevadm") or shutil.which("udevadm", path="/usr/bin:/bin:/sbin")
    if udevadm is None:
        print("udevadm not found: apt-get install udev")
        return 2
    paths = [f"/sys/class/net/{n}/uevent" for n in sorted(os.listdir("/sys/class/net"))]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "c.toml"
        cfg.write_text(f'[daemon]\nstate_file = "{tmp}/s.json"\nlog_format = "console"\n')
        ctw = subprocess.Popen([str(BIN), "run", "--config", str(cfg)], stderr=subprocess.DEVNULL)
        udev = subprocess.Popen([udevadm, "monitor", "--kernel"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(2.0)
        c0, u0 = cpu(ctw.pid), cpu(udev.pid)
        t0 = time.monotonic()
        n = 0
        while n < args.events:
            for p in paths:
                with open(p, "w") as fh:
                    fh.write("change")
                n += 1
        took = time.monotonic() - t0
        time.sleep(1.0)  # let both drain what is queued
        c1, u1 = cpu(ctw.pid), cpu(udev.pid)
        alive = ctw.poll() is None
        for proc in (ctw, udev):
            proc.terminate()
            proc.wait(timeout=20)
    ctw_cpu, udev_cpu = c1 - c0, u1 - u0
    print(f"{n} uevents in {took:.1f} s ({n / took:.0f}/s) on {os.uname().release}")
    print(f"  ctwatchd run:            {ctw_cpu:6.2f} CPU-s  (alive afterwards: {alive})")
    print(f"  udevadm monitor --kernel:{udev_cpu:6.2f} CPU-s")
    if udev_cpu > 0:
        print(f"  ratio {ctw_cpu / udev_cpu:.2f}x  (goal <= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
