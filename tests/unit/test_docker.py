"""docker = "if-needed": restart docker only when it is active and its own iptables rules are gone.

iptables and systemctl are real scripts in a temporary tree answering as the real tools do (the dumps
below are `iptables -S` output of docker 20.10 on Debian bookworm, iptables-nft); the restore runs the
real Executor. The judgement itself is a pure function, tested on the dumps directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from fakehost import FakeHost, executable
from harness import Harness, cfg_for, events
from structlog.testing import capture_logs

from ctwatchd import config as configmod
from ctwatchd.audit import get_logger
from ctwatchd.config import Config, ConfigError, DockerMode
from ctwatchd.core import CoreState, decide
from ctwatchd.docker import NEEDS, Baseline, DockerProbe, Unit, judge_iptables, needs_present, parse_unit
from ctwatchd.executor import Executor
from ctwatchd.kernel import KernelProbe
from ctwatchd.model import Observation, Outcome, StepKind
from ctwatchd.runner import Runner

NAT = """\
-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-N DOCKER
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
"""
FILTER = """\
-P INPUT ACCEPT
-P FORWARD DROP
-P OUTPUT ACCEPT
-N DOCKER
-N DOCKER-ISOLATION-STAGE-1
-N DOCKER-ISOLATION-STAGE-2
-N DOCKER-USER
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-ISOLATION-STAGE-1
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -o docker0 -j DOCKER
-A DOCKER-USER -j RETURN
"""
EMPTY_NAT = "-P PREROUTING ACCEPT\n-P INPUT ACCEPT\n-P OUTPUT ACCEPT\n-P POSTROUTING ACCEPT\n"
EMPTY_FILTER = "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n"


def flushed(dump: str) -> str:
    """What `iptables -F` leaves: policies and chains, no rules (so no jumps either)."""
    return "".join(line + "\n" for line in dump.splitlines() if not line.startswith("-A "))


@pytest.mark.parametrize(("nat", "filter_", "intact", "reason"), [
    (NAT, FILTER, True, "rules intact"),
    (EMPTY_NAT, EMPTY_FILTER, False,
     "DOCKER chain missing in table nat; DOCKER chain missing in table filter"),  # nft flush ruleset
    (flushed(NAT), flushed(FILTER), False,  # iptables -F: chains stay, jumps go
     "no jump from PREROUTING to DOCKER in table nat; no jump from FORWARD to DOCKER in table filter"),
    (EMPTY_NAT, FILTER, False, "DOCKER chain missing in table nat"),
    (NAT, flushed(FILTER), False, "no jump from FORWARD to DOCKER in table filter"),
    (NAT.replace("-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n", ""), FILTER, False,
     "no jump from PREROUTING to DOCKER in table nat"),
], ids=["intact", "nft-flush", "iptables-F", "nat-gone", "filter-flushed", "prerouting-jump-gone"])
def test_judge_iptables(nat: str, filter_: str, intact: bool, reason: str) -> None:
    """Without a baseline, docker's rules are intact with the DOCKER chain reached from PREROUTING in nat
    and from FORWARD in filter; the reason names what is missing, the chain rather than its jumps."""
    rules = judge_iptables(nat, filter_)
    assert (rules.intact, rules.reason) == (intact, reason)


# After a live-restore restart with running containers, docker 20.10 re-creates DOCKER and its jumps but
# not DOCKER-USER (moby/moby#48560): what the docker boot's `iptables -S` showed.
FILTER_AFTER_RESTART = "".join(line + "\n" for line in FILTER.splitlines() if "DOCKER-USER" not in line)
# docker 28: FORWARD reaches DOCKER through DOCKER-FORWARD.
FILTER_28 = """\
-P FORWARD DROP
-N DOCKER
-N DOCKER-FORWARD
-N DOCKER-USER
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-FORWARD
-A DOCKER-FORWARD -o docker0 -j DOCKER
"""


def test_needs_present_names_what_traffic_uses() -> None:
    """Chains, the jumps reaching them (through other chains too, and -g), and the published ports' DNAT."""
    assert needs_present(NAT, FILTER) == frozenset(NEEDS)
    assert needs_present(NAT, FILTER_28) == frozenset(NEEDS)
    assert needs_present(NAT.replace("-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER", "-N HOP\n"
                                     "-A PREROUTING -g HOP\n-A HOP -j DOCKER"), FILTER) == frozenset(NEEDS)
    assert needs_present(NAT.replace("-j DNAT", "-j ACCEPT"), FILTER) == frozenset(NEEDS) - {"nat:DNAT"}
    assert needs_present(flushed(NAT), flushed(FILTER)) == {"nat:DOCKER", "filter:DOCKER"}
    assert needs_present(EMPTY_NAT, EMPTY_FILTER) == frozenset()


