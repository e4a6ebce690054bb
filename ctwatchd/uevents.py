"""Kernel module uevents from a pyudev netlink monitor, turned into small ModuleEvent values.

source='kernel' reads the kernel's own multicast group, so it works without udevd (in a pod, an
initramfs, a minimal VM). That group has no BPF filter from pyudev, so the module subsystem is picked
in userspace. An event is only a hint: the daemon re-reads /sys before it acts.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ctwatchd.model import AuditLog, clean

RCVBUF = 4 * 1024 * 1024  # room for a storm of unrelated uevents between two loop turns
RCVBUF_MAX = 64 * 1024 * 1024
# Uevents taken per drain(): a sustained storm is worked off over several loop turns, with the
# watchdog and the timers served in between, instead of in one unbounded call.
DRAIN_LIMIT = 512
MONITOR_RETRY = 30.0  # seconds before a failed monitor is opened again; polling covers the gap
OVERRUN_PAUSE = 0.5  # after an overrun the socket is not watched for this long: a persistent error cannot spin
OVERRUN_REPORT_EVERY = 60.0  # at most one monitor.overrun record per this many seconds, with a count


@dataclass(frozen=True)
class ModuleEvent:
    action: str  # "add", "remove", …
    module: str


class Overrun(Exception):
    """The socket lost events (ENOBUFS); the state must be read again from /sys and /proc."""


class MonitorClosed(Exception):
    """The monitor's socket is gone; events stop until a new monitor is made."""


class UeventSource(Protocol):
    def fileno(self) -> int: ...

    def drain(self) -> list[ModuleEvent]: ...

    def close(self) -> None: ...


class KernelMonitor:
    """The production UeventSource: pyudev's netlink monitor on the kernel's uevent group, or (source
    "udev") on udevd's, which announces an event once udev has run its rules for it, RUN+= included."""

    def __init__(self, rcvbuf: int = RCVBUF, *, monitor: Any = None, source: str = "kernel") -> None:  # noqa: ANN401
        if monitor is None:
            import pyudev  # imported here so `check` and tests without netlink do not pay for it

            monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
            if source == "udev":
                # udevd's group carries its own header, so libudev can filter in the kernel (BPF).
                monitor.filter_by("module")
        # `monitor` is a seam for tests: a pyudev-shaped monitor on a real socket.
        self._monitor: Any = monitor
        self.rcvbuf = rcvbuf
        self._grow(rcvbuf)
        self._monitor.start()

    def fileno(self) -> int:
        return int(self._monitor.fileno())

    def drain(self) -> list[ModuleEvent]:
        """Up to DRAIN_LIMIT queued uevents, module events only; raises Overrun after clearing the
        socket error. What is left stays readable for the next loop turn."""
        out: list[ModuleEvent] = []
        for device in self._poll_some(DRAIN_LIMIT):
            if device.subsystem == "module":
                out.append(ModuleEvent(str(device.action or ""), str(device.sys_name)))
        return out

    def _poll_some(self, limit: int) -> Iterator[Any]:
        for _ in range(limit):
            try:
                device = self._monitor.poll(timeout=0)
            except OSError as exc:
                self._recover(exc)
            except ValueError as exc:  # pyudev raises this on a closed socket
                raise MonitorClosed(str(exc)) from exc
            if device is None:
                return
            yield device

    def _recover(self, exc: OSError) -> None:
        if str(exc).startswith("File descriptor not open"):  # pyudev's POLLNVAL: the fd is gone, no overrun
            raise MonitorClosed(str(exc)) from exc
        # pyudev keeps raising a bare OSError until SO_ERROR is read; reading it clears the error.
        try:
            sock = socket.socket(fileno=os.dup(self.fileno()))
        except OSError as gone:
            raise MonitorClosed(f"{exc} ({gone.strerror})") from exc
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        finally:
            sock.close()
        if self.rcvbuf < RCVBUF_MAX:
            self.rcvbuf = min(self.rcvbuf * 2, RCVBUF_MAX)
            self._grow(self.rcvbuf)
        detail = f"{exc.strerror or exc} (SO_ERROR={err}); receive buffer now {self.rcvbuf} bytes"
        raise Overrun(detail) from exc

    def _grow(self, size: int) -> None:
        """SO_RCVBUFFORCE (libudev) needs CAP_NET_ADMIN; without it SO_RCVBUF, capped at rmem_max."""
        try:
            self._monitor.set_receive_buffer_size(size)
        except (OSError, ValueError):
            sock = socket.socket(fileno=os.dup(self.fileno()))
            with contextlib.suppress(OSError), sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def close(self) -> None:
        # libudev owns the fd and closes it when the last reference to the monitor goes.
        self._monitor = None


