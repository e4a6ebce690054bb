"""Collateral restore: the loaded modules that depended on a watched one come back with it.

A conntrack helper loaded by hand (nf_conntrack_ftp, nf_nat_ftp) is never autoloaded again after a
clean-up; ctwatchd remembers the holders of the watched modules while healthy and reloads those that
went with them. One removed alone is the operator's choice. The fake modprobe keeps
/sys/module/<m>/holders like the kernel does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from fakehost import FakeHost
from harness import ALL, Harness, cfg_for, events

from ctwatchd import config as configmod
from ctwatchd import state as statefile
from ctwatchd.config import Config, DockerMode
from ctwatchd.core import COURTESY_TRIES, FORGET_AFTER, CoreState, collateral_due, decide, record
from ctwatchd.kernel import KernelProbe
from ctwatchd.model import (
    ModuleState,
    ModuleStatus,
    Observation,
    Outcome,
    RestorePlan,
    RestoreResult,
    StepKind,
    StepResult,
)

FTP = ("nf_conntrack_ftp", "nf_nat_ftp")
HASHSIZE = "module.nf_conntrack.hashsize"


def obs_with(states: dict[str, ModuleState], instances: dict[str, int] | None = None,
             holders: dict[str, tuple[str, ...]] | None = None) -> Observation:
    inst = instances or {}
    mods = {m: ModuleStatus(m, st, "", None, inst.get(m, 1) if st is ModuleState.LIVE else None)
            for m, st in states.items()}
    bridge = {"net.bridge.bridge-nf-call-iptables": "1", "net.bridge.bridge-nf-call-ip6tables": "1"}
    return Observation("6.1.0-28-amd64", mods, bridge, 0, {},
                       {"nf_nat": ("nf_conntrack",), "nf_conntrack_ftp": ("nf_conntrack",),
                        "nf_nat_ftp": ("nf_nat", "nf_conntrack_ftp", "nf_conntrack")}, holders)


LIVE = dict.fromkeys((*ALL, *FTP), ModuleState.LIVE)
HOLDERS = {"nf_nat": ("nf_conntrack",), "nf_conntrack_ftp": ("nf_conntrack",),
           "nf_nat_ftp": ("nf_conntrack", "nf_nat")}


def learned(cfg: Config | None = None) -> CoreState:
    return decide(cfg or Config(), CoreState(), obs_with(LIVE, holders=HOLDERS), 0.0).state


def test_healthy_looks_learn_the_dependents_but_not_the_watched_modules() -> None:
    """The holders of the watched modules are remembered with their bases; nf_nat, watched itself, is not."""
    s = learned()
    assert dict(s.dependents) == {"nf_conntrack_ftp": ("nf_conntrack",), "nf_nat_ftp": ("nf_conntrack", "nf_nat")}
    assert dict(s.base_instances) == {"nf_conntrack": 1, "nf_nat": 1}


def test_dependents_that_went_with_their_base_come_back_after_it_in_order() -> None:
    """The family gone: the plan reloads the watched modules, then the helpers, in modules.dep order."""
    gone = dict.fromkeys((*ALL, *FTP), ModuleState.ABSENT)
    d = decide(Config(), learned(), obs_with(gone), 1.0)
    assert d.plan.modules == ("nf_conntrack", "nf_nat", "br_netfilter", "nf_conntrack_ftp", "nf_nat_ftp")
    assert d.plan.reason == ("not loaded: nf_conntrack, nf_nat, br_netfilter; "
                             "loaded with them before: nf_conntrack_ftp, nf_nat_ftp")


def test_a_dependent_removed_alone_is_left_alone_and_forgotten() -> None:
    """rmmod nf_nat_ftp with its bases untouched: no plan; the remembered set drops it once it has
    stayed gone FORGET_AFTER with its bases the same modules."""
    states = {**LIVE, "nf_nat_ftp": ModuleState.ABSENT}
    holders = {k: v for k, v in HOLDERS.items() if k != "nf_nat_ftp"}
    d = decide(Config(), learned(), obs_with(states, holders=holders), 1.0)
    assert not d.plan and "nf_nat_ftp" in d.state.dependents and d.state.gone_since == {"nf_nat_ftp": 1.0}
    d = decide(Config(), d.state, obs_with(states, holders=holders), 1.0 + FORGET_AFTER - 0.1)
    assert not d.plan and "nf_nat_ftp" in d.state.dependents
    d = decide(Config(), d.state, obs_with(states, holders=holders), 1.0 + FORGET_AFTER)
    assert not d.plan and "nf_nat_ftp" not in d.state.dependents and d.state.gone_since == {}


def test_a_dependent_seen_going_is_not_forgotten() -> None:
    """A slow removal: the helper has left the holders but is still going at a healthy look; it stays
    remembered, and comes back when its base goes too."""
    states = {**LIVE, "nf_nat_ftp": ModuleState.GOING}
    holders = {k: v for k, v in HOLDERS.items() if k != "nf_nat_ftp"}
    d = decide(Config(), learned(), obs_with(states, holders=holders), 1.0)
    assert "nf_nat_ftp" in d.state.dependents
    gone = dict.fromkeys((*ALL, *FTP), ModuleState.ABSENT)
    assert "nf_nat_ftp" in decide(Config(), d.state, obs_with(gone, holders={}), 2.0).plan.modules


def test_a_dependent_read_live_but_gone_from_the_holders_is_not_forgotten() -> None:
    """A look reads the states, then the holders; firewalld's next rmmod can fall in between, so the
    helper reads live yet is no holder. One such torn look must not drop it: when the base goes
    moments later it still comes back."""
    holders = {k: v for k, v in HOLDERS.items() if k != "nf_nat_ftp"}
    d = decide(Config(), learned(), obs_with(LIVE, holders=holders), 1.0)
    assert "nf_nat_ftp" in d.state.dependents and d.state.gone_since == {"nf_nat_ftp": 1.0}
    gone = dict.fromkeys((*ALL, *FTP), ModuleState.ABSENT)
    assert "nf_nat_ftp" in decide(Config(), d.state, obs_with(gone, holders={}), 2.0).plan.modules
    # ... and a holder again at the next look: remembered as before, its clock cleared
    d = decide(Config(), d.state, obs_with(LIVE, holders=HOLDERS), 2.0)
    assert dict(d.state.dependents) == dict(learned().dependents) and d.state.gone_since == {}


def test_a_clean_up_unloading_one_module_at_a_time_brings_all_back() -> None:
    """firewalld's rmmod one by one: the holders go seconds before nf_conntrack, and a healthy look in
    between sees them gone with their base still there. When the base goes too, they all come back."""
    states = {**LIVE, "nf_conntrack_ftp": ModuleState.ABSENT, "nf_nat_ftp": ModuleState.ABSENT}
    d = decide(Config(), learned(), obs_with(states, holders={"nf_nat": ("nf_conntrack",)}), 1.0)
    assert not d.plan and set(FTP) <= set(d.state.dependents)
    gone = dict.fromkeys((*ALL, *FTP), ModuleState.ABSENT)
    d = decide(Config(), d.state, obs_with(gone, holders={}), 3.0)
    assert d.plan.modules == ("nf_conntrack", "nf_nat", "br_netfilter", "nf_conntrack_ftp", "nf_nat_ftp")


def test_a_base_reloaded_by_someone_else_brings_its_dependents_back() -> None:
    """nf_conntrack live again but as a new instance (reloaded behind our back): the helpers are due."""
    states = {**LIVE, "nf_conntrack_ftp": ModuleState.ABSENT, "nf_nat_ftp": ModuleState.ABSENT}
    obs = obs_with(states, instances={"nf_conntrack": 2, "nf_nat": 2}, holders={"nf_nat": ("nf_conntrack",)})
    assert collateral_due(Config(), learned(), obs) == FTP
    d = decide(Config(), learned(), obs, 1.0)
    assert d.plan.modules == FTP
    assert dict(d.state.dependents) == dict(learned().dependents)  # not forgotten while due


def test_never_restore_and_collateral_off() -> None:
    """never_restore globs leave a module alone; collateral = false turns the whole thing off."""
    gone = dict.fromkeys((*ALL, *FTP), ModuleState.ABSENT)
    cfg = Config(never_restore=("nf_nat_*",))
    assert decide(cfg, learned(cfg), obs_with(gone), 1.0).plan.modules[-1] == "nf_conntrack_ftp"
    off = Config(collateral=False)
    assert decide(off, learned(off), obs_with(gone), 1.0).plan.modules == ALL
    assert learned(off).dependents == {}


def test_configuration_keys() -> None:
    """collateral is a boolean, never_restore a list of names or globs; anything else is refused."""
    cfg = configmod.parse({"restore": {"collateral": False, "never_restore": ["xt_*", "nf-nat-ftp"]}})
    assert not cfg.collateral and cfg.never_restore == ("xt_*", "nf_nat_ftp")


@pytest.mark.parametrize("bad", [["a/b"], ["-r"], [1], "xt_*"])
def test_never_restore_refuses_what_is_not_a_name_or_glob(bad: object) -> None:
    """A path, an option, a number, a bare string: one ConfigError naming the key."""
    with pytest.raises(configmod.ConfigError, match="never_restore"):
        configmod.parse({"restore": {"never_restore": bad}})


def test_daemon_brings_hand_loaded_helpers_back_with_the_family(h: Harness) -> None:
    """End to end: helpers loaded by hand, the family unloaded holders first; all come back; then one
    removed alone stays gone."""
    h.host.load(*FTP)

    def driver() -> None:
        h.wait_notify("READY=1")
        time.sleep(0.2)  # a healthy look has learned the helpers
        for m in ("nf_nat_ftp", "nf_conntrack_ftp", "br_netfilter", "nf_nat", "nf_conntrack"):
            h.host.unload(m)
        h.monitor.send("remove nf_conntrack")
        h.wait_for(lambda: all(h.host.is_live(m) for m in (*ALL, *FTP)))
        time.sleep(0.3)
        h.host.unload("nf_nat_ftp")  # the operator's choice
        h.monitor.send("remove nf_nat_ftp")
        time.sleep(0.5)

    code, logs = h.run(h.daemon(cfg_for(h.host, poll_interval=0.1)), driver)
    assert code == 0 and not h.host.is_live("nf_nat_ftp")
    assert h.host.modprobe_calls()[-5:] == ["nf_conntrack", "nf_nat", "br_netfilter", "nf_conntrack_ftp", "nf_nat_ftp"]
    assert [e["modules"] for e in events(logs, "restore.planned")] == [
        "nf_conntrack nf_nat br_netfilter nf_conntrack_ftp nf_nat_ftp"]


def test_remembered_dependents_survive_a_daemon_restart(loaded: FakeHost, tmp_path: object) -> None:
    """The set is in the state file: a daemon started after the family went (while it was down) still
    brings the helpers back; check shows the set."""
    loaded.load(*FTP)
    cfgpath = loaded.config("[watch]\npoll_interval = 0.1\n")
    env = {**os.environ}

    def ctw(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ctwatchd", *args, "--root", str(loaded.root), "--config",
                               str(cfgpath)], capture_output=True, text=True, timeout=timeout, env=env, check=False)

    first = subprocess.Popen([sys.executable, "-m", "ctwatchd", "run", "--no-uevents", "--root", str(loaded.root),
                              "--config", str(cfgpath)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            saved = statefile.load(loaded.root / "run/state.json") if (loaded.root / "run/state.json").exists() \
                else None
            if saved is not None and set(saved.dependents) == set(FTP):
                break
            time.sleep(0.1)
    finally:
        first.terminate()
        first.wait(10)
    data = json.loads(ctw("check", "--json").stdout)
    assert data["daemon"]["collateral"] == ["nf_conntrack_ftp", "nf_nat_ftp"]
    for m in ("nf_nat_ftp", "nf_conntrack_ftp", "br_netfilter", "nf_nat", "nf_conntrack"):
        loaded.unload(m)
    r = ctw("restore")
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(loaded.is_live(m) for m in (*ALL, *FTP))


@pytest.mark.parametrize("buckets_writable", [True, False], ids=["buckets-sysctl", "old-kernel"])
def test_a_hashsize_set_at_run_time_comes_back_after_a_reload(h: Harness, buckets_writable: bool) -> None:
    """`echo 131072 > /sys/module/nf_conntrack/parameters/hashsize` resizes the table nf_conntrack_buckets
    shows: after a reload it comes back through that sysctl; where the sysctl is read-only (older
    kernels) the parameter itself is in the snapshot and written back."""
    param = h.host.root / "sys/module/nf_conntrack/parameters/hashsize"
    buckets = "net.netfilter.nf_conntrack_buckets"
    if not buckets_writable:  # read-only there, as before the kernel made it writable
        h.host.sysctl(buckets).chmod(0o444)
        h.host.write_modprobe(readonly=("nf_conntrack_buckets",))

    def driver() -> None:
        h.wait_notify("READY=1")
        param.write_text("131072\n")
        if buckets_writable:
            h.host.write_sysctl(buckets, "131072")  # the kernel shows the resize there too
        time.sleep(0.3)  # a look learns it
        for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
            h.host.unload(m)
        h.monitor.send("remove nf_conntrack")
        def back() -> bool:
            value = h.host.read_sysctl(buckets) if buckets_writable else (
                param.read_text().strip() if param.exists() else None)
            return all(h.host.is_live(m) for m in ALL) and value == "131072"

        h.wait_for(back)

    code, logs = h.run(h.daemon(cfg_for(h.host, poll_interval=0.1)), driver)
    assert code == 0
    writes = {e["key"]: (e["value"], e["previous"], e["result"]) for e in events(logs, "sysctl.write")}
    if buckets_writable:
        assert writes[buckets] == ("131072", "65536", "ok") and HASHSIZE not in writes
    else:
        assert writes[HASHSIZE] == ("131072", "65536", "ok") and buckets not in writes


def test_the_holders_walk_is_bounded_and_ignores_odd_names(host: FakeHost) -> None:
    """A holders loop or a hostile name in /sys cannot make the walk endless or leak into a plan."""
    host.load("nf_conntrack", "nf_nat")
    sm = host.root / "sys/module"
    (sm / "nf_nat/holders/nf_conntrack").touch()  # a loop
    (sm / "nf_conntrack/holders/..evil name").touch()
    got = KernelProbe(host.root).holders(["nf_conntrack"])
    assert got == {"nf_nat": ("nf_conntrack",)}
    for i in range(400):
        (sm / f"nf_conntrack/holders/m{i}").touch()
    assert len(KernelProbe(host.root).holders(["nf_conntrack"], limit=256)) == 256


def test_state_file_refuses_a_hostile_dependents_table(tmp_path: object) -> None:
    """A dependents entry that is not a plain module name is refused with the whole file."""
    from pathlib import Path

    path = Path(str(tmp_path)) / "state.json"
    base = {"version": 1, "tuning": {}, "conntrack_reloaded": False}
    for bad in ({"dependents": {"-r": ["nf_conntrack"]}}, {"dependents": {"x": ["a b"]}},
                {"dependents": ["x"]}, {"base_instances": {"nf_conntrack": "1"}}):
        path.write_text(json.dumps({**base, **bad}))
        path.chmod(0o600)
        with pytest.raises(statefile.StateError, match=r"dependents|base_instances"):
            statefile.load(path)
    saved = statefile.SavedState({}, False, dependents={"nf_conntrack_ftp": ("nf_conntrack",)},
                                 base_instances={"nf_conntrack": 5})
    statefile.save(path, saved)
    assert statefile.load(path) == replace(saved)


# -- a dependent that cannot come back is a courtesy, never a block (docs/faults.md H27) ----------------
GONE = dict.fromkeys((*ALL, *FTP), ModuleState.ABSENT)


def executed(plan: RestorePlan, failing: str | None) -> RestoreResult:
    """What the executor returns: each step ok until `failing`'s load fails; the steps after it skipped."""
    results: list[StepResult] = []
    for step in plan.steps:
        if results and results[-1].outcome is not Outcome.OK:
            results.append(StepResult(step, Outcome.SKIPPED, 0.0, "not run"))
        elif failing is not None and step.module == failing:
            results.append(StepResult(step, Outcome.FAILED, 1.0, f"modprobe: FATAL: Module {failing} not found"))
        else:
            results.append(StepResult(step, Outcome.OK, 1.0, ""))
    return RestoreResult(plan, tuple(results), 1.0)


