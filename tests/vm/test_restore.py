"""`ctwatchd run` on a real modular kernel: it loads the set at start and restores every removal."""

from __future__ import annotations

import json
import shlex
from typing import Any

import guest
import pytest

SCRIPT = '"$PY" {driver} "$RESULTS" > restore_guest.log 2>&1\n'
MODULES = ("nf_conntrack", "nf_nat", "br_netfilter")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rwdir = tmp_path_factory.mktemp("restore")
    boot = guest.boot(SCRIPT.format(driver=shlex.quote(str(guest.HERE / "restore_guest.py"))),
                      timeout=900, rwdir=rwdir)
    log = (rwdir / "restore_guest.log").read_text() if (rwdir / "restore_guest.log").exists() else ""
    assert not boot.timed_out, boot.console[-3000:]
    assert boot.returncode == 0, f"guest driver failed:\n{log}\n{boot.console[-3000:]}"
    data: dict[str, Any] = json.loads((rwdir / "restore.json").read_text())
    data["boot_seconds"] = round(boot.elapsed, 1)
    summary = {s["name"]: s["removal_to_restored_s"] for s in data["scenarios"]}
    print(json.dumps({"boot_seconds": data["boot_seconds"], "start_seconds": data["start_seconds"],
                      "removal_to_restored_s": summary}, indent=2))
    return data


def events(data: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in data["log"] if e.get("event") == name]


def test_daemon_loads_the_desired_set_at_start(run: dict[str, Any]) -> None:
    """A fresh guest has none of the modules; ctwatchd loads them in order before it is ready."""
    assert run["before_start"]["initstate"] == dict.fromkeys(MODULES)
    assert run["start_loaded"], run["after_start"]
    first = events(run, "restore.planned")[0]
    assert first["modules"] == "nf_conntrack nf_nat br_netfilter"


REMOVED = [("br_netfilter",), ("nf_nat",), ("nf_nat", "nf_conntrack"), MODULES, MODULES]


@pytest.mark.parametrize("index", range(5))
def test_each_removal_is_restored_with_sysctls(run: dict[str, Any], index: int) -> None:
    """After rmmod / modprobe -r, every module is live again, the count readable, sysctls desired."""
    sc = run["scenarios"][index]
    assert all(c["rc"] == 0 for c in sc["commands"]), sc["commands"]
    # Each removed module really went: it is back as a new instance (a new /sys/module inode).
    for m in REMOVED[index]:
        assert sc["after"]["instance"][m] != sc["before"]["instance"][m], (m, sc)
    if REMOVED[index] == ("br_netfilter",):  # the bridge itself stays: only its netfilter hook went
        assert sc["after"]["instance"]["bridge"] == sc["before"]["instance"]["bridge"] is not None
    if REMOVED[index] == ("nf_nat",):  # conntrack stays while NAT is reloaded
        assert sc["after"]["instance"]["nf_conntrack"] == sc["before"]["instance"]["nf_conntrack"]
    assert sc["restored_after_s"] is not None, sc
    after = sc["after"]
    assert after["initstate"] == dict.fromkeys(MODULES, "live")
    assert after["count"] is not None
    assert after["sysctls"]["net.bridge.bridge-nf-call-iptables"] == "1"
    assert after["sysctls"]["net.bridge.bridge-nf-call-ip6tables"] == "1"
    assert after["sysctls"]["net.bridge.bridge-nf-call-arptables"] == "0"


def test_tuned_conntrack_values_survive_every_reload(run: dict[str, Any]) -> None:
    """nf_conntrack_max and a TCP timeout set while healthy are back after conntrack reloads."""
    reloads = [s for s in run["scenarios"] if "nf_conntrack" in " ".join(" ".join(c["argv"]) for c in s["commands"])]
    assert len(reloads) == 3
    assert run["tuning_snapshot_after_s"] is not None, "the daemon never persisted the tuned values"
    for sc in reloads:
        assert sc["after"]["sysctls"]["net.netfilter.nf_conntrack_max"] == "131072", sc["name"]
        assert sc["after"]["sysctls"]["net.netfilter.nf_conntrack_tcp_timeout_established"] == "3600"


def test_every_restore_is_audited_and_the_daemon_stops_cleanly(run: dict[str, Any]) -> None:
    """One plan/finished pair per restore, no failed step, and exit 0 on SIGTERM."""
    finished = events(run, "restore.finished")
    assert len(finished) >= 6 and all(e["result"] == "ok" for e in finished)
    assert not [e for e in events(run, "restore.step") if e["result"] != "ok"]
    assert {e["module"] for e in events(run, "module.event")} >= set(MODULES)
    assert run["daemon_exit"] == 0
