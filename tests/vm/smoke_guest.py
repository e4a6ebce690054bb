"""Runs INSIDE the guest (as root, venv python): probe the kernel, write results.json.

Usage: python smoke_guest.py RESULTS_DIR
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyudev

NF_MODULES = ("nf_conntrack", "nf_nat", "br_netfilter")


def run(*argv: str, timeout: float = 30) -> dict[str, Any]:
    """Run argv and record everything about it; a missing binary is not an error here."""
    if shutil.which(argv[0]) is None:
        return {"argv": list(argv), "missing": True}
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    return {
        "argv": list(argv),
        "rc": proc.returncode,
        "out": proc.stdout.strip(),
        "err": proc.stderr.strip(),
        "seconds": round(time.monotonic() - start, 3),
    }


def read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def watch_remove(module: str, timeout: float) -> dict[str, Any]:
    """rmmod ``module`` while a pyudev kernel-source monitor listens for its uevent."""
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
    monitor.start()  # bound before rmmod: the socket buffers what comes next
    rmmod = run("rmmod", module)
    events: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        device = monitor.poll(timeout=left)
        if device is None:
            break
        props = {key: str(device.properties[key]) for key in device.properties}
        events.append(props)
        if props.get("ACTION") == "remove" and props.get("DEVPATH") == f"/module/{module}":
            break
    return {"rmmod": rmmod, "events": events, "gone": not Path(f"/sys/module/{module}").exists()}


def main(results: Path) -> int:
    release = os.uname().release
    modules_dep = read(f"/lib/modules/{release}/modules.dep") or ""
    dep_names = {Path(line.split(":", 1)[0]).name for line in modules_dep.splitlines()}
    facts: dict[str, Any] = {
        "uname_r": release,
        "proc_config_gz": Path("/proc/config.gz").exists(),
        "modules_dep_lines": len(modules_dep.splitlines()),
        "legacy_modules_in_dep": {
            name: any(n.startswith(name + ".ko") for n in dep_names) for name in ("nf_conntrack_ipv4", "nf_nat_ipv4")
        },
        "show_depends_nf_nat": run("modprobe", "--show-depends", "nf_nat"),
        "iptables": run("iptables", "--version"),
        "iptables_legacy": run("iptables-legacy", "--version"),
        "iptables_nft": run("iptables-nft", "--version"),
        "nft": run("nft", "--version"),
        "py_import_warm": run(sys.executable, "-c", "import pyudev, structlog"),
    }
    # Without -a, modprobe treats every name after the first as a module parameter.
    facts["modprobe_plain"] = run("modprobe", *NF_MODULES)
    facts["loaded_after_plain"] = {m: Path(f"/sys/module/{m}").exists() for m in NF_MODULES}
    facts["modprobe"] = run("modprobe", "-a", *NF_MODULES)
    facts["initstate"] = {m: read(f"/sys/module/{m}/initstate") for m in NF_MODULES}
    facts["lsmod_nf"] = [line for line in (read("/proc/modules") or "").splitlines() if "nf_" in line or "br_" in line]
    facts["remove_br_netfilter"] = watch_remove("br_netfilter", timeout=15)
    facts["uptime_at_end"] = read("/proc/uptime")
    (results / "results.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
