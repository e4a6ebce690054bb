"""Real triggers and what they take along, under systemd with udevd and firewalld, in one boot.

Conntrack helpers loaded by hand, nf_conntrack's hashsize set at run time, a sysctl.d file fighting
the restore through the udev rule of sysctl.d(5), the modprobe.d unload guard, and firewalld's
clean-up (CleanupModulesOnExit=yes, a masquerading zone), and who removed a module (with and without
the shipped audit rule). triggers_guest.py runs them in order.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import sysguest  # noqa: E402

pytestmark = pytest.mark.vm

# The phases unload the conntrack family (holders first, modprobe -r, firewalld's clean-up): the hold
# (on by default) would refuse that. The guard phase's refused modprobe -r is then the guard's alone.
CONFIG = "[watch]\npoll_interval = 2.0\n[hold]\nenabled = false\n"
ZONE = """\
<?xml version="1.0" encoding="utf-8"?>
<zone>
  <short>Public</short>
  <masquerade/>
</zone>
"""
WANTS = "/etc/systemd/system/multi-user.target.wants"
FIREWALLD_CONF = "etc/firewalld/firewalld.conf"


@pytest.fixture(scope="module")
def triggers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    missing = sysguest.missing_prerequisites()
    root = sysguest.SYSROOT
    if not missing and not (root / "usr/sbin/firewalld").exists():
        missing.append(f"firewalld in {root} (run {HERE / 'build-root.sh'})")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"trigger VM tier needs: {', '.join(missing)}", pytrace=False)
        pytest.skip(f"trigger VM tier needs: {', '.join(missing)}")
    work = tmp_path_factory.mktemp("triggers")
    conf = root / FIREWALLD_CONF
    original = conf.read_bytes()
    conf.write_text(original.decode().replace("CleanupModulesOnExit=no", "CleanupModulesOnExit=yes"))
    files: dict[str, str | bytes | Path] = {
        "/etc/ctwatchd/ctwatchd.toml": CONFIG,
        "/etc/firewalld/zones/public.xml": ZONE,
        "/root/triggers_guest.py": HERE / "triggers_guest.py",
        "/root/ctwatchd.rules": HERE.parents[2] / "packaging/audit/ctwatchd.rules",
    }
    link = root / WANTS.lstrip("/") / "ctwatchd.service"
    try:
        with sysguest.ctwatchd_installed(root, work, files):
            link.unlink(missing_ok=True)
            link.symlink_to("/etc/systemd/system/ctwatchd.service")
            try:
                boot = sysguest.boot_systemd(root, "python3 /root/triggers_guest.py results\n", timeout=1800,
                                             results=work / "results", memory="1G")
            finally:
                link.unlink(missing_ok=True)
    finally:
        conf.write_bytes(original)
        for leftover in ("etc/modprobe.d/ctwatchd-protect.conf", "etc/sysctl.d/99-test.conf",
                         "etc/udev/rules.d/99-ctwatchd-test-bridge.rules"):
            (root / leftover).unlink(missing_ok=True)
    assert not boot.timed_out, boot.console[-3000:]
    data: dict[str, Any] = json.loads((work / "results/triggers.json").read_text())
    data["boot_seconds"] = round(boot.elapsed, 1)
    print(json.dumps(data, indent=2))
    return data


def phase(d: dict[str, Any], name: str) -> dict[str, Any]:
    assert name not in d.get("errors", {}), d["errors"][name]
    return dict(d[name])


def test_hand_loaded_helpers_come_back_with_the_family_and_stay_gone_alone(triggers: dict[str, Any]) -> None:
    """nf_conntrack_ftp and nf_nat_ftp, loaded by hand, are remembered; unloaded holders first with the
    family, they come back after it in dependency order; removed alone later, they stay gone."""
    r = phase(triggers, "helpers")
    assert r["learned_after_s"] is not None and r["rmmod"] == 0, r
    assert {"nf_conntrack", "nf_nat", "br_netfilter", "nf_conntrack_ftp", "nf_nat_ftp"} <= set(r["gone_after_unload"])
    assert r["back_after_s"] is not None
    planned = " ".join(m or "" for m in r["planned"]).split()
    assert planned.index("nf_conntrack") < planned.index("nf_conntrack_ftp") < planned.index("nf_nat_ftp")
    assert planned.index("nf_nat") < planned.index("nf_nat_ftp")
    assert r["rmmod_alone"] == 0 and r["alone_still_gone"] and r["planned_after_alone"] == []
    assert r["forgotten_after_s"] is not None, r


def test_a_hashsize_set_at_run_time_is_back_after_a_reload(triggers: dict[str, Any]) -> None:
    """/sys/module/nf_conntrack/parameters/hashsize doubled at run time: the reload resets it, ctwatchd
    writes it back."""
    r = phase(triggers, "hashsize")
    assert r["set"] == 2 * r["default"] and r["rmmod"] == 0
    assert r["back_after_s"] is not None and r["final"] == str(r["set"])


def test_the_sysctl_d_fight_is_won_right_after_udev_and_named_once(triggers: dict[str, Any]) -> None:
    """99-test.conf says 0 and udev applies it after each load: after `rmmod br_netfilter` the value is 1
    within 1 s of udev's write (2 s after the rmmod where udev is that fast) and stays 30 s; check names
    99-test.conf:1; one conflict record."""
    r = phase(triggers, "sysctl")
    assert r["udev_alone_sets"] == "0", "the udev rule should set the file's value on load"
    assert r["rmmod"] == 0
    assert r["holds_1_from_s"] is not None and r["saw_0_after_load"], r
    # Under TCG udev's own RUN+= (systemd-sysctl) may write 0 later than 2 s after the rmmod; the claim
    # that holds everywhere: ctwatchd's 1 is back within 1 s of udev's last 0 (0.1 s samples)
    assert r["holds_1_from_s"] - r["udev_zero_until_s"] <= 1.0, r
    print(f"sysctl fight: module back {r['module_back_s']} s, udev's 0 from {r['udev_zero_from_s']} "
          f"to {r['udev_zero_until_s']} s, 1 holds from {r['holds_1_from_s']} s (after the rmmod)")
    assert r["held_for_s"] >= 30
    assert r["check_table_names_it"]
    assert r["check_conflicts"] == ["/etc/sysctl.d/99-test.conf:1 sets net.bridge.bridge-nf-call-iptables = 0, "
                                    "ctwatchd wants 1"]
    assert r["conflict_records"] == ["/etc/sysctl.d/99-test.conf:1"]


def test_the_unload_guard_refuses_modprobe_r_and_goes_away(triggers: dict[str, Any]) -> None:
    """With `ctwatchd protect`, `modprobe -r nf_nat` fails and nf_nat stays the same module; check shows
    the guard; after `protect --remove`, modprobe -r unloads it again (and ctwatchd restores it)."""
    r = phase(triggers, "guard")
    assert r["protect"].startswith("wrote /etc/modprobe.d/ctwatchd-protect.conf")
    assert r["modprobe_r_rc"] != 0 and r["nf_nat_same_instance"], r
    assert all(g and "ctwatchd-protect.conf" in g for g in r["check_guards"])
    assert r["remove"].startswith("removed") and r["file_gone"]
    assert r["after_remove_rc"] == 0 and r["after_remove_gone"] and r["restored_after_s"] is not None


def test_firewalld_cleanup_on_stop_and_restart_is_repaired(triggers: dict[str, Any]) -> None:
    """firewalld with CleanupModulesOnExit=yes unloads the conntrack family on stop (with rmmod, so the
    modprobe.d guard cannot refuse it); ctwatchd brings the watched modules, the bridge sysctl and what sat
    on nf_conntrack back. After a restart from running the family is live, nothing remembered is missing
    and firewalld runs with its table."""
    r = phase(triggers, "firewalld")
    assert r["state"] == "running" and r["masquerade"] == "yes"
    assert "nft_ct" in r["remembered"]
    assert r["check_notes"] and r["check_notes"][0].startswith("/etc/firewalld/firewalld.conf:19 sets Cleanup"), r
    stop = r["stop"]
    assert {"nf_conntrack", "nf_nat"} <= set(stop["unloaded"]), stop
    print(f"firewalld stop: unloaded {stop['unloaded']}, back {stop['back']}, still gone {stop['still_gone']}")
    # Every remembered dependent firewalld took is back (one was missed in 2 of 3 runs while a look
    # torn by firewalld's next rmmod could drop it from the remembered set).
    assert not set(r["remembered"]) & set(stop["still_gone"]), stop
    for action in ("stop", "restart"):
        a = r[action]
        assert a["watched_live"] and a["bridge"] == "1", (action, a)
    assert r["restart"]["firewalld"] == "active" and r["state_after_restart"] == "running"
    assert r["nft_has_firewalld"]


def test_attribution_names_the_remover_with_and_without_the_audit_rule(triggers: dict[str, Any]) -> None:
    """Under the shipped unit: with the audit rule every removal is ATTRIBUTION=audit naming the process
    (a rmmod that exited at once included), the session's login uid, and the unit of a process still
    running; without it, whatever /proc caught at the uevent is labelled proc, the rest unknown, and a
    name given is never a wrong one. (A unit for a process that exited at once needs /proc to have seen
    it: on this one-vCPU guest the remover finishes before the daemon is scheduled, see the figures.)"""
    r = phase(triggers, "attribution")
    units = {"job": "cleanup-job-{}.service", "scope": "admin-scope-{}.scope", "daemon": "py-remover-{}.service"}
    comms = {"job": "rmmod", "scope": "modprobe", "daemon": "python3"}
    for label, rnd in (("audit", r["with_rule"]), ("plain", r["without_rule"])):
        for kind, trials in ((k, rnd[k]) for k in units):
            for n, t in enumerate(trials):
                assert t["rc"] == 0 and t["ATTRIBUTION"] is not None, (label, kind, n, t)
                if label == "audit":
                    assert t["ATTRIBUTION"] == "audit" and t["REMOVED_BY_PID"], (kind, n, t)
                if t["ATTRIBUTION"] in ("audit", "proc"):  # never a wrong name
                    assert t["REMOVED_BY_COMM"] == comms[kind], (label, kind, n, t)
                    assert t["REMOVED_BY_UNIT"] in (units[kind].format(f"{label}-{n}"), None), (label, kind, n, t)
                    if kind == "scope":
                        assert t["REMOVED_BY_AUID"] == "1000", (label, kind, n, t)
                    if label == "audit" and kind == "daemon":  # still running: its unit from /proc
                        assert t["REMOVED_BY_UNIT"] == units[kind].format(f"{label}-{n}"), (kind, n, t)
                else:
                    assert t["ATTRIBUTION"] == "unknown" and t["REMOVED_BY_COMM"] is None, (label, kind, n, t)
    assert "last removal: br_netfilter by" in r["with_rule"]["status"]
    assert r["check_table"] and "last removal: br_netfilter by" in r["check_table"][0]
    for label, rnd in (("without the rule", r["without_rule"]), ("with the audit rule", r["with_rule"])):
        named = {k: sum(t["ATTRIBUTION"] in ("audit", "proc") for t in rnd[k]) for k in units}
        with_unit = {k: sum(t["REMOVED_BY_UNIT"] is not None for t in rnd[k]) for k in units}
        print(f"attribution {label}: process named {named}, unit named {with_unit}, of {len(rnd['job'])} each")


def test_the_hold_refuses_every_unload_of_the_family_also_after_a_flush(triggers: dict[str, Any]) -> None:
    """With the hold on (defaults, the shipped unit): rmmod and modprobe -r of nf_conntrack, nf_nat and the
    modules holding them fail, another process can neither delete the table nor flush it away; nf_conntrack
    and nf_nat stay the same modules; br_netfilter, which cannot be held, unloads and is repaired."""
    r = phase(triggers, "hold")
    assert r["acquired"] and "nf_conntrack nf_nat" in r["acquired"][0], r["acquired"]
    assert "held: nf_conntrack nf_nat" in r["status"], r["status"]
    assert "flags dormant,owner" in r["table"] or "flags owner,dormant" in r["table"], r["table"]
    for cmd, (rc, err) in {**r["refused"], **r["refused_after_flush"]}.items():
        assert rc != 0, (cmd, err)
    assert r["other_delete"][0] != 0 and "Operation not permitted" in r["other_delete"][1], r["other_delete"]
    assert r["flush"] == 0 and r["table_after_flush"]
    assert r["same_instances"]
    assert r["check_holds"]["nf_conntrack"] == r["check_holds"]["nf_nat"] == "held by ctwatchd (nft table ip ctwatchd)"
    assert r["check_holds"]["br_netfilter"].startswith("cannot be held")
    assert r["br_rmmod"] == 0 and r["br_back_s"] is not None
    print(f"hold: `systemctl restart` to READY {r['ready_on_s']} s with the hold, {r['ready_off_s']} s without")


def test_firewalld_cleanup_on_stop_unloads_nothing_held(triggers: dict[str, Any]) -> None:
    """firewalld with CleanupModulesOnExit=yes and a masquerading zone: its stop succeeds, nf_conntrack,
    nf_nat and nft_masq (held once firewalld loaded it) are never unloaded; firewalld starts and works."""
    r = phase(triggers, "hold")
    assert r["firewalld_masq_held_s"] is not None, r
    assert r["firewalld_stop"] == 0 and r["firewalld_family_kept"], r
    assert not {"nf_conntrack", "nf_nat", "nft_masq"} & set(r["firewalld_unloaded"]), r["firewalld_unloaded"]
    assert r["firewalld_start"] == 0 and r["firewalld_state"] == "running" and r["firewalld_table"]
    print(f"firewalld stop with the hold: {r['firewalld_stop_s']} s, unloaded {r['firewalld_unloaded']}")


def test_established_nat_connections_survive_a_cleanup_only_with_the_hold(triggers: dict[str, Any]) -> None:
    """A DNAT-ed and a masqueraded TCP connection, the server sending next after a clean-up (flush,
    holders-first unload, family and NAT rules put back): with the hold both survive and their conntrack
    entries stay; with it off (released by a reload) both are broken, so this test can fail."""
    r = phase(triggers, "hold")
    on, off = r["connections_on"], r["connections_off"]
    for c in (on, off):
        assert c["dnat_connected"] == c["masquerade_connected"] == "connected", c
    assert on["masq_held_after_s"] is not None, on
    assert on["dnat"] == on["masquerade"] == "survived", on
    assert on["same_instance"] == {"nf_conntrack": True, "nf_nat": True, "nft_masq": True}, on
    assert r["released_on_reload_s"] is not None
    assert off["dnat"] != "survived" and off["masquerade"] != "survived", off
    assert not off["same_instance"]["nf_conntrack"], off
    print(f"connections: hold on {on['dnat']}/{on['masquerade']}, conntrack entries {on['count_before']} -> "
          f"{on['count_after']}; hold off {off['dnat']}/{off['masquerade']}, {off['count_before']} -> "
          f"{off['count_after']}")


def test_the_hold_goes_with_ctwatchd_and_comes_back_with_it(triggers: dict[str, Any]) -> None:
    """systemctl stop releases the table (nf_nat then unloads normally); SIGKILL releases it at once and
    systemd's restart makes a new one (another owner socket)."""
    r = phase(triggers, "hold")
    assert r["table_before_stop"] and not r["table_after_stop"]
    assert r["rmmod_after_stop"][0] == 0 and r["nf_nat_gone_after_stop"], r["rmmod_after_stop"]
    assert r["nf_nat_back"] and r["table_after_start"]
    assert r["table_gone_after_kill_s"] is not None
    assert r["reheld_after_kill_s"] is not None and r["owner_port_changed"]


def test_the_hold_hooks_nothing_and_turns_no_conntrack_on(triggers: dict[str, Any]) -> None:
    """The kernel lists the table dormant (no chain of it hooked); in a network namespace with no
    conntrack, the hold without a masquerade rule leaves loopback TCP untracked (count 0), while with
    the rule (nft_masq needs conntrack) the same traffic is tracked: the count tells the two apart.
    (Debian's 6.1 has no nfnetlink_hook, so `nft list hooks` shows nothing there to compare.)"""
    r = phase(triggers, "hold")
    flags: list[str] = next((line.split() for line in r["table"].splitlines()
                             if line.strip().startswith("flags")), [])
    assert flags and "dormant" in flags[1].split(","), r["table"]
    plain, masq = r["netns_plain"], r["netns_masq"]
    assert plain["event"] == masq["event"] == "hold.acquired", r
    assert plain["count"] == "0", plain
    assert masq["count"] not in (None, "0"), masq
    print(f"hold phase laps (s): {r['seconds']}")