def test_a_dependents_load_comes_after_everything_the_watched_modules_need() -> None:
    """Watched loads, verify, sysctls, docker and hooks first; the remembered dependents last."""
    cfg = Config(docker=DockerMode.IF_ACTIVE, hooks=(("/bin/true",),))
    d = decide(cfg, learned(cfg), obs_with(GONE), 1.0)
    kinds = [(s.kind, s.module) for s in d.plan.steps]
    assert kinds[:3] == [(StepKind.LOAD_MODULE, m) for m in ALL]
    assert kinds[-3:] == [(StepKind.RUN_HOOK, None), (StepKind.LOAD_MODULE, "nf_conntrack_ftp"),
                          (StepKind.LOAD_MODULE, "nf_nat_ftp")]
    assert (StepKind.WRITE_SYSCTLS, None) in kinds[3:-3] and (StepKind.RESTART_DOCKER, None) in kinds[3:-3]


def test_a_failing_dependent_is_retried_with_its_own_backoff_then_given_up() -> None:
    """Its failure is no failed restore (no backoff for the next fault, docker/hooks paid); it waits for
    its own retry time, still due (not learned away); after COURTESY_TRIES it is forgotten, told once."""
    cfg = Config(hooks=(("/bin/true",),), backoff_initial=1.0)
    state, now = learned(cfg), 1.0
    d = decide(cfg, state, obs_with(GONE), now)
    state = record(cfg, d.state, executed(d.plan, "nf_conntrack_ftp"), now)
    assert (state.failures, state.retry_at, state.restarts_owed) == (0, None, False)
    # nf_nat_ftp, skipped after it (it needs it), waits as long, its own count untouched
    assert dict(state.courtesy) == {"nf_conntrack_ftp": (1, 2.0), "nf_nat_ftp": (0, 2.0)} and state.given_up == ()
    back = dict(LIVE, nf_conntrack_ftp=ModuleState.ABSENT, nf_nat_ftp=ModuleState.ABSENT)
    new = {"nf_conntrack": 2, "nf_nat": 2, "br_netfilter": 2}
    waiting = decide(cfg, state, obs_with(back, new, holders={}), 1.5)
    assert not waiting.plan and waiting.wake_at == 2.0
    assert set(waiting.state.dependents) == set(FTP)  # not learned away while it waits
    tries = 1
    state, now = waiting.state, 2.0
    while True:
        d = decide(cfg, state, obs_with(back, new, holders={}), now)
        assert d.plan.modules == FTP and not any(s.kind is StepKind.RUN_HOOK for s in d.plan.steps)
        state = record(cfg, d.state, executed(d.plan, "nf_conntrack_ftp"), now)
        tries += 1
        if tries == COURTESY_TRIES:
            break
        assert state.courtesy["nf_conntrack_ftp"] == (tries, now + 2 ** (tries - 1))
        now = state.courtesy["nf_conntrack_ftp"][1]
    assert state.given_up == ("nf_conntrack_ftp",) and "nf_conntrack_ftp" not in state.dependents
    assert "nf_conntrack_ftp" not in state.courtesy and state.failures == 0
    assert "nf_conntrack_ftp" not in decide(cfg, state, obs_with(back, new, holders={}), now + 100).plan.modules


