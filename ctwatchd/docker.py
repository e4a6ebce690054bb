"""Docker as the runbook's last step sees it: is docker.service there and active, are its own iptables
rules still what container traffic needs, and would a restart keep the containers running (live-restore).

A module reload does not by itself remove docker's rules: only a firewall clean-up that flushed them
does. `docker = "if-needed"` restarts docker only then, because without live-restore a restart stops
every container on the host. The judgement (judge_iptables) is pure; the readings go through the
Runner (argv only, absolute paths, timeouts) and the injected root.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ctwatchd.config import IPTABLES_PATHS
from ctwatchd.files import read_regular
from ctwatchd.model import clean
from ctwatchd.runner import Runner

DOCKER_UNIT = "docker.service"
DAEMON_JSON = "etc/docker/daemon.json"
QUERY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Unit:
    """docker.service as systemd reports it."""

    installed: bool | None  # None: systemctl could not tell
    active: str  # "active", "inactive", "failed", … or "unknown (…)"
    main_pid: int | None = None


# What container traffic needs from docker's rules, each with the sentence said when it is gone. Only
# these decide a restart: DOCKER-USER is created only where docker creates networks (docker 20.10 with
# live-restore skips that at a restart with running containers, moby/moby#48560), so no restart could
# bring it back, and a missing DOCKER-USER is information, never a reason.
NEEDS: dict[str, str] = {
    "nat:DOCKER": "DOCKER chain missing in table nat",
    "nat:PREROUTING>DOCKER": "no jump from PREROUTING to DOCKER in table nat",
    "nat:OUTPUT>DOCKER": "no jump from OUTPUT to DOCKER in table nat",
    "nat:DNAT": "no DNAT of published ports left in table nat",
    "filter:DOCKER": "DOCKER chain missing in table filter",
    "filter:FORWARD>DOCKER": "no jump from FORWARD to DOCKER in table filter",
}
# Needed whatever the baseline says: what every docker release since 17.06 sets up on a bridge host.
MINIMUM = frozenset({"nat:DOCKER", "nat:PREROUTING>DOCKER", "filter:DOCKER", "filter:FORWARD>DOCKER"})
# A chain that is gone makes its jumps' absence say nothing new.
_UNDER = {"nat:PREROUTING>DOCKER": "nat:DOCKER", "nat:OUTPUT>DOCKER": "nat:DOCKER", "nat:DNAT": "nat:DOCKER",
          "filter:FORWARD>DOCKER": "filter:DOCKER"}


@dataclass(frozen=True)
class Baseline:
    """What traffic needed of docker's rules while it worked: taken while healthy, and again after
    each docker restart (what docker itself re-creates is all a restart can give)."""

    present: frozenset[str]
    taken: str  # "while healthy", "after docker's restart"


@dataclass(frozen=True)
class Rules:
    intact: bool | None  # None: cannot tell
    reason: str  # "rules intact …", "DOCKER chain missing in table nat …", …
    present: frozenset[str] | None = None  # the NEEDS found; None when docker's rules were not read
    compared: str = ""  # what the reading was judged against, for docker.decision


@dataclass(frozen=True)
class LiveRestore:
    enabled: bool | None  # None: cannot tell
    source: str  # "daemon.json", "dockerd --live-restore", "docker's default (off)"


def needs_present(nat: str, filter_: str) -> frozenset[str]:
    """Which of NEEDS `iptables -t nat -S` and `iptables -t filter -S` show. A jump counts when the
    parent reaches DOCKER directly or through other chains (docker 28 puts DOCKER-FORWARD between)."""
    found: set[str] = set()
    for table, dump, parents in (("nat", nat, ("PREROUTING", "OUTPUT")), ("filter", filter_, ("FORWARD",))):
        chains, jumps = _parse_save(dump)
        if "DOCKER" not in chains:
            continue
        found.add(f"{table}:DOCKER")
        found.update(f"{table}:{parent}>DOCKER" for parent in parents if _reaches(jumps, parent, "DOCKER"))
        if table == "nat" and ("DOCKER", "DNAT") in jumps:
            found.add("nat:DNAT")
    return frozenset(found)


def judge_iptables(nat: str, filter_: str, baseline: Baseline | None = None) -> Rules:
    """Are docker's rules what container traffic needs? Needed: MINIMUM, and whatever else of NEEDS the
    baseline had (the OUTPUT jump, published ports' DNAT). A flushed table loses the jumps even where
    `-F` keeps the chains, so both are looked for."""
    present = needs_present(nat, filter_)
    expected = MINIMUM | (baseline.present if baseline is not None else frozenset())
    source = f"the baseline taken {baseline.taken}" if baseline is not None else "docker's minimum (no baseline yet)"
    compared = f"{source}: {' '.join(sorted(expected))}"
    gone = expected - present
    missing = [NEEDS[k] for k in NEEDS if k in gone and _UNDER.get(k) not in gone]
    info = ""
    chains, jumps = _parse_save(filter_)
    if "filter:FORWARD>DOCKER" in present and not ("DOCKER-USER" in chains
                                                   and _reaches(jumps, "FORWARD", "DOCKER-USER")):
        info = "; DOCKER-USER absent in table filter (information only: traffic does not need it, and " \
               "docker re-creates it only when it creates a network)"
    if missing:
        return Rules(False, "; ".join(missing) + info, present, compared)
    return Rules(True, "rules intact" + info, present, compared)


def _reaches(jumps: set[tuple[str, str]], start: str, goal: str) -> bool:
    seen, todo = {start}, [start]
    while todo:
        chain = todo.pop()
        for parent, child in jumps:
            if parent == chain and child not in seen:
                if child == goal:
                    return True
                seen.add(child)
                todo.append(child)
    return False


def _parse_save(dump: str) -> tuple[set[str], set[tuple[str, str]]]:
    """Chains (-N), and (chain, target) of every rule's jump or goto: to a chain, or to DNAT, ACCEPT…"""
    chains: set[str] = set()
    jumps: set[tuple[str, str]] = set()
    for line in dump.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "-N":
            chains.add(words[1])
        elif len(words) >= 2 and words[0] == "-A":
            for flag in ("-j", "-g"):
                if flag in words[2:]:
                    i = words.index(flag, 2)
                    if i + 1 < len(words):
                        jumps.add((words[1], words[i + 1]))
    return chains, jumps


def parse_unit(text: str) -> Unit:
    """`systemctl show -p LoadState -p ActiveState -p MainPID docker.service`."""
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    load = props.get("LoadState", "")
    if not load:
        return Unit(None, "unknown (systemctl said nothing)")
    if load == "not-found":
        return Unit(False, "not installed")
    pid = props.get("MainPID", "0")
    main_pid = int(pid) if pid.isdigit() and pid != "0" else None
    return Unit(True, clean(props.get("ActiveState", "unknown"), 40), main_pid)


class DockerProbe:
    def __init__(self, runner: Runner, *, systemctl: str, iptables: str | None, root: Path = Path("/")) -> None:
        self.runner = runner
        self.systemctl = systemctl
        self.iptables = iptables  # None: the first of IPTABLES_PATHS under root
        self.root = root

    def unit(self) -> Unit:
        done = self.runner.run([self.systemctl, "show", "-p", "LoadState", "-p", "ActiveState", "-p", "MainPID",
                                DOCKER_UNIT], QUERY_TIMEOUT)
        if done.error or done.timed_out or done.interrupted or done.returncode != 0:
            return Unit(None, f"unknown ({done.why()})")
        return parse_unit(done.output)

    def daemon_json(self) -> dict[str, object] | None:
        """/etc/docker/daemon.json, or None when absent or unreadable (docker's defaults apply)."""
        try:
            raw, _ = read_regular(self.root / DAEMON_JSON, 1 << 20)
            data = json.loads(raw)
        except (OSError, ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    def rules(self, baseline: Baseline | None = None) -> Rules:
        config = self.daemon_json() or {}
        if config.get("iptables") is False:
            return Rules(True, "docker manages no iptables rules (\"iptables\": false in daemon.json)")
        # Commands run on this host whatever the injected root (which is for reading files only).
        iptables = self.iptables or next((p for p in IPTABLES_PATHS if os.path.exists(p)), None)
        if iptables is None:
            return Rules(True, "no iptables on this host: docker manages no rules here")
        dumps = []
        for table in ("nat", "filter"):
            done = self.runner.run([iptables, "-w", "5", "-t", table, "-S"], QUERY_TIMEOUT)
            if not done.ok:
                return Rules(None, f"cannot list table {table}: {done.why()}")
            dumps.append(done.output)
        judged = judge_iptables(dumps[0], dumps[1], baseline)
        variant = os.path.basename(os.path.realpath(iptables))  # which backend: xtables-nft-multi, -legacy-
        return Rules(judged.intact, f"{judged.reason} ({clean(variant, 40)})", judged.present, judged.compared)

    def baseline(self, taken: str) -> Baseline | None:
        """What traffic needs of docker's rules now; None when docker is not active or they cannot be
        read (the judgement then falls back to MINIMUM)."""
        if self.unit().active != "active":
            return None
        rules = self.rules()
        return None if rules.present is None else Baseline(rules.present, taken)

    def live_restore(self, unit: Unit) -> LiveRestore:
        """dockerd's --live-restore flag wins over daemon.json (docker refuses both set at once)."""
        if unit.main_pid is not None:
            try:
                raw, _ = read_regular(self.root / f"proc/{unit.main_pid}/cmdline", 1 << 16)
            except OSError:
                raw = b""
            if b"--live-restore" in raw.split(b"\0"):
                return LiveRestore(True, "dockerd --live-restore")
        config = self.daemon_json()
        if config is not None and isinstance(config.get("live-restore"), bool):
            return LiveRestore(bool(config["live-restore"]), "/etc/docker/daemon.json")
        return LiveRestore(False, "docker's default")
