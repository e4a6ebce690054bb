"""The pure decision core: observations in, an ordered restore plan out. No I/O, no clock of its own.

decide() is called with every fresh Observation; record() with every RestoreResult. Both return a
new CoreState, so the whole policy (ordering, tuning snapshot, backoff, restart breaker) is testable
as a table of inputs and outputs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ctwatchd.config import Config, DockerMode
from ctwatchd.model import (
    BR_NETFILTER,
    CANONICAL_ORDER,
    CONNTRACK,
    CONNTRACK_IPV4,
    HOLD_TABLE,
    NAT,
    NAT_IPV4,
    HoldSpec,
    HoldView,
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
    normalize_value,
)
from ctwatchd.state import SavedState

# Modules that only exist on old kernels, with the first release that folded them into their parent.
LEGACY = {CONNTRACK_IPV4: (CONNTRACK, (4, 19)), NAT_IPV4: (NAT, (5, 1))}

# A remembered dependent gone this long while its watched bases stay was removed on its own: forgotten.
FORGET_AFTER = 30.0
# How long a module may stay in "coming"/"going" before we call it stuck rather than busy.
TRANSIENT_GRACE = 10.0
# How soon to look again while a module is coming or going (the remove uevent comes while it is going).
TRANSIENT_RECHECK = 0.05
# A clean-up rmmods one module after another: plan once the removals have been quiet this long (one
# plan, one docker decision per fault), within TRANSIENT_GRACE of the first, so a stream of them
# cannot postpone the repair for ever.
REMOVALS_QUIET = 0.3
# A remembered dependent is a courtesy: its load runs after everything the watched modules need, and
# one that keeps failing (its .ko gone, its modprobe refused) is retried with the backoff this many
# times, then given up with one record; it never delays sysctls, tuning, docker, hooks or a later repair.
COURTESY_TRIES = 3
# Sysctl files that exist only while their module is loaded: a missing one can appear only with that load.
SYSCTL_OWNERS = (("net.bridge.", BR_NETFILTER), ("net.netfilter.nf_conntrack_", CONNTRACK))
# A sysctl restore that succeeds but is needed again at once, this many times in a row with no look in
# between that needed nothing, is being undone by something else: back off instead of fighting it.
UNSETTLED_AFTER = 3
# After a load, look again this many seconds later even without an event: udev runs its rules for the
# new module (the sysctl.d(5) rule reapplies /net/bridge) after the kernel's add event, and a value
# it puts back must be won again once udev is done, not at the next poll.
SETTLE_AFTER = (0.5, 1.0, 2.0, 4.0)
# Kconfig symbols of the modules we know, for telling "built in" from "missing" via the kernel config.
KCONFIG = {
    CONNTRACK: "CONFIG_NF_CONNTRACK",
    NAT: "CONFIG_NF_NAT",
    BR_NETFILTER: "CONFIG_BRIDGE_NETFILTER",
    CONNTRACK_IPV4: "CONFIG_NF_CONNTRACK_IPV4",
    NAT_IPV4: "CONFIG_NF_NAT_IPV4",
}
# initstate values the kernel shows while a module is on its way in or out.
_INITSTATES = {"live": ModuleState.LIVE, "coming": ModuleState.COMING, "unformed": ModuleState.COMING,
               "going": ModuleState.GOING}


def classify(ev: ModuleEvidence, facts: KernelFacts) -> ModuleStatus:
    """One module's state from the raw evidence and the kernel's static facts (pure; see kernel.py)."""
    name = ev.name
    rule = facts.blockers.get(name)
    blocker = str(rule) if rule else None
    noted = facts.notes.get(name)
    note = f"{noted}: modprobe ignores a blacklist for a module it is asked for by name" if noted else None
    guarded = facts.guards.get(name)
    guard = str(guarded) if guarded else None

    def status(state: ModuleState, detail: str, instance: int | None = None) -> ModuleStatus:
        return ModuleStatus(name, state, detail, blocker, instance, note, guard)

    state = _INITSTATES.get(ev.initstate or "")
    if state is not None:
        return status(state, f"/sys/module/{name}/initstate", ev.instance)
    if ev.initstate is None and ev.sys_dir and not ev.refcnt:
        # Built-in code with parameters gets /sys/module/<name> but never an initstate or refcnt.
        return status(ModuleState.BUILTIN, f"/sys/module/{name} has no initstate")
    if name in facts.builtin:
        return status(ModuleState.BUILTIN, "listed in modules.builtin")
    symbol = KCONFIG.get(name)
    if symbol and facts.kconfig.get(symbol) == "y":
        return status(ModuleState.BUILTIN, f"{symbol}=y in the kernel config")
    if not facts.module_support:
        if ev.sign:
            return status(ModuleState.BUILTIN, f"{ev.sign_path} exists")
        return status(ModuleState.UNAVAILABLE, "the kernel has no module support and shows no sign of it")
    if rule is not None:
        return status(ModuleState.BLOCKED, str(rule))
    if name in facts.deps:
        return status(ModuleState.ABSENT, "not loaded")
    if not facts.modules_dir:
        # A package upgrade that removed the running kernel's modules (Arch does; so does an
        # autoremove): nothing can be loaded until the running kernel and its modules match again.
        return status(ModuleState.UNAVAILABLE, f"the running kernel's modules directory /lib/modules/"
                                               f"{facts.release} is gone: reboot into the installed kernel, "
                                               "or reinstall the running one")
    if not facts.deps and facts.modules_dir:
        # No modules.dep to consult (depmod never ran): let modprobe be the judge.
        return status(ModuleState.ABSENT, "not loaded (no modules.dep to check the disk)")
    return status(ModuleState.UNAVAILABLE, f"not in /lib/modules/{facts.release}/modules.dep")


def kernel_version(release: str) -> tuple[int, int]:
    """'4.18.0-553.el8.x86_64' -> (4, 18); unparsable releases count as new."""
    parts = release.split("-", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (99, 0)


def observed_modules(desired: Sequence[str], release: str, dependents: Iterable[str] = ()) -> tuple[str, ...]:
    """What to look at: the desired set plus, on kernels old enough to have them, the legacy modules, and
    the remembered collateral."""
    version = kernel_version(release)
    legacy = [m for m, (parent, fixed_in) in LEGACY.items() if parent in desired and version < fixed_in]
    return tuple(dict.fromkeys([*desired, *legacy, *dependents]))


def never_restore(cfg: Config, module: str) -> bool:
    return any(fnmatch.fnmatchcase(module, pattern) for pattern in cfg.never_restore)


def collateral_due(cfg: Config, state: CoreState, obs: Observation) -> tuple[str, ...]:
    """Remembered dependents that went with their watched module and are to come back with it now.

    Due when it is absent and one of its bases is absent too (reloaded by this plan) or live as a new
    instance (reloaded by someone else). A dependent removed alone, its bases still the same modules,
    is the operator's choice and is not due.
    """
    if not cfg.collateral:
        return ()
    due: list[str] = []
    for dep, bases in state.dependents.items():
        st = obs.modules.get(dep)
        if st is None or st.state is not ModuleState.ABSENT or never_restore(cfg, dep):
            continue
        for base in bases:
            b = obs.modules.get(base)
            if b is not None and (b.state is ModuleState.ABSENT or (
                    b.state is ModuleState.LIVE and b.instance is not None
                    and b.instance != state.base_instances.get(base, b.instance))):
                due.append(dep)
                break
    return tuple(due)


def _learn(cfg: Config, state: CoreState, obs: Observation, health_ok: bool, due: Sequence[str], *,
           now: float) -> CoreState:
    """While healthy and owing nothing, remember what depends on the watched modules now.

    A remembered dependent that is gone while its bases stay is forgotten only after FORGET_AFTER:
    a clean-up that unloads one module per rmmod (firewalld) takes the holders seconds before the
    watched module itself, and a look in between must not take that for a removal on its own."""
    if not cfg.collateral or obs.holders is None or not health_ok or due:
        return state
    watched = set(observed_modules(cfg.modules, obs.release))  # restored as themselves, not as collateral
    dependents = {m: bases for m, bases in obs.holders.items() if m not in watched and not never_restore(cfg, m)}
    gone_since: dict[str, float] = {}
    for dep, bases in state.dependents.items():
        # Not a holder now: absent, going (its holders link goes before the module does), or even live,
        # because a look reads the modules' states before their holders and a clean-up unloading one
        # module after another (firewalld's stop) can take it in between. A module cannot stop
        # depending on a base while loaded, so each case is kept for FORGET_AFTER, not dropped at once.
        if dep in dependents or never_restore(cfg, dep):
            continue
        since = state.gone_since.get(dep, now)
        if now - since < FORGET_AFTER:
            dependents[dep] = bases
            gone_since[dep] = since
    instances = {b: st.instance for b in {x for bs in dependents.values() for x in bs}
                 if (st := obs.modules.get(b)) is not None and st.instance is not None}
    if (dependents != dict(state.dependents) or instances != dict(state.base_instances)
            or gone_since != dict(state.gone_since)):
        return replace(state, dependents=dependents, base_instances=instances, gone_since=gone_since)
    return state


def effective_modules(desired: Sequence[str], obs: Observation) -> tuple[str, ...]:
    """The desired set plus the legacy per-family modules this kernel still has on disk."""
    version = kernel_version(obs.release)
    out = list(desired)
    for legacy, (parent, fixed_in) in LEGACY.items():
        status = obs.modules.get(legacy)
        if (parent in desired and legacy not in out and version < fixed_in and status is not None
                and status.state is not ModuleState.UNAVAILABLE):
            out.append(legacy)
    return tuple(out)


def dependency_order(names: Sequence[str], deps: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Order modules so each comes after the ones it depends on (modules.dep), the runbook's order otherwise."""

    def rank(name: str) -> tuple[int, int]:
        canon = CANONICAL_ORDER.index(name) if name in CANONICAL_ORDER else len(CANONICAL_ORDER)
        return (canon, list(names).index(name))

    wanted = set(names)
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in ordered or name in visiting:
            return  # a cycle in modules.dep cannot happen in a sane tree; do not recurse forever
        visiting.add(name)
        for dep in sorted((d for d in deps.get(name, ()) if d in wanted), key=rank):
            visit(dep)
        visiting.discard(name)
        ordered.append(name)

    for name in sorted(names, key=rank):
        visit(name)
    return tuple(ordered)


