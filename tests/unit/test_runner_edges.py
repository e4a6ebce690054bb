"""The runner's edges: children already gone or reaped elsewhere, and the reasons it gives without output."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from ctwatchd import runner
from ctwatchd.runner import TICK, Completed, Runner


def test_killing_the_group_of_a_child_reaped_elsewhere_does_not_raise() -> None:
    """A child whose whole process group is gone and which was reaped behind Popen's back (the orphan
    reaper) is killed without an exception: there is nothing left to signal or to wait for."""
    proc = subprocess.Popen(["/bin/true"], start_new_session=True)
    os.waitpid(proc.pid, 0)  # reaped elsewhere: Popen still thinks it is running
    assert proc.returncode is None
    runner._kill_group(proc)
    assert proc.returncode is not None


def test_reap_children_counts_the_exited_and_leaves_the_running() -> None:
    """Every exited child is reaped and counted; a still-running child neither blocks the call nor is counted."""
    running = subprocess.Popen(["/bin/sleep", "30"])
    exited = [subprocess.Popen(["/bin/true"]) for _ in range(3)]
    try:
        for p in exited:
            stat = Path(f"/proc/{p.pid}/stat")
            deadline = time.monotonic() + 5
            while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
                assert time.monotonic() < deadline
                time.sleep(0.01)
        counted: list[int] = []
        worker = threading.Thread(target=lambda: counted.append(runner.reap_children()), daemon=True)
        worker.start()
        worker.join(5)
        assert counted == [3]
        assert runner.reap_children() == 0
        assert all(not Path(f"/proc/{p.pid}").exists() for p in exited)
    finally:
        running.kill()
        running.wait()


def test_reasons_without_output_end_with_the_status() -> None:
    """A command that printed nothing gets a reason that ends with its status or signal, nothing appended."""
    assert Runner().run(["/bin/sh", "-c", "exit 3"], 5).why() == "/bin/sh exited with status 3"
    assert Runner().run(["/bin/sh", "-c", "kill -9 $$"], 5).why() == "/bin/sh was killed by signal 9"
    assert Runner().run(["/bin/true"], 5).why() == "/bin/true exited with status 0"
    assert Runner().run([], 5).why() == "(empty) is not an absolute path"


def test_a_long_executable_name_is_capped_in_the_reason() -> None:
    """A 250-character executable path that failed is named capped in the reason, with what was cut counted."""
    long = "/" + "x" * 249
    assert Completed((long,), 1, "", 0.0).why() == f"{long[:200]}… (50 more characters) exited with status 1"


def test_a_timeout_is_not_a_stop_and_a_stop_is_not_a_timeout() -> None:
    """A command killed at its timeout is reported timed out (a failure to retry), one killed because
    ctwatchd is stopping is reported interrupted, never both: the executor tells them apart."""
    timed_out = Runner().run(["/bin/sleep", "30"], 0.1)
    assert timed_out.timed_out and not timed_out.interrupted
    assert timed_out.why() == "/bin/sleep did not finish within its timeout; its process group was killed"
    stopped = Runner(tick=lambda: True).run(["/bin/sleep", "30"], 30)
    assert stopped.interrupted and not stopped.timed_out
    assert stopped.why() == "/bin/sleep was stopped because ctwatchd is stopping"


def test_the_timeout_is_kept_to_within_a_fraction_of_a_tick() -> None:
    """A 50 ms timeout ends the command about 50 ms in, not at the next TICK."""
    t0 = time.monotonic()
    done = Runner().run(["/bin/sleep", "30"], 0.05)
    assert done.timed_out and time.monotonic() - t0 < 0.2


def test_waiting_with_a_pidfd_wakes_about_once_per_tick() -> None:
    """While a command runs, tick() is called about once per TICK, not in a tight poll (idle CPU)."""
    pidfd = runner.open_pidfd(os.getpid())
    if pidfd is None:
        pytest.fail("this kernel has no pidfd_open (the no-pidfd cadence is tested in test_runner.py)")
    os.close(pidfd)
    ticks: list[float] = []

    def tick() -> bool:
        ticks.append(time.monotonic())
        return False

    done = Runner(tick=tick).run(["/bin/sleep", "0.6"], 10)
    assert done.ok
    assert 1 <= len(ticks) <= 0.6 / TICK + 2, len(ticks)


def test_a_grandchild_holding_the_pipe_delays_completion_by_a_short_grace_only() -> None:
    """A command that exits leaving a background child on its output completes within a fraction of a
    second of its exit, not after a full second."""
    t0 = time.monotonic()
    done = Runner().run(["/bin/sh", "-c", "sleep 30 & echo started"], 10)
    assert done.ok and "started" in done.output
    assert time.monotonic() - t0 < 1.0


def test_megabytes_of_output_never_pile_up_in_memory() -> None:
    """20 MB of output are read and dropped as they come: the runner's buffer never holds much more than
    twice OUTPUT_LIMIT plus one read, and the tail is kept."""
    tracemalloc.start()
    try:
        done = Runner().run(["/bin/sh", "-c", "head -c 20000000 /dev/zero | tr '\\0' x; echo; echo END"], 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert done.ok and done.output.strip().endswith("END")
    assert peak < 2_000_000, peak


def test_commands_that_cannot_start_are_reported_without_running() -> None:
    """A relative path, a missing file and a NUL in an argument each give a Completed with no status, no
    output and one sentence; the time spent is in milliseconds of the runner's clock."""
    ticks = iter([10.0, 10.5])
    assert Runner(clock=lambda: next(ticks)).run(["modprobe", "x"], 5) == \
        Completed(("modprobe", "x"), None, "", 0.0, error="modprobe is not an absolute path")
    ticks = iter([10.0, 10.5])
    assert Runner(clock=lambda: next(ticks)).run(["/nonexistent/modprobe", "x"], 5) == \
        Completed(("/nonexistent/modprobe", "x"), None, "", 500.0,
                  error="cannot run /nonexistent/modprobe: No such file or directory")
    ticks = iter([10.0, 10.5])
    assert Runner(clock=lambda: next(ticks)).run(["/bin/echo", "a\0b"], 5) == \
        Completed(("/bin/echo", "a\0b"), None, "", 500.0, error="cannot run /bin/echo: embedded null byte")


