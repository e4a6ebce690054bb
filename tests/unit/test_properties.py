"""Property tests (hypothesis): the decision core over random observation sequences, the config loader
over random TOML documents and random bytes, and the state file and sysctl paths over hostile input.

The core is driven like the daemon drives it: decide() on an observation, a simulated execution of the
plan with random step outcomes, record() at a later simulated monotonic time, and again. Example counts
are set per test (`EXAMPLES`) so the module runs in well under 30 s.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import string
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ctwatchd import config as configmod
from ctwatchd import state as statefile
from ctwatchd.config import Config, ConfigError, DockerMode, LogFormat
from ctwatchd.core import (
    UNSETTLED_AFTER,
    CoreState,
    Decision,
    assess,
    breaker_open,
    core_state,
    decide,
    dependency_order,
    effective_modules,
    record,
)
from ctwatchd.kernel import sysctl_path
from ctwatchd.model import (
    MODULE_NAME,
    ModuleState,
    ModuleStatus,
    Observation,
    Outcome,
    RestoreResult,
    StepKind,
    StepResult,
    normalize_module,
)

EXAMPLES = {"core": 300, "cycles": 200, "toml": 400, "bytes": 400, "state": 200, "paths": 300}
SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}

CORE = ("nf_conntrack", "nf_nat", "br_netfilter")
LEGACY = ("nf_conntrack_ipv4", "nf_nat_ipv4")
EXTRA = ("xt_conntrack", "nf_tables", "veth")
DEP_ONLY = ("libcrc32c", "bridge", "stp", "nf_defrag_ipv4")
ALL_NAMES = (*CORE, *LEGACY, *EXTRA, *DEP_ONLY)
RELEASES = ("3.10.0-1160.el7.x86_64", "4.14.0-1", "4.18.0-553.el8.x86_64", "4.19.0", "4.19.0-25-amd64", "5.0.21",
            "5.1.0", "6.1.0-28-amd64", "6.18.4", "garbage", "5", "", "4.x.y")
BRIDGE_KEYS = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")
TUNING_KEYS = ("net.netfilter.nf_conntrack_max", "net.netfilter.nf_conntrack_buckets",
               "net.netfilter.nf_conntrack_tcp_timeout_established", "net.netfilter.nf_conntrack_tcp_loose")
OTHER_KEYS = ("net.ipv4.ip_forward", "net.core.somaxconn")
VALUES = ("0", "1", "2", "65536", "262144", "1048576", "4096 16384", "7200")


# == the decision core ============================================================================

@st.composite
def configs(draw: st.DrawFn) -> Config:
    modules = draw(st.lists(st.sampled_from((*CORE, *EXTRA)), unique=True, max_size=6))
    keys = draw(st.lists(st.sampled_from((*BRIDGE_KEYS, *TUNING_KEYS, *OTHER_KEYS)), unique=True, max_size=5))
    backoff_initial = draw(st.sampled_from((0.1, 1.0, 5.0)))
    return Config(
        modules=tuple(modules),
        sysctls=tuple((k, draw(st.sampled_from(VALUES))) for k in keys),
        docker=draw(st.sampled_from(DockerMode)),
        hooks=tuple(draw(st.lists(st.sampled_from((("/bin/true",), ("/usr/bin/env", "x"))), max_size=2))),
        keep_conntrack_tuning=draw(st.booleans()),
        backoff_initial=backoff_initial,
        backoff_max=backoff_initial * draw(st.sampled_from((1, 4, 100))),
        max_restarts=draw(st.integers(0, 4)),
        restart_window=draw(st.sampled_from((1.0, 10.0, 60.0, 600.0))),
    )


@st.composite
def module_deps(draw: st.DrawFn, *, acyclic: bool = True) -> dict[str, tuple[str, ...]]:
    """A random modules.dep: a DAG over a random order, or anything at all (cycles included)."""
    order = draw(st.permutations(ALL_NAMES))
    deps: dict[str, tuple[str, ...]] = {}
    for i, name in enumerate(order):
        if draw(st.booleans()):  # some modules are not in modules.dep at all
            pool = order[:i] if acyclic else [n for n in order if n != name]
            deps[name] = tuple(draw(st.lists(st.sampled_from(pool), unique=True, max_size=4))) if pool else ()
    return deps


@st.composite
def observations(draw: st.DrawFn, cfg: Config, deps: Mapping[str, tuple[str, ...]]) -> Observation:
    """What the probe could report: states for the desired set and the legacy candidates, consistent files."""
    names = list(dict.fromkeys([*cfg.modules, *LEGACY]))
    modules: dict[str, ModuleStatus] = {}
    for name in names:
        state = draw(st.sampled_from(ModuleState))
        instance = draw(st.integers(1, 4)) if state in (ModuleState.LIVE, ModuleState.COMING,
                                                         ModuleState.GOING) else None
        blocker = f"'install {name} /bin/true' in /etc/modprobe.d/x.conf:1" if state is ModuleState.BLOCKED else None
        modules[name] = ModuleStatus(name, state, "", blocker, instance)
    ct = modules.get("nf_conntrack")
    br = modules.get("br_netfilter")
    ct_live = ct is not None and ct.state is ModuleState.LIVE
    ct_files = (ct is not None and ct.state.satisfied) or (ct is None and draw(st.booleans()))
    br_files = (br is not None and br.state.satisfied) or (br is None and draw(st.booleans()))
    tuning = {k: draw(st.sampled_from(VALUES)) for k in TUNING_KEYS if draw(st.booleans())} if ct_live else {}
    sysctls: dict[str, str | None] = {}
    for key, want in cfg.sysctls:
        if key in TUNING_KEYS:
            sysctls[key] = (tuning.setdefault(key, draw(st.sampled_from((want, *VALUES)))) if ct_live
                            else draw(st.sampled_from((want, *VALUES))) if ct_files else None)
        elif key in BRIDGE_KEYS:
            sysctls[key] = draw(st.sampled_from((want, *VALUES))) if br_files else None
        else:
            sysctls[key] = draw(st.sampled_from((want, *VALUES)))
    count = draw(st.one_of(st.none(), st.integers(0, 10**6))) if ct_files else None
    return Observation(draw(st.sampled_from(RELEASES)), modules, sysctls, count, tuning, dict(deps))


def simulate(decision: Decision, data: st.DataObject, *, all_ok: bool = False) -> tuple[RestoreResult, float]:
    """The executor's shape: steps in order, a random outcome each, everything after a failure skipped."""
    results: list[StepResult] = []
    stopped = False
    for step in decision.plan.steps:
        if stopped:
            results.append(StepResult(step, Outcome.SKIPPED, 0.0))
            continue
        choices = [Outcome.OK] if all_ok else [Outcome.OK, Outcome.OK, Outcome.FAILED, Outcome.INTERRUPTED]
        if step.kind is StepKind.RESTART_DOCKER and not all_ok:
            choices.append(Outcome.SKIPPED)  # docker.service not active
        outcome = data.draw(st.sampled_from(choices))
        stopped = outcome in (Outcome.FAILED, Outcome.INTERRUPTED)
        results.append(StepResult(step, outcome, 1.0))
    duration = 0.0 if all_ok else data.draw(st.sampled_from((0.0, 0.01, 0.5, 3.0)))
    return RestoreResult(decision.plan, tuple(results), duration * 1000), duration


