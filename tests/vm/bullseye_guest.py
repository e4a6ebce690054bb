"""Runs inside the guest on Debian bullseye's 5.10, a kernel without nftables owner tables: one `ctwatchd run`
with the hold on (the defaults) must say once why it cannot hold, make no table, and repair as on 6.1.

Usage: python bullseye_guest.py RESULTS_DIR REPEATS. Writes RESULTS_DIR/facts.json (what was seen around the
daemon) and, through guestlib.daemon, RESULTS_DIR/bullseye.json (what was seen while it ran, and its log); a
failure is an "error" in either. tests/vm/test_bullseye.py asserts on them.

One boot, one daemon start, four Python starts (this driver, the daemon, `ctwatchd check`, the HTTP server):
  1. the family loaded by hand; what the kernel answers to `flags owner` (nft, no ctwatchd involved);
  2. the bare manual chain timed after `rmmod` of the family, REPEATS times, no daemon running;
  3. `ctwatchd run` started: its hold attempt, its STATUS, `check --json`, the ruleset;
  4. the same removal timed while ctwatchd repairs it, REPEATS times; then br_netfilter alone;
  5. nf_conntrack_max tuned; the traffic check of scenarios_guest.py (traffic.py): DNAT + MASQUERADE +
     bridged requests, the "firewall reload" (ruleset flushed, the family unloaded holders first), back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from guestlib import (
    BRIDGE,
    HOOKDIR,
    MODULES,
    check_json,
    daemon,
    healthy,
    hook,
    instance,
    manual_chain,
    sh,
    sysctl,
    timed_removal,
    wait_for,
)
from traffic import RULES, network, reload_check

RESULTS = Path(sys.argv[1])
REPEATS = int(sys.argv[2])
PHASE = "bullseye"
FAMILY = ("br_netfilter", "nf_nat", "nf_conntrack")  # one rmmod, holders first: bench/vm_bench_guest.py's "all three"
MAX = "net.netfilter.nf_conntrack_max"
TUNED = "131072"
# The timed restores run the daemon's hook too (hooks follow every module load); until the traffic check it
# must not create the NAT rules, which would hold nf_nat and fail the next timed rmmod.
GATE = HOOKDIR / "traffic-on"
# The timed restores and the traffic check run the hook more often than the default breaker allows (3).
EXTRA = "[restore]\nhooks = [[\"{rules}\"]]\nmax_restarts = 50\n"


def nft(*args: str) -> dict[str, Any]:
    p = sh("nft", *args)
    return {"rc": p.returncode, "out": p.stdout, "err": p.stderr.strip()}


def owner_flag_probe() -> dict[str, Any]:
    """What this kernel answers to a table with `flags owner`, asked by nft itself (the oracle for the
    daemon's reason). Were it accepted, the table would be nft's own and go when nft exits."""
    p = nft("add table ip ctwatchd_probe { flags owner; flags dormant; }")
    m = re.search(r"Could not process rule: ([^\n]+)", p["err"])
    p["kernel_says"] = m.group(1).strip() if m else None
    nft("delete table ip ctwatchd_probe")  # only there if some kernel took the flags and nft kept it
    # nf_tables itself works here: a plain dormant table is made.
    p["dormant_only"] = nft("add table ip ctwatchd_probe2 { flags dormant; }")["rc"]
    nft("delete table ip ctwatchd_probe2")
    return p


def saved_tuning(path: Path) -> dict[str, str]:
    try:
        tuning = json.loads(path.read_text()).get("tuning", {})
    except (OSError, ValueError):
        return {}
    return tuning if isinstance(tuning, dict) else {}


def saved_status(path: Path) -> str | None:
    try:
        status = json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None
    return status if isinstance(status, str) else None


def timings(after_rmmod: Callable[[Sequence[str]], None]) -> list[float]:
    """Seconds from `rmmod` of the family to healthy again, REPEATS times."""
    return [round(timed_removal(FAMILY, healthy, after_rmmod)[0], 4) for _ in range(REPEATS)]


def bare(removed: Sequence[str]) -> None:
    manual_chain(removed, BRIDGE)


def nothing(_removed: Sequence[str]) -> None:
    """After the rmmod, while ctwatchd runs: nothing, the daemon repairs it."""


def records(path: Path) -> list[dict[str, Any]]:
    """The daemon's records so far; a line it is still writing is skipped."""
    out: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def mark(path: Path) -> int:
    """Where the daemon's log is now, as an index into its records (the test slices them there)."""
    return sum(1 for line in path.read_text().splitlines() if line.startswith("{"))


def with_daemon(d: dict[str, Any], rules: Path, logpath: Path, state: Path) -> None:
    """Steps 3 to 5, while `ctwatchd run` runs (d is what guestlib.daemon writes to bullseye.json)."""
    wait_for(lambda: any(e.get("event") == "daemon.ready" for e in records(logpath)), 10, 0.05)
    d["ready_status"] = next((e.get("status") for e in records(logpath) if e.get("event") == "daemon.ready"), None)
    d["state_status_at_ready"] = saved_status(state)
    d["ruleset_at_ready"] = nft("list", "ruleset")["out"]
    d["tables_at_ready"] = nft("list", "tables")["out"]
    d["check"] = check_json(RESULTS, PHASE)
    d["marks"] = {"timed": mark(logpath)}
    d["ctwatchd_s"] = timings(nothing)
    d["marks"]["br_netfilter"] = mark(logpath)
    before = instance("br_netfilter")
    d["br_netfilter_s"] = round(timed_removal(["br_netfilter"], healthy, nothing)[0], 4)
    d["br_netfilter_new_instance"] = instance("br_netfilter") not in (None, before)
    d["bridge_after_br_netfilter"] = {k: sysctl(k) for k in BRIDGE}
    # Tune conntrack while healthy; the daemon snapshots it at its next look (poll_interval 2 s).
    Path("/proc/sys/" + MAX.replace(".", "/")).write_text(TUNED)
    d["tuning_saved_after_s"] = wait_for(lambda: saved_tuning(state).get(MAX) == TUNED, 60, 0.2)
    GATE.touch()
    d["marks"]["traffic"] = mark(logpath)
    with network(rules) as res:
        d["traffic"] = res
        reload_check(d["pid"], res)
        res["max_after"] = sysctl(MAX)
        res["max_back_after_s"] = wait_for(lambda: sysctl(MAX) == TUNED, 30, 0.05)
    d["tables_after_restores"] = nft("list", "tables")["out"]
    # Right after a restore STATUS has no hold part (the look before it saw the modules gone); the
    # verification's look says "not held" again.
    wait_for(lambda: "not held" in (saved_status(state) or ""), 10, 0.1)
    d["state_status_at_end"] = saved_status(state)
    time.sleep(1.0)  # let the daemon finish verifying before it is stopped


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"uname": os.uname().release, "repeats": REPEATS}
    logpath = RESULTS / f"{PHASE}-daemon.log"
    state = RESULTS / f"{PHASE}-state.json"
    try:
        sh("modprobe", "-a", *MODULES, check=True)
        out["owner_probe"] = owner_flag_probe()
        out["tables_before"] = nft("list", "tables")["out"]
        out["max_default"] = sysctl(MAX)
        out["bare_s"] = timings(bare)
        rules = hook("rules.sh", f"[ -e {GATE} ] || exit 0\n" + RULES)
        with daemon(RESULTS, PHASE, EXTRA.format(rules=rules)) as d:
            try:  # caught here, so that guestlib.daemon still writes the daemon's log to bullseye.json
                with_daemon(d, rules, logpath, state)
            except Exception as exc:
                d["error"] = f"{type(exc).__name__}: {exc}"
        failed = "error" in d
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        failed = True
    finally:
        out["tables_after_stop"] = nft("list", "tables")["out"]
        (RESULTS / "facts.json").write_text(json.dumps(out, indent=2))
        shutil.rmtree(HOOKDIR, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
