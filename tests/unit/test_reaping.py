"""Orphans handed to the daemon are reaped (issue 10, item 20), and a stop wins over what is queued with it.

The test process makes itself a child subreaper, as PID 1 of a container is: the background children
of a hook are then re-parented to it, and only the daemon's SIGCHLD handling keeps them from piling
up as zombies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakehost import executable
from harness import Harness, cfg_for, events, run_daemon

from ctwatchd.config import Config
from ctwatchd.runner import TICK
from ctwatchd.signals import SignalQueue

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
RESTORES = 20


def set_child_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def children() -> dict[int, tuple[str, str]]:
    """This process's children, from every thread's /proc children list: pid -> (comm, state)."""
    pids: set[int] = set()
    for listing in Path("/proc/self/task").glob("*/children"):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in listing.read_text().split())
    out = {}
    for pid in pids:
        try:
            comm, rest = Path(f"/proc/{pid}/stat").read_text().split(" (", 1)[1].rsplit(")", 1)
        except OSError:
            continue  # reaped meanwhile
        out[pid] = (comm, rest.split()[0])
    return out


@pytest.fixture
def subreaper() -> Iterator[set[int]]:
    """This process as a child subreaper; yields the children it already had, and afterwards reaps
    whatever a failing run left behind and turns the subreaper off again."""
    set_child_subreaper(True)
    before = set(children())
    try:
        yield before
    finally:
        set_child_subreaper(False)
        for pid in set(children()) - before:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def test_orphans_of_hooks_are_reaped(h: Harness, tmp_path: Path, subreaper: set[int]) -> None:
    """Twenty restores whose hook leaves two background children each: the orphans come to this process
    and every one is reaped, so no zombie child is left."""
    runs = tmp_path / "hook.runs"
    hook = executable(tmp_path / "hook", (
        "#!/bin/sh\n"
        f"echo run >> {runs}\n"
        "sleep 0.1 </dev/null >/dev/null 2>&1 &\n"
        "sleep 0.2 </dev/null >/dev/null 2>&1 &\n"
        "exit 0\n"))
    cfg = cfg_for(h.host, hooks=((str(hook),),), max_restarts=RESTORES + 5)
    orphans: set[int] = set()
    left: dict[int, tuple[str, str]] = {}

    def hook_runs() -> int:
        return len(runs.read_text().splitlines()) if runs.exists() else 0

    def restored(times: int) -> Callable[[], bool]:
        return lambda: hook_runs() >= times and h.host.is_live("nf_nat")

    def driver() -> None:
        h.wait_notify("READY=1")
        for i in range(RESTORES):
            h.host.unload("nf_nat")
            h.monitor.send("remove nf_nat")
            h.wait_for(restored(i + 1))
            orphans.update(pid for pid, (comm, _) in children().items() if comm == "sleep")
            h.read_notify()  # keep the notify socket's small datagram queue from filling up
        deadline = time.monotonic() + 3  # the last orphans sleep 0.2 s, then must be reaped
        while (rest := {p: c for p, c in children().items() if p not in subreaper}) and time.monotonic() < deadline:
            time.sleep(0.02)
        left.update(rest)

    code, logs, _ = run_daemon(h.daemon(cfg), driver)
    assert code == 0 and hook_runs() == RESTORES
    assert len(events(logs, "restore.finished")) == RESTORES
    assert orphans, "no orphan was re-parented to this process: the test proves nothing"
    assert left == {}, f"children left behind (pid: (comm, state)): {left}"
    zombies = {p: c for p, c in children().items() if p not in subreaper and c[1] == "Z"}
    assert zombies == {}


def test_signal_queue_stop_wins_over_a_reload_queued_before_it() -> None:
    """Real HUP, CHLD and TERM arriving together: pop() returns TERM first and drops the rest."""
    queue = SignalQueue()
    queue.install()
    try:
        for sig in (signal.SIGHUP, signal.SIGCHLD, signal.SIGTERM):
            os.kill(os.getpid(), sig)
        queue.read()
        assert queue.pending == [signal.SIGHUP, signal.SIGCHLD, signal.SIGTERM]
        assert queue.stop_requested()
        assert queue.pop() == signal.SIGTERM
        assert queue.pop() is None
    finally:
        queue.restore()


def test_signal_queue_keeps_arrival_order_without_a_stop() -> None:
    """Without a stop, signals are handled in the order they came."""
    queue = SignalQueue()
    queue.pending = [signal.SIGCHLD, signal.SIGHUP, signal.SIGCHLD]
    assert [queue.pop(), queue.pop(), queue.pop(), queue.pop()] == [signal.SIGCHLD, signal.SIGHUP,
                                                                     signal.SIGCHLD, None]


def test_reload_queued_before_a_stop_never_runs(h: Harness, tmp_path: Path) -> None:
    """HUP, then TERM, both queued while a hook runs (no TERM from the harness): the stop wins, the
    hook is stopped, the reload never runs, exit 0."""
    started = tmp_path / "hook.started"
    hook = executable(tmp_path / "hook", f"#!/bin/sh\necho $$ > {started}\nexec sleep 30\n")
    cfg = cfg_for(h.host, hooks=((str(hook),),))
    reloads: list[float] = []

    def reload() -> Config:
        reloads.append(time.monotonic())
        return cfg

    def driver() -> None:
        h.wait_notify("READY=1")
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(started.exists)
        # The kernel hands two signals sent back to back to different threads, TERM's byte often
        # first; a hook in progress keeps both in the queue, in the order they were sent.
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(2 * TICK)  # the runner's tick has moved HUP into the queue
        os.kill(os.getpid(), signal.SIGTERM)

    code, logs, stopped_in = run_daemon(h.daemon(cfg, reload_config=reload), driver, stop=False)
    assert code == 0 and stopped_in < 2
    assert reloads == [] and not events(logs, "config.loaded")
    assert [e["signal"] for e in events(logs, "daemon.stopping")] == ["SIGTERM"]
    hook_step = [e for e in events(logs, "restore.step") if e["action"] == "run-hook"]
    assert [e["result"] for e in hook_step] == ["interrupted"]
    assert not any("RELOADING=1" in m for m in h.read_notify())
