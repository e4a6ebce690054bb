"""The decision core's edges: the reason every plan gives, the STATUS= text, the waits, the snapshot
under torn reads, and what a restarted daemon resumes from its own boot's state file."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ctwatchd import core
from ctwatchd.config import Config, DockerMode
from ctwatchd.core import (
    TRANSIENT_GRACE,
    CoreState,
    Health,
    assess,
    classify,
    core_state,
    decide,
    dependency_order,
    record,
)
from ctwatchd.model import (
    Blocker,
    KernelFacts,
    ModuleEvidence,
    ModuleState,
    ModuleStatus,
    Observation,
    Outcome,
    RestorePlan,
    RestoreResult,
    Step,
    StepKind,
    StepResult,
)
from ctwatchd.state import SavedState

BOOT = "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b"
MAX = "net.netfilter.nf_conntrack_max"
TCP = "net.netfilter.nf_conntrack_tcp_timeout_established"
IPT = "net.bridge.bridge-nf-call-iptables"
IP6 = "net.bridge.bridge-nf-call-ip6tables"
TUNED = {MAX: "1048576", TCP: "7200"}
L, A, U, G = ModuleState.LIVE, ModuleState.ABSENT, ModuleState.UNAVAILABLE, ModuleState.GOING
CFG = Config()


def obs(sysctls: dict[str, str | None] | None = None, tuning: dict[str, str] | None = None, count: int | None = 0,
        detail: str = "", **states: ModuleState) -> Observation:
    base = {"nf_conntrack": L, "nf_nat": L, "br_netfilter": L, "nf_conntrack_ipv4": U, "nf_nat_ipv4": U}
    base.update(states)
    return Observation("6.1.0-28-amd64", {n: ModuleStatus(n, s, detail) for n, s in base.items()},
                       {IPT: "1", IP6: "1"} if sysctls is None else sysctls, count, tuning or {},
                       {"nf_nat": ("nf_conntrack",), "nf_conntrack": (), "br_netfilter": ()})


def test_same_boot_resumes_an_owed_snapshot_and_a_restart_made_just_now() -> None:
    """Restarted in the same boot, the daemon still owes the tuning snapshot to a reloaded conntrack, and a
    restart recorded at exactly `now` counts for the breaker (only times after `now` are refused)."""
    saved = SavedState({MAX: "1048576"}, True, (50.0, 200.0, 200.5), "degraded", None, False, BOOT)
    s = core_state(saved, boot_id=BOOT, now=200.0)
    assert s.conntrack_reloaded is True
    assert s.restarts == (50.0, 200.0)
    assert s.tuning == {MAX: "1048576"}
    settled = SavedState({MAX: "1048576"}, False, (), "healthy", None, False, BOOT)
    assert core_state(settled, boot_id=BOOT, now=200.0).conntrack_reloaded is False


@pytest.mark.parametrize(("release", "version"), [("4.18-rc1-amd64", (4, 18)), ("5.4-custom", (5, 4))])
def test_a_release_without_a_patch_level_still_parses(release: str, version: tuple[int, int]) -> None:
    """'4.18-rc1-amd64' is 4.18 (the dash ends the version), not an unparsable new kernel."""
    assert core.kernel_version(release) == version


def test_dependencies_modules_dep_does_not_order_keep_the_configured_order() -> None:
    """Two dependencies of one module that modules.dep leaves unordered are loaded in the configured order."""
    assert dependency_order(["nf_conntrack", "zz_b", "zz_a"], {"nf_conntrack": ("zz_a", "zz_b")}) == \
        ("zz_b", "zz_a", "nf_conntrack")


def test_status_line_names_problems_modules_and_an_open_breaker() -> None:
    """STATUS= is 'healthy' or 'degraded: p1; p2', then each module's state, then the breaker if open."""
    o = obs(nf_nat=A)
    mods = ("nf_conntrack", "nf_nat")
    assert Health(False, ("nf_nat absent", "x missing"), True).summary(o, mods) == \
        "degraded: nf_nat absent; x missing (nf_conntrack live, nf_nat absent); " \
        "restart breaker open (docker/hooks paused)"
    assert Health(True, ()).summary(o, mods) == "healthy (nf_conntrack live, nf_nat absent)"


def test_health_problems_say_what_was_seen() -> None:
    """A desired module missing from the observation, one with evidence and one without each read as a
    sentence fragment; assess also says whether the restart breaker is open."""
    cfg = replace(CFG, docker=DockerMode.IF_ACTIVE, max_restarts=1)
    o = obs(nf_nat=U, br_netfilter=G, detail="")
    o = replace(o, modules={**{k: v for k, v in o.modules.items() if k != "nf_conntrack"},
                            "nf_nat": ModuleStatus("nf_nat", U, "not in /lib/modules/6.1/modules.dep")})
    h = assess(cfg, o, CoreState(restarts=(10.0,)), 20.0)
    assert h.problems[:3] == ("nf_conntrack was not observed",
                              "nf_nat unavailable (not in /lib/modules/6.1/modules.dep)", "br_netfilter going")
    assert h.breaker_open is True
    assert assess(cfg, o, CoreState(), 20.0).breaker_open is False