def test_duration_is_the_commands_run_time_in_milliseconds() -> None:
    """duration_ms of a 0.2 s command is about 200."""
    done = Runner().run(["/bin/sleep", "0.2"], 5)
    assert 200 <= done.duration_ms < 5000, done.duration_ms


def test_commands_run_in_root_with_stdin_at_dev_null() -> None:
    """Hooks start in / and read /dev/null, never the daemon's own stdin (which may be a pipe nobody writes)."""
    assert Runner().run(["/bin/pwd"], 5).output.strip() == "/"
    r, w = os.pipe()
    saved = os.dup(0)
    try:
        os.dup2(r, 0)  # a stdin that would block forever
        done = Runner().run(["/bin/cat"], 2)
    finally:
        os.dup2(saved, 0)
        for fd in (saved, r, w):
            os.close(fd)
    assert done.ok and done.output == ""


def test_the_environment_given_to_the_runner_is_the_commands_whole_environment() -> None:
    """Runner(env=...) runs commands with exactly that environment, in place of SAFE_ENV, as it was
    when the runner was made."""
    env = {"PATH": "/bin", "CTWATCHD_TEST": "given"}
    given = Runner(env=env)
    env["CTWATCHD_LATE"] = "added after"
    done = given.run(["/usr/bin/env"], 5)
    assert done.ok
    assert dict(line.split("=", 1) for line in done.output.splitlines()) == {"PATH": "/bin", "CTWATCHD_TEST": "given"}


def test_duration_is_the_runner_clocks_span_in_milliseconds() -> None:
    """duration_ms of a command that ran is the runner's clock at the end minus at the start, times 1000."""
    readings: list[float] = []

    def clock() -> float:
        readings.append(time.monotonic())
        return readings[-1]

    done = Runner(clock=clock).run(["/bin/true"], 5)
    assert done.ok and len(readings) >= 2
    assert done.duration_ms == (readings[-1] - readings[0]) * 1000


def test_output_written_after_the_exit_is_collected_until_the_pipe_closes() -> None:
    """After the command exits, what a background child still writes on its output is kept until that
    output closes, as long as the grace on the runner's clock has not run out (here the clock stands still)."""
    t0 = time.monotonic()

    def still() -> float:  # stands still; moves on only after 10 s, so a regression fails instead of hanging
        return 1000.0 if time.monotonic() - t0 < 10 else 2000.0

    done = Runner(clock=still).run(["/bin/sh", "-c", "(sleep 0.3; echo late) & echo early"], 5)
    assert done.ok
    assert done.output.split() == ["early", "late"]
