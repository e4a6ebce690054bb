"""The executor's edges: snapshot write-back bookkeeping, default executable paths, what a skipped step
says, a docker probe that never answered, and write_sysctl on files that fight back."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import MutableMapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fakehost import FakeHost
from structlog.testing import capture_logs

from ctwatchd import audit
from ctwatchd.config import MODPROBE_PATHS, SYSTEMCTL_PATHS, Config, DockerMode
from ctwatchd.executor import Executor, first_existing, modprobe_path, systemctl_path, write_sysctl
from ctwatchd.kernel import KernelProbe
from ctwatchd.model import Outcome, RestorePlan, Step, StepKind
from ctwatchd.runner import Completed, Runner

MAX = "net.netfilter.nf_conntrack_max"
BUCKETS = "net.netfilter.nf_conntrack_buckets"
LOOSE = "net.netfilter.nf_conntrack_tcp_loose"
GONE = "net.netfilter.nf_conntrack_icmpv6_timeout"  # keys the reloaded module does not have
GONE2 = "net.netfilter.nf_conntrack_icmp_timeout"
BRIDGE = "net.bridge.bridge-nf-call-iptables"


def executor(host: FakeHost, runner: Runner | None = None, **cfg: object) -> Executor:
    config = replace(Config(modprobe=str(host.modprobe)), **cfg)  # type: ignore[arg-type]
    return Executor(config, KernelProbe(host.root), runner or Runner(), audit.get_logger())


def tuning_plan(*pairs: tuple[str, str]) -> RestorePlan:
    return RestorePlan((Step(StepKind.RESTORE_TUNING, sysctls=pairs),), "test")


def writes(logs: Sequence[MutableMapping[str, Any]]) -> dict[object, tuple[object, object, object]]:
    return {e["key"]: (e["value"], e["previous"], e["result"]) for e in logs if e["event"] == "sysctl.write"}


def test_snapshot_write_back_counts_written_already_set_and_dropped(loaded: FakeHost) -> None:
    """Restoring the snapshot writes only what differs, leaves what is already right, drops a key the
    module no longer has, says so in one line, and audits each write with its old and new value."""
    loaded.write_sysctl(BUCKETS, "65536")
    with capture_logs() as logs:
        result = executor(loaded).execute(tuning_plan((MAX, "1048576"), (BUCKETS, "65536"), (GONE, "10"),
                                                      (GONE2, "30")))
    step = result.results[0]
    assert result.ok and step.outcome is Outcome.OK
    assert step.detail == f"1 written and read back, 1 already set; dropped from the snapshot: {GONE}, {GONE2}"
    assert step.dropped == (GONE, GONE2)
    assert loaded.read_sysctl(MAX) == "1048576"
    assert writes(logs) == {MAX: ("1048576", "262144", "ok"), GONE: ("10", None, "dropped"),
                            GONE2: ("30", None, "dropped")}


def test_snapshot_write_back_with_nothing_dropped_has_no_tail(loaded: FakeHost) -> None:
    """Two keys written, none dropped: the detail counts them and names nothing as dropped."""
    result = executor(loaded).execute(tuning_plan((MAX, "1048576"), (LOOSE, "0")))
    assert result.results[0].detail == "2 written and read back, 0 already set"
    assert result.results[0].dropped == ()


def test_snapshot_key_that_exists_but_does_not_take_the_value_fails_and_is_kept(loaded: FakeHost) -> None:
    """A snapshot key whose file exists but reads back something else is a failure naming the key (not
    dropped: it may take the value next time), while a missing key beside it is still dropped."""
    target = loaded.sysctl(LOOSE)
    target.unlink()
    target.symlink_to("/dev/null")  # exists, takes any write, reads back ''
    with capture_logs() as logs:
        result = executor(loaded).execute(tuning_plan((GONE, "10"), (LOOSE, "0")))
    step = result.results[0]
    assert step.outcome is Outcome.FAILED and not result.ok
    assert step.detail == f"{LOOSE}: wrote '0' but read back ''"
    assert step.dropped == (GONE,)
    assert writes(logs) == {GONE: ("10", None, "dropped"), LOOSE: ("0", "", "failed")}


def test_two_snapshot_failures_are_both_named(loaded: FakeHost) -> None:
    """Every failing snapshot key is in the detail, in plan order, separated by '; '."""
    for key in (LOOSE, MAX):
        loaded.sysctl(key).unlink()
        loaded.sysctl(key).symlink_to("/dev/null")
    result = executor(loaded).execute(tuning_plan((LOOSE, "0"), (MAX, "5")))
    assert result.results[0].detail == f"{LOOSE}: wrote '0' but read back ''; {MAX}: wrote '5' but read back ''"


def test_unconfigured_modprobe_and_systemctl_are_the_first_standard_path_that_exists(tmp_path: Path) -> None:
    """Without a configured path, the first standard location that exists is used, else the first named."""
    present = tmp_path / "systemctl"
    present.write_text("")
    assert first_existing((str(tmp_path / "absent"), str(present))) == str(present)
    assert first_existing((str(tmp_path / "a"), str(tmp_path / "b"))) == str(tmp_path / "a")
    assert modprobe_path(Config()) == first_existing(MODPROBE_PATHS)
    assert systemctl_path(Config()) == first_existing(SYSTEMCTL_PATHS)
    assert systemctl_path(Config(systemctl="/opt/bin/systemctl")) == "/opt/bin/systemctl"


def test_skipped_steps_name_the_step_that_stopped_the_plan(loaded: FakeHost, tmp_path: Path) -> None:
    """After a failure every later step is skipped with 'not run: <step> failed', the module named
    when the failed step has one."""
    loaded.write_modprobe(exit_code=1, load=False)
    loaded.unload("nf_nat")
    plan = RestorePlan((Step(StepKind.LOAD_MODULE, module="nf_nat"), Step(StepKind.RUN_HOOK, argv=("/bin/true",))),
                       "test")
    result = executor(loaded).execute(plan)
    assert result.results[1].outcome is Outcome.SKIPPED
    assert result.results[1].detail == "not run: load-module nf_nat failed"

    bridge = loaded.sysctl(BRIDGE)
    bridge.unlink()
    bridge.symlink_to("/dev/null")
    plan = RestorePlan((Step(StepKind.WRITE_SYSCTLS, sysctls=((BRIDGE, "1"),)),
                        Step(StepKind.RUN_HOOK, argv=("/bin/true",))), "test")
    result = executor(loaded).execute(plan)
    assert result.results[1].detail == "not run: write-sysctls failed"


class TimedOutRunner(Runner):
    """Every command runs into its timeout, as a hung systemd would make `systemctl is-active` do."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str], timeout: float) -> Completed:
        self.calls.append(tuple(argv))
        return Completed(tuple(argv), None, "", timeout * 1000, timed_out=True)