def after_success(obs: Observation, decision: Decision) -> Observation:
    """The observation right after the plan ran without a failure: loaded modules live (new instances),
    written values in place, conntrack readable again."""
    modules = dict(obs.modules)
    for name in decision.plan.modules:
        modules[name] = ModuleStatus(name, ModuleState.LIVE, "", None, 1000)
    writes = {k: v for s in decision.plan.steps if s.kind in (StepKind.WRITE_SYSCTLS, StepKind.RESTORE_TUNING)
              for k, v in s.sysctls}
    sysctls = {k: writes.get(k, v) for k, v in obs.sysctls.items()}
    conntrack = modules.get("nf_conntrack")
    tuning: dict[str, str] = {}
    if conntrack is not None and conntrack.state is ModuleState.LIVE:
        tuning = {**({} if "nf_conntrack" in decision.plan.modules else obs.tuning),
                  **{k: v for k, v in writes.items() if k.startswith("net.netfilter.nf_conntrack_")}}
        for key in sysctls:
            if key in tuning:
                sysctls[key] = tuning[key]
    count = 0 if "nf_conntrack" in decision.plan.modules else obs.conntrack_count
    return replace(obs, modules=modules, sysctls=sysctls, tuning=tuning, conntrack_count=count)


def check_plan(cfg: Config, obs: Observation, decision: Decision, state_before: CoreState, now: float) -> None:
    plan = decision.plan
    names = effective_modules(cfg.modules, obs)
    blocked = {n for n, s in obs.modules.items() if s.state is ModuleState.BLOCKED}
    loads = plan.modules
    # Only desired (or their legacy parts), only absent, never a built-in/unavailable/blocked one, nor one
    # that needs a blocked module; each once.
    assert len(set(loads)) == len(loads)
    for name in loads:
        assert name in names
        assert obs.modules[name].state is ModuleState.ABSENT
        assert not blocked.intersection(obs.deps.get(name, ()))
    # Dependency order: whatever a planned module needs (modules.dep) and is planned comes first.
    for i, name in enumerate(loads):
        for dep in obs.deps.get(name, ()):
            if dep in loads:
                assert loads.index(dep) < i, (loads, name, dep)
    # Shape: loads, verification (only with conntrack), at most one sysctl step, then docker, then hooks.
    kinds = [s.kind for s in plan.steps]
    order = [StepKind.LOAD_MODULE, StepKind.VERIFY_CONNTRACK, StepKind.WRITE_SYSCTLS, StepKind.RESTORE_TUNING,
             StepKind.RESTART_DOCKER, StepKind.RUN_HOOK]
    assert kinds == sorted(kinds, key=order.index)
    assert (StepKind.VERIFY_CONNTRACK in kinds) == ("nf_conntrack" in loads)
    assert kinds.count(StepKind.WRITE_SYSCTLS) <= 1 and kinds.count(StepKind.RESTORE_TUNING) <= 1
    restarts = [k for k in kinds if k in (StepKind.RESTART_DOCKER, StepKind.RUN_HOOK)]
    # Docker/hooks follow a module load, or are still owed by an earlier one; never while the breaker is open.
    if restarts:
        assert (loads or state_before.restarts_owed) and not breaker_open(cfg, decision.state, now)
    if plan.skipped_restarts:
        assert (loads or state_before.restarts_owed) and not restarts and breaker_open(cfg, decision.state, now)
    # Backoff holds: nothing is planned before retry_at.
    if state_before.retry_at is not None and now < state_before.retry_at:
        assert not plan
    # Healthy (and no tuned values to put back, no docker/hook run still owed): nothing to do.
    if decision.health.healthy and not decision.state.conntrack_reloaded and not state_before.restarts_owed:
        assert not plan, (plan, decision.health)
    # Sysctl writes go to desired keys or snapshot keys only, and never to a file that is missing now
    # unless this plan loads the module that creates it (a blocked or unavailable owner never appears).
    owners = {"net.bridge.": "br_netfilter", "net.netfilter.nf_conntrack_": "nf_conntrack"}
    for step in plan.steps:
        for key, _ in step.sysctls:
            assert key in cfg.sysctl_map or key in decision.state.tuning
            have = obs.sysctls.get(key) if key in cfg.sysctl_map else obs.tuning.get(key)
            if have is None:
                owner = next((m for prefix, m in owners.items() if key.startswith(prefix)), None)
                assert loads and (owner is None or owner in loads), (key, loads)