@dataclass(frozen=True)
class Health:
    healthy: bool
    problems: tuple[str, ...]
    breaker_open: bool = False

    def summary(self, obs: Observation, modules: Sequence[str]) -> str:
        """The one-line STATUS= text."""
        parts = [f"{m} {obs.modules[m].state.value}" for m in modules if m in obs.modules]
        head = "healthy" if self.healthy else "degraded: " + "; ".join(self.problems)
        tail = "; restart breaker open (docker/hooks paused)" if self.breaker_open else ""
        return f"{head} ({', '.join(parts)}){tail}"


@dataclass(frozen=True)
class CoreState:
    tuning: Mapping[str, str] = field(default_factory=dict)  # last tuned nf_conntrack_* values seen live
    conntrack_reloaded: bool = False  # nf_conntrack went away since `tuning` was taken: reapply it
    conntrack_instance: int | None = None  # identity of the live nf_conntrack the snapshot belongs to
    failures: int = 0  # consecutive failed restores
    retry_at: float | None = None  # backoff: no new restore before this monotonic time
    restarts: tuple[float, ...] = ()  # when docker/hooks last ran, for the breaker window
    transient_since: Mapping[str, float] = field(default_factory=dict)
    restarts_owed: bool = False  # modules were reloaded but docker/hooks have not run successfully since
    unsettled: int = 0  # successful restores in a row, each needed again at the next look
    settle: tuple[float, ...] = ()  # monotonic times to look again after a load (udev's rules)
    # Collateral: loaded modules that depended on a watched one while healthy -> those watched modules,
    # and the watched modules' /sys/module instances at that time (a new one means they were reloaded).
    dependents: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    base_instances: Mapping[str, int] = field(default_factory=dict)
    gone_since: Mapping[str, float] = field(default_factory=dict)  # remembered dependents absent, bases not
    dropped: tuple[str, ...] = ()  # snapshot keys dropped by the last decide/record, for the audit
    removals: tuple[float, float] | None = None  # first and last removal uevent of the burst in progress
    courtesy: Mapping[str, tuple[int, float]] = field(default_factory=dict)  # failed dependents: tries, retry at
    given_up: tuple[str, ...] = ()  # dependents record() stopped reloading, for the audit