@pytest.mark.parametrize(("kw", "reason"), [
    ({"o": obs(nf_nat=A, br_netfilter=A, sysctls={IPT: None, IP6: None})}, "not loaded: nf_nat, br_netfilter"),
    ({"o": obs(sysctls={IPT: "0", IP6: "0"})}, f"sysctl drift: {IPT}, {IP6}"),
    ({"o": obs(tuning={MAX: "262144", TCP: "432000"}), "s": CoreState(tuning=TUNED, conntrack_reloaded=True)},
     f"sysctl drift: {MAX}, {TCP}"),
    ({"o": obs(), "s": CoreState(restarts_owed=True), "cfg": replace(CFG, hooks=(("/bin/true",),))},
     "docker/hooks still owed after an earlier restore"),
    ({"o": obs()}, "healthy"),
    ({"o": obs(nf_nat=U, sysctls={IPT: None, IP6: "1"})},
     f"nothing ctwatchd can do: nf_nat unavailable; {IPT} missing"),
])
def test_every_plan_says_why_it_exists(kw: dict[str, object], reason: str) -> None:
    """The plan's reason (audited, and shown by `restore --dry-run`) names what is missing or drifted,
    what is still owed, or that nothing can be done and why."""
    cfg = kw.get("cfg", CFG)
    d = decide(cfg, kw.get("s", CoreState()), kw["o"], 0.0)  # type: ignore[arg-type]
    assert d.plan.reason == reason


def test_waiting_for_busy_modules_is_an_empty_plan_that_names_them() -> None:
    """While modules are coming or going the plan is empty, names each busy module and still carries the
    health; at TRANSIENT_GRACE after it was first seen busy a module counts as stuck instead."""
    o = obs(nf_nat=G, br_netfilter=ModuleState.COMING)
    first = decide(CFG, CoreState(), o, 1000.0)
    d = decide(CFG, first.state, o, 1005.0)
    assert d.plan.steps == () and d.plan.reason == "waiting for nf_nat, br_netfilter"
    assert d.health is not None and not d.health.healthy
    stuck = decide(CFG, first.state, o, 1000.0 + TRANSIENT_GRACE)
    assert not stuck.plan.reason.startswith("waiting")


@pytest.mark.parametrize(("unsettled", "reason"), [(0, "backing off after a failed restore"),
                                                   (3, "backing off: the last restores did not hold")])
def test_backing_off_is_an_empty_plan_that_says_why(unsettled: int, reason: str) -> None:
    """Before retry_at nothing is planned; the reason tells a failed restore from one that did not hold."""
    d = decide(CFG, CoreState(retry_at=50.0, unsettled=unsettled, failures=1), obs(nf_nat=A), 10.0)
    assert d.plan.steps == () and d.plan.reason == reason and d.wake_at == 50.0
    assert d.health is not None and not d.health.healthy


def test_dropped_snapshot_keys_are_reported_by_one_decision_only() -> None:
    """Keys dropped from the snapshot are carried to the next audit once; the following decision has none."""
    d = decide(CFG, CoreState(dropped=(MAX,)), obs(), 0.0)
    assert d.state.dropped == ()


def test_a_torn_tuning_read_neither_erases_the_snapshot_nor_plans_a_write_back() -> None:
    """An observation with no tuning values (a read torn by a reload) keeps the snapshot as it was and,
    right after a reload, plans no write-back until the values can be read."""
    live = decide(CFG, CoreState(tuning=TUNED), obs(tuning={}), 0.0)
    assert live.state.tuning == TUNED
    owed = decide(CFG, CoreState(tuning=TUNED, conntrack_reloaded=True), obs(tuning={}), 0.0)
    assert owed.state.conntrack_reloaded and owed.state.tuning == TUNED
    assert not any(s.kind is StepKind.RESTORE_TUNING for s in owed.plan.steps)


def test_a_removal_with_no_snapshot_owes_nothing() -> None:
    """With no tuned values taken, a conntrack removal does not mark a snapshot as owed."""
    assert decide(CFG, CoreState(), obs(nf_conntrack=A, count=None), 0.0).state.conntrack_reloaded is False


FACTS = KernelFacts("6.1.0-28-amd64", True, True, frozenset({"nf_nat"}), {"nf_conntrack": ()},
                    {"CONFIG_BRIDGE_NETFILTER": "y"})


