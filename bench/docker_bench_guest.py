"""Inside the docker boot (see bench/docker_bench.py): fault -> traffic back, ctwatchd vs the runbook, traced.

Usage (in the guest): python3 docker_bench_guest.py RESULTS REPEATS. Stdlib only; reuses the scenario
helpers of tests/vm/systemd/docker_guest.py (copied next to it as /root/docker_guest.py).

Both sides are measured the same way: the fault, then one light probe (curl from the host, and from
the client container's network namespace entered by a pid looked up before the fault) every
PROBE_EVERY seconds until both answer. The runbook's chain runs in a thread started right after the
fault, so the probe overlaps it exactly as it overlaps ctwatchd's repair. The order of the two sides
alternates from one repeat to the next. Each run keeps a trace: ctwatchd's records with their
CLOCK_MONOTONIC time, docker's start and active times and MainPID, the runbook's step times, and
`iptables-save` before the fault, after it and after the repair.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, "/root")
import docker_guest as g

RESULTS, REPEATS = Path(sys.argv[1]), int(sys.argv[2])
URL = f"http://{g.GATEWAY}:{g.PUBLISHED}/"
PROBE_EVERY = 0.1
FLUSH = (["iptables", "-t", "nat", "-F"], ["iptables", "-t", "nat", "-X"], ["iptables", "-F"], ["iptables", "-X"],
         ["nft", "flush", "ruleset"])
TRACED = ("module.event", "restore.planned", "restore.step", "docker.decision", "docker.baseline",
          "restore.finished")


def rules() -> str:
    return g.sh("iptables-save").stdout


def docker_times() -> dict[str, Any]:
    """docker.service's last start and active transitions (CLOCK_MONOTONIC, seconds) and its MainPID."""
    def mono(name: str) -> float | None:
        value = g.prop("docker.service", name)
        return int(value) / 1e6 if value.isdigit() and value != "0" else None
    return {"exec_start": mono("ExecMainStartTimestampMonotonic"),
            "active_enter": mono("ActiveEnterTimestampMonotonic"), "main_pid": g.docker_pid()}


class Probe:
    """Container traffic: the published port from the host, and from the client container."""

    def __init__(self) -> None:
        self.client = g.container_pid("client")

    def __call__(self) -> bool:
        if not os.path.exists(f"/proc/{self.client}"):  # only if the container was restarted
            self.client = g.container_pid("client")
        return g.fetch_from(None, URL, 2) and g.fetch_from("client", URL, 2, pid=self.client)


def runbook(steps: list[tuple[str, float]]) -> None:
    """The seed's chain typed at once: modprobe x3, the bridge sysctls, restart docker."""
    for m in g.FAMILY:
        g.sh("modprobe", m)
        steps.append((f"modprobe {m}", time.monotonic()))
    g.sh("sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1")
    steps.append(("sysctl -w", time.monotonic()))
    g.sh("systemctl", "restart", "docker.service", timeout=600)
    steps.append(("systemctl restart docker", time.monotonic()))


def fault(kind: str) -> None:
    if kind == "cleanup":
        for argv in FLUSH:
            g.sh(*argv)
        g.sh("rmmod", *g.holders_first(g.FAMILY))
    else:
        g.sh("rmmod", "br_netfilter")


def records(since: str) -> list[dict[str, Any]]:
    """ctwatchd's records of this run, each with journald's CLOCK_MONOTONIC receive time."""
    text = g.sh("journalctl", "-u", "ctwatchd", "-o", "json", "--since", since).stdout
    out = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        e = json.loads(line)
        if e.get("CTWATCHD_EVENT") not in TRACED:
            continue
        out.append({"event": e["CTWATCHD_EVENT"], "at": int(e["__MONOTONIC_TIMESTAMP"]) / 1e6,
                    **{k.removeprefix("CTWATCHD_").lower(): v for k, v in e.items()
                       if k in ("MODULE", "ACTION", "RESULT", "DURATION_MS")
                       or k in ("CTWATCHD_RESTART", "CTWATCHD_REASON", "CTWATCHD_DETAIL", "CTWATCHD_MONOTONIC")}})
    return out


def one(kind: str, by: str, repeat: int) -> dict[str, Any]:
    probe = Probe()
    web0, before = g.container_pid("web"), docker_times()
    rules_before = rules()
    if by == "runbook":
        g.must("systemctl", "stop", "ctwatchd.service")
    since = g.now_stamp()
    steps: list[tuple[str, float]] = []
    t0 = time.monotonic()
    fault(kind)
    t_fault = time.monotonic()
    chain = threading.Thread(target=runbook, args=(steps,)) if by == "runbook" else None
    if chain is not None:
        chain.start()
    rules_fault = rules()  # on both sides while the repair already runs: the same cost for each
    back = None
    while time.monotonic() - t0 < 600:
        if probe():
            back = time.monotonic()
            break
        time.sleep(PROBE_EVERY)
    if chain is not None:
        chain.join(600)
    rules_after = rules()
    if by == "runbook":
        g.must("systemctl", "start", "ctwatchd.service")
    g.wait_for(lambda: g.prop("docker.service", "ActiveState") == "active", 300, 1)
    time.sleep(3)  # the last records reach the journal
    after = docker_times()

    def rel(t: float | None) -> float | None:
        return round(t - t0, 3) if t is not None else None

    trace = [{**r, "at": rel(r["at"])} for r in records(since)] if by == "ctwatchd" else []
    return {"kind": kind, "by": by, "repeat": repeat, "seconds": rel(back), "fault_s": rel(t_fault),
            "docker_restarted": after["main_pid"] != before["main_pid"],
            "docker_exec_start_s": rel(after["exec_start"]) if after["main_pid"] != before["main_pid"] else None,
            "docker_active_s": rel(after["active_enter"]) if after["main_pid"] != before["main_pid"] else None,
            "docker_pid": [before["main_pid"], after["main_pid"]],
            "web_kept_running": g.container_pid("web") == web0,
            "runbook_steps": [(name, rel(t)) for name, t in steps], "trace": trace,
            "iptables": {"before": rules_before, "after_fault": rules_fault, "after_repair": rules_after}}


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    g.wait_for(lambda: g.prop("docker.service", "ActiveState") == "active", 300, 1)
    g.setup()
    runs = []
    for repeat in range(REPEATS):
        # Alternate which side goes first, so a drift within the boot (caches, docker's own state)
        # does not always favour the same one.
        sides = ("ctwatchd", "runbook") if repeat % 2 == 0 else ("runbook", "ctwatchd")
        for kind in ("bridged", "cleanup"):
            for by in sides:
                runs.append(one(kind, by, repeat))
                (RESULTS / "bench.json").write_text(json.dumps({"runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