@dataclass(frozen=True)
class Decision:
    state: CoreState
    plan: RestorePlan
    wake_at: float | None  # look again at this time even without a poll or event
    health: Health


def core_state(saved: SavedState, *, boot_id: str | None, now: float) -> CoreState:
    """The decision state a restarted daemon, `check` or `restore` resumes from.

    Monotonic times and /sys inode numbers mean something only within one boot: a state file from
    another boot (a persistent state_file) keeps only its tuning snapshot, which the first look then
    compares with the live values like any other, and the remembered dependents (without their base
    instances, so none is due until a base is reloaded). Times in the future are refused, never trusted.
    """
    if saved.boot_id is None or saved.boot_id != boot_id:
        return CoreState(tuning=saved.tuning, dependents=saved.dependents)
    restarts = tuple(t for t in saved.restarts if t <= now)
    return CoreState(tuning=saved.tuning, conntrack_reloaded=saved.conntrack_reloaded, restarts=restarts,
                     conntrack_instance=saved.conntrack_instance, restarts_owed=saved.restarts_owed,
                     dependents=saved.dependents, base_instances=saved.base_instances)


def restarts_wanted(cfg: Config) -> bool:
    """Is there anything for the breaker to limit? max_restarts = 0 turns docker and hooks off."""
    return (cfg.docker is not DockerMode.NEVER or bool(cfg.hooks)) and cfg.max_restarts > 0


