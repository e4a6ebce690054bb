"""Running external commands: argv lists only, fixed environment, own process group, hard timeout.

The wait is a selectors loop over the child's pidfd and output pipe, so the caller's `tick` (watchdog
ping, signal check) keeps running while modprobe or a hook works, and a stop request or a timeout
kills the whole process group, not only the direct child.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

from ctwatchd.model import clean

SAFE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C"}
OUTPUT_LIMIT = 16 * 1024  # keep the tail of this much output; the rest is read and dropped
TERM_GRACE = 2.0  # after SIGTERM to the group, SIGKILL follows this many seconds later
TICK = 0.25
# Without a pidfd (kernels before 5.3, or a seccomp filter denying pidfd_open) the child's exit is
# noticed by polling this often; with one, the wait is event-driven.
POLL_WITHOUT_PIDFD = 0.02


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int | None  # None: it did not exit by itself (timeout, stop, or never started)
    output: str
    duration_ms: float
    timed_out: bool = False
    interrupted: bool = False
    error: str | None = None  # could not start: the sentence says why

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def why(self) -> str:
        """One sentence fragment for the audit record."""
        name = clean(self.argv[0], 200) if self.argv else "?"
        if self.error:
            return self.error
        if self.timed_out:
            return f"{name} did not finish within its timeout; its process group was killed"
        if self.interrupted:
            return f"{name} was stopped because ctwatchd is stopping"
        # The last line of what it printed, escaped and capped: it reaches terminals, STATUS= and the journal.
        last = clean((self.output.strip().splitlines()[-1:] or [""])[0].strip())
        if self.returncode is not None and self.returncode < 0:
            return f"{name} was killed by signal {-self.returncode}" + (f": {last}" if last else "")
        return f"{name} exited with status {self.returncode}" + (f": {last}" if last else "")


class Runner:
    def __init__(self, *, tick: Callable[[], bool] | None = None, env: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # tick() runs at least every TICK seconds while waiting; True means "stop now".
        self.tick = tick
        self.env = dict(SAFE_ENV if env is None else env)
        self.clock = clock

    def run(self, argv: Sequence[str], timeout: float) -> Completed:
        args = tuple(argv)
        start = self.clock()
        if not args or not os.path.isabs(args[0]):
            return Completed(args, None, "", 0.0,
                             error=f"{clean(args[0]) if args else '(empty)'} is not an absolute path")
        try:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=self.env, close_fds=True, start_new_session=True, cwd="/",
            )
        except (OSError, ValueError) as exc:  # ValueError: a NUL in an argument
            return Completed(args, None, "", (self.clock() - start) * 1000,
                             error=f"cannot run {clean(args[0])}: {clean(exc.strerror or str(exc))}"
                             if isinstance(exc, OSError) else f"cannot run {clean(args[0])}: {clean(str(exc))}")
        stdout = proc.stdout
        if stdout is None:  # cannot happen with stdout=PIPE; keeps the type checker honest
            raise RuntimeError("subprocess without stdout pipe")
        try:
            out, timed_out, interrupted = self._collect(proc, stdout, start + timeout)
        finally:
            stdout.close()
            if proc.returncode is None:
                _kill_group(proc)
        rc = None if (timed_out or interrupted) else proc.returncode
        text = bytes(out[-OUTPUT_LIMIT:]).decode("utf-8", "replace")
        return Completed(args, rc, text, (self.clock() - start) * 1000, timed_out, interrupted)

    def _collect(self, proc: subprocess.Popen[bytes], stdout: IO[bytes],
                 deadline: float) -> tuple[bytearray, bool, bool]:
        """Read output until the child exits, the deadline passes or tick() asks to stop."""
        out = bytearray()
        pidfd = open_pidfd(proc.pid)
        sel = selectors.DefaultSelector()
        sel.register(stdout, selectors.EVENT_READ)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        exited_at: float | None = None
        try:
            while True:
                now = self.clock()
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None:
                    # A grandchild holding the pipe must not keep us: a short grace, then go.
                    if not sel.get_map() or now - exited_at > 0.2:
                        return out, False, False
                elif now >= deadline:
                    return out, True, False
                elif self.tick is not None and self.tick():
                    return out, False, True
                wait = min(TICK if pidfd is not None else POLL_WITHOUT_PIDFD, max(0.0, deadline - now)) \
                    if exited_at is None else 0.05
                for key, _ in sel.select(wait):
                    if key.fileobj is not stdout:
                        sel.unregister(key.fileobj)  # the pidfd: exited; proc.poll() reaps it next turn
                        continue
                    chunk = os.read(stdout.fileno(), 65536)
                    if not chunk:
                        sel.unregister(stdout)
                    out += chunk
                    if len(out) > 2 * OUTPUT_LIMIT:
                        del out[:-OUTPUT_LIMIT]
        finally:
            sel.close()
            if pidfd is not None:
                os.close(pidfd)


def open_pidfd(pid: int) -> int | None:
    """A pidfd for the child, or None where the kernel has none (ENOSYS before 5.3) or a seccomp
    filter denies it (EPERM): the wait then polls instead."""
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def reap_children() -> int:
    """Reap every child that has exited, without blocking; returns how many.

    Call it only while no Runner.run() is waiting: run() always reaps its own child before it
    returns, so what is reaped here are orphans re-parented to us (as PID 1 in a container, the
    background children of a hook).
    """
    reaped = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped += 1


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, SIGKILL it if it lingers, and reap the child."""
    for sig, grace in ((signal.SIGTERM, TERM_GRACE), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group, if any
        return