def test_a_missing_docker_user_is_information_never_a_restart() -> None:
    """The seen fault (issue: A -> B -> C): after docker's restart DOCKER-USER is gone for good; the next
    br_netfilter reload finds everything traffic needs and says DOCKER-USER is absent, as information."""
    baseline = Baseline(needs_present(NAT, FILTER_AFTER_RESTART), "after docker's restart")
    for b in (None, baseline):
        rules = judge_iptables(NAT, FILTER_AFTER_RESTART, b)
        assert rules.intact is True
        assert rules.reason.startswith("rules intact; DOCKER-USER absent in table filter (information only")
    assert judge_iptables(NAT, FILTER).reason == "rules intact"


def test_the_baseline_adds_what_traffic_used_to_what_is_needed() -> None:
    """Published ports' DNAT and the OUTPUT jump are needed when the baseline had them: a flush of the
    DOCKER chain alone (`iptables -t nat -F DOCKER`) then restarts; without them in the baseline it does
    not, and the minimum is needed whatever the baseline."""
    no_dnat = NAT.replace("-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination "
                          "172.17.0.2:80\n", "")
    no_output = NAT.replace("-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER\n", "")
    healthy = Baseline(needs_present(NAT, FILTER), "while healthy")
    assert judge_iptables(no_dnat, FILTER, healthy).reason == "no DNAT of published ports left in table nat"
    assert judge_iptables(no_output, FILTER, healthy).reason == "no jump from OUTPUT to DOCKER in table nat"
    assert judge_iptables(no_dnat, FILTER).intact and judge_iptables(no_output, FILTER).intact
    empty = Baseline(frozenset(), "while healthy")
    assert judge_iptables(EMPTY_NAT, FILTER, empty).reason == "DOCKER chain missing in table nat"
    rules = judge_iptables(no_dnat, FILTER, healthy)
    assert rules.compared == "the baseline taken while healthy: " + " ".join(sorted(NEEDS))


def test_a_jump_is_read_from_the_j_option_not_from_any_word() -> None:
    """A comment or a chain name mentioning DOCKER is not a jump to it."""
    nat = "-N DOCKER\n-A PREROUTING -m comment --comment DOCKER -j ACCEPT\n"
    assert judge_iptables(nat, FILTER).reason == "no jump from PREROUTING to DOCKER in table nat"


@pytest.mark.parametrize(("text", "unit"), [
    ("LoadState=loaded\nActiveState=active\nMainPID=812\n", Unit(True, "active", 812)),
    ("MainPID=0\nLoadState=loaded\nActiveState=inactive\n", Unit(True, "inactive", None)),
    ("LoadState=not-found\nActiveState=inactive\nMainPID=0\n", Unit(False, "not installed")),
    ("", Unit(None, "unknown (systemctl said nothing)")),
    ("LoadState=loaded\nActiveState=\x1b[31mactive\nMainPID=x\n", Unit(True, "\\x1b[31mactive", None)),
])
def test_parse_unit(text: str, unit: Unit) -> None:
    """`systemctl show` in any order; not-found is "not installed"; odd values are escaped, not trusted."""
    assert parse_unit(text) == unit


# -- the restore step, with real scripts standing in for systemctl and iptables ----------------------

