"""The subprocess seam: argv only, fixed environment, closed fds, group kill on timeout and on stop."""

from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path

import pytest
from fakehost import executable

from ctwatchd import runner
from ctwatchd.model import ECHO_LIMIT
from ctwatchd.runner import OUTPUT_LIMIT, TICK, Runner

SH = "/bin/sh"
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.append(int(stat.parent.name))
    return pids


def group_gone(pgid: int, timeout: float = 0.5) -> bool:
    """No live process is left in the group within `timeout` (SIGKILL'd processes take a moment)."""
    deadline = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_exit_status_and_output_are_reported() -> None:
    """A failing command's status and last output line make the reason."""
    done = Runner().run([SH, "-c", "echo first; echo 'modprobe: FATAL: Module x not found' >&2; exit 3"], 5)
    assert done.returncode == 3 and not done.ok
    assert "first" in done.output
    assert done.why() == "/bin/sh exited with status 3: modprobe: FATAL: Module x not found"


def test_missing_and_relative_executables_are_errors_not_exceptions(tmp_path: Path) -> None:
    """A missing binary and a relative path are reported as sentences."""
    missing = Runner().run([str(tmp_path / "nope")], 5)
    assert missing.returncode is None and "cannot run" in (missing.error or "")
    relative = Runner().run(["modprobe", "x"], 5)
    assert relative.error == "modprobe is not an absolute path"