def breaker_open(cfg: Config, state: CoreState, now: float) -> bool:
    return restarts_wanted(cfg) and len(recent_restarts(cfg, state, now)) >= cfg.max_restarts


def recent_restarts(cfg: Config, state: CoreState, now: float) -> tuple[float, ...]:
    return tuple(t for t in state.restarts if 0 <= now - t < cfg.restart_window)


def assess(cfg: Config, obs: Observation, state: CoreState, now: float) -> Health:
    """Is the host in the desired state? Built-in counts as healthy; everything else is named."""
    problems: list[str] = []
    for name in effective_modules(cfg.modules, obs):
        st = obs.modules.get(name)
        if st is None:
            problems.append(f"{name} was not observed")
        elif st.state is ModuleState.BLOCKED:
            problems.append(f"{name} blocked by {st.blocker}")
        elif not st.state.satisfied:
            problems.append(f"{name} {st.state.value}" + (f" ({st.detail})" if st.detail else ""))
    if CONNTRACK in cfg.modules and obs.conntrack_count is None:
        problems.append("nf_conntrack_count unreadable")
    for key, want in cfg.sysctls:
        have = obs.sysctls.get(key)
        if have is None:
            problems.append(f"{key} missing")
        elif normalize_value(have) != normalize_value(want):
            problems.append(f"{key}={normalize_value(have)} (want {want})")
    return Health(not problems, tuple(problems), breaker_open(cfg, state, now))