class Tools:
    """A systemctl and an iptables answering from files the test changes; every call logged."""

    def __init__(self, root: Path, *, active: bool = True, installed: bool = True) -> None:
        self.dir = root / "tools"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "calls.log"
        self.nat, self.filter = self.dir / "nat.txt", self.dir / "filter.txt"
        self.set_rules(NAT, FILTER)
        load = "loaded" if installed else "not-found"
        state = "active" if active else "inactive"
        self.systemctl = executable(self.dir / "systemctl", f"""#!/bin/sh
echo "systemctl $*" >> {self.log}
case "$1" in
is-active) [ {state} = active ] && exit 0; echo {state}; exit 3 ;;
show) printf 'LoadState={load}\\nActiveState={state}\\nMainPID=0\\n' ;;
try-restart) exit 0 ;;
esac
""")
        self.iptables = executable(self.dir / "iptables", f"""#!/bin/sh
echo "iptables $*" >> {self.log}
[ -e {self.dir}/iptables.fails ] && {{ echo "iptables: Permission denied (you must be root)." >&2; exit 4; }}
case "$4" in nat) cat {self.nat} ;; filter) cat {self.filter} ;; esac
""")

    def set_rules(self, nat: str, filter_: str) -> None:
        self.nat.write_text(nat)
        self.filter.write_text(filter_)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


Decisions = list[dict[str, object]]


def restore(host: FakeHost, tools: Tools, mode: DockerMode) -> tuple[Outcome, str, Decisions]:
    cfg = Config(modprobe=str(host.modprobe), docker=mode, systemctl=str(tools.systemctl),
                 iptables=str(tools.iptables))
    probe = KernelProbe(host.root)
    host.unload("br_netfilter")
    plan = decide(cfg, CoreState(), probe.observe(probe.facts(), cfg.modules, [k for k, _ in cfg.sysctls]), 0).plan
    with capture_logs() as logs:
        result = Executor(cfg, probe, Runner(), get_logger()).execute(plan)
    step = next(r for r in result.results if r.step.kind is StepKind.RESTART_DOCKER)
    return step.outcome, step.detail, [dict(e) for e in logs if e["event"] == "docker.decision"]


def test_if_needed_leaves_docker_alone_when_its_rules_are_intact(loaded: FakeHost, tmp_path: Path) -> None:
    """br_netfilter went but docker's chains did not: no restart (containers keep running), and the
    journal record says why."""
    tools = Tools(tmp_path)
    outcome, detail, decisions = restore(loaded, tools, DockerMode.IF_NEEDED)
    assert outcome is Outcome.SKIPPED
    assert detail == "rules intact (iptables): docker.service not restarted"
    assert not [c for c in tools.calls() if "try-restart" in c]
    assert decisions == [{"event": "docker.decision", "log_level": "info", "mode": "if-needed", "restart": False,
                          "reason": "rules intact (iptables)",
                          "compared": "docker's minimum (no baseline yet): filter:DOCKER filter:FORWARD>DOCKER "
                                      "nat:DOCKER nat:PREROUTING>DOCKER"}]


@pytest.mark.parametrize(("nat", "filter_", "reason"), [
    (EMPTY_NAT, EMPTY_FILTER, "DOCKER chain missing in table nat; DOCKER chain missing in table filter"),
    (flushed(NAT), FILTER, "no jump from PREROUTING to DOCKER in table nat"),
])
def test_if_needed_restarts_docker_once_its_rules_are_gone(loaded: FakeHost, tmp_path: Path, nat: str,
                                                           filter_: str, reason: str) -> None:
    """A firewall clean-up flushed docker's rules: try-restart, with the missing rule as the reason."""
    tools = Tools(tmp_path)
    tools.set_rules(nat, filter_)
    outcome, detail, decisions = restore(loaded, tools, DockerMode.IF_NEEDED)
    assert outcome is Outcome.OK and detail == f"systemctl exited 0 ({reason} (iptables))"
    calls = tools.calls()
    # after the restart, docker's rules are read again as the next fault's baseline
    assert calls[-4:] == ["systemctl try-restart docker.service",
                          "systemctl show -p LoadState -p ActiveState -p MainPID docker.service",
                          "iptables -w 5 -t nat -S", "iptables -w 5 -t filter -S"]
    assert [d["restart"] for d in decisions] == [True] and decisions[0]["reason"] == f"{reason} (iptables)"


