"""Inside the docker boot (see bench/docker_bench.py): unload -> traffic back, ctwatchd vs the runbook.

Usage (in the guest): python3 docker_bench_guest.py RESULTS REPEATS. Stdlib only; reuses the scenario
helpers of tests/vm/systemd/docker_guest.py (copied next to it as /root/docker_guest.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, "/root")
import docker_guest as g

RESULTS, REPEATS = Path(sys.argv[1]), int(sys.argv[2])
URL = f"http://{g.GATEWAY}:{g.PUBLISHED}/"
FLUSH = (["iptables", "-t", "nat", "-F"], ["iptables", "-t", "nat", "-X"], ["iptables", "-F"], ["iptables", "-X"],
         ["nft", "flush", "ruleset"])


def traffic() -> bool:
    return g.fetch_from(None, URL, 2) and g.fetch_from("client", URL, 2)


def runbook() -> None:
    """The seed's chain by hand: modprobe x3, the bridge sysctls, restart docker."""
    for m in g.FAMILY:
        g.sh("modprobe", m)
    g.sh("sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1", "net.bridge.bridge-nf-call-ip6tables=1")
    g.sh("systemctl", "restart", "docker.service", timeout=600)


def fault(kind: str) -> None:
    if kind == "cleanup":
        for argv in FLUSH:
            g.sh(*argv)
        g.sh("rmmod", *g.holders_first(g.FAMILY))
    else:
        g.sh("rmmod", "br_netfilter")


def one(kind: str, by: str) -> dict[str, Any]:
    web0, docker0 = g.container_pid("web"), g.docker_pid()
    if by == "runbook":
        g.must("systemctl", "stop", "ctwatchd.service")
    t0 = time.monotonic()
    fault(kind)
    if by == "runbook":
        runbook()
    back = g.wait_for(traffic, 600, 0.1)
    took = round(time.monotonic() - t0, 2) if back is not None else None
    if by == "runbook":
        g.must("systemctl", "start", "ctwatchd.service")
    g.wait_for(lambda: g.prop("docker.service", "ActiveState") == "active", 300, 1)
    time.sleep(3)
    return {"kind": kind, "by": by, "seconds": took, "docker_restarted": g.docker_pid() != docker0,
            "web_kept_running": g.container_pid("web") == web0}


def main() -> int:
    g.wait_for(lambda: g.prop("docker.service", "ActiveState") == "active", 300, 1)
    g.setup()
    runs = []
    for _ in range(REPEATS):
        for kind in ("bridged", "cleanup"):
            for by in ("ctwatchd", "runbook"):
                runs.append(one(kind, by))
                (RESULTS / "bench.json").write_text(json.dumps({"runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
