"""The one path from the kernel to a verdict, shared by `run`, `check` and `restore`.

    facts (static, re-read when their files change) + observation (live) -> core.decide() -> Look

The daemon calls look() on every event and poll; `check` and `restore` call it once (restore a few
times while a module is coming or going), each resuming from the daemon's state file, so the three
commands cannot disagree about what the host needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ctwatchd import core
from ctwatchd import state as statefile
from ctwatchd.config import Config
from ctwatchd.core import CoreState, Decision
from ctwatchd.kernel import KernelProbe
from ctwatchd.model import Conflict, KernelFacts, Observation, clean
from ctwatchd.sysctld import conflicts


@dataclass(frozen=True)
class Look:
    facts: KernelFacts
    observation: Observation
    decision: Decision
    watched: tuple[str, ...]  # the desired modules plus the legacy ones this kernel has
    conflicts: tuple[Conflict, ...] = ()  # sysctl.d files that would set a desired value otherwise


@dataclass(frozen=True)
class Resumed:
    state: CoreState
    saved: statefile.SavedState | None
    problem: str | None  # why the state file was not used, a sentence fragment


class Inspector:
    """Holds the kernel's static facts and turns a configuration and a CoreState into a Look."""

    def __init__(self, probe: KernelProbe, *, on_problem: Callable[[str], None] | None = None) -> None:
        self.probe = probe
        self.on_problem = on_problem
        self._reported: set[str] = set()
        self._conflicts: tuple[KernelFacts, tuple[tuple[str, str], ...], tuple[Conflict, ...]] | None = None
        self.facts = self.refresh()

    def refresh(self) -> KernelFacts:
        """Re-read the static facts. probe.facts() turns unreadable files into `problems`; anything it
        did not foresee keeps the facts we had, reported, rather than ending the daemon."""
        try:
            facts = self.probe.facts()
        except Exception as exc:  # the repairer must not die of a corrupt tree
            self._problem(f"kernel facts not re-read: {type(exc).__name__}: {clean(str(exc))}")
            existing: KernelFacts | None = getattr(self, "facts", None)
            return existing or KernelFacts(release=self.probe.release(), module_support=True, modules_dir=False)
        for problem in facts.problems:
            self._problem(problem)
        self.facts = facts
        return facts

    def _problem(self, text: str) -> None:
        if text not in self._reported and self.on_problem is not None:
            self._reported.add(text)  # once per distinct problem, not every poll
            self.on_problem(text)

    def observe(self, cfg: Config, state: CoreState) -> Observation:
        watched = core.observed_modules(cfg.modules, self.facts.release)
        return self.probe.observe(self.facts, core.observed_modules(cfg.modules, self.facts.release, state.dependents),
                                  [k for k, _ in cfg.sysctls], with_tuning=cfg.keep_conntrack_tuning,
                                  holders_of=watched if cfg.collateral else ())

    def look(self, cfg: Config, state: CoreState, now: float) -> Look:
        obs = self.observe(cfg, state)
        decision = core.decide(cfg, state, obs, now)
        # modules.dep and modprobe.d only matter when something is missing, so a healthy look does not
        # even stat them; otherwise a changed file (a lifted blocker, a depmod) is read before acting.
        if ((decision.plan or not decision.health.healthy)
                and self.probe.fingerprint(self.facts.release, self.facts.conf_files) != self.facts.fingerprint):
            self.refresh()
            obs = self.observe(cfg, state)
            decision = core.decide(cfg, state, obs, now)
        return Look(self.facts, obs, decision, core.effective_modules(cfg.modules, obs), self.conflicts(cfg))

    def conflicts(self, cfg: Config) -> tuple[Conflict, ...]:
        """The sysctl.d conflicts, computed when the facts or the desired sysctls change, not per look."""
        cached = self._conflicts
        # the facts by identity: refresh() makes a new object, and comparing 50k settings per look is
        # what this cache saves
        if cached is None or cached[0] is not self.facts or cached[1] != cfg.sysctls:
            cached = self._conflicts = (self.facts, cfg.sysctls, tuple(conflicts(cfg.sysctls, self.facts.sysctl_d)))
        return cached[2]

    def resume(self, cfg: Config, now: float) -> Resumed:
        """The CoreState the daemon left in its state file, valid for this boot; fresh when there is none."""
        try:
            saved = statefile.load(cfg.state_file)
        except statefile.StateError as exc:
            return Resumed(CoreState(), None, str(exc))
        if saved is None:
            return Resumed(CoreState(), None, None)
        return Resumed(core.core_state(saved, boot_id=self.probe.boot_id(), now=now), saved, None)
