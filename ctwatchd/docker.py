"""Docker as the runbook's last step sees it: is docker.service there and active, are its own iptables
rules still in place, and would a restart keep the containers running (live-restore).

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


@dataclass(frozen=True)
class Rules:
    intact: bool | None  # None: cannot tell
    reason: str  # "rules intact", "DOCKER chain missing in table nat", …


@dataclass(frozen=True)
class LiveRestore:
    enabled: bool | None  # None: cannot tell
    source: str  # "daemon.json", "dockerd --live-restore", "docker's default (off)"


def judge_iptables(nat: str, filter_: str) -> Rules:
    """Are docker's own rules in place, from `iptables -t nat -S` and `iptables -t filter -S`?

    What every docker release since 17.06 sets up: the DOCKER chain in nat with the jump to it from
    PREROUTING (published ports), and DOCKER-USER in filter with the jump to it from FORWARD. A
    flushed table loses the jumps even where `-F` keeps the chains, so both are looked for.
    """
    missing: list[str] = []
    for table, dump, chain, parent in (("nat", nat, "DOCKER", "PREROUTING"),
                                       ("filter", filter_, "DOCKER-USER", "FORWARD")):
        chains, jumps = _parse_save(dump)
        if chain not in chains:
            missing.append(f"{chain} chain missing in table {table}")
        elif (parent, chain) not in jumps:
            missing.append(f"no jump from {parent} to {chain} in table {table}")
    if missing:
        return Rules(False, "; ".join(missing))
    return Rules(True, "rules intact")


def _parse_save(dump: str) -> tuple[set[str], set[tuple[str, str]]]:
    chains: set[str] = set()
    jumps: set[tuple[str, str]] = set()
    for line in dump.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "-N":
            chains.add(words[1])
        elif len(words) >= 2 and words[0] == "-A" and "-j" in words[2:]:
            i = words.index("-j", 2)
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

    def rules(self) -> Rules:
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
        judged = judge_iptables(*dumps)
        variant = os.path.basename(os.path.realpath(iptables))  # which backend: xtables-nft-multi, -legacy-
        return Rules(judged.intact, f"{judged.reason} ({clean(variant, 40)})")

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