def test_a_restart_that_did_what_it_could_is_not_repeated_for_what_docker_never_re_creates(
        loaded: FakeHost, tmp_path: Path) -> None:
    """Phases B and C of the docker boot: a clean-up flushed everything, docker's restart re-created all
    but DOCKER-USER and one published port's DNAT; the baseline retaken after it makes the next
    br_netfilter reload a "rules intact" skip, not another restart that could not help either."""
    tools = Tools(tmp_path)
    cfg = Config(modprobe=str(loaded.modprobe), docker=DockerMode.IF_NEEDED, systemctl=str(tools.systemctl),
                 iptables=str(tools.iptables))
    probe = KernelProbe(loaded.root)
    healthy = needs_present(NAT, FILTER)
    executor = Executor(cfg, probe, Runner(), get_logger(),
                        docker_baseline=Baseline(healthy, "while healthy"))
    after_restart = NAT.replace("-j DNAT", "-j ACCEPT")

    def fault() -> list[dict[str, object]]:
        loaded.unload("br_netfilter")
        obs = probe.observe(probe.facts(), cfg.modules, [k for k, _ in cfg.sysctls])
        with capture_logs() as logs:
            executor.execute(decide(cfg, CoreState(), obs, 0).plan)
        return [dict(e) for e in logs if e["event"] in ("docker.decision", "docker.baseline")]

    tools.set_rules(EMPTY_NAT, EMPTY_FILTER)  # B: the clean-up; docker's restart (the fake) re-creates...
    (tools.dir / "systemctl").write_text((tools.dir / "systemctl").read_text().replace(
        "try-restart) exit 0 ;;", f"try-restart) cp {tools.dir}/nat.after {tools.nat}; "
                                  f"cp {tools.dir}/filter.after {tools.filter}; exit 0 ;;"))
    (tools.dir / "nat.after").write_text(after_restart)
    (tools.dir / "filter.after").write_text(FILTER_AFTER_RESTART)
    b = fault()
    assert [(e["event"], e.get("restart")) for e in b] == [("docker.decision", True), ("docker.baseline", None)]
    assert str(b[0]["compared"]).startswith("the baseline taken while healthy: ")
    assert b[1]["taken"] == "after docker's restart" and "nat:DNAT" not in str(b[1]["present"])
    assert executor.docker_baseline is not None and executor.docker_baseline.present == healthy - {"nat:DNAT"}
    c = fault()  # C: br_netfilter again, docker's rules as its restart left them
    assert [(e["event"], e.get("restart")) for e in c] == [("docker.decision", False)]
    assert str(c[0]["reason"]).startswith("rules intact; DOCKER-USER absent in table filter")
    assert str(c[0]["compared"]).startswith("the baseline taken after docker's restart: ")
    assert sum("try-restart" in call for call in tools.calls()) == 1


def test_if_needed_without_a_verdict_on_the_rules_fails_instead_of_guessing(loaded: FakeHost, tmp_path: Path) -> None:
    """iptables cannot list the tables: the step fails (retried with backoff); docker is not restarted
    on a guess."""
    tools = Tools(tmp_path)
    (tools.dir / "iptables.fails").touch()
    outcome, detail, _ = restore(loaded, tools, DockerMode.IF_NEEDED)
    assert outcome is Outcome.FAILED
    assert detail.startswith("cannot tell whether docker's iptables rules are intact: cannot list table nat: ")
    assert "Permission denied (you must be root)." in detail
    assert not [c for c in tools.calls() if "try-restart" in c]


def test_if_needed_trusts_daemon_json_that_docker_keeps_no_rules(loaded: FakeHost, tmp_path: Path) -> None:
    """`"iptables": false` in daemon.json: docker has no rules to lose, so none are looked for."""
    tools = Tools(tmp_path)
    tools.set_rules(EMPTY_NAT, EMPTY_FILTER)
    (loaded.root / "etc/docker").mkdir(parents=True)
    (loaded.root / "etc/docker/daemon.json").write_text('{"iptables": false}')
    outcome, detail, _ = restore(loaded, tools, DockerMode.IF_NEEDED)
    assert outcome is Outcome.SKIPPED and "docker manages no iptables rules" in detail
    assert not [c for c in tools.calls() if c.startswith("iptables")]


@pytest.mark.parametrize("mode", [DockerMode.IF_NEEDED, DockerMode.IF_ACTIVE])
def test_docker_not_installed_is_a_clear_skip(loaded: FakeHost, tmp_path: Path, mode: DockerMode) -> None:
    """A host without docker: skipped with "is not installed", never a failure, whatever the mode."""
    tools = Tools(tmp_path, active=False, installed=False)
    outcome, detail, decisions = restore(loaded, tools, mode)
    assert (outcome, detail) == (Outcome.SKIPPED, "docker.service is not installed")
    assert decisions[0]["restart"] is False