def test_docker_probe_that_times_out_fails_the_step_instead_of_skipping_it(loaded: FakeHost) -> None:
    """`systemctl is-active` running into its timeout is a failed docker step (the restart is still
    owed), never "docker.service is not active", and no try-restart is attempted."""
    runner = TimedOutRunner()
    ex = executor(loaded, runner, docker=DockerMode.IF_ACTIVE, systemctl="/usr/bin/systemctl")
    result = ex.execute(RestorePlan((Step(StepKind.RESTART_DOCKER),), "test"))
    step = result.results[0]
    assert step.outcome is Outcome.FAILED
    assert "did not finish within its timeout" in step.detail
    assert runner.calls == [("/usr/bin/systemctl", "is-active", "--quiet", "docker.service")]


@pytest.mark.parametrize(("code", "says"), [
    (errno.EPERM, "permission denied (EPERM)"),
    (errno.EACCES, "permission denied (EACCES)"),
    (errno.EROFS, "read-only file system (EROFS)"),
    (errno.EIO, os.strerror(errno.EIO)),
])
def test_write_errors_are_named_by_their_cause(loaded: FakeHost, monkeypatch: pytest.MonkeyPatch, code: int,
                                               says: str) -> None:
    """Each way a /proc/sys write can be refused gives one sentence with the key, the file and the cause."""
    target = str(loaded.sysctl(BRIDGE))
    real_open = os.open

    def refuse(path: object, flags: int, *args: int) -> int:
        if str(path) == target:
            raise OSError(code, os.strerror(code))
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse)
    problem = write_sysctl(loaded.root, BRIDGE, "1")
    assert problem == f"{BRIDGE}: cannot write {target}: {says}"


