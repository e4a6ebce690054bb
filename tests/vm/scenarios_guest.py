"""Runs inside the guest: the harder scenarios against `ctwatchd run`, one phase per daemon start.

Usage: python scenarios_guest.py RESULTS_DIR PHASE... with PHASE in traffic, flapping, blocker.
Each phase writes RESULTS_DIR/<phase>.json; the host test asserts on them.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

from guestlib import HOOKDIR, MODULES, check_json, daemon, healthy, holders_first, hook, initstate, sh, wait_for
from traffic import RULES, network, reload_check

RESULTS = Path(sys.argv[1])
# The hold (on by default) makes the daemon refuse rmmod / modprobe -r of nf_conntrack and nf_nat while it
# runs: the phases that unload them turn it off, so they prove the repair.
NO_HOLD = "[hold]\nenabled = false\n"


# -- 8. real traffic through DNAT, MASQUERADE and a bridge (traffic.py) ------------------------
def phase_traffic() -> None:
    for m in MODULES:
        sh("modprobe", m, check=True)
    rules = hook("rules.sh", RULES)
    with network(rules) as res, daemon(RESULTS, "traffic", f'[restore]\nhooks = [["{rules}"]]\n' + NO_HOLD) as d:
        d["result"] = res
        reload_check(d["pid"], res)


# -- 7. flapping: 50 removals in quick succession -----------------------------------------------
def phase_flapping() -> None:
    for m in MODULES:
        sh("modprobe", m, check=True)
    counter = RESULTS / "hook-runs.txt"
    run_hook = hook("count.sh", f"date +%s.%N >> {counter}\n")
    removals = 0
    extra = f'[restore]\nhooks = [["{run_hook}"]]\nmax_restarts = 3\nrestart_window = 600\n'
    with daemon(RESULTS, "flapping", extra) as d:
        t0 = time.monotonic()
        for _ in range(50):
            if wait_for(lambda: initstate("br_netfilter") == "live", 60, 0.005) is None:
                break
            if sh("rmmod", "br_netfilter").returncode == 0:
                removals += 1
        d["removals"] = removals
        d["removal_seconds"] = round(time.monotonic() - t0, 2)
        d["restored_at_end_s"] = wait_for(healthy, 60)
        d["hook_runs"] = len(counter.read_text().splitlines()) if counter.exists() else 0
        d["check"] = check_json(RESULTS, "flapping")


# -- 5 and 6. a modprobe.d blocker; no legacy modules on this kernel ---------------------------
def phase_blocker() -> None:
    for m in MODULES:
        sh("modprobe", m, check=True)
    # /etc is the host's, read-only: lay a writable copy of modprobe.d over it for this guest.
    shadow = Path("/run/modprobe.d-shadow")
    shutil.copytree("/etc/modprobe.d", shadow, dirs_exist_ok=True)
    sh("mount", "--bind", str(shadow), "/etc/modprobe.d", check=True)
    Path("/etc/modprobe.d/protect-conntrack.conf").write_text("install nf_conntrack /bin/true\n")
    with daemon(RESULTS, "blocker", NO_HOLD) as d:
        os.kill(d["pid"], signal.SIGSTOP)  # held: the unload cannot race a restore
        try:
            names = holders_first(MODULES)
            d["rmmod"] = sh("rmmod", *names).returncode
            d["removed"] = [m for m in names if initstate(m) is None]
        finally:
            os.kill(d["pid"], signal.SIGCONT)
        d["br_netfilter_back_s"] = wait_for(lambda: initstate("br_netfilter") == "live", 90)
        time.sleep(7)  # three polls: the daemon must not loop on the blocked module
        d["states_while_blocked"] = {m: initstate(m) for m in MODULES}
        d["check"] = check_json(RESULTS, "blocker")
        Path("/etc/modprobe.d/protect-conntrack.conf").unlink()
        d["released_restored_s"] = wait_for(healthy, 90)
        time.sleep(2)  # let the daemon finish verifying before it is stopped
    sh("umount", "/etc/modprobe.d")


PHASES = {"traffic": phase_traffic, "flapping": phase_flapping, "blocker": phase_blocker}


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in sys.argv[2:]:
        try:
            PHASES[name]()
        except Exception as exc:
            failed += 1
            (RESULTS / f"{name}.error").write_text(f"{type(exc).__name__}: {exc}\n")
        finally:
            shutil.rmtree(HOOKDIR, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