@settings(max_examples=EXAMPLES["core"], **SETTINGS)  # type: ignore[arg-type]
@given(data=st.data())
def test_plans_over_random_observation_sequences(data: st.DataObject) -> None:
    """For any sequence of observations (all module states, random sysctls, releases old and new, random
    modules.dep) and any step outcomes: plans respect dependency order, never load a built-in,
    unavailable, blocked or undesired module (nor one needing a blocked one), are empty when healthy, are
    idempotent (the post-restore observation needs no module step), hold the backoff, and never run
    docker/hooks more than max_restarts times in any restart_window (simulated monotonic time)."""
    cfg = data.draw(configs())
    deps = data.draw(module_deps())
    state = CoreState()
    now = data.draw(st.floats(0, 1e6))
    restart_times: list[float] = []
    for _ in range(data.draw(st.integers(1, 12))):
        obs = data.draw(observations(cfg, deps))
        decision = decide(cfg, state, obs, now)
        check_plan(cfg, obs, decision, state, now)

        if decision.plan:
            # Idempotence: had this plan succeeded, deciding again right away loads nothing more, writes
            # nothing more and restarts nothing.
            ok_result, _ = simulate(decision, data, all_ok=True)
            ok_state = record(cfg, decision.state, ok_result, now)
            again = decide(cfg, ok_state, after_success(obs, decision), now)
            assert not again.plan, (decision.plan, again.plan)

            result, duration = simulate(decision, data)
            done_at = now + duration
            state = record(cfg, decision.state, result, done_at)
            if any(r.step.kind in (StepKind.RESTART_DOCKER, StepKind.RUN_HOOK) and r.outcome is not Outcome.SKIPPED
                   for r in result.results):
                restart_times.append(done_at)
            if result.ok:
                # Never spin: once UNSETTLED_AFTER successful restores in a row were needed again at
                # once, the next one waits; before that, none does.
                assert state.failures == 0
                assert (state.retry_at is not None and state.retry_at > done_at) == \
                    (state.unsettled >= UNSETTLED_AFTER)
            else:
                assert state.retry_at is not None
                assert state.retry_at - done_at == pytest.approx(
                    min(cfg.backoff_initial * 2 ** (state.failures - 1), cfg.backoff_max))
            now = done_at
        else:
            state = decision.state
        now += data.draw(st.sampled_from((0.0, 0.001, 0.2, 1.0, cfg.restart_window - 0.001, cfg.restart_window,
                                          cfg.backoff_max, 3 * cfg.restart_window)))
    # The breaker: in every window [t, t + restart_window) at most max_restarts docker/hook runs.
    for t in restart_times:
        assert sum(1 for u in restart_times if t <= u < t + cfg.restart_window) <= cfg.max_restarts