class MonitorSupervisor:
    """Keeps a UeventSource open and registered in the loop's selector, and turns what it yields into
    module events or a resync request; a failed source is dropped and reopened later, polling covers
    the gap. Never raises."""

    def __init__(self, factory: Callable[[], UeventSource] | None, sel: selectors.BaseSelector, log: AuditLog,
                 clock: Callable[[], float], poll_interval: Callable[[], float]) -> None:
        self.factory = factory
        self.sel = sel
        self.log = log
        self.clock = clock
        self.poll_interval = poll_interval
        self.source: UeventSource | None = None
        self.retry_at: float | None = None  # reopen a failed source then
        self.resume_at: float | None = None  # watch the socket again then, after an overrun
        self.overruns = 0  # since the last monitor.overrun record
        self._overrun_reported: float | None = None
        self.on_readable: Callable[[], None] = lambda: None

    @property
    def deadline(self) -> float | None:
        times = [t for t in (self.retry_at, self.resume_at) if t is not None]
        return min(times) if times else None

    def open(self) -> None:
        self.retry_at = None
        if self.factory is None:
            return
        try:
            self.source = self.factory()
            self.sel.register(self.source.fileno(), selectors.EVENT_READ, self.on_readable)
        except Exception as exc:  # whatever the netlink library raises, polling goes on
            self._drop()
            self.retry_at = self.clock() + MONITOR_RETRY
            self.log.warning("monitor.failed", detail=f"{type(exc).__name__}: {clean(str(exc))}",
                             poll_interval=self.poll_interval())

    def tick(self, now: float) -> None:
        """Timers: reopen a failed source, watch an overrun one again."""
        if self.retry_at is not None and now >= self.retry_at:
            self.open()
        if self.resume_at is not None and now >= self.resume_at and self.source is not None:
            self.resume_at = None
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.sel.register(self.source.fileno(), selectors.EVENT_READ, self.on_readable)

    def drain(self) -> tuple[list[ModuleEvent], str | None]:
        """(module events, resync reason or None)."""
        if self.source is None:
            return [], None
        try:
            return self.source.drain(), None
        except Overrun as exc:
            self._overrun(str(exc))
            return [], "overrun"
        except Exception as exc:  # MonitorClosed, OSError, or a library surprise
            self.log.error("monitor.failed", detail=f"{type(exc).__name__}: {clean(str(exc))}",
                           poll_interval=self.poll_interval())
            self._drop()
            self.retry_at = self.clock() + MONITOR_RETRY
            return [], "monitor-failed"

    def _overrun(self, detail: str) -> None:
        # The socket error is cleared by drain(); if it comes back at once (a persistent error), the
        # pause keeps it from costing more than one resync per OVERRUN_PAUSE.
        now = self.clock()
        self.overruns += 1
        if self._overrun_reported is None or now - self._overrun_reported >= OVERRUN_REPORT_EVERY:
            self.log.warning("monitor.overrun", detail=detail, count=self.overruns)
            self._overrun_reported = now
            self.overruns = 0
        if self.source is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.sel.unregister(self.source.fileno())
        self.resume_at = now + OVERRUN_PAUSE

    def _drop(self) -> None:
        if self.source is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.sel.unregister(self.source.fileno())
            with contextlib.suppress(Exception):
                self.source.close()
        self.source = None
        self.resume_at = None

    def close(self) -> None:
        self._drop()
