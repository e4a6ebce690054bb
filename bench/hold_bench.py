"""What the hold costs, on this host's own nf_tables, in network namespaces of its own (root).

Usage: python bench/hold_bench.py [--repeats 5] [--seconds 2]

Prints a table:
- making the hold: Hold.ensure() for nf_conntrack + nf_nat (one batch, then the read-back), and the
  per-look verify the daemon does at every poll;
- the cost per packet: TCP throughput over a veth pair between two namespaces, the sender's namespace
  with the hold (nf_conntrack and nf_nat; a masquerade rule would turn conntrack on where it was off,
  which only happens where nothing masquerades yet) and without, alternating. The
  table is dormant, so the expected difference is none; the run says how large the noise is.
Modules are not involved (a built-in kernel does as well): this measures netlink and the data path.
The VM tier measures what needs a modular kernel (READY with and without the hold, connections).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap

INNER = textwrap.dedent("""
    import json, os, socket, sys, threading, time
    from ctwatchd import hold
    from ctwatchd.model import HoldSpec
    repeats, seconds, peer = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    make, verify = [], []
    for _ in range(repeats * 4):
        h = hold.Hold()
        t0 = time.perf_counter(); h.ensure(HoldSpec(True, True)); make.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); h.ensure(HoldSpec(True, True)); verify.append(time.perf_counter() - t0)
        h.release()
    def throughput():
        s = socket.create_connection((peer, 5001)); chunk = b"x" * (1 << 16); n = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.sendall(chunk); n += len(chunk)
        s.close(); return n / seconds
    rates = {"off": [], "on": []}
    for _ in range(repeats):
        rates["off"].append(throughput())
        h = hold.Hold(); assert h.ensure(HoldSpec(True, True)).event == "hold.acquired"
        rates["on"].append(throughput()); h.release()
    print(json.dumps({"make": make, "verify": verify, "rates": rates}))
""")
SINK = ("import socket, threading\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind(('10.99.0.2', 5001)); s.listen()\n"
        "def drain(c):\n    while c.recv(1 << 20): pass\n"
        "while True:\n    c, _ = s.accept(); threading.Thread(target=drain, args=(c,), daemon=True).start()\n")


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("hold_bench: needs root (network namespaces, nf_tables)", file=sys.stderr)
        return 2
    a, b = f"hb-a-{os.getpid()}", f"hb-b-{os.getpid()}"
    sink = None
    try:
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b)
        sh("ip", "-n", a, "addr", "add", "10.99.0.1/24", "dev", "va")
        sh("ip", "-n", b, "addr", "add", "10.99.0.2/24", "dev", "vb")
        sh("ip", "-n", a, "link", "set", "va", "up")
        sh("ip", "-n", b, "link", "set", "vb", "up")
        sink = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", SINK])
        subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c",
                        "import socket, time\nfor _ in range(100):\n"
                        "    try: socket.create_connection(('10.99.0.2', 5001)).close(); break\n"
                        "    except OSError: time.sleep(0.05)"], check=True)
        out = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", INNER, str(args.repeats),
                              str(args.seconds), "10.99.0.2"], check=True, capture_output=True, text=True)
    finally:
        if sink is not None:
            sink.kill()
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    import json

    data = json.loads(out.stdout)

    def ms(xs: list[float]) -> str:
        return f"median {statistics.median(xs) * 1000:.2f} ms (min {min(xs) * 1000:.2f}, max {max(xs) * 1000:.2f})"

    off, on = data["rates"]["off"], data["rates"]["on"]
    print(f"{'what':<44} result")
    print(f"{'make the hold (batch + read-back), n=' + str(len(data['make'])):<44} {ms(data['make'])}")
    print(f"{'verify it (one look), n=' + str(len(data['verify'])):<44} {ms(data['verify'])}")
    print(f"{'veth TCP throughput, hold off':<44} median {statistics.median(off) / 1e9 * 8:.2f} Gbit/s "
          f"(min {min(off) / 1e9 * 8:.2f}, max {max(off) / 1e9 * 8:.2f})")
    print(f"{'veth TCP throughput, hold on':<44} median {statistics.median(on) / 1e9 * 8:.2f} Gbit/s "
          f"(min {min(on) / 1e9 * 8:.2f}, max {max(on) / 1e9 * 8:.2f})")
    print(f"{'on / off':<44} {statistics.median(on) / statistics.median(off):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
