"""Restore time on a real kernel (ctwatchd vs the bare manual chain), detection latency, storm safety.

Usage: python bench/vm_bench.py [--repeats 8] [--kernel bookworm|bullseye]
Boots Debian's modular kernel under QEMU/TCG (tests/vm/guest.py; `bash tests/vm/prepare.sh` first):
bookworm's 6.1 (the README's figures), or bullseye's 5.10 for the same figures on a kernel without owner tables.
Under TCG absolute times are inflated; compare the ratio, which the emulation affects about equally.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "vm"))

import guest  # noqa: E402

KERNELS = {"bookworm": guest.KERNEL_ROOT, "bullseye": guest.BULLSEYE_KERNEL_ROOT}


def latencies(log: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """For each uevent-triggered restore: remove event received -> plan, and -> first modprobe started."""
    to_plan, to_modprobe = [], []
    pending: float | None = None
    planned: float | None = None
    for e in log:
        ev = e.get("event")
        if ev == "module.event" and e.get("action") == "remove" and pending is None:
            pending = e["monotonic"]
        elif ev == "restore.planned" and pending is not None and planned is None:
            planned = e["monotonic"]
            to_plan.append((planned - pending) * 1000)
        elif ev == "restore.step" and e.get("action") == "load-module" and pending is not None:
            to_modprobe.append((e["monotonic"] - pending) * 1000)
            pending = planned = None
    return to_plan, to_modprobe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--kernel", choices=sorted(KERNELS), default="bookworm")
    args = ap.parse_args()
    kernel = KERNELS[args.kernel]
    missing = guest.vm_available(kernel)
    if missing:
        print(missing)
        return 2
    with tempfile.TemporaryDirectory(prefix="ctwatchd-bench-") as tmp:
        rw = Path(tmp)
        script = f'"$PY" {shlex.quote(str(HERE / "vm_bench_guest.py"))} "$RESULTS" {args.repeats} > guest.log 2>&1\n'
        run = guest.boot(script, timeout=1800, rwdir=rw, kernel=kernel)
        if run.returncode != 0:
            print((rw / "guest.log").read_text()[-3000:] if (rw / "guest.log").exists() else run.console[-3000:])
            return 1
        data = json.loads((rw / "bench.json").read_text())
    print(f"guest kernel {data['uname']} under QEMU/TCG, {args.repeats} removals per case, medians")
    print(f"{'case':<14} {'bare chain':>11} {'ctwatchd':>10} {'ratio':>7}   (goal <= 1.10)")
    for case in data["bare"]:
        bare = statistics.median(data["bare"][case]) * 1000
        ctw = statistics.median(data["ctwatchd"][case]) * 1000
        print(f"{case:<14} {bare:>8.0f} ms {ctw:>7.0f} ms {ctw / bare:>7.2f}")
    to_plan, to_modprobe = latencies(data["log"])
    if to_modprobe:
        def p90(xs: list[float]) -> float:
            return sorted(xs)[int(len(xs) * 0.9)]

        print(f"\nremove uevent received -> reconcile begins:   median {statistics.median(to_plan):6.1f} ms, "
              f"p90 {p90(to_plan):6.1f} ms (n={len(to_plan)})")
        print(f"remove uevent received -> modprobe started:  median {statistics.median(to_modprobe):6.1f} ms, "
              f"p90 {p90(to_modprobe):6.1f} ms (TCG, state file on 9p; goal <= 10 ms outside a VM)")
    s = data["storm"]
    print(f"\nstorm: {s['events']} unrelated uevents in {s['seconds']} s with one rmmod inside: ctwatchd used "
          f"{s['ctwatchd_cpu_s']} CPU-s, module restored: {s['restored_after_storm']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