def _snapshot(cfg: Config, state: CoreState, obs: Observation) -> CoreState:
    """Keep the tuned conntrack values while nf_conntrack is live and not freshly reloaded.

    A reload is seen either as an observation without nf_conntrack, or as a new module instance
    (the /sys/module/nf_conntrack inode): a removal and reload between two looks, ours or anyone's.
    """
    if not cfg.keep_conntrack_tuning:
        return state
    status = obs.modules.get(CONNTRACK)
    if status is None or status.state is ModuleState.BUILTIN:
        return state  # a built-in conntrack is never reloaded, so its values never reset
    if status.state is not ModuleState.LIVE:
        if state.tuning and not state.conntrack_reloaded:
            state = replace(state, conntrack_reloaded=True)
        return replace(state, conntrack_instance=None) if state.conntrack_instance is not None else state
    if status.instance is None and state.conntrack_instance is not None:
        # "live", then gone before its stat: a removal racing this look. Unknown is not new; keeping
        # the old identity lets the next look see the reload instead of learning its defaults.
        return state
    if (state.tuning and status.instance is not None and state.conntrack_instance is not None
            and status.instance != state.conntrack_instance):
        state = replace(state, conntrack_reloaded=True)
    if status.instance != state.conntrack_instance:
        state = replace(state, conntrack_instance=status.instance)
    if state.conntrack_reloaded:
        if not obs.tuning:
            return state  # not readable this time (a read torn by a reload): judge at the next look
        # A key the reloaded module does not have (a per-protocol key of an old kernel, a key of a
        # module that did not come back) can never be written back: drop it, or the snapshot would
        # stay "owed" forever and keep overriding the admin's later changes.
        missing = tuple(k for k in state.tuning if k not in obs.tuning)
        if missing:
            state = replace(state, tuning={k: v for k, v in state.tuning.items() if k not in missing},
                            dropped=state.dropped + missing)
        desired = cfg.sysctl_map
        back = all(normalize_value(obs.tuning[k]) == normalize_value(v)
                   for k, v in state.tuning.items() if k not in desired)
        if not back:
            return state  # still the kernel's defaults: the snapshot must not learn them
        state = replace(state, conntrack_reloaded=False)
    if obs.tuning and obs.tuning != state.tuning:
        if status.instance is not None and not set(state.tuning) <= set(obs.tuning):
            # The same module never loses a sysctl: fewer keys is a read torn by its removal, and
            # learning it would drop tuned values for good.
            return state
        return replace(state, tuning=dict(obs.tuning))
    return state


def _transients(state: CoreState, obs: Observation, names: Sequence[str], now: float) -> CoreState:
    since = {n: state.transient_since.get(n, now) for n in names
             if (s := obs.modules.get(n)) is not None and s.state.transient}
    return replace(state, transient_since=since) if since != state.transient_since else state


def removal_seen(state: CoreState, now: float) -> CoreState:
    """A watched module or a remembered dependent was removed: a burst begins or goes on."""
    first = state.removals[0] if state.removals is not None and now - state.removals[1] < TRANSIENT_GRACE else now
    return replace(state, removals=(first, now))


def _waiting(state: CoreState, now: float) -> tuple[str, float] | None:
    """Why not to plan yet, and when to look again: a module in the middle of loading or unloading
    (modprobe now would race it), or removals still arriving."""
    busy = [n for n, t in state.transient_since.items() if now - t < TRANSIENT_GRACE]
    if busy:
        return f"waiting for {', '.join(busy)}", now + TRANSIENT_RECHECK
    if state.removals is not None:
        first, last = state.removals
        if now - last < REMOVALS_QUIET and now - first < TRANSIENT_GRACE:
            return "waiting: removals still arriving", min(last + REMOVALS_QUIET, first + TRANSIENT_GRACE)
    return None