@settings(max_examples=EXAMPLES["cycles"], **SETTINGS)  # type: ignore[arg-type]
@given(names=st.lists(st.sampled_from(ALL_NAMES), unique=True), deps=module_deps(acyclic=False))
def test_dependency_order_terminates_on_any_modules_dep(names: list[str], deps: dict[str, tuple[str, ...]]) -> None:
    """Even a cyclic (corrupt) modules.dep yields each requested module exactly once; an acyclic part
    of it is respected."""
    ordered = dependency_order(names, deps)
    assert sorted(ordered) == sorted(names)


@settings(max_examples=EXAMPLES["cycles"], **SETTINGS)  # type: ignore[arg-type]
@given(release=st.one_of(st.sampled_from(RELEASES), st.text(max_size=20)), data=st.data())
def test_legacy_modules_only_join_on_old_kernels(release: str, data: st.DataObject) -> None:
    """nf_conntrack_ipv4 / nf_nat_ipv4 are wanted only below 4.19 / 5.1, and only when on disk."""
    cfg = Config()
    obs = replace(data.draw(observations(cfg, {})), release=release)
    wanted = effective_modules(cfg.modules, obs)
    assert wanted[:3] == CORE
    for legacy in wanted[3:]:
        assert legacy in LEGACY and obs.modules[legacy].state is not ModuleState.UNAVAILABLE
    health = assess(cfg, obs, CoreState(), 0.0)
    assert health.healthy == (not health.problems)


# == the config loader ============================================================================

def toml_key(key: str) -> str:
    return toml_string(key)