def test_if_active_restarts_even_with_the_rules_intact(loaded: FakeHost, tmp_path: Path) -> None:
    """if-active still means what it says: restart after every reload, rules or not, when active."""
    tools = Tools(tmp_path)
    outcome, detail, _ = restore(loaded, tools, DockerMode.IF_ACTIVE)
    assert outcome is Outcome.OK and detail.endswith("(if-active: restarted after every module reload)")
    assert not [c for c in tools.calls() if c.startswith("iptables")]
    assert tools.calls()[-1] == "systemctl try-restart docker.service"


def test_if_needed_restart_counts_for_the_breaker_and_a_skip_does_not(loaded: FakeHost, tmp_path: Path) -> None:
    """Only a restart that happened is a restart for max_restarts: a "rules intact" skip is free."""
    from ctwatchd.core import record

    tools = Tools(tmp_path)
    cfg = Config(modprobe=str(loaded.modprobe), docker=DockerMode.IF_NEEDED, systemctl=str(tools.systemctl),
                 iptables=str(tools.iptables))
    probe = KernelProbe(loaded.root)
    loaded.unload("br_netfilter")
    d = decide(cfg, CoreState(), probe.observe(probe.facts(), cfg.modules, [k for k, _ in cfg.sysctls]), 10.0)
    with capture_logs():
        result = Executor(cfg, probe, Runner(), get_logger()).execute(d.plan)
    state = record(cfg, d.state, result, 11.0)
    assert result.ok and state.restarts == () and not state.restarts_owed


# -- what check shows ------------------------------------------------------------------------------

def with_systemd(host: FakeHost) -> None:
    (host.root / "run/systemd/system").mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize(("daemon_json", "cmdline", "expected"), [
    ('{"live-restore": true}', b"/usr/sbin/dockerd\0-H\0fd://\0", (True, "/etc/docker/daemon.json")),
    ('{"live-restore": false}', b"/usr/sbin/dockerd\0", (False, "/etc/docker/daemon.json")),
    (None, b"/usr/sbin/dockerd\0--live-restore\0", (True, "dockerd --live-restore")),
    (None, b"/usr/sbin/dockerd\0", (False, "docker's default")),
    ("{not json", b"/usr/sbin/dockerd\0", (False, "docker's default")),
])
def test_live_restore_is_read_from_dockerd_and_daemon_json(loaded: FakeHost, tmp_path: Path, daemon_json: str | None,
                                                           cmdline: bytes, expected: tuple[bool, str]) -> None:
    """live-restore from dockerd's command line, else daemon.json, else docker's default (off)."""
    if daemon_json is not None:
        (loaded.root / "etc/docker").mkdir(parents=True)
        (loaded.root / "etc/docker/daemon.json").write_text(daemon_json)
    (loaded.root / "proc/4242").mkdir(parents=True)
    (loaded.root / "proc/4242/cmdline").write_bytes(cmdline)
    tools = Tools(tmp_path)
    got = DockerProbe(Runner(), systemctl=str(tools.systemctl), iptables=None, root=loaded.root) \
        .live_restore(Unit(True, "active", 4242))
    assert (got.enabled, got.source) == expected


def ctw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctwatchd", *args], capture_output=True, text=True, timeout=30,
                          env=os.environ, check=False)


def test_check_shows_docker_rules_live_restore_and_warns(loaded: FakeHost, tmp_path: Path) -> None:
    """check: docker active, its rules, live-restore off from daemon.json, and the warning that a restart
    would stop every container."""
    with_systemd(loaded)
    tools = Tools(tmp_path)
    tools.set_rules(EMPTY_NAT, FILTER)
    (loaded.root / "etc/docker").mkdir(parents=True)
    (loaded.root / "etc/docker/daemon.json").write_text('{"live-restore": false}')
    cfg = loaded.config(f'[restore]\ndocker = "if-needed"\nsystemctl = "{tools.systemctl}"\n'
                        f'iptables = "{tools.iptables}"\n')
    r = ctw("check", "--json", "--root", str(loaded.root), "--config", str(cfg))
    docker = json.loads(r.stdout)["docker"]
    assert docker == {"unit": "active", "mode": "if-needed", "rules_intact": False,
                      "rules": "DOCKER chain missing in table nat (iptables)", "live_restore": False,
                      "live_restore_source": "/etc/docker/daemon.json",
                      "warning": "live-restore is off: restarting docker stops every running container; "
                                 "docker = \"if-needed\" restarts it only when its rules are gone"}
    table = ctw("check", "--root", str(loaded.root), "--config", str(cfg)).stdout
    assert "docker.service: active; docker = \"if-needed\"; rules: DOCKER chain missing in table nat (iptables); " \
           "live-restore off (/etc/docker/daemon.json)" in table
    assert "\nwarning: live-restore is off" in table


