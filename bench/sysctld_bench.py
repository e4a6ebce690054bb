"""A large sysctl.d: what one look and one sysctl.d conflict computation cost.

Usage: python bench/sysctld_bench.py [--keys 52000] [--looks 50]
Builds a fake host tree (nothing on this machine is read or changed) whose sysctl.d holds KEYS
per-interface keys in two files under the 1 MB limit, and a line contradicting a desired value; then
times Inspector.look() (observe, decide, conflicts) over LOOKS looks, and conflicts() alone. A healthy
daemon looks every poll_interval: a look's cost times 1/poll_interval is the share of a core it takes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "unit"))

from fakehost import FakeHost  # noqa: E402

from ctwatchd.config import Config  # noqa: E402
from ctwatchd.core import CoreState  # noqa: E402
from ctwatchd.kernel import KernelProbe  # noqa: E402
from ctwatchd.sysctld import conflicts  # noqa: E402
from ctwatchd.verdict import Inspector  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=52_000)
    ap.add_argument("--looks", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ctwatchd-sysctld-") as tmp:
        host = FakeHost(Path(tmp) / "root")
        host.load("nf_conntrack", "nf_nat", "br_netfilter")
        d = host.root / "etc/sysctl.d"
        d.mkdir(parents=True)
        half = args.keys // 2
        for n in range(2):
            (d / f"9{n}-ifaces.conf").write_text(
                "".join(f"net.ipv4.conf.veth{n}x{i}.rp_filter = 2\n" for i in range(half))
                + "net.bridge.bridge-nf-call-iptables = 0\n")
        inspector = Inspector(KernelProbe(host.root))
        cfg = Config()
        settings = inspector.facts.sysctl_d
        times = []
        for i in range(args.looks):
            t0 = time.perf_counter()
            look = inspector.look(cfg, CoreState(), float(i))
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        found = conflicts(cfg.sysctls, settings)
        once = time.perf_counter() - t0
    print(f"sysctl.d: {len(settings)} keys in 2 files; conflicts found: {len(found)} ({found[0] if found else '-'})")
    print(f"one look: median {statistics.median(times) * 1000:.2f} ms, max {max(times) * 1000:.2f} ms "
          f"over {args.looks} looks (the first {times[0] * 1000:.2f} ms)")
    print(f"conflicts() once: {once * 1000:.2f} ms; at poll_interval = 1 a look costs "
          f"{statistics.median(times) * 100:.2f} % of a core")
    print(f"last look: {look.decision.plan.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