def toml_string(text: str) -> str:
    out = json.dumps(text, ensure_ascii=False)
    return out.replace("\x7f", "\\u007F")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def dumps(doc: Mapping[str, Any]) -> str:
    """A tiny TOML writer (there is none in the standard library and tomli_w is not installed): plain
    keys first, then one [table] per top-level dict; nested tables inline."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_key(name)}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


TEXT = st.one_of(st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
                 st.sampled_from(["a\nb", "x\r", "\x00", "\t", "\x1b[31m", "\u2028", "é", " ", "."]))
SCALARS = st.one_of(
    TEXT, st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True), st.booleans(),
    st.datetimes(timezones=st.just(UTC)),
)
ANY = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)
SECONDS = st.one_of(st.integers(-5, 100_000), st.floats(-1, 1e5), st.sampled_from([0.1, 1, 30, math.nan, math.inf]))
EXES = st.sampled_from(["/bin/true", "/usr/bin/env", "/nonexistent/x", "relative", "/usr/../bin/sh", "/tmp",
                        "/etc/hostname"])
KNOWN: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "watch": {
        "modules": st.lists(st.one_of(st.sampled_from([*CORE, *EXTRA, "nf-nat", "-r", "a b", "../x", ""]), ANY),
                            max_size=4),
        "poll_interval": SECONDS,
    },
    "restore": {
        "docker": st.sampled_from(["never", "if-active", "always", ""]),
        "hooks": st.lists(st.one_of(st.lists(st.one_of(EXES, TEXT), max_size=3), ANY), max_size=3),
        "modprobe": EXES, "systemctl": EXES,
        "module_timeout": SECONDS, "hook_timeout": SECONDS, "docker_timeout": SECONDS,
        "keep_conntrack_tuning": st.booleans(),
        "backoff_initial": SECONDS, "backoff_max": SECONDS,
        "max_restarts": st.one_of(st.integers(-2, 1002), st.booleans()),
        "restart_window": SECONDS,
    },
    "daemon": {
        "state_file": st.sampled_from(["/run/x/state.json", "state.json", "/a/../b", ""]),
        "log_format": st.sampled_from(["auto", "journal", "console", "json", "xml"]),
    },
    "metrics": {"textfile": st.sampled_from(["/var/lib/x.prom", "x.prom", ""])},
}
def seconds(low: float, high: float) -> st.SearchStrategy[float | int]:
    return st.one_of(st.floats(low, high), st.integers(math.ceil(low), int(high)))


PLAIN = st.text(string.ascii_letters + string.digits + " -_./:=", max_size=10)
# Values the loader must accept, so that a good share of documents load and are compared field by field.
VALID_KNOWN: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "watch": {"modules": st.lists(st.sampled_from([*CORE, *EXTRA, "nf-nat", "br-netfilter"]), max_size=4),
              "poll_interval": seconds(0.1, 3600)},
    "restore": {
        "docker": st.sampled_from(["never", "if-active"]),
        "hooks": st.lists(st.tuples(st.sampled_from(["/bin/true", "/usr/bin/env"]), st.lists(PLAIN, max_size=2))
                          .map(lambda t: [t[0], *t[1]]), max_size=2),
        "modprobe": st.sampled_from(["/sbin/modprobe", "/usr/sbin/modprobe"]), "systemctl": st.just("/bin/systemctl"),
        "module_timeout": seconds(0.1, 600), "hook_timeout": seconds(0.1, 3600), "docker_timeout": seconds(0.1, 3600),
        "keep_conntrack_tuning": st.booleans(), "backoff_initial": seconds(0.01, 10),
        "backoff_max": seconds(10, 86400), "max_restarts": st.integers(0, 1000), "restart_window": seconds(1, 86400),
    },
    "daemon": {"state_file": st.sampled_from(["/run/x/state.json", "/var/lib/ctwatchd/s.json"]),
               "log_format": st.sampled_from(["auto", "journal", "console", "json"])},
    "metrics": {"textfile": st.sampled_from(["/var/lib/x.prom", ""])},
}
VALID_SYSCTLS = st.dictionaries(st.sampled_from([*BRIDGE_KEYS, *TUNING_KEYS, *OTHER_KEYS]),
                                st.one_of(st.sampled_from(VALUES), st.integers(0, 10**6)), max_size=4)
SYSCTL_TABLE = st.dictionaries(
    st.one_of(st.sampled_from([*BRIDGE_KEYS, *TUNING_KEYS, "net/x", "net..x", "kernel", "net.x y"]), TEXT),
    st.one_of(st.sampled_from(VALUES), st.integers(-5, 10**6), ANY), max_size=4)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly the real sections and keys with plausible or arbitrary values; sometimes anything at all."""
    doc: dict[str, Any] = {}
    if draw(st.booleans()):  # only valid values: these must load, and mean exactly what they say
        for section, keys in VALID_KNOWN.items():
            if draw(st.booleans()):
                doc[section] = {k: draw(strategy) for k, strategy in keys.items() if draw(st.booleans())}
        if draw(st.booleans()):
            doc["sysctl"] = draw(VALID_SYSCTLS)
        return doc
    for section, keys in KNOWN.items():
        if draw(st.booleans()):
            table = {k: draw(strategy if draw(st.integers(0, 4)) else ANY) for k, strategy in keys.items()
                     if draw(st.integers(0, 2)) == 0}
            if draw(st.integers(0, 9)) == 0:
                table[draw(TEXT)] = draw(ANY)
            doc[section] = table if draw(st.integers(0, 19)) else draw(ANY)
    if draw(st.booleans()):
        doc["sysctl"] = draw(SYSCTL_TABLE)
    if draw(st.integers(0, 9)) == 0:
        doc[draw(TEXT)] = draw(ANY)
    return doc