def test_check_without_docker_says_not_installed(loaded: FakeHost, tmp_path: Path) -> None:
    """A host without docker: check says so and asks nothing else of it."""
    with_systemd(loaded)
    tools = Tools(tmp_path, active=False, installed=False)
    cfg = loaded.config(f'[restore]\ndocker = "if-needed"\nsystemctl = "{tools.systemctl}"\n'
                        f'iptables = "{tools.iptables}"\n')
    r = ctw("check", "--json", "--root", str(loaded.root), "--config", str(cfg))
    assert json.loads(r.stdout)["docker"] == {"unit": "not installed", "mode": "if-needed"}


# -- configuration ---------------------------------------------------------------------------------

def test_if_needed_and_the_iptables_path_are_configuration(tmp_path: Path) -> None:
    """docker = "if-needed" parses; iptables must be an absolute path, trusted like every executable."""
    p = tmp_path / "c.toml"
    p.write_text('[restore]\ndocker = "if-needed"\niptables = "/bin/sh"\n')
    cfg = configmod.load(p)
    assert cfg.docker is DockerMode.IF_NEEDED and cfg.iptables == "/bin/sh"
    p.write_text('[restore]\niptables = "iptables"\n')
    with pytest.raises(ConfigError, match=r"\[restore\] iptables must be an absolute path"):
        configmod.load(p)


def test_plan_names_the_docker_condition(loaded: FakeHost) -> None:
    """`restore --dry-run` says under which condition docker would be restarted."""
    cfg = Config(modprobe=str(loaded.modprobe), docker=DockerMode.IF_NEEDED)
    probe = KernelProbe(loaded.root)
    loaded.unload("nf_nat")
    plan = decide(cfg, CoreState(), probe.observe(probe.facts(), cfg.modules, [k for k, _ in cfg.sysctls]), 0).plan
    assert plan.steps[-1].describe() == \
        "systemctl try-restart docker.service, if it is active and its iptables rules are gone"


# -- the daemon takes the baseline --------------------------------------------------------------------

@pytest.mark.parametrize("active", [True, False])
def test_the_daemon_takes_the_baseline_once_while_healthy_and_keeps_it_across_a_reload(
        h: Harness, tmp_path: Path, active: bool) -> None:
    """The first healthy look with docker active takes the baseline; a reload keeps it (the executor
    is new, the baseline is not). Docker not active yet (the unit starts before it): one systemctl
    call, no iptables, and no more tries within BASELINE_EVERY."""
    tools = Tools(tmp_path, active=active)
    cfg = replace(cfg_for(h.host), docker=DockerMode.IF_NEEDED, systemctl=str(tools.systemctl),
                  iptables=str(tools.iptables))

    def driver() -> None:
        h.wait_notify("READY=1")
        n = len(h.read_notify())
        os.kill(os.getpid(), signal.SIGHUP)
        h.wait_notify("READY=1", after=n + 1)

    d = h.daemon(cfg)
    code, logs = h.run(d, driver)
    assert code == 0
    taken = events(logs, "docker.baseline")
    if active:
        assert [e["taken"] for e in taken] == ["while healthy"]
        assert taken[0]["present"] == " ".join(sorted(NEEDS))
        assert d.executor.docker_baseline is not None and d.executor.docker_baseline.present == frozenset(NEEDS)
        assert sum(c.startswith("iptables") for c in tools.calls()) == 2
    else:
        assert taken == [] and d.executor.docker_baseline is None
        assert tools.calls() == ["systemctl show -p LoadState -p ActiveState -p MainPID docker.service"]