def test_environment_is_fixed_and_minimal(monkeypatch: object) -> None:
    """Children see PATH and LC_ALL=C only, never the daemon's environment."""
    os.environ["CTWATCHD_SECRET_TEST"] = "x"
    try:
        done = Runner().run(["/usr/bin/env"], 5)
    finally:
        del os.environ["CTWATCHD_SECRET_TEST"]
    env = dict(line.split("=", 1) for line in done.output.splitlines())
    assert env == {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C"}


def test_file_descriptors_are_closed_in_the_child() -> None:
    """An inheritable descriptor of the daemon does not leak into hooks."""
    r, w = os.pipe()
    os.set_inheritable(w, True)
    try:
        done = Runner().run([SH, "-c", f"[ -e /proc/self/fd/{w} ] && echo leaked || echo closed"], 5)
    finally:
        os.close(r)
        os.close(w)
    assert done.output.strip() == "closed"


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """A hanging command and the children it started are killed at the timeout."""
    pidfile = tmp_path / "child.pid"
    script = executable(tmp_path / "hang.sh", f"#!/bin/sh\nsleep 300 &\necho $! > {pidfile}\nwait\n")
    t0 = time.monotonic()
    done = Runner().run([str(script)], 0.5)
    assert done.timed_out and done.returncode is None
    assert "did not finish within its timeout" in done.why()
    assert time.monotonic() - t0 < 5
    child = int(pidfile.read_text())
    time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_sigterm_ignoring_command_is_killed_after_the_grace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command group that ignores SIGTERM gets SIGKILL TERM_GRACE after the SIGTERM, not before and
    not much later, and is gone when run() returns."""
    monkeypatch.setattr(runner, "TERM_GRACE", 0.6)
    pidfile = tmp_path / "stubborn.pid"
    script = executable(tmp_path / "stubborn.sh",
                        f"#!/bin/sh\ntrap '' TERM\necho $$ > {pidfile}\nwhile :; do sleep 0.05; done\n")
    timeout = 0.3
    t0 = time.monotonic()
    done = Runner().run([str(script)], timeout)
    took = time.monotonic() - t0
    assert done.timed_out and done.returncode is None
    assert timeout + 0.6 <= took < timeout + 0.6 + 1.0, took
    assert group_gone(int(pidfile.read_text()))


def test_megabytes_of_output_are_capped() -> None:
    """A chatty hook cannot grow memory: only the tail is kept."""
    done = Runner().run([SH, "-c", "head -c 8000000 /dev/zero | tr '\\0' x; echo; echo END"], 20)
    assert done.ok
    assert len(done.output) <= OUTPUT_LIMIT
    assert done.output.strip().endswith("END")


def test_tick_runs_while_waiting_and_can_stop_the_command() -> None:
    """The caller's tick keeps running during a long step and a True answer kills the group."""
    ticks: list[float] = []

    def tick() -> bool:
        ticks.append(time.monotonic())
        return len(ticks) >= 3

    t0 = time.monotonic()
    done = Runner(tick=tick).run([SH, "-c", "sleep 30"], 60)
    assert done.interrupted and done.returncode is None
    assert len(ticks) == 3
    assert time.monotonic() - t0 < 5


def test_grandchild_holding_the_pipe_does_not_block_completion(tmp_path: Path) -> None:
    """A command that exits but leaves a background child on stdout still completes promptly."""
    t0 = time.monotonic()
    done = Runner().run([SH, "-c", "sleep 30 & echo started"], 10)
    assert done.ok and "started" in done.output
    assert time.monotonic() - t0 < 5


# -- without a pidfd (kernels before 5.3, or seccomp denying pidfd_open) ---------------------------

@pytest.fixture(params=[errno.ENOSYS, errno.EPERM], ids=["ENOSYS", "EPERM"])
def no_pidfd(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """os.pidfd_open fails as on an old kernel (ENOSYS) or under a seccomp filter (EPERM); returns the
    pids it was asked for, so a test can tell the fallback was really taken."""
    asked: list[int] = []
    code: int = request.param

    def refuse(pid: int, flags: int = 0) -> int:
        asked.append(pid)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "pidfd_open", refuse)
    return asked


def test_without_pidfd_status_and_output_are_reported(no_pidfd: list[int]) -> None:
    """Without a pidfd, exit status, output and the reason are what they are with one."""
    done = Runner().run([SH, "-c", "echo first; echo 'modprobe: FATAL: Module x not found' >&2; exit 3"], 5)
    assert no_pidfd and done.returncode == 3 and "first" in done.output
    assert done.why() == "/bin/sh exited with status 3: modprobe: FATAL: Module x not found"
    assert Runner().run(["/bin/true"], 5).ok


def test_without_pidfd_timeout_kills_the_whole_group(no_pidfd: list[int], tmp_path: Path) -> None:
    """Without a pidfd, a hanging command and its background child are killed at the timeout."""
    pidfile = tmp_path / "hang.pid"
    script = executable(tmp_path / "hang.sh", f"#!/bin/sh\nsleep 300 &\necho $$ > {pidfile}\nwait\n")
    t0 = time.monotonic()
    done = Runner().run([str(script)], 0.5)
    assert no_pidfd and done.timed_out and done.returncode is None
    assert time.monotonic() - t0 < 0.5 + 1.0
    assert group_gone(int(pidfile.read_text()))  # the script and its `sleep 300 &`, in the script's group


def test_without_pidfd_tick_runs_and_can_stop_the_command(no_pidfd: list[int], tmp_path: Path) -> None:
    """Without a pidfd, tick() still runs at least every TICK while waiting and a True answer kills the group."""
    ticks: list[float] = []
    pidfile = tmp_path / "sh.pid"

    def tick() -> bool:
        ticks.append(time.monotonic())
        return len(ticks) >= 3

    done = Runner(tick=tick).run([SH, "-c", f"echo $$ > {pidfile}; sleep 30"], 60)
    assert no_pidfd and done.interrupted and done.returncode is None and len(ticks) == 3
    assert ticks[-1] - ticks[0] <= 2 * TICK + 0.1  # at least one tick per TICK
    assert group_gone(int(pidfile.read_text()))


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "no-pidfd"])
def test_exit_is_noticed_well_within_a_tick(pidfd: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that closed its output and exits after 0.3 s is noticed within TICK / 3 of its exit,
    with a pidfd and without one (the pipe's EOF came long before, so only the exit itself can wake us)."""
    if not pidfd:
        def refuse(pid: int, flags: int = 0) -> int:
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        monkeypatch.setattr(os, "pidfd_open", refuse)
    t0 = time.monotonic()
    done = Runner().run([SH, "-c", "exec >/dev/null 2>&1; sleep 0.3; exit 4"], 10)
    late = time.monotonic() - t0 - 0.3
    assert done.returncode == 4
    assert late < TICK / 3, late


# -- what reaches the journal, STATUS= and terminals ------------------------------------------------

@pytest.mark.parametrize(("tail", "says"), [("exit 1", "/bin/sh exited with status 1: "),
                                          ("kill -9 $$", "/bin/sh was killed by signal 9: ")],
                         ids=["status", "signal"])
def test_control_characters_in_the_last_line_are_escaped_and_capped(tail: str, says: str) -> None:
    """ESC, BEL and an OSC title sequence in the last output line reach why() escaped, never raw, and
    a long line is capped."""
    hostile = r"\033[31mred\033]0;owned title\007 bell\007 "
    done = Runner().run([SH, "-c", f"printf '{hostile}%s\\n' $(printf 'A%.0s' $(seq 2000)); {tail}"], 5)
    why = done.why()
    assert not CONTROL.search(why), repr(why)
    assert why.startswith(says + "\\x1b[31mred\\x1b]0;owned title\\x07 bell\\x07 AAAA")
    assert len(why) < ECHO_LIMIT + 100 and "more characters)" in why