def test_a_dependent_that_loads_at_its_retry_is_forgiven() -> None:
    """One failure, then a load that works: its count is cleared, nothing given up."""
    cfg = Config()
    d = decide(cfg, learned(cfg), obs_with(GONE), 1.0)
    state = record(cfg, d.state, executed(d.plan, "nf_nat_ftp"), 1.0)
    assert dict(state.courtesy) == {"nf_nat_ftp": (1, 2.0)}
    back = dict(LIVE, nf_nat_ftp=ModuleState.ABSENT)
    d = decide(cfg, state, obs_with(back, {"nf_conntrack": 2, "nf_nat": 2}, holders={}), 2.0)
    assert d.plan.modules == ("nf_nat_ftp",)
    assert dict(record(cfg, d.state, executed(d.plan, None), 2.0).courtesy) == {}


def test_a_watched_modules_failure_is_still_a_failed_restore() -> None:
    """The courtesy rule is for dependents only: nf_nat failing backs off and leaves docker/hooks owed."""
    cfg = Config(hooks=(("/bin/true",),))
    d = decide(cfg, learned(cfg), obs_with(GONE), 1.0)
    state = record(cfg, d.state, executed(d.plan, "nf_nat"), 1.0)
    assert state.failures == 1 and state.retry_at == 2.0 and state.restarts_owed and dict(state.courtesy) == {}