def _split_due(state: CoreState, due: Sequence[str], now: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The due dependents to load now, and those waiting for their retry after a failed load."""
    pending = tuple(n for n in due if n in state.courtesy and now < state.courtesy[n][1])
    return tuple(n for n in due if n not in pending), pending


def decide(cfg: Config, state: CoreState, obs: Observation, now: float) -> Decision:
    """Turn one observation into the ordered plan that brings the host back to the desired state."""
    names = effective_modules(cfg.modules, obs)
    if state.dropped:
        state = replace(state, dropped=())
    state = _transients(_snapshot(cfg, state, obs), obs, names, now)
    health = assess(cfg, obs, state, now)

    waiting = _waiting(state, now)
    if waiting is not None:
        return Decision(state, RestorePlan((), waiting[0]), waiting[1], health)
    if state.removals is not None:
        state = replace(state, removals=None)
    if state.retry_at is not None and now < state.retry_at:
        why = "backing off: the last restores did not hold" if state.unsettled else \
            "backing off after a failed restore"
        return Decision(state, RestorePlan((), why), state.retry_at, health)

    blocked = {n for n, s in obs.modules.items() if s.state is ModuleState.BLOCKED}
    # A dependent whose load failed waits for its own retry time (pending); until then it is still due
    # for _learn, which would otherwise take the new bases as normal and forget the retry.
    due, pending = _split_due(state, collateral_due(cfg, state, obs), now)
    # modprobe would pull a blocked dependency in along with its user: that is fighting the block too.
    to_load = [n for n in (*names, *due) if (s := obs.modules.get(n)) is not None
               and s.state is ModuleState.ABSENT and not blocked.intersection(obs.deps.get(n, ()))]
    to_load = list(dependency_order(to_load, obs.deps))
    steps = [Step(StepKind.LOAD_MODULE, module=n) for n in to_load if n in names]
    if CONNTRACK in to_load:
        steps.append(Step(StepKind.VERIFY_CONNTRACK))

    writes = _sysctl_writes(cfg, obs, loading=to_load)
    if writes:
        steps.append(Step(StepKind.WRITE_SYSCTLS, sysctls=writes))
    tuning = _tuning_writes(cfg, state, obs, loading=to_load)
    if tuning:
        steps.append(Step(StepKind.RESTORE_TUNING, sysctls=tuning))

    skipped = False
    # Docker and hooks follow a module load, and are owed until they have run after one: a failed hook,
    # or one the breaker held back, runs once the backoff or the breaker window lets it.
    # A dependent's load alone (a courtesy retry) breaks nothing docker or a hook would mend.
    if (any(n in names for n in to_load) or state.restarts_owed) and restarts_wanted(cfg):
        if breaker_open(cfg, state, now):
            skipped = True
        else:
            if cfg.docker is not DockerMode.NEVER:
                steps.append(Step(StepKind.RESTART_DOCKER, when=cfg.docker.value))
            steps.extend(Step(StepKind.RUN_HOOK, argv=argv) for argv in cfg.hooks)
    # Last: a failing courtesy load stops nothing the watched modules need (the first failure stops the rest).
    steps.extend(Step(StepKind.LOAD_MODULE, module=n) for n in to_load if n not in names)

    reason = _reason(to_load, due, (*writes, *tuning), bool(steps), health)
    if not steps and state.unsettled:
        state = replace(state, unsettled=0)  # a look that needs nothing: whatever fought us has stopped
    state = _learn(cfg, state, obs, health.healthy and not steps, (*due, *pending), now=now)
    settle = tuple(t for t in state.settle if t > now)
    if settle != state.settle:
        state = replace(state, settle=settle)
    wake = min((*settle[:1], *(state.courtesy[n][1] for n in pending)), default=None)
    return Decision(state, RestorePlan(tuple(steps), reason, skipped), wake, health)


def _reason(to_load: Sequence[str], due: Sequence[str], writes: Sequence[tuple[str, str]], planned: bool,
            health: Health) -> str:
    """The plan's reason, for restore.planned and STATUS=."""
    if to_load:
        own = [n for n in to_load if n not in due]
        went_with = [n for n in to_load if n in due]
        return "; ".join([*(["not loaded: " + ", ".join(own)] if own else []),
                          *(["loaded with them before: " + ", ".join(went_with)] if went_with else [])])
    if writes:
        return "sysctl drift: " + ", ".join(k for k, _ in writes)
    if planned:
        return "docker/hooks still owed after an earlier restore"
    return "healthy" if health.healthy else "nothing ctwatchd can do: " + "; ".join(health.problems)


def _sysctl_writes(cfg: Config, obs: Observation, *, loading: Sequence[str]) -> tuple[tuple[str, str], ...]:
    writes: dict[str, str] = {}
    for key, want in cfg.sysctls:
        have = obs.sysctls.get(key)
        # After loading modules every desired key is written: the files appear with the load. Without a
        # load, a missing file cannot be fixed by writing it, so only existing, drifted keys are planned;
        # the same holds for a missing file whose module is not among those loaded (blocked, unavailable).
        owner = next((m for prefix, m in SYSCTL_OWNERS if key.startswith(prefix)), None)
        appears = bool(loading) and (have is not None or owner is None or owner in loading)
        if appears or (have is not None and normalize_value(have) != normalize_value(want)):
            writes[key] = want
    return tuple(writes.items())


def _tuning_writes(cfg: Config, state: CoreState, obs: Observation, *,
                   loading: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The snapshot goes back after this plan loads nf_conntrack, or once a reload by someone else is
    seen live; never while conntrack is absent (blocked, failing): its files do not exist then."""
    conntrack = CONNTRACK in loading
    status = obs.modules.get(CONNTRACK)
    live = status is not None and status.state is ModuleState.LIVE
    if not (conntrack or (state.conntrack_reloaded and live)):
        return ()
    desired = cfg.sysctl_map
    writes: list[tuple[str, str]] = []
    for key, value in sorted(state.tuning.items()):
        if key in desired:
            continue  # [sysctl] wins over the snapshot
        have = obs.tuning.get(key)
        if conntrack or (have is not None and normalize_value(have) != normalize_value(value)):
            writes.append((key, value))
    return tuple(writes)


def record(cfg: Config, state: CoreState, result: RestoreResult, now: float) -> CoreState:
    """Fold a finished restore into the state: backoff on failure or on a restore that does not hold,
    breaker bookkeeping, snapshot keys the kernel refused dropped."""
    restarts = recent_restarts(cfg, state, now)
    if any(r.step.kind in (StepKind.RESTART_DOCKER, StepKind.RUN_HOOK) and r.outcome is not Outcome.SKIPPED
           for r in result.results):
        restarts = (*restarts, now)
    owed = _restarts_owed(state, result)
    state, own_failure = _courtesy(cfg, state, result, now)
    dropped = tuple(k for r in result.results for k in r.dropped)
    if any(r.step.kind is StepKind.LOAD_MODULE and r.outcome is Outcome.OK for r in result.results):
        state = replace(state, settle=tuple(now + d for d in SETTLE_AFTER))
    if dropped:
        state = replace(state, tuning={k: v for k, v in state.tuning.items() if k not in dropped},
                        dropped=state.dropped + dropped)
    if own_failure is None:
        # Only sysctl plans count: a module that is needed again was removed again, a new fault to
        # repair at once (verification and the restart breaker pace a remover that never stops).
        unsettled = 0 if result.plan.modules else state.unsettled + 1
        retry_at = None
        if unsettled >= UNSETTLED_AFTER:
            retry_at = now + min(cfg.backoff_initial * 2 ** min(unsettled - UNSETTLED_AFTER, 64), cfg.backoff_max)
        return replace(state, failures=0, retry_at=retry_at, restarts=restarts, restarts_owed=owed,
                       unsettled=unsettled)
    failures = state.failures + 1
    delay = min(cfg.backoff_initial * 2 ** min(failures - 1, 64), cfg.backoff_max)
    return replace(state, failures=failures, retry_at=now + delay, restarts=restarts, restarts_owed=owed)


def _courtesy(cfg: Config, state: CoreState, result: RestoreResult,
              now: float) -> tuple[CoreState, StepResult | None]:
    """Book the dependents' loads: a failed one waits with its own backoff, and after COURTESY_TRIES is
    given up (forgotten, told once). Returns the state and the first failure that was not a courtesy
    load: only that one makes the restore a failure (backoff, breaker, STATUS)."""
    courtesy = dict(state.courtesy)
    dependents, gone_since = dict(state.dependents), dict(state.gone_since)
    given_up: list[str] = []
    own: StepResult | None = None
    retry: float | None = None  # a courtesy load failed: the ones skipped after it wait as long
    for r in result.results:
        name = r.step.module
        if r.step.kind is not StepKind.LOAD_MODULE or name is None or name not in state.dependents:
            if own is None and r.outcome in (Outcome.FAILED, Outcome.INTERRUPTED):
                own = r
            continue
        tries = courtesy.get(name, (0, now))[0]
        if r.outcome is Outcome.OK:
            courtesy.pop(name, None)
        elif r.outcome is Outcome.FAILED:
            tries += 1
            retry = now + min(cfg.backoff_initial * 2 ** (tries - 1), cfg.backoff_max)
            if tries >= COURTESY_TRIES:
                courtesy.pop(name, None)
                dependents.pop(name, None)
                gone_since.pop(name, None)
                given_up.append(name)
            else:
                courtesy[name] = (tries, retry)
        elif r.outcome is Outcome.SKIPPED and retry is not None:
            courtesy[name] = (tries, retry)  # most often it needs the one that failed: not at once
        elif r.outcome is Outcome.INTERRUPTED and own is None:
            own = r  # stopping: not the module's fault, and not a success either
    if (courtesy, dependents, gone_since) != (dict(state.courtesy), dict(state.dependents), dict(state.gone_since)) \
            or given_up:
        state = replace(state, courtesy=courtesy, dependents=dependents, gone_since=gone_since,
                        given_up=state.given_up + tuple(given_up))
    return state, own


def _restarts_owed(state: CoreState, result: RestoreResult) -> bool:
    """Are docker/hooks still to run after this restore?"""
    kinds = (StepKind.RESTART_DOCKER, StepKind.RUN_HOOK)
    restart_steps = [r for r in result.results if r.step.kind in kinds]
    loaded = any(r.step.kind is StepKind.LOAD_MODULE and r.outcome is Outcome.OK for r in result.results)
    if any(r.deferred for r in restart_steps):
        return True  # left for after READY (docker's start job waits for ctwatchd's): still owed
    if restart_steps:
        # All ran (SKIPPED here is docker found inactive) and none failed: paid; anything else: owed. A
        # failure after them (a courtesy load, last in the plan) does not undo what they did.
        failed_at = next((i for i, r in enumerate(result.results)
                          if r.outcome in (Outcome.FAILED, Outcome.INTERRUPTED)), len(result.results))
        ran = failed_at > max(i for i, r in enumerate(result.results) if r.step.kind in kinds)
        return not (ran and all(r.outcome in (Outcome.OK, Outcome.SKIPPED) for r in restart_steps))
    if loaded and result.plan.skipped_restarts:
        return True  # the breaker held them back
    return state.restarts_owed


OWNER_TABLES = (5, 12)  # NFT_TABLE_F_OWNER: the kernel's promise that only the hold's socket can drop it


def hold_target(cfg: Config, obs: Observation, held: HoldSpec, *, masq_loaded: bool) -> HoldSpec:
    """What the hold's table should contain: each watched module that is loaded from disk, or held
    already. A module's passing state never shrinks it (a lost hold is re-created after the restore
    that brought the module back); only the configuration does."""
    if not cfg.hold:
        return HoldSpec()

    def wanted(name: str, is_held: bool) -> bool:
        st = obs.modules.get(name)
        return name in cfg.modules and (is_held or (st is not None and st.state is ModuleState.LIVE))

    nat = wanted(NAT, held.nat)
    return HoldSpec(wanted(CONNTRACK, held.conntrack), nat,
                    nat and cfg.hold_masquerade and (masq_loaded or held.masquerade))


def hold_rows(cfg: Config, obs: Observation, watched: Sequence[str], view: HoldView | None) -> dict[str, str]:
    """`check`'s hold column: per watched module, held, not held and why, or cannot be held."""
    out: dict[str, str] = {}
    held = view.spec.modules if view is not None else ()
    for name in watched:
        st = obs.modules.get(name)
        if st is not None and st.state is ModuleState.BUILTIN:
            out[name] = "built in: cannot be unloaded"
        elif name not in (CONNTRACK, NAT):
            out[name] = "cannot be held (nothing in nftables or iptables takes a reference on it)"
        elif name in held:
            out[name] = f"held by ctwatchd (nft table {HOLD_TABLE})"
        elif not cfg.hold:
            out[name] = "not held: [hold] enabled = false"
        elif kernel_version(obs.release) < OWNER_TABLES:
            out[name] = (f"not held: Linux {obs.release} has no nftables owner tables (5.12 and newer do); "
                         "an unload is repaired instead")
        elif view is None:
            out[name] = "not held: unknown (the hold is read only on the running host)"
        elif view.error:
            out[name] = f"not held: unknown ({view.error})"
        elif not view.exists:
            out[name] = (f"not held: no table {HOLD_TABLE} (ctwatchd is not running, or cannot hold here: "
                         "its status says why)")
        else:
            out[name] = f"not held: table {HOLD_TABLE} does not hold it"
    return out