@pytest.mark.parametrize(("ev", "facts", "state", "detail"), [
    (ModuleEvidence("nf_conntrack", "live", True, True, 42), FACTS, ModuleState.LIVE,
     "/sys/module/nf_conntrack/initstate"),
    (ModuleEvidence("nf_nat", None, True, False), FACTS, ModuleState.BUILTIN, "/sys/module/nf_nat has no initstate"),
    (ModuleEvidence("nf_nat", None, False, False), FACTS, ModuleState.BUILTIN, "listed in modules.builtin"),
    (ModuleEvidence("br_netfilter", None, False, False), FACTS, ModuleState.BUILTIN,
     "CONFIG_BRIDGE_NETFILTER=y in the kernel config"),
    (ModuleEvidence("nf_conntrack", None, False, False), FACTS, ModuleState.ABSENT, "not loaded"),
    (ModuleEvidence("nf_conntrack", None, False, False), replace(FACTS, deps={}), ModuleState.ABSENT,
     "not loaded (no modules.dep to check the disk)"),
    (ModuleEvidence("nf_conntrack", None, False, False), replace(FACTS, module_support=False),
     ModuleState.UNAVAILABLE, "the kernel has no module support and shows no sign of it"),
])
def test_each_classification_names_its_evidence(ev: ModuleEvidence, facts: KernelFacts, state: ModuleState,
                                                detail: str) -> None:
    """Each state comes with the evidence it was read from, which `check` and the health problems show."""
    assert classify(ev, facts) == ModuleStatus(ev.name, state, detail, None, ev.instance if state is L else None)


def test_a_blacklist_is_noted_only_for_the_module_it_names() -> None:
    """A blacklist line for nf_nat adds a note to nf_nat's status only."""
    rule = Blocker("blacklist nf_nat", "/etc/modprobe.d/x.conf:1", blocks=False)
    facts = replace(FACTS, builtin=frozenset(), notes={"nf_nat": rule})
    nat = classify(ModuleEvidence("nf_nat", None, False, False), replace(facts, deps={"nf_nat": ()}))
    assert nat.note == f"{rule}: modprobe ignores a blacklist for a module it is asked for by name"
    assert classify(ModuleEvidence("nf_conntrack", None, False, False), facts).note is None


def test_snapshot_keys_the_kernel_refused_are_dropped_and_reported_once() -> None:
    """A restore whose write-back dropped a key removes it from the snapshot and lists it in `dropped`."""
    d = decide(CFG, CoreState(tuning=TUNED, conntrack_reloaded=True), obs(tuning={MAX: "262144", TCP: "1"}), 0.0)
    step = next(s for s in d.plan.steps if s.kind is StepKind.RESTORE_TUNING)
    result = RestoreResult(d.plan, (StepResult(step, Outcome.OK, 1.0, "", (TCP,)),), 1.0)
    s = record(CFG, d.state, result, 1.0)
    assert s.tuning == {MAX: "1048576"} and s.dropped == (TCP,)


def restore_result(plan_steps: list[tuple[Step, Outcome]], skipped_restarts: bool = False) -> RestoreResult:
    plan = RestorePlan(tuple(s for s, _ in plan_steps), "test", skipped_restarts)
    return RestoreResult(plan, tuple(StepResult(s, o, 1.0) for s, o in plan_steps), 1.0)


LOAD = Step(StepKind.LOAD_MODULE, module="nf_nat")
HOOK = Step(StepKind.RUN_HOOK, argv=("/bin/true",))


def test_what_is_owed_after_a_restore() -> None:
    """Hooks not run because an earlier step failed are still owed; a reload the breaker held hooks back
    from owes them; a reload with nothing to restart owes nothing."""
    cfg = replace(CFG, hooks=(("/bin/true",),))
    failed = restore_result([(LOAD, Outcome.FAILED), (HOOK, Outcome.SKIPPED)])
    assert record(cfg, CoreState(), failed, 0.0).restarts_owed is True
    held = restore_result([(LOAD, Outcome.OK)], skipped_restarts=True)
    assert record(cfg, CoreState(), held, 0.0).restarts_owed is True
    assert record(CFG, CoreState(), restore_result([(LOAD, Outcome.OK)]), 0.0).restarts_owed is False


def test_the_breaker_window_counts_a_restart_from_its_instant_until_restart_window_later() -> None:
    """A restart made at `now` counts at once; it stops counting exactly restart_window later."""
    cfg = replace(CFG, hooks=(("/bin/true",),), max_restarts=1, restart_window=600.0)
    s = CoreState(restarts=(1000.0,))
    assert core.breaker_open(cfg, s, 1000.0)
    assert core.breaker_open(cfg, s, 1599.0)
    assert not core.breaker_open(cfg, s, 1600.0)


def test_a_module_restore_resets_the_unsettled_count() -> None:
    """After a module reload, it takes UNSETTLED_AFTER sysctl-only restores in a row before backing off."""
    sysctl = Step(StepKind.WRITE_SYSCTLS, sysctls=((IPT, "1"),))
    s = record(CFG, CoreState(unsettled=2), restore_result([(LOAD, Outcome.OK)]), 0.0)
    assert s.unsettled == 0
    for i in range(1, core.UNSETTLED_AFTER):
        s = record(CFG, s, restore_result([(sysctl, Outcome.OK)]), float(i))
        assert s.retry_at is None
    s = record(CFG, s, restore_result([(sysctl, Outcome.OK)]), 10.0)
    assert s.retry_at == 10.0 + CFG.backoff_initial
