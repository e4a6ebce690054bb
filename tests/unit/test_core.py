"""The pure decision core, table-driven: observation in, ordered plan out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ctwatchd import core
from ctwatchd.config import Config, DockerMode
from ctwatchd.core import CoreState, decide, dependency_order, effective_modules, record
from ctwatchd.model import (
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

L, A, B, U, X = ModuleState.LIVE, ModuleState.ABSENT, ModuleState.BUILTIN, ModuleState.UNAVAILABLE, \
    ModuleState.BLOCKED
DEPS = {"nf_nat": ("nf_conntrack", "libcrc32c"), "br_netfilter": ("bridge", "stp"), "nf_conntrack": ()}
BRIDGE = {"net.bridge.bridge-nf-call-iptables": "1", "net.bridge.bridge-nf-call-ip6tables": "1"}
CFG = Config()


def obs(release: str = "6.1.0", sysctls: dict[str, str | None] | None = None, count: int | None = 0,
        tuning: dict[str, str] | None = None, **states: ModuleState) -> Observation:
    base = {"nf_conntrack": L, "nf_nat": L, "br_netfilter": L, "nf_conntrack_ipv4": U, "nf_nat_ipv4": U}
    base.update(states)
    return Observation(
        release=release,
        modules={n: ModuleStatus(n, s, blocker="'install x /bin/true' in f:1" if s is X else None)
                 for n, s in base.items()},
        sysctls=dict(BRIDGE if sysctls is None else sysctls),
        conntrack_count=count,
        tuning=tuning or {},
        deps=DEPS,
    )


def kinds(plan: RestorePlan) -> list[str]:
    return [f"{s.kind.value}:{s.module}" if s.module else s.kind.value for s in plan.steps]


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ({}, []),
        ({"br_netfilter": A}, ["load-module:br_netfilter", "write-sysctls"]),
        ({"nf_nat": A}, ["load-module:nf_nat", "write-sysctls"]),
        ({"nf_conntrack": A, "nf_nat": A, "br_netfilter": A},
         ["load-module:nf_conntrack", "load-module:nf_nat", "load-module:br_netfilter", "verify-conntrack",
          "write-sysctls"]),
        ({"nf_conntrack": B, "nf_nat": B, "br_netfilter": B}, []),
        ({"nf_nat": U}, []),
        ({"nf_conntrack": X, "nf_nat": A}, []),
        ({"nf_conntrack": X, "br_netfilter": A}, ["load-module:br_netfilter", "write-sysctls"]),
    ],
    ids=["healthy", "br_netfilter-gone", "nat-gone", "all-gone", "all-built-in", "nat-unavailable",
         "nat-needs-blocked-conntrack", "blocked-conntrack-does-not-stop-bridge"],
)
def test_plan_loads_only_absent_modules_in_dependency_order(states: dict[str, ModuleState],
                                                            expected: list[str]) -> None:
    """Plans hold desired, absent modules only, dependencies first, then verification and sysctls."""
    d = decide(CFG, CoreState(), obs(**states), 0.0)  # type: ignore[arg-type]  # only states here
    assert kinds(d.plan) == expected


def test_plan_order_follows_modules_dep_over_config_order() -> None:
    """The configured order does not matter: modules.dep (then the runbook's order) decides."""
    cfg = replace(CFG, modules=("br_netfilter", "nf_nat", "nf_conntrack"))
    d = decide(cfg, CoreState(), obs(nf_conntrack=A, nf_nat=A, br_netfilter=A), 0.0)
    assert d.plan.modules == ("nf_conntrack", "nf_nat", "br_netfilter")


def test_dependency_order_puts_dependencies_first_even_for_unknown_names() -> None:
    """A module that depends on another is loaded after it whatever the input order."""
    assert dependency_order(["zz_b", "zz_a"], {"zz_b": ("zz_a",)}) == ("zz_a", "zz_b")
    assert dependency_order(["x", "y"], {"x": ("y",), "y": ("x",)}) in (("x", "y"), ("y", "x"))


@pytest.mark.parametrize(
    ("release", "ipv4", "expected"),
    [
        ("4.14.0-1", A, ("nf_conntrack", "nf_nat", "br_netfilter", "nf_conntrack_ipv4", "nf_nat_ipv4")),
        ("4.19.0-1", A, ("nf_conntrack", "nf_nat", "br_netfilter", "nf_nat_ipv4")),
        ("5.1.0", A, ("nf_conntrack", "nf_nat", "br_netfilter")),
        ("4.14.0-1", U, ("nf_conntrack", "nf_nat", "br_netfilter")),
        ("6.1.0", A, ("nf_conntrack", "nf_nat", "br_netfilter")),
    ],
)
def test_legacy_modules_only_on_old_kernels_and_only_when_on_disk(release: str, ipv4: ModuleState,
                                                                  expected: tuple[str, ...]) -> None:
    """nf_conntrack_ipv4 (< 4.19) and nf_nat_ipv4 (< 5.1) join the set only where they exist."""
    o = obs(release=release, nf_conntrack_ipv4=ipv4, nf_nat_ipv4=ipv4)
    assert effective_modules(CFG.modules, o) == expected


def test_old_kernel_plan_loads_ipv4_modules_after_their_parents() -> None:
    """On a 4.14 kernel the runbook's order holds: conntrack, conntrack_ipv4, nat, nat_ipv4."""
    o = obs(release="4.14.0", nf_conntrack=A, nf_nat=A, br_netfilter=L, nf_conntrack_ipv4=A, nf_nat_ipv4=A)
    o = replace(o, deps={"nf_conntrack_ipv4": ("nf_conntrack",), "nf_nat": ("nf_conntrack",),
                         "nf_nat_ipv4": ("nf_nat", "nf_conntrack_ipv4", "nf_conntrack")})
    d = decide(CFG, CoreState(), o, 0.0)
    assert d.plan.modules == ("nf_conntrack", "nf_conntrack_ipv4", "nf_nat", "nf_nat_ipv4")


def test_sysctl_drift_alone_plans_only_the_drifted_key() -> None:
    """With modules live, only keys that exist and differ are written."""
    o = obs(sysctls={"net.bridge.bridge-nf-call-iptables": "0", "net.bridge.bridge-nf-call-ip6tables": "1"})
    d = decide(CFG, CoreState(), o, 0.0)
    assert d.plan.steps == (Step(StepKind.WRITE_SYSCTLS, sysctls=(("net.bridge.bridge-nf-call-iptables", "1"),)),)


def test_missing_sysctl_without_a_load_is_reported_not_planned() -> None:
    """A sysctl whose file is missing cannot be written; without a load to make it, no plan (no loop)."""
    cfg = replace(CFG, modules=("nf_conntrack",))
    o = obs(sysctls={"net.bridge.bridge-nf-call-iptables": None, "net.bridge.bridge-nf-call-ip6tables": "1"})
    d = decide(cfg, CoreState(), o, 0.0)
    assert not d.plan
    assert not d.health.healthy
    assert "net.bridge.bridge-nf-call-iptables missing" in d.health.problems


def test_values_compare_by_fields_not_whitespace() -> None:
    """'4096\\t16384' read from /proc equals '4096 16384' in the config."""
    cfg = replace(CFG, sysctls=(("net.ipv4.tcp_rmem", "4096 16384 6291456"),))
    d = decide(cfg, CoreState(), obs(sysctls={"net.ipv4.tcp_rmem": "4096\t16384\t6291456"}), 0.0)
    assert not d.plan


def test_builtin_counts_as_healthy() -> None:
    """A kernel with everything built in is healthy and needs nothing."""
    d = decide(CFG, CoreState(), obs(nf_conntrack=B, nf_nat=B, br_netfilter=B), 0.0)
    assert d.health.healthy and not d.plan


TUNED = {"net.netfilter.nf_conntrack_max": "1048576",
         "net.netfilter.nf_conntrack_tcp_timeout_established": "7200"}
DEFAULTS = {"net.netfilter.nf_conntrack_max": "262144",
            "net.netfilter.nf_conntrack_tcp_timeout_established": "432000"}


def test_tuning_snapshot_is_reapplied_after_conntrack_reload() -> None:
    """Tuned values seen while live are written back after nf_conntrack is loaded again."""
    s = decide(CFG, CoreState(), obs(tuning=TUNED), 0.0).state
    assert s.tuning == TUNED
    d = decide(CFG, s, obs(nf_conntrack=A, nf_nat=A, count=None, tuning={}), 1.0)
    writes = dict(next(st for st in d.plan.steps if st.kind is StepKind.RESTORE_TUNING).sysctls)
    assert writes["net.netfilter.nf_conntrack_max"] == "1048576"
    assert writes["net.netfilter.nf_conntrack_tcp_timeout_established"] == "7200"


def test_snapshot_never_learns_the_defaults_of_a_fresh_reload() -> None:
    """If someone else reloads conntrack, the defaults are not taken as the new tuning; they are fixed."""
    s = decide(CFG, CoreState(), obs(tuning=TUNED), 0.0).state
    s = decide(CFG, s, obs(nf_conntrack=A, count=None), 1.0).state  # seen absent
    assert s.conntrack_reloaded
    d = decide(CFG, s, obs(tuning=DEFAULTS), 2.0)  # loaded again by someone else, values at defaults
    assert d.state.tuning == TUNED
    assert dict(d.plan.steps[0].sysctls) == TUNED
    d2 = decide(CFG, d.state, obs(tuning=TUNED), 3.0)  # back: snapshot follows live values again
    assert not d2.state.conntrack_reloaded and not d2.plan
    d3 = decide(CFG, d2.state, obs(tuning={**TUNED, "net.netfilter.nf_conntrack_max": "2000000"}), 4.0)
    assert d3.state.tuning["net.netfilter.nf_conntrack_max"] == "2000000"


def test_sysctl_config_wins_over_snapshot() -> None:
    """A key in [sysctl] is written with its configured value, not the snapshot's."""
    cfg = replace(CFG, sysctls=(*CFG.sysctls, ("net.netfilter.nf_conntrack_max", "500000")))
    s = decide(cfg, CoreState(), obs(tuning=TUNED, sysctls={**BRIDGE, "net.netfilter.nf_conntrack_max": "500000"}),
               0.0).state
    d = decide(cfg, s, obs(nf_conntrack=A, count=None), 1.0)
    kinds = {st.kind: dict(st.sysctls) for st in d.plan.steps}
    assert kinds[StepKind.WRITE_SYSCTLS]["net.netfilter.nf_conntrack_max"] == "500000"
    assert "net.netfilter.nf_conntrack_max" not in kinds[StepKind.RESTORE_TUNING]


def test_keep_conntrack_tuning_off_takes_no_snapshot() -> None:
    """keep_conntrack_tuning = false leaves the kernel defaults after a reload."""
    cfg = replace(CFG, keep_conntrack_tuning=False)
    s = decide(cfg, CoreState(), obs(tuning=TUNED), 0.0).state
    assert s.tuning == {}


def result_of(plan: RestorePlan, outcome: Outcome = Outcome.OK) -> RestoreResult:
    results = [StepResult(s, Outcome.OK, 1.0) for s in plan.steps]
    if outcome is not Outcome.OK:
        results[0] = StepResult(plan.steps[0], outcome, 1.0, "boom")
    return RestoreResult(plan, tuple(results), 1.0)


def test_failed_restore_backs_off_exponentially() -> None:
    """After failures no plan is made before retry_at, which doubles up to backoff_max."""
    cfg = replace(CFG, backoff_initial=1.0, backoff_max=4.0)
    o = obs(nf_nat=A)
    s = CoreState()
    delays = []
    now = 0.0
    for _ in range(4):
        d = decide(cfg, s, o, now)
        assert d.plan
        s = record(cfg, d.state, result_of(d.plan, Outcome.FAILED), now)
        assert s.retry_at is not None
        delays.append(s.retry_at - now)
        waiting = decide(cfg, s, o, now + 0.5)
        assert not waiting.plan and waiting.wake_at == s.retry_at
        now = s.retry_at
    assert delays == [1.0, 2.0, 4.0, 4.0]
    d = decide(cfg, s, o, now)
    s = record(cfg, d.state, result_of(d.plan), now)
    assert s.failures == 0 and s.retry_at is None


def test_breaker_limits_docker_and_hook_restarts_per_window_and_closes() -> None:
    """At most max_restarts docker/hook runs per window; later restores load modules only; then it closes."""
    cfg = replace(CFG, docker=DockerMode.IF_ACTIVE, hooks=(("/bin/true",),), max_restarts=2,
                  restart_window=100.0)
    o = obs(br_netfilter=A)
    s = CoreState()
    with_restarts = []
    for t in (0.0, 10.0, 20.0, 30.0):
        d = decide(cfg, s, o, t)
        has = any(st.kind in (StepKind.RESTART_DOCKER, StepKind.RUN_HOOK) for st in d.plan.steps)
        with_restarts.append(has)
        assert d.plan.modules == ("br_netfilter",)
        s = record(cfg, d.state, result_of(d.plan), t)
    assert with_restarts == [True, True, False, False]
    assert core.breaker_open(cfg, s, 30.0)
    assert decide(cfg, s, o, 40.0).plan.skipped_restarts
    assert not core.breaker_open(cfg, s, 110.0)
    assert kinds(decide(cfg, s, o, 110.0).plan)[-2:] == ["restart-docker", "run-hook"]


def test_transient_module_is_waited_for_then_called_stuck() -> None:
    """A module coming or going is rechecked soon, not raced; after the grace period it is a problem."""
    o = obs(nf_nat=ModuleState.GOING, br_netfilter=A)
    d = decide(CFG, CoreState(), o, 0.0)
    assert not d.plan and d.wake_at == pytest.approx(core.TRANSIENT_RECHECK)
    d2 = decide(CFG, d.state, o, core.TRANSIENT_GRACE + 1)
    assert d2.plan.modules == ("br_netfilter",)
    assert any("nf_nat going" in p for p in d2.health.problems)


def test_hooks_and_docker_follow_sysctls_only_when_modules_were_loaded() -> None:
    """Docker/hooks run after a module restore, never for sysctl drift alone."""
    cfg = replace(CFG, docker=DockerMode.IF_ACTIVE, hooks=(("/usr/bin/systemctl", "try-restart", "x"),))
    d = decide(cfg, CoreState(), obs(nf_nat=A), 0.0)
    assert kinds(d.plan) == ["load-module:nf_nat", "write-sysctls", "restart-docker", "run-hook"]
    drift = obs(sysctls={**BRIDGE, "net.bridge.bridge-nf-call-iptables": "0"})
    assert kinds(decide(cfg, CoreState(), drift, 0.0).plan) == ["write-sysctls"]


def test_health_names_every_problem() -> None:
    """Degraded health says which module, which blocker, which sysctl."""
    o = obs(nf_conntrack=X, nf_nat=U, count=None,
            sysctls={"net.bridge.bridge-nf-call-iptables": "0", "net.bridge.bridge-nf-call-ip6tables": None})
    h = core.assess(CFG, o, CoreState(), 0.0)
    assert not h.healthy
    text = "; ".join(h.problems)
    for needle in ("nf_conntrack blocked by", "nf_nat unavailable", "nf_conntrack_count unreadable",
                   "bridge-nf-call-iptables=0 (want 1)", "bridge-nf-call-ip6tables missing"):
        assert needle in text


@pytest.mark.parametrize(("release", "version"), [("4.18.0-553.el8.x86_64", (4, 18)), ("6.1.0-28-amd64", (6, 1)),
                                                  ("garbage", (99, 0)), ("5", (99, 0))])
def test_kernel_version_parsing(release: str, version: tuple[int, int]) -> None:
    """Release strings parse to (major, minor); unparsable ones count as new kernels."""
    assert core.kernel_version(release) == version


def live_ct(instance: int | None, tuning: dict[str, str]) -> Observation:
    """All live, nf_conntrack as the module instance given (its /sys/module inode), with these values."""
    o = obs(tuning=tuning)
    mods = dict(o.modules)
    mods["nf_conntrack"] = replace(mods["nf_conntrack"], instance=instance)
    return replace(o, modules=mods)


def test_reload_seen_only_as_a_new_instance_still_reapplies_tuning() -> None:
    """Removed and reloaded between two looks (no absent observation): the new inode gives it away."""
    s = decide(CFG, CoreState(), live_ct(100, TUNED), 0.0).state
    assert s.conntrack_instance == 100 and s.tuning == TUNED
    d = decide(CFG, s, live_ct(101, DEFAULTS), 1.0)
    assert d.state.conntrack_reloaded and d.state.tuning == TUNED
    assert dict(d.plan.steps[0].sysctls) == TUNED
    same = decide(CFG, s, live_ct(100, {**TUNED, "net.netfilter.nf_conntrack_max": "5"}), 1.0)
    assert not same.state.conntrack_reloaded  # same instance: an admin's change, learned
    assert same.state.tuning["net.netfilter.nf_conntrack_max"] == "5"


def test_a_look_that_cannot_read_conntracks_identity_does_not_forget_it() -> None:
    """initstate read "live", then /sys/module/nf_conntrack vanished before its stat (a removal racing
    the look): the identity is unknown, not new. Forgetting the old one let the next look, of a fresh
    reload, teach the snapshot the kernel's defaults (seen in the VM: nf_conntrack_max back to 7680)."""
    s = decide(CFG, CoreState(), live_ct(100, TUNED), 0.0).state
    torn = decide(CFG, s, live_ct(None, {}), 1.0)
    assert torn.state.conntrack_instance == 100 and torn.state.tuning == TUNED
    d = decide(CFG, torn.state, live_ct(101, DEFAULTS), 2.0)
    assert d.state.conntrack_reloaded and d.state.tuning == TUNED
    assert dict(d.plan.steps[0].sysctls) == TUNED


def test_the_same_module_showing_fewer_tuning_keys_does_not_shrink_the_snapshot() -> None:
    """A read torn by a removal that began during it: same instance, some keys missing. Learning it
    dropped nf_conntrack_max from the snapshot, and the reload after it went untuned (seen in the VM)."""
    s = decide(CFG, CoreState(), live_ct(100, TUNED), 0.0).state
    torn = decide(CFG, s, live_ct(100, {"net.netfilter.nf_conntrack_tcp_timeout_established": "432000"}), 1.0)
    assert torn.state.tuning == TUNED
    d = decide(CFG, torn.state, live_ct(101, DEFAULTS), 2.0)
    assert d.state.conntrack_reloaded and dict(d.plan.steps[0].sysctls) == TUNED
    grown = decide(CFG, s, live_ct(100, {**TUNED, "net.netfilter.nf_conntrack_acct": "1"}), 3.0)
    assert grown.state.tuning["net.netfilter.nf_conntrack_acct"] == "1"  # more keys, or changed values: learned


def test_snapshot_is_not_written_while_conntrack_is_absent() -> None:
    """A blocked (or failing) conntrack after a reload: no tuning writes into files that do not exist."""
    s = decide(CFG, CoreState(), obs(tuning=TUNED), 0.0).state
    d = decide(CFG, s, obs(nf_conntrack=X, nf_nat=A, count=None), 1.0)
    assert d.state.conntrack_reloaded
    assert not d.plan  # nf_nat needs the blocked conntrack; the tuning waits for conntrack to be live
    d2 = decide(CFG, d.state, obs(tuning=DEFAULTS), 2.0)  # the block lifted, loaded by someone else
    assert dict(d2.plan.steps[0].sysctls) == TUNED


@pytest.mark.parametrize(("release", "expected"), [
    ("4.14.0", ("nf_conntrack", "nf_nat", "br_netfilter", "nf_conntrack_ipv4", "nf_nat_ipv4")),
    ("4.19.0", ("nf_conntrack", "nf_nat", "br_netfilter", "nf_nat_ipv4")),
    ("6.1.0-28-amd64", ("nf_conntrack", "nf_nat", "br_netfilter")),
])
def test_legacy_modules_are_only_looked_at_on_old_kernels(release: str, expected: tuple[str, ...]) -> None:
    """A 6.1 kernel is never asked about nf_conntrack_ipv4; a 4.14 one is, for both legacy names."""
    assert core.observed_modules(CFG.modules, release) == expected
    assert core.observed_modules(("br_netfilter",), "4.14.0") == ("br_netfilter",)


def test_failed_hook_is_retried_after_backoff_even_though_modules_are_back() -> None:
    """A hook that failed after a successful reload is owed: it runs again (alone) after the backoff."""
    cfg = replace(CFG, hooks=(("/usr/bin/systemctl", "try-restart", "kube-proxy.service"),))
    d = decide(cfg, CoreState(), obs(br_netfilter=A), 0.0)
    results = tuple(StepResult(st, Outcome.FAILED if st.kind is StepKind.RUN_HOOK else Outcome.OK, 1.0, "x")
                    for st in d.plan.steps)
    s = record(cfg, d.state, RestoreResult(d.plan, results, 1.0), 0.0)
    assert s.restarts_owed and s.retry_at == 1.0
    assert not decide(cfg, s, obs(), 0.5).plan  # backing off
    retry = decide(cfg, s, obs(), 1.0)
    assert kinds(retry.plan) == ["run-hook"] and "owed" in retry.plan.reason
    s2 = record(cfg, retry.state, result_of(retry.plan), 1.0)
    assert not s2.restarts_owed and not decide(cfg, s2, obs(), 2.0).plan


def test_restarts_held_back_by_the_breaker_run_once_it_closes() -> None:
    """After flapping stops, the breaker closes and docker/hooks run once for the last reload."""
    cfg = replace(CFG, docker=DockerMode.IF_ACTIVE, max_restarts=1, restart_window=100.0)
    s = CoreState()
    for t in (0.0, 10.0):
        d = decide(cfg, s, obs(br_netfilter=A), t)
        s = record(cfg, d.state, result_of(d.plan), t)
    assert s.restarts_owed  # the second reload's docker restart was held back
    assert not decide(cfg, s, obs(), 50.0).plan  # breaker still open: nothing but waiting
    later = decide(cfg, s, obs(), 100.5)
    assert kinds(later.plan) == ["restart-docker"]


def test_no_plan_while_removals_are_still_arriving_then_one_plan_for_all_of_them() -> None:
    """A clean-up rmmods one module after another: no plan until the removals have been quiet for
    REMOVALS_QUIET, then one plan with every module gone by then (one docker decision per fault)."""
    s = core.removal_seen(CoreState(), 100.0)
    d = decide(CFG, s, obs(nf_nat=A), 100.1)
    assert (d.plan.steps, d.plan.reason) == ((), "waiting: removals still arriving")
    assert d.wake_at == 100.0 + core.REMOVALS_QUIET
    s = core.removal_seen(d.state, 100.2)
    assert s.removals == (100.0, 100.2)
    d = decide(CFG, s, obs(nf_nat=A, nf_conntrack=A), 100.2 + core.REMOVALS_QUIET - 0.01)
    assert d.plan.steps == ()
    d = decide(CFG, d.state, obs(nf_nat=A, nf_conntrack=A), 100.2 + core.REMOVALS_QUIET + 0.001)
    assert kinds(d.plan)[:2] == ["load-module:nf_conntrack", "load-module:nf_nat"]
    assert d.state.removals is None


def test_a_stream_of_removals_postpones_the_repair_at_most_the_transient_grace() -> None:
    """Removals every 0.2 s for ever: the plan comes TRANSIENT_GRACE after the first, not never; a
    removal long after the last one starts a new burst."""
    s, t = CoreState(), 0.0
    while t < core.TRANSIENT_GRACE - 0.1:
        s = core.removal_seen(s, t)
        assert decide(CFG, s, obs(nf_nat=A), t + 0.05).plan.steps == ()
        t += 0.2
    s = core.removal_seen(s, core.TRANSIENT_GRACE)
    assert s.removals is not None and s.removals[0] == 0.0
    d = decide(CFG, s, obs(nf_nat=A), core.TRANSIENT_GRACE + 0.01)
    assert kinds(d.plan)[0] == "load-module:nf_nat"
    assert core.removal_seen(CoreState(removals=(0.0, 1.0)), 1.0 + core.TRANSIENT_GRACE).removals == \
        (1.0 + core.TRANSIENT_GRACE,) * 2
