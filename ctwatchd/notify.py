"""sd_notify to systemd, through sdnotify, kept in this one module.

sdnotify is small and unmaintained and swallows every error; we run it in debug mode so errors reach
us, report each kind once, reconnect on the next message, and never let a notify failure hurt the
daemon. Its notify() encodes Latin-1, so one Cyrillic file name in a STATUS= line would raise:
we send UTF-8 ourselves (systemd takes it) on its socket. Without NOTIFY_SOCKET everything here is
a no-op (gunicorn's rule).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import sdnotify

from ctwatchd.model import clean

STATUS_LIMIT = 400  # characters of STATUS=; systemctl status shows one line anyway
SEND_TIMEOUT = 2.0  # seconds one notify datagram may wait for room in the receiver's queue


# The shortest time between WATCHDOG=1 pings: a WatchdogSec= far below it (WATCHDOG_USEC=1) cannot be
# met by any process, and pinging as often as it asks is a hot loop of datagrams.
WATCHDOG_FLOOR = 0.1


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is ours."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner and owner.strip() != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None


class Notifier:
    def __init__(self, *, on_error: Callable[[str], None] | None = None) -> None:
        # sdnotify reads NOTIFY_SOCKET from os.environ itself, so that is the one source of truth.
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self.on_error = on_error
        self._impl: Any = None
        self._reported: set[str] = set()
        self.sent: int = 0
        # After a send timed out, the receiver is stalled: later messages are sent without waiting (and
        # dropped while its queue is full) until one goes out, so a stalled systemd costs no seconds
        # per message (a stop after a few reloads took 26 s that way).
        self.stalled = False

    def _connect(self) -> Any:  # noqa: ANN401
        if self._impl is None:
            impl = sdnotify.SystemdNotifier(debug=True)
            # sdnotify's socket blocks: a receiver that stopped reading would stall the loop (and its
            # watchdog pings) forever. Wait a little for a busy systemd, then give the message up.
            self._impl = impl
        self._impl.socket.settimeout(0 if self.stalled else SEND_TIMEOUT)
        return self._impl

    def send(self, *lines: str) -> bool:
        """One datagram with all lines (e.g. READY=1 and STATUS=…); False if it did not go out."""
        if not self.enabled:
            return False
        try:
            self._connect().socket.sendall("\n".join(lines).encode("utf-8", "backslashreplace"))
        except Exception as exc:  # a notify failure must never hurt the daemon
            self._impl = None  # reconnect next time: systemd may have come back
            self.stalled = isinstance(exc, (TimeoutError, BlockingIOError))
            # A timeout, then EAGAIN while stalled: one problem, told once.
            kind = "stalled" if self.stalled else type(exc).__name__ + (f":{exc.errno}" if isinstance(exc, OSError)
                                                                         else "")
            if kind not in self._reported and self.on_error is not None:
                self._reported.add(kind)
                self.on_error(clean(str(exc)) or type(exc).__name__)
            return False
        self.sent += 1
        self.stalled = False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={_line(status)}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={_line(status)}")

    def reloading(self, monotonic_usec: int) -> bool:
        # MONOTONIC_USEC lets systemd ≥ 253 tell this reload from an earlier one (Type=notify-reload).
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}", "STATUS=reloading configuration")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Still starting (or stopping): systemd ≥ 236 then waits this much longer than it would."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def _line(text: str) -> str:
    """One line, control characters escaped, capped: what STATUS= may carry."""
    return clean(" ".join(text.split()), STATUS_LIMIT)
