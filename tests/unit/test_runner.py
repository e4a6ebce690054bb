"""The subprocess seam: argv only, fixed environment, closed fds, group kill on timeout and on stop."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fakehost import executable

from ctwatchd.runner import OUTPUT_LIMIT, Runner

SH = "/bin/sh"


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


def test_sigterm_ignoring_command_is_killed(tmp_path: Path) -> None:
    """A command that ignores SIGTERM still dies (SIGKILL follows)."""
    script = executable(tmp_path / "stubborn.sh", "#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.05; done\n")
    done = Runner().run([str(script)], 0.3)
    assert done.timed_out


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
