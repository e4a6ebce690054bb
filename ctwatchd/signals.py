"""Signals as data: handlers only queue (gunicorn's rule), the selectors loop dispatches.

set_wakeup_fd writes each signal's number into a socket the loop watches, so a signal arriving while
the loop sleeps in select() wakes it, and one arriving during a step is read by the runner's tick.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Iterable
from types import FrameType

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
RELOAD = signal.SIGHUP
CHILD = signal.SIGCHLD
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


def _noop(_signum: int, _frame: FrameType | None) -> None:
    """The handler only exists so the signal does not kill us; set_wakeup_fd carries the number."""


class SignalQueue:
    def __init__(self, signals: Iterable[int] = HANDLED) -> None:
        self.signals = tuple(signals)
        self.pending: list[int] = []
        self._r: socket.socket | None = None
        self._w: socket.socket | None = None
        self._old_wakeup = -1
        self._old_handlers: dict[int, object] = {}

    def install(self) -> socket.socket:
        """Route the signals into the queue; returns the socket for the loop's selector."""
        self._r, self._w = socket.socketpair()
        for s in (self._r, self._w):
            s.setblocking(False)
        self._old_wakeup = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self._old_handlers = {s: signal.signal(s, _noop) for s in self.signals}
        return self._r

    def restore(self) -> None:
        if self._w is None:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for s, h in self._old_handlers.items():
            signal.signal(s, h)  # type: ignore[arg-type]  # what signal.signal() returned before
        for sock in (self._r, self._w):
            if sock is not None:
                sock.close()
        self._r = self._w = None

    def read(self) -> None:
        """Move what the wake-up socket holds into the queue (never blocks)."""
        if self._r is None:
            return
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while data := self._r.recv(64):
                self.pending.extend(data)

    def stop_requested(self) -> bool:
        return any(s in STOP_SIGNALS for s in self.pending)

    def pop(self) -> int | None:
        """The next signal to handle. A stop wins over everything queued with it, before or after: a
        reload or a reap would only delay it."""
        if not self.pending:
            return None
        stop = next((s for s in self.pending if s in STOP_SIGNALS), None)
        if stop is not None:
            self.pending.clear()
            return stop
        signum = self.pending.pop(0)
        if signum == RELOAD:
            # One reload reads the file as it is now: the ones queued behind it would only repeat it
            # (and each costs a reconcile and two notify messages).
            self.pending = [s for s in self.pending if s != RELOAD]
        return signum