@pytest.mark.parametrize("active", [True, False])
def test_a_start_up_restore_never_waits_on_docker_before_ready(h: Harness, tmp_path: Path, active: bool) -> None:
    """The unit is Before=docker.service: a try-restart before READY would wait on a docker start job
    that waits on ctwatchd's. So the start-up restore leaves an active docker's restart, and the hooks
    after it, owed; the first look after READY makes the one decision and restarts it, then the hook.
    An inactive docker is a plain skip before READY, nothing owed."""
    tools = Tools(tmp_path, active=active)
    hook = executable(tmp_path / "hook", f"#!/bin/sh\necho hook >> {tools.log}\n")
    cfg = replace(cfg_for(h.host), docker=DockerMode.IF_ACTIVE, systemctl=str(tools.systemctl),
                  iptables=str(tools.iptables), hooks=((str(hook),),))
    h.host.unload("br_netfilter")

    def driver() -> None:
        h.wait_notify("READY=1")
        if active:
            h.wait_for(lambda: "hook" in tools.calls())
        time.sleep(0.3)

    d = h.daemon(cfg)
    code, logs = h.run(d, driver)
    assert code == 0
    order = [(e["event"], e.get("action"), e.get("result"), e.get("restart")) for e in logs
             if e["event"] in ("daemon.ready", "docker.decision")
             or (e["event"] == "restore.step" and e.get("action") in ("restart-docker", "run-hook"))]
    if active:
        assert order == [("restore.step", "restart-docker", "skipped", None),
                         ("restore.step", "run-hook", "skipped", None), ("daemon.ready", None, None, None),
                         ("docker.decision", None, None, True),
                         ("restore.step", "restart-docker", "ok", None), ("restore.step", "run-hook", "ok", None)]
        deferred = next(e for e in events(logs, "restore.step") if e.get("action") == "restart-docker")
        assert str(deferred["detail"]).startswith("deferred until ctwatchd is ready")
        calls = tools.calls()
        assert calls.index("systemctl try-restart docker.service") < calls.index("hook")
        assert calls.count("systemctl try-restart docker.service") == 1
    else:
        assert order == [("docker.decision", None, None, False), ("restore.step", "restart-docker", "skipped", None),
                         ("restore.step", "run-hook", "ok", None), ("daemon.ready", None, None, None)]
    assert not d.state.restarts_owed


def test_the_baseline_is_read_again_while_healthy_so_removed_containers_are_no_loss(
        h: Harness, tmp_path: Path) -> None:
    """Containers with published ports removed since the baseline: the next reading, BASELINE_REFRESH
    later, drops their DNAT, so a br_netfilter reload after it does not restart docker for it. Never
    read while a watched module is missing (the fault's rules are not a baseline)."""
    from ctwatchd.daemon import BASELINE_REFRESH

    tools = Tools(tmp_path)
    cfg = replace(cfg_for(h.host), docker=DockerMode.IF_NEEDED, systemctl=str(tools.systemctl),
                  iptables=str(tools.iptables))
    d = h.daemon(cfg)
    probe = KernelProbe(h.host.root)

    def look() -> Observation:
        return probe.observe(probe.facts(), cfg.modules, [k for k, _ in cfg.sysctls])

    with capture_logs() as logs:
        d._docker_baseline(look(), 1000.0)
        tools.set_rules(NAT.replace("-j DNAT", "-j ACCEPT"), FILTER)
        d._docker_baseline(look(), 1000.0 + BASELINE_REFRESH - 1)
        assert d.executor.docker_baseline is not None and "nat:DNAT" in d.executor.docker_baseline.present
        d._docker_baseline(look(), 1000.0 + BASELINE_REFRESH)
        assert d.executor.docker_baseline is not None and "nat:DNAT" not in d.executor.docker_baseline.present
        d._docker_baseline(look(), 1000.0 + 2 * BASELINE_REFRESH)  # the same again: no record
        h.host.unload("br_netfilter")
        tools.set_rules(EMPTY_NAT, EMPTY_FILTER)
        d._docker_baseline(look(), 1000.0 + 3 * BASELINE_REFRESH)
    assert d.executor.docker_baseline.present == frozenset(NEEDS) - {"nat:DNAT"}
    assert [e["present"] for e in logs if e["event"] == "docker.baseline"] == [
        " ".join(sorted(NEEDS)), " ".join(sorted(set(NEEDS) - {"nat:DNAT"}))]
