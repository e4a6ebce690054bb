"""Helpers for the scripts that run inside the guest (stdlib only): reading /sys and /proc, waiting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
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