def trusted(path: Path, data: bytes) -> tuple[bytes, os.stat_result]:
    """The opener seam: the bytes as if read from a root-owned 0644 file."""
    return data, os.stat_result((stat.S_IFREG | 0o644, 1, 1, 1, 0, 0, len(data), 0, 0, 0))


def load_or_error(raw: bytes, euid: int) -> Config | ConfigError:
    path = Path("/etc/ctwatchd/prop.toml")
    try:
        return configmod.load(path, euid=euid, opener=lambda p: trusted(p, raw))
    except ConfigError as exc:
        text = str(exc)
        assert text.startswith(f"{path}: "), text
        assert "\n" not in text and "\r" not in text, text
        return exc


def expected_config(doc: Mapping[str, Any], path: Path) -> Config:
    """What an accepted document must mean, field by field: nothing of it dropped, nothing invented."""
    fields: dict[str, Any] = {"path": path}
    watch, restore, daemon = doc.get("watch", {}), doc.get("restore", {}), doc.get("daemon", {})
    if "modules" in watch:
        fields["modules"] = tuple(dict.fromkeys(normalize_module(m) for m in watch["modules"]))
    if "poll_interval" in watch:
        fields["poll_interval"] = float(watch["poll_interval"])
    if "sysctl" in doc:
        fields["sysctls"] = tuple((k, str(v)) for k, v in flatten(doc["sysctl"]))
    for key in ("module_timeout", "hook_timeout", "docker_timeout", "backoff_initial", "backoff_max",
                "restart_window"):
        if key in restore:
            fields[key] = float(restore[key])
    for key in ("keep_conntrack_tuning", "max_restarts", "modprobe", "systemctl"):
        if key in restore:
            fields[key] = restore[key]
    if "docker" in restore:
        fields["docker"] = DockerMode(restore["docker"])
    if "hooks" in restore:
        fields["hooks"] = tuple(tuple(h) for h in restore["hooks"])
    if "state_file" in daemon:
        fields["state_file"] = Path(daemon["state_file"])
    if "log_format" in daemon:
        fields["log_format"] = LogFormat(daemon["log_format"])
    if "textfile" in doc.get("metrics", {}):
        fields["metrics_textfile"] = Path(doc["metrics"]["textfile"]) if doc["metrics"]["textfile"] else None
    return Config(**fields)


