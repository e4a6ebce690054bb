"""Runs inside the guest: restore time with ctwatchd vs the bare manual chain, detection latency, and
module events inside a uevent storm. Usage: python vm_bench_guest.py RESULTS_DIR REPEATS.
Writes RESULTS_DIR/bench.json; bench/vm_bench.py boots the guest and prints the table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "vm"))

from guestlib import cpu_seconds, manual_chain, read, timed_removal, wait_for

RESULTS = Path(sys.argv[1])
REPEATS = int(sys.argv[2])
MODULES = ("nf_conntrack", "nf_nat", "br_netfilter")
BRIDGE = {"net.bridge.bridge-nf-call-iptables": "1", "net.bridge.bridge-nf-call-ip6tables": "1"}
CASES = {"br_netfilter": ["br_netfilter"], "nf_nat": ["nf_nat"], "all three": ["br_netfilter", "nf_nat",
                                                                               "nf_conntrack"]}




def restored() -> bool:
    return (all(read(f"/sys/module/{m}/initstate") == "live" for m in MODULES)
            and all(read("/proc/sys/" + k.replace(".", "/")) == v for k, v in BRIDGE.items()))


def wait(pred: Callable[[], bool], timeout: float = 60.0) -> bool:
    return wait_for(pred, timeout, 0.001) is not None


def bare_chain(case: Sequence[str]) -> None:
    """What an admin types after the same rmmod: modprobe in order, then the two sysctls."""
    manual_chain(case, BRIDGE)


def storm(seconds: float) -> int:
    """Unrelated kernel uevents as fast as one writer can make them: 'change' on every net device."""
    paths = [f"/sys/class/net/{n}/uevent" for n in os.listdir("/sys/class/net")]
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for p in paths:
            with open(p, "w") as fh:
                fh.write("change")
            n += 1
    return n




def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    subprocess.run(["modprobe", "-a", *MODULES], check=True)
    out: dict[str, Any] = {"uname": os.uname().release, "repeats": REPEATS, "bare": {}, "ctwatchd": {},
                           "rmmod_return": {}}
    # The bare chain first, with no daemon running.
    for name, case in CASES.items():
        out["bare"][name] = [timed_removal(case, restored, bare_chain)[0] for _ in range(REPEATS)]
    cfg = RESULTS / "bench.toml"
    # The repair is what is timed: the hold (on by default) would refuse the unloads.
    cfg.write_text(f'[daemon]\nstate_file = "{RESULTS}/state.json"\nlog_format = "json"\n[hold]\nenabled = false\n')
    log = RESULTS / "daemon.log"
    with open(log, "w") as fh:
        daemon = subprocess.Popen([sys.executable, "-m", "ctwatchd", "run", "--config", str(cfg)],
                                  stdout=fh, stderr=fh)
        try:
            assert wait(lambda: "daemon.ready" in log.read_text(), 180)
            for name, case in CASES.items():
                runs = [timed_removal(case, restored, lambda _c: None) for _ in range(REPEATS)]
                out["ctwatchd"][name] = [r[0] for r in runs]
                out["rmmod_return"][name] = [r[1] for r in runs]
            # A storm of unrelated uevents with one module removal in the middle of it.
            time.sleep(1)
            c0 = cpu_seconds(daemon.pid)
            made: list[int] = []
            t = threading.Thread(target=lambda: made.append(storm(6.0)))
            t.start()
            time.sleep(3.0)
            subprocess.run(["rmmod", "br_netfilter"], check=True)
            t.join()
            out["storm"] = {"events": made[0], "seconds": 6.0, "ctwatchd_cpu_s": round(cpu_seconds(daemon.pid) - c0, 3),
                            "restored_after_storm": wait(restored, 60)}
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    out["log"] = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    (RESULTS / "bench.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
