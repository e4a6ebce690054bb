"""Helpers for the scripts that run inside the guest (stdlib only): reading /sys and /proc, waiting, and
what the scenario guests share: commands, hooks, one `ctwatchd run` with a JSON log, `ctwatchd check`,
and timing a removal's repair against the bare manual chain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def initstate(module: str) -> str | None:
    return read(f"/sys/module/{module}/initstate")


def sysctl(key: str) -> str | None:
    return read("/proc/sys/" + key.replace(".", "/"))


def instance(module: str) -> int | None:
    """The inode of /sys/module/<module>: a reload makes a new one."""
    try:
        return os.stat(f"/sys/module/{module}").st_ino
    except OSError:
        return None


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.005) -> float | None:
    """Seconds until pred() held, or None if it did not within timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return round(time.monotonic() - t0, 3)
        time.sleep(step)
    return None


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_daemon(proc: subprocess.Popen[Any]) -> int | str:
    """SIGTERM `ctwatchd run` as systemd would; its exit status, or "killed" if it did not stop in 60 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return "killed"


def json_log(path: Path) -> list[dict[str, Any]]:
    """The daemon's audit records from a `log_format = "json"` stderr capture."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


# -- shared by the scenario guests: commands, hooks, one `ctwatchd run`, `ctwatchd check` ----------------
MODULES = ("nf_conntrack", "nf_nat", "br_netfilter")
BRIDGE = {"net.bridge.bridge-nf-call-iptables": "1", "net.bridge.bridge-nf-call-ip6tables": "1"}
# Hooks run as root, so ctwatchd refuses them below group/world-writable directories such as /tmp:
# they live on the guest's own /run.
HOOKDIR = Path("/run/ctwatchd-test")


def sh(*argv: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"{argv}: {p.returncode}: {p.stdout}{p.stderr}")
    return p


def healthy() -> bool:
    return (all(initstate(m) == "live" for m in MODULES)
            and read("/proc/sys/net/netfilter/nf_conntrack_count") is not None
            and all(sysctl(k) == v for k, v in BRIDGE.items()))


def holders_first(modules: tuple[str, ...]) -> list[str]:
    """The modules and everything holding them, holders deepest first: one `rmmod` line for a reload."""
    out: list[str] = []

    def visit(module: str) -> None:
        holders = Path(f"/sys/module/{module}/holders")
        for h in sorted(os.listdir(holders)) if holders.is_dir() else []:
            visit(h)
        if module not in out and initstate(module) is not None:
            out.append(module)

    for m in modules:
        visit(m)
    return out


def hook(name: str, body: str) -> Path:
    HOOKDIR.mkdir(mode=0o700, exist_ok=True)
    path = HOOKDIR / name
    path.write_text("#!/bin/sh\nset -e\n" + body)
    path.chmod(0o755)
    return path


@contextmanager
def daemon(results: Path, phase: str, extra: str) -> Iterator[dict[str, Any]]:
    """Start `ctwatchd run` with this phase's config; stop it with SIGTERM; collect its JSON log.

    Writes results/<phase>.json with what the body put in the dict it is given."""
    cfg = results / f"{phase}.toml"
    cfg.write_text(
        "[watch]\npoll_interval = 2.0\n[sysctl]\n"
        + "".join(f'"{k}" = "{v}"\n' for k, v in BRIDGE.items())
        + f'[daemon]\nstate_file = "{results}/{phase}-state.json"\nlog_format = "json"\n' + extra)
    cfg.chmod(0o644)
    logpath = results / f"{phase}-daemon.log"
    out: dict[str, Any] = {"config": cfg.read_text()}
    with open(logpath, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ctwatchd", "run", "--config", str(cfg)],
                                stdout=log, stderr=log)
        out["pid"] = proc.pid
        out["ready_after_s"] = wait_for(lambda: "daemon.ready" in logpath.read_text(), 180, 0.1)
        try:
            yield out
        finally:
            out["alive_at_end"] = proc.poll() is None
            out["exit"] = stop_daemon(proc)
    out["log"] = json_log(logpath)
    (results / f"{phase}.json").write_text(json.dumps(out, indent=2))


def check_json(results: Path, phase: str) -> dict[str, Any]:
    """`ctwatchd check --json` with the phase's config: its exit status and its report."""
    p = sh(sys.executable, "-m", "ctwatchd", "check", "--json", "--config", str(results / f"{phase}.toml"))
    return {"exit": p.returncode, "report": json.loads(p.stdout) if p.stdout.startswith("{") else p.stdout}


# -- restore time: ctwatchd against the bare manual chain (bench/vm_bench_guest.py, tests/vm/bullseye_guest.py)
def manual_chain(removed: Sequence[str], sysctls: Mapping[str, str]) -> None:
    """What an admin types after `rmmod <removed>`: modprobe each, dependencies first, then the sysctls."""
    for m in reversed(removed):  # rmmod order reversed: dependencies first
        subprocess.run(["modprobe", m], check=True)
    for k, v in sysctls.items():
        subprocess.run(["sysctl", "-qw", f"{k}={v}"], check=True)


def timed_removal(removed: Sequence[str], restored: Callable[[], bool],
                  after_rmmod: Callable[[Sequence[str]], None]) -> tuple[float, float]:
    """(rmmod start -> restored() again, in seconds; rmmod's return, monotonic). `after_rmmod` runs right
    after the rmmod: the manual chain, or nothing while ctwatchd repairs."""
    if wait_for(restored, 60, 0.001) is None:
        raise AssertionError("not healthy before the removal")
    time.sleep(0.3)
    t0 = time.monotonic()
    subprocess.run(["rmmod", *removed], check=True)
    t_rm = time.monotonic()
    after_rmmod(removed)
    if wait_for(restored, 60, 0.001) is None:
        raise AssertionError(f"not restored after removing {list(removed)}")
    return time.monotonic() - t0, t_rm
