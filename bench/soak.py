"""Soak ctwatchd on a real modular kernel: boot the VM guest, remove and restore the modules for N minutes.

Usage: python bench/soak.py [--minutes 10] [--results DIR]

Boots the guest with the VM tier's harness (tests/vm/guest.py; `bash tests/vm/prepare.sh` installs
what it needs) and runs bench/soak_guest.py in it: `ctwatchd run`, then one
`rmmod br_netfilter nf_nat nf_conntrack` after another, each waited for until the daemon has put all
three back. Prints cycles, missed restores (not back within 60 s), the daemon's RSS and open fds at
start and end, and cycle times. QEMU runs under TCG and takes both cores of a small machine, so this
waits while another VM (`pgrep -f qemu-system`) is running rather than share the CPU with it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GUEST_SCRIPT = REPO / "bench" / "soak_guest.py"
BOOT_SLACK = 900.0  # seconds on top of the soak itself: boot under TCG, Python start, daemon start, stop


def load_guest() -> ModuleType:
    """tests/vm/guest.py, imported by path (tests/vm is not a package)."""
    spec = importlib.util.spec_from_file_location("ctwatchd_vm_guest", REPO / "tests" / "vm" / "guest.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("cannot load tests/vm/guest.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def other_vms() -> list[str]:
    p = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True, check=False)
    return [line for line in p.stdout.splitlines() if line.strip()]


def wait_for_other_vms(limit: float) -> None:
    deadline = time.monotonic() + limit
    while running := other_vms():
        if time.monotonic() > deadline:
            raise SystemExit(f"soak: another VM is still running after {limit:.0f} s; not starting a second one")
        print(f"soak: waiting for another VM to finish: {running[0][:100]}", file=sys.stderr, flush=True)
        time.sleep(15)


def kib(value: Any) -> str:  # noqa: ANN401 - a JSON number or null
    return "-" if value is None else f"{value / 1024:.1f} MiB"


def samples(data: dict[str, Any]) -> str:
    """RSS every 10th cycle, thinned to at most 12 values: does it level off or keep climbing?"""
    points = data.get("usage_samples") or []
    step = max(1, len(points) // 12)
    return " ".join(str(p["rss_kib"]) for p in points[::step]) or "-"


def table(data: dict[str, Any], boot_seconds: float) -> str:
    start = data.get("usage_start") or {}
    warm = data.get("usage_after_first_cycle") or {}
    end = data.get("usage_end") or {}
    rss0, rss1, rssw = start.get("rss_kib"), end.get("rss_kib"), warm.get("rss_kib")
    growth = "-" if rss0 is None or rss1 is None else f"{rss1 - rss0:+d} KiB ({(rss1 - rss0) / rss0 * 100:+.1f} %)"
    growth_warm = "-" if rssw is None or rss1 is None else f"{rss1 - rssw:+d} KiB"
    live, full, rmmod = data.get("live_s") or {}, data.get("restored_s") or {}, data.get("rmmod_s") or {}

    def s(stats: dict[str, Any], key: str) -> str:
        v = stats.get(key)
        return "-" if v is None else f"{v:.3f} s"

    rows = [
        ("guest kernel", data.get("uname", "?")),
        ("soak duration", f"{data.get('seconds', 0):.0f} s (VM boot + start + stop: {boot_seconds:.0f} s total)"),
        ("cycles", str(data.get("count", 0))),
        ("missed restores (> 60 s)", str(data.get("missed", "?"))),
        ("rmmod failures", str(data.get("rmmod_failed", "?"))),
        ("restores ok / failed", f"{data.get('restores', {}).get('ok', '?')} / "
                                 f"{data.get('restores', {}).get('failed', '?')}"),
        ("rmmod itself: median / max", f"{s(rmmod, 'median')} / {s(rmmod, 'max')}"),
        ("rmmod start -> all live: median / p95 / max",
         f"{s(live, 'median')} / {s(live, 'p95')} / {s(live, 'max')}"),
        ("rmmod start -> restored incl. sysctls: median / p95 / max",
         f"{s(full, 'median')} / {s(full, 'p95')} / {s(full, 'max')}"),
        ("RSS start / after 1st cycle / end", f"{kib(rss0)} / {kib(rssw)} / {kib(rss1)}"),
        ("RSS growth start->end (after 1st cycle->end)", f"{growth} ({growth_warm})"),
        ("RSS at every 10th cycle (KiB)", samples(data)),
        ("open fds start / end", f"{start.get('fds', '-')} / {end.get('fds', '-')}"),
        ("daemon exit", str(data.get("daemon_exit"))),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if data.get("failed_details"):
        lines.append("failed restore details: " + "; ".join(data["failed_details"]))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--results", type=Path, default=None,
                    help="directory for soak.json, daemon.log and the console (default .cache/soak/<time>)")
    ap.add_argument("--wait-for-other-vms", type=float, default=3600.0, metavar="SECONDS",
                    help="how long to wait while another qemu-system runs (default 3600)")
    args = ap.parse_args()
    guest = load_guest()
    missing = guest.vm_available()
    if missing:
        print(f"soak: {missing}", file=sys.stderr)
        return 2
    results: Path = args.results or REPO / ".cache" / "soak" / time.strftime("%Y%m%d-%H%M%S")
    results.mkdir(parents=True, exist_ok=True)
    seconds = args.minutes * 60
    wait_for_other_vms(args.wait_for_other_vms)
    script = (f'"$PY" {shlex.quote(str(GUEST_SCRIPT))} "$RESULTS" --seconds {seconds:.0f} '
              "> soak_guest.log 2>&1\n")
    print(f"soak: booting the guest for {args.minutes:g} min of rmmod/restore cycles; results in {results}",
          file=sys.stderr, flush=True)
    run = guest.boot(script, timeout=seconds + BOOT_SLACK, rwdir=results)
    data_file = results / "soak.json"
    if not data_file.exists():
        log = results / "soak_guest.log"
        print(f"soak: no soak.json (timed out: {run.timed_out}, rc {run.returncode})", file=sys.stderr)
        print(log.read_text()[-3000:] if log.exists() else run.console[-3000:], file=sys.stderr)
        return 1
    data: dict[str, Any] = json.loads(data_file.read_text())
    print(table(data, float(run.elapsed)))
    print(f"(details: {data_file}; daemon log: {results / 'daemon.log'})")
    return 0 if run.returncode == 0 and data.get("missed") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
