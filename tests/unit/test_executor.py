"""The executor on a fake host tree: modprobe, verify, sysctls, docker, hooks; stop at the first failure."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from fakehost import FakeHost, executable
from structlog.testing import capture_logs

from ctwatchd import audit
from ctwatchd.config import Config, DockerMode
from ctwatchd.core import CoreState, decide
from ctwatchd.executor import Executor, write_sysctl
from ctwatchd.kernel import KernelProbe
from ctwatchd.model import Outcome, RestorePlan, Step, StepKind
from ctwatchd.runner import Runner


def make(host: FakeHost, **cfg_changes: object) -> tuple[Config, Executor]:
    cfg = replace(Config(modprobe=str(host.modprobe)), **cfg_changes)  # type: ignore[arg-type]
    return cfg, Executor(cfg, KernelProbe(host.root), Runner(), audit.get_logger())


def plan_for(cfg: Config, host: FakeHost) -> RestorePlan:
    probe = KernelProbe(host.root)
    return decide(cfg, CoreState(), probe.observe(probe.facts(), cfg.modules, [k for k, _ in cfg.sysctls]), 0).plan


def test_restore_loads_in_order_and_verifies_everything(loaded: FakeHost) -> None:
    """After all three are removed, one execution brings them back with the bridge sysctls at 1."""
    for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
        loaded.unload(m)
    cfg, ex = make(loaded)
    with capture_logs() as logs:
        result = ex.execute(plan_for(cfg, loaded))
    assert result.ok, result
    assert loaded.modprobe_calls() == ["nf_conntrack", "nf_nat", "br_netfilter"]
    assert all(loaded.is_live(m) for m in ("nf_conntrack", "nf_nat", "br_netfilter"))
    steps = [e for e in logs if e["event"] == "restore.step"]
    assert [(e["action"], e["module"], e["result"]) for e in steps] == [
        ("load-module", "nf_conntrack", "ok"), ("load-module", "nf_nat", "ok"),
        ("load-module", "br_netfilter", "ok"), ("verify-conntrack", None, "ok"), ("write-sysctls", None, "ok")]
    assert all(isinstance(e["duration_ms"], float) for e in steps)


def test_failed_modprobe_stops_the_plan_and_names_the_cause(host: FakeHost) -> None:
    """modprobe's own error becomes the detail; later steps are skipped, not run."""
    host.write_modprobe(exit_code=1, load=False, extra='echo "modprobe: ERROR: could not insert \'$1\'" >&2')
    cfg, ex = make(host)
    result = ex.execute(plan_for(cfg, host))
    assert not result.ok
    assert result.failed is not None and result.failed.step.module == "nf_conntrack"
    assert "could not insert 'nf_conntrack'" in result.failed.detail
    assert [r.outcome for r in result.results[1:]] == [Outcome.SKIPPED] * (len(result.results) - 1)
    assert host.modprobe_calls() == ["nf_conntrack"]


def test_modprobe_success_without_load_is_a_failure(host: FakeHost) -> None:
    """`install x /bin/true` makes modprobe succeed without loading: initstate is checked, not trusted."""
    host.write_modprobe(load=False)
    cfg, ex = make(host, modules=("nf_nat",))
    result = ex.execute(plan_for(cfg, host))
    assert result.failed is not None
    assert "exited 0 but nf_nat is not loaded" in result.failed.detail and "install" in result.failed.detail


def test_sysctl_writes_are_read_back(loaded: FakeHost) -> None:
    """Desired values are written and confirmed; a missing file fails with the key named."""
    assert write_sysctl(loaded.root, "net.bridge.bridge-nf-call-iptables", "0") is None
    assert loaded.read_sysctl("net.bridge.bridge-nf-call-iptables") == "0"
    problem = write_sysctl(loaded.root, "net.bridge.nope", "1")
    assert problem is not None and problem.startswith("net.bridge.nope: cannot write") and "does not exist" in problem
    assert not (loaded.root / "proc/sys/net/bridge/nope").exists()


def test_sysctl_read_back_mismatch_fails(loaded: FakeHost, tmp_path: Path) -> None:
    """A value the kernel silently changes is reported (read-back differs)."""
    target = loaded.sysctl("net.bridge.bridge-nf-call-iptables")
    target.unlink()
    target.symlink_to("/dev/null")
    problem = write_sysctl(loaded.root, "net.bridge.bridge-nf-call-iptables", "1")
    assert problem is not None and "read back ''" in problem


def test_hooks_run_in_order_after_sysctls_and_failure_is_named(loaded: FakeHost, tmp_path: Path) -> None:
    """Hooks are argv lists run in order; a failing hook fails the restore with its output."""
    out = tmp_path / "hooks.log"
    h1 = executable(tmp_path / "h1", f"#!/bin/sh\necho h1 \"$@\" >> {out}\n")
    h2 = executable(tmp_path / "h2", f"#!/bin/sh\necho h2 >> {out}\necho 'kube-proxy: no such unit'\nexit 5\n")
    loaded.unload("br_netfilter")
    cfg, ex = make(loaded, hooks=((str(h1), "a b"), (str(h2),)))
    result = ex.execute(plan_for(cfg, loaded))
    assert out.read_text().splitlines() == ["h1 a b", "h2"]
    assert result.failed is not None and result.failed.step.kind is StepKind.RUN_HOOK
    assert "exited with status 5: kube-proxy: no such unit" in result.failed.detail


@pytest.mark.parametrize(("active_rc", "outcome", "calls"), [
    (0, Outcome.OK, ["is-active --quiet docker.service", "try-restart docker.service"]),
    (3, Outcome.SKIPPED, ["is-active --quiet docker.service",
                          "show -p LoadState -p ActiveState -p MainPID docker.service"]),
])
def test_docker_restarted_only_when_active(loaded: FakeHost, tmp_path: Path, active_rc: int,
                                           outcome: Outcome, calls: list[str]) -> None:
    """docker = "if-active" asks systemctl and try-restarts only an active docker.service."""
    log = tmp_path / "systemctl.log"
    systemctl = executable(tmp_path / "systemctl", f"#!/bin/sh\necho \"$*\" >> {log}\n"
                                                   f"[ \"$1\" = is-active ] && exit {active_rc}\nexit 0\n")
    loaded.unload("nf_nat")
    cfg, ex = make(loaded, docker=DockerMode.IF_ACTIVE, systemctl=str(systemctl))
    result = ex.execute(plan_for(cfg, loaded))
    docker = next(r for r in result.results if r.step.kind is StepKind.RESTART_DOCKER)
    assert docker.outcome is outcome
    assert log.read_text().splitlines() == calls
    assert result.ok


def test_unexpected_exception_becomes_a_failed_step(loaded: FakeHost) -> None:
    """The executor never raises: an internal error is a failed step with its type named."""
    _, ex = make(loaded)

    class Boom(KernelProbe):
        def conntrack_count(self) -> int | None:
            raise RuntimeError("disk on fire")

    ex.probe = Boom(loaded.root)
    result = ex.execute(RestorePlan((Step(StepKind.VERIFY_CONNTRACK),), "test"))
    assert result.failed is not None and "RuntimeError: disk on fire" in result.failed.detail