def test_daemon_a_dependent_whose_ko_is_gone_never_blocks_the_repair(h: Harness) -> None:
    """End to end: nf_conntrack_ftp's modprobe fails (its .ko gone, modules.dep still naming it). The
    family, the sysctls and the hook come back at once; the helper is tried COURTESY_TRIES times, then
    one collateral.given_up record; the restore after that fault is no failure."""
    h.host.load(*FTP)
    hook = h.host.root / "hook.log"
    h.host.write_modprobe(extra='case "$*" in *nf_conntrack_ftp*) echo "modprobe: FATAL: Module '
                                'nf_conntrack_ftp not found" >&2; exit 1 ;; esac')

    def remembered() -> tuple[str, ...]:
        path = h.host.root / "run/state.json"
        saved = statefile.load(path) if path.exists() else None
        return tuple(saved.dependents) if saved is not None else FTP

    def driver() -> None:
        h.wait_notify("READY=1")
        time.sleep(0.2)  # a healthy look has learned the helpers
        for m in ("nf_nat_ftp", "nf_conntrack_ftp", "br_netfilter", "nf_nat", "nf_conntrack"):
            h.host.unload(m)
        h.host.write_sysctl("net.bridge.bridge-nf-call-iptables", "0")
        h.monitor.send("remove nf_conntrack")
        h.wait_for(lambda: all(h.host.is_live(m) for m in ALL) and hook.exists())
        h.wait_for(lambda: "nf_conntrack_ftp" not in remembered(), timeout=15)
        time.sleep(0.5)

    cfg = cfg_for(h.host, poll_interval=0.1, backoff_initial=0.2,
                  hooks=(("/bin/sh", "-c", f"echo ran >> {hook}"),))
    code, logs = h.run(h.daemon(cfg), driver)
    assert code == 0 and all(h.host.is_live(m) for m in ALL)
    assert h.host.read_sysctl("net.bridge.bridge-nf-call-iptables") == "1"
    assert hook.read_text() == "ran\n"  # once: the helper's failures did not make the hook owed again
    assert h.host.modprobe_calls().count("nf_conntrack_ftp") == COURTESY_TRIES
    given = events(logs, "collateral.given_up")
    assert [(e["module"], e["tries"]) for e in given] == [("nf_conntrack_ftp", COURTESY_TRIES)]
    assert "not found" in given[0]["detail"]
    first = events(logs, "restore.finished")[0]
    assert first["modules"].startswith("nf_conntrack nf_nat br_netfilter") and first["retry_in"] is None
