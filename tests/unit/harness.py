"""The in-process daemon harness shared by the daemon and fault-injection tests.

A FakeMonitor on a real pipe, a real AF_UNIX notify socket and real signals: the loop under test
cannot tell it is not in production.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fakehost import FakeHost
from structlog.testing import capture_logs

from ctwatchd.audit import get_logger
from ctwatchd.config import Config
from ctwatchd.daemon import Daemon
from ctwatchd.kernel import KernelProbe
from ctwatchd.uevents import ModuleEvent, MonitorClosed, Overrun

Logs = list[MutableMapping[str, Any]]

ALL = ("nf_conntrack", "nf_nat", "br_netfilter")


class FakeMonitor:
    """Lines written to a real pipe: 'remove nf_nat', 'OVERRUN' or 'CLOSE'."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.closed = False

    def fileno(self) -> int:
        return self.r

    def send(self, line: str) -> None:
        os.write(self.w, line.encode() + b"\n")

    def drain(self) -> list[ModuleEvent]:
        try:
            data = os.read(self.r, 65536).decode()
        except BlockingIOError:
            return []
        out = []
        for line in data.splitlines():
            if line == "OVERRUN":
                raise Overrun("ENOBUFS (test)")
            if line == "CLOSE":
                raise MonitorClosed("socket closed (test)")
            action, module = line.split()
            out.append(ModuleEvent(action, module))
        return out

    def close(self) -> None:
        if not self.closed:
            os.close(self.r)
            os.close(self.w)
            self.closed = True


class Harness:
    def __init__(self, host: FakeHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.host = host
        self.notify_path = str(tmp_path / "notify.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.notify.settimeout(0.05)
        monkeypatch.setenv("NOTIFY_SOCKET", self.notify_path)
        self.messages: list[str] = []
        self.monitor = FakeMonitor()
        self.monitors = 0

    def daemon(self, cfg: Config, *, env: dict[str, str] | None = None,
               reload_config: Callable[[], Config] | None = None, monitor: bool = True,
               udev: FakeMonitor | None = None) -> Daemon:
        def factory() -> FakeMonitor:
            self.monitors += 1
            if self.monitors > 1:
                self.monitor = FakeMonitor()
            return self.monitor

        return Daemon(cfg, probe=KernelProbe(self.host.root), log=get_logger(),
                      reload_config=reload_config or (lambda: cfg), monitor_factory=factory if monitor else None,
                      udev_factory=(lambda: udev) if udev is not None else None, env=env or {})

    def read_notify(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return self.messages

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError("condition not reached in time")

    def wait_notify(self, text: str, after: int = 0, timeout: float = 10.0) -> int:
        """Index of the first datagram at or after `after` containing text."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.read_notify()
            for i in range(after, len(msgs)):
                if text in msgs[i]:
                    return i
        raise AssertionError(f"no notify message with {text!r}: {self.messages}")

    def run(self, daemon: Daemon, driver: Callable[[], None],
            limit: float = 30.0) -> tuple[int, list[MutableMapping[str, Any]]]:
        """Run the daemon in this (main) thread while `driver` acts from another, then SIGTERM."""
        code, logs, _ = run_daemon(daemon, driver, limit=limit)
        return code, logs


def cfg_for(host: FakeHost, **kw: Any) -> Config:
    base = Config(modprobe=str(host.modprobe), poll_interval=60.0, state_file=host.root / "run/state.json",
                  journalctl=str(host.journalctl))
    return replace(base, **kw)


def events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def run_daemon(daemon: Daemon, driver: Callable[[], None], *, limit: float = 30.0, capture: bool = True,
               stop: bool = True) -> tuple[int, Logs, float]:
    """Run the daemon in this thread while `driver` acts from another; SIGTERM after it unless stop=False.

    Returns the exit code, the audit records and the seconds from the driver's end to the daemon's exit.
    A stray stop signal arriving after the daemon has returned hits a no-op handler, not pytest.
    """
    errors: list[BaseException] = []
    driver_done: list[float] = []
    daemon_done = threading.Event()

    def drive() -> None:
        try:
            driver()
        except BaseException as exc:
            errors.append(exc)
        finally:
            driver_done.append(time.monotonic())
            # Once the daemon has returned, a TERM would hit pytest itself: only signal a running daemon.
            if (stop or errors) and not daemon_done.is_set():
                os.kill(os.getpid(), signal.SIGTERM)

    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    guard = threading.Timer(limit, lambda: os.kill(os.getpid(), signal.SIGTERM))
    thread = threading.Thread(target=drive, daemon=True)
    logs: Logs = []
    try:
        recorder: contextlib.AbstractContextManager[Logs] = capture_logs() if capture else contextlib.nullcontext([])
        with recorder as captured:
            guard.start()
            thread.start()
            try:
                code = daemon.run()
            finally:
                daemon_done.set()
                guard.cancel()
                thread.join(limit)  # the no-op handlers stay until the driver is done
            logs = list(captured)
        ended = time.monotonic()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if errors:
        raise errors[0]
    return code, logs, ended - (driver_done[0] if driver_done else ended)