def flatten(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in table.items():
        full = f"{prefix}.{k}" if prefix else k
        out += flatten(v, full) if isinstance(v, dict) else [(full, v)]
    return out


def check_valid(cfg: Config) -> None:
    """Every invariant the daemon relies on holds in an accepted configuration."""
    assert all(MODULE_NAME.fullmatch(m) for m in cfg.modules)
    assert all(configmod.SYSCTL_KEY.fullmatch(k) and configmod.SYSCTL_VALUE.fullmatch(v) for k, v in cfg.sysctls)
    assert all(h and h[0].startswith("/") and os.access(h[0], os.X_OK) for h in cfg.hooks)
    for exe in (cfg.modprobe, cfg.systemctl):
        assert exe is None or exe.startswith("/")
    assert cfg.state_file.is_absolute()
    assert 0.1 <= cfg.poll_interval <= 3600 and 0 <= cfg.max_restarts <= 1000
    assert cfg.backoff_initial <= cfg.backoff_max
    for value in (cfg.module_timeout, cfg.hook_timeout, cfg.docker_timeout, cfg.restart_window):
        assert math.isfinite(value) and value > 0


@settings(max_examples=EXAMPLES["toml"], **SETTINGS)  # type: ignore[arg-type]
@given(doc=documents(), euid=st.sampled_from([0, 1000]))
def test_any_toml_document_is_a_whole_config_or_one_error(doc: dict[str, Any], euid: int) -> None:
    """A random TOML document loads to a Config that means exactly what the document says, or raises one
    ConfigError whose single line starts with the file path; never another exception."""
    text = dumps(doc)
    outcome = load_or_error(text.encode(), euid)
    event("accepted" if isinstance(outcome, Config) else "rejected")
    if isinstance(outcome, Config):
        check_valid(outcome)
        assert outcome == expected_config(doc, Path("/etc/ctwatchd/prop.toml"))


VALID = dumps({"watch": {"modules": ["nf_conntrack", "nf_nat"], "poll_interval": 2.5},
               "sysctl": {"net.bridge.bridge-nf-call-iptables": "1"},
               "restore": {"docker": "if-active", "hooks": [["/bin/true", "a"]], "max_restarts": 2},
               "daemon": {"state_file": "/run/ctwatchd/state.json", "log_format": "json"}}).encode()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid document with bytes flipped, inserted or cut: close to valid, so the parser goes deep."""
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "cut"]))
        if op == "flip" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[i:i + draw(st.integers(1, 8))]
    return bytes(data)


@settings(max_examples=EXAMPLES["bytes"], **SETTINGS)  # type: ignore[arg-type]
@given(raw=st.one_of(st.binary(max_size=300), mutated(), st.text(string.printable, max_size=200).map(str.encode)),
       euid=st.sampled_from([0, 1000]))
def test_any_bytes_are_a_valid_config_or_one_error(raw: bytes, euid: int) -> None:
    """Arbitrary bytes (random, printable, or a valid file with a few bytes damaged) never raise anything
    but one single-line ConfigError starting with the path; what loads is valid throughout."""
    outcome = load_or_error(raw, euid)
    event("accepted" if isinstance(outcome, Config) else "rejected")
    if isinstance(outcome, Config):
        check_valid(outcome)


# == hostile state files and sysctl paths ==========================================================

JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
                    max_leaves=8)
HOSTILE_KEYS = st.one_of(
    st.sampled_from([*TUNING_KEYS, "kernel.modprobe", "kernel.core_pattern", "net.netfilter.nf_conntrack_max/../x",
                     "net.netfilter.nf_conntrack_", "net.netfilter.nf_conntrack_MAX", "../../etc/passwd"]),
    st.text(max_size=40).map(lambda s: "net.netfilter.nf_conntrack_" + s), TEXT)
HOSTILE_VALUES = st.one_of(st.sampled_from(VALUES), st.sampled_from(["$(reboot)", "1; rm -rf /", "1\n2", "-1",
                                                                     " ", "9" * 70]), TEXT)


@st.composite
def state_documents(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 4)) == 0:
        return draw(JSON)
    doc: dict[str, Any] = {"version": draw(st.sampled_from([1, 1, 1, 2, "1", True])),
                           "tuning": draw(st.one_of(st.dictionaries(HOSTILE_KEYS, st.one_of(HOSTILE_VALUES, JSON),
                                                                    max_size=4), JSON)),
                           "conntrack_reloaded": draw(st.one_of(st.booleans(), JSON))}
    for key, strategy in (("restarts", st.lists(st.one_of(st.floats(allow_nan=False), JSON), max_size=3)),
                          ("status", st.one_of(TEXT, JSON)), ("conntrack_instance", st.one_of(st.integers(), JSON))):
        if draw(st.booleans()):
            doc[key] = draw(strategy)
    return doc


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@settings(max_examples=EXAMPLES["state"], **SETTINGS)  # type: ignore[arg-type]
@given(doc=state_documents(), data=st.data())
def test_hostile_state_file_never_reaches_a_command_line_or_a_foreign_sysctl(state_dir: Path, doc: Any,
                                                                             data: st.DataObject) -> None:
    """Whatever JSON is in the state file: it is refused (StateError), or every value that can reach the
    kernel is a plain nf_conntrack_* key with a numeric value, written under /proc/sys/net/netfilter.
    Nothing from the file ever reaches an argv: the plan's argvs are the configured hooks only."""
    path = state_dir / "state.json"
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    try:
        saved = statefile.load(path)
    except statefile.StateError:
        return
    assert saved is not None
    for key, value in saved.tuning.items():
        assert statefile.TUNING_KEY.fullmatch(key) and statefile.TUNING_VALUE.fullmatch(value)
        assert "\n" not in value
    cfg = Config(hooks=(("/bin/true",),), docker=DockerMode.IF_ACTIVE)
    obs = data.draw(observations(cfg, {}))
    obs = replace(obs, modules={**obs.modules, "nf_conntrack": ModuleStatus("nf_conntrack", ModuleState.ABSENT)})
    plan = decide(cfg, core_state(saved, boot_id=saved.boot_id, now=1e9), obs, 0.0).plan
    proc_sys = Path("/proc/sys")
    for step in plan.steps:
        assert step.argv in ((), ("/bin/true",))
        assert step.module is None or step.module in (*CORE, *LEGACY)
        for key, value in step.sysctls:
            target = sysctl_path(proc_sys, key)
            assert target.parent in (proc_sys / "net/netfilter", proc_sys / "net/bridge")
            assert re.fullmatch(r"[0-9 \t-]{1,64}", value)


@settings(max_examples=EXAMPLES["paths"], **SETTINGS)  # type: ignore[arg-type]
@given(key=st.one_of(st.text(max_size=40), st.lists(st.sampled_from(["net", "..", ".", "", "/", "a/b", "x\0", "ok"]),
                                                    max_size=6).map(".".join)))
def test_sysctl_paths_never_leave_proc_sys(key: str) -> None:
    """Any key maps below /proc/sys (no '..', '.', empty or '/' parts) or is refused with ValueError."""
    base = Path("/proc/sys")
    try:
        target = sysctl_path(base, key)
    except ValueError:
        return
    assert os.path.normpath(target) == str(target)
    assert target.is_relative_to(base) and target != base
    assert len(target.relative_to(base).parts) == len(key.split("."))


@pytest.mark.parametrize("doc", [{}, {"sysctl": {}}, {"watch": {"modules": []}}])
def test_tiny_writer_round_trips(doc: dict[str, Any]) -> None:
    """The test's own TOML writer produces what tomllib reads back (sanity of the generator)."""
    import tomllib

    assert tomllib.loads(dumps(doc)) == doc


@pytest.mark.parametrize(("raw", "message"), [
    (b"x = " + b"[" * 5000, "malformed TOML"),  # tomllib recurses per nesting level
    (b"x = " + b"{a = " * 5000, "malformed TOML"),
    (b"#" * (1 << 20) + b"\n[restore]\nhooks = [['/bin/true']]\n", "larger than"),  # no silent truncation
], ids=["deep-array", "deep-inline-table", "over-1-MiB"])
def test_byte_strings_found_by_hand(tmp_path: Path, raw: bytes, message: str) -> None:
    """Inputs too large for random generation: deep nesting is one ConfigError (not a RecursionError,
    which a SIGHUP would turn into a dead daemon), and a file over the size limit is refused whole
    rather than read up to the limit (which could drop its last sections: a partial config)."""
    path = tmp_path / "big.toml"
    path.write_bytes(raw)
    with pytest.raises(ConfigError) as exc:
        configmod.load(path)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value) and "\n" not in str(exc.value)