def test_write_error_without_an_errno_still_gives_its_text(loaded: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError that carries no errno (a library's own) is reported by its text, not as a guessed cause."""
    target = str(loaded.sysctl(BRIDGE))
    real_open = os.open

    def refuse(path: object, flags: int, *args: int) -> int:
        if str(path) == target:
            raise OSError("device went away")
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse)
    assert write_sysctl(loaded.root, BRIDGE, "1") == f"{BRIDGE}: cannot write {target}: device went away"


def test_a_huge_value_that_does_not_take_is_echoed_short(loaded: FakeHost) -> None:
    """A 5000-character value the kernel rejects (EINVAL, a real proc handler) or silently drops (read back
    differs) is named in a sentence that stays short: the value is capped."""
    target = loaded.sysctl(LOOSE)
    target.unlink()
    target.symlink_to("/proc/self/oom_score_adj")  # kstrtoint: never a number, so EINVAL and nothing changes
    problem = write_sysctl(loaded.root, LOOSE, "x" * 5000)
    assert problem is not None and problem.endswith("(EINVAL)") and "the kernel rejected the value 'xxx" in problem
    assert len(problem) < 300, len(problem)
    target.unlink()
    target.symlink_to("/dev/null")
    problem = write_sysctl(loaded.root, LOOSE, "x" * 5000)
    assert problem is not None and problem.startswith(f"{LOOSE}: wrote 'xxx") and problem.endswith("read back ''")
    assert len(problem) < 300, len(problem)


def test_fifo_in_a_sysctls_place_answers_at_once_even_with_a_reader(loaded: FakeHost) -> None:
    """A FIFO where a sysctl file belongs, held open by some reader and full of non-ASCII junk, makes
    write_sysctl return a short mismatch sentence at once: the read-back neither blocks nor raises."""
    target = loaded.sysctl(BRIDGE)
    target.unlink()
    os.mkfifo(target)
    reader = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(target, os.O_WRONLY | os.O_NONBLOCK)
    os.write(writer, b"\xff\xfe" * 1000)
    os.close(writer)
    answer: list[str | None] = []
    worker = threading.Thread(target=lambda: answer.append(write_sysctl(loaded.root, BRIDGE, "1")),
                              daemon=True)
    try:
        worker.start()
        worker.join(5)
        blocked = worker.is_alive()
    finally:
        if worker.is_alive():  # release a read-back open blocked waiting for a writer
            os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(5)
        os.close(reader)
    assert not blocked, "write_sysctl blocked on the FIFO"
    assert answer and answer[0] is not None
    assert answer[0].startswith(f"{BRIDGE}: wrote '1' but read back '\ufffd") and len(answer[0]) < 300


class ScriptedProbe(KernelProbe):
    """initstate answers from a script, one per read; the last answer repeats."""

    def __init__(self, root: Path, answers: Sequence[str | None]) -> None:
        super().__init__(root)
        self.answers = answers
        self.reads = 0

    def initstate(self, name: str) -> str | None:
        self.reads += 1
        return self.answers[min(self.reads, len(self.answers)) - 1]


def load_with(loaded: FakeHost, answers: Sequence[str | None]) -> tuple[Outcome, str, float, ScriptedProbe]:
    """One load-module step against scripted initstate answers, on a fake clock advanced only by sleep."""
    now = [100.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    loaded.unload("nf_nat")
    probe = ScriptedProbe(loaded.root, answers)
    ex = Executor(Config(modprobe=str(loaded.modprobe)), probe, Runner(), audit.get_logger(),
                  clock=lambda: now[0], sleep=sleep)
    r = ex.execute(RestorePlan((Step(StepKind.LOAD_MODULE, module="nf_nat"),), "test")).results[0]
    return r.outcome, r.detail, now[0] - 100.0, probe


def test_a_module_that_goes_live_shortly_after_modprobe_is_seen_within_one_poll(loaded: FakeHost) -> None:
    """modprobe returned while initstate still says 'coming': initstate is polled every 10 ms and the
    step succeeds as soon as it reads 'live'."""
    outcome, detail, waited, probe = load_with(loaded, ["coming"] * 5 + ["live"])
    assert (outcome, detail) == (Outcome.OK, "initstate live")
    assert probe.reads == 6 and waited == pytest.approx(0.05)


def test_a_module_stuck_after_modprobe_fails_after_live_wait_naming_its_state(loaded: FakeHost) -> None:
    """A module that never reads 'live' fails the step after LIVE_WAIT, naming the state it is stuck in;
    one that is gone at once names the two likely causes."""
    outcome, detail, waited, _ = load_with(loaded, ["coming"])
    assert outcome is Outcome.FAILED
    assert detail == "modprobe nf_nat succeeded but /sys/module/nf_nat/initstate is 'coming'"
    assert 2.0 <= waited < 2.05
    outcome, detail, _, _ = load_with(loaded, [None])
    assert (outcome, detail) == (Outcome.FAILED, "modprobe nf_nat exited 0 but nf_nat is not loaded: it was removed "
                                                 "again at once, or an 'install' rule in modprobe.d replaced the load")


def test_desired_sysctls_already_right_are_not_rewritten(loaded: FakeHost) -> None:
    """Of the desired sysctls only drifted ones are written (a buckets write would rehash the table); the
    detail counts both kinds and each write is audited with the value it replaced."""
    loaded.write_sysctl("net.bridge.bridge-nf-call-ip6tables", "0")
    loaded.write_sysctl("net.bridge.bridge-nf-call-arptables", "0")
    pairs = (("net.bridge.bridge-nf-call-iptables", "1"), ("net.bridge.bridge-nf-call-ip6tables", "1"),
             ("net.bridge.bridge-nf-call-arptables", "1"))
    with capture_logs() as logs:
        result = executor(loaded).execute(RestorePlan((Step(StepKind.WRITE_SYSCTLS, sysctls=pairs),), "test"))
    assert result.results[0].detail == "2 written and read back, 1 already set"
    assert writes(logs) == {"net.bridge.bridge-nf-call-ip6tables": ("1", "0", "ok"),
                            "net.bridge.bridge-nf-call-arptables": ("1", "0", "ok")}
    assert loaded.read_sysctl("net.bridge.bridge-nf-call-ip6tables") == "1"


def test_every_step_after_a_failure_is_listed_as_skipped_and_durations_are_milliseconds(loaded: FakeHost) -> None:
    """The result has one entry per planned step: the failed one with its real duration in milliseconds,
    each later one skipped with no time spent."""
    plan = RestorePlan((Step(StepKind.RUN_HOOK, argv=("/bin/sh", "-c", "sleep 0.2; exit 1")),
                        Step(StepKind.RUN_HOOK, argv=("/bin/true",)), Step(StepKind.VERIFY_CONNTRACK)), "test")
    result = executor(loaded).execute(plan)
    assert [r.outcome for r in result.results] == [Outcome.FAILED, Outcome.SKIPPED, Outcome.SKIPPED]
    assert 200 <= result.results[0].duration_ms < 10_000
    assert [r.duration_ms for r in result.results[1:]] == [0.0, 0.0]
    assert [r.detail for r in result.results[1:]] == ["not run: run-hook failed"] * 2


class ClockRunner(Runner):
    """Each command 'takes' half a second of the executor's fake clock and exits with the status named
    by its last argument."""

    def __init__(self, now: list[float]) -> None:
        super().__init__()
        self.now = now

    def run(self, argv: Sequence[str], timeout: float) -> Completed:
        self.now[0] += 0.5
        return Completed(tuple(argv), int(argv[-1]), "", 500.0)


def test_step_records_carry_level_argv_start_time_and_milliseconds(loaded: FakeHost) -> None:
    """Each restore.step record says when the step began (monotonic), how long it took in milliseconds,
    the hook's command line, and is an error when the step failed; the result adds the steps up."""
    now = [100.25]
    ex = Executor(Config(modprobe=str(loaded.modprobe)), KernelProbe(loaded.root), ClockRunner(now),
                  audit.get_logger(), clock=lambda: now[0])
    plan = RestorePlan((Step(StepKind.RUN_HOOK, argv=("/usr/bin/hook", "--flag", "0")),
                        Step(StepKind.RUN_HOOK, argv=("/usr/bin/hook", "3"))), "test")
    with capture_logs() as logs:
        result = ex.execute(plan)
    steps = [e for e in logs if e["event"] == "restore.step"]
    assert [(e["log_level"], e["argv"], e["monotonic"], e["duration_ms"]) for e in steps] == [
        ("info", "/usr/bin/hook --flag 0", 100.25, 500.0), ("error", "/usr/bin/hook 3", 100.75, 500.0)]
    assert [r.duration_ms for r in result.results] == [500.0, 500.0] and result.duration_ms == 1000.0
    with capture_logs() as logs:
        ex.execute(RestorePlan((Step(StepKind.VERIFY_CONNTRACK),), "test"))
    assert [(e["log_level"], e["argv"]) for e in logs if e["event"] == "restore.step"] == [("info", None)]


def test_every_desired_sysctl_that_fails_is_named(loaded: FakeHost) -> None:
    """Two desired sysctls that do not take their value are both in the failed step's detail, '; ' apart."""
    keys = ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")
    for key in keys:
        loaded.sysctl(key).unlink()
        loaded.sysctl(key).symlink_to("/dev/null")
    step = Step(StepKind.WRITE_SYSCTLS, sysctls=tuple((k, "1") for k in keys))
    result = executor(loaded).execute(RestorePlan((step,), "test"))
    assert result.results[0].detail == f"{keys[0]}: wrote '1' but read back ''; {keys[1]}: wrote '1' but read back ''"
