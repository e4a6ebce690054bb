"""Kernel module uevents from a pyudev netlink monitor, turned into small ModuleEvent values.

source='kernel' reads the kernel's own multicast group, so it works without udevd (in a pod, an
initramfs, a minimal VM). That group has no BPF filter from pyudev, so the module subsystem is picked
in userspace. An event is only a hint: the daemon re-reads /sys before it acts.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

RCVBUF = 4 * 1024 * 1024  # room for a storm of unrelated uevents between two loop turns
RCVBUF_MAX = 64 * 1024 * 1024


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
    """The production UeventSource: pyudev's netlink monitor on the kernel's uevent group."""

    def __init__(self, rcvbuf: int = RCVBUF) -> None:
        import pyudev  # imported here so `check` and tests without netlink do not pay for it

        self._monitor: Any = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        self.rcvbuf = rcvbuf
        self._grow(rcvbuf)
        self._monitor.start()

    def fileno(self) -> int:
        return int(self._monitor.fileno())

    def drain(self) -> list[ModuleEvent]:
        """Everything queued now, module events only; raises Overrun after clearing the socket error."""
        out: list[ModuleEvent] = []
        for device in self._poll_all():
            if device.subsystem == "module":
                out.append(ModuleEvent(str(device.action or ""), str(device.sys_name)))
        return out

    def _poll_all(self) -> Iterator[Any]:
        while True:
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
        # pyudev keeps raising a bare OSError until SO_ERROR is read; reading it clears the error.
        sock = socket.socket(fileno=os.dup(self.fileno()))
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
