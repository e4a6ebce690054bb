"""The uevent adapter's edges without netlink: KernelMonitor over a pyudev-shaped monitor on a real
socketpair (pyudev's own fake-monitor idea), and MonitorSupervisor's overrun accounting on a fake clock.

These need no root, so the reasons KernelMonitor gives and the supervisor's never-raise promise are
checked on every machine, beside the netlink tests in test_uevents.py.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from ctwatchd import audit
from ctwatchd.uevents import (
    MONITOR_RETRY,
    OVERRUN_PAUSE,
    OVERRUN_REPORT_EVERY,
    KernelMonitor,
    ModuleEvent,
    MonitorClosed,
    MonitorSupervisor,
    Overrun,
)


@dataclass(frozen=True)
class Device:
    action: str | None
    subsystem: str
    sys_name: str


class PairMonitor:
    """pyudev.Monitor's surface on one end of a datagram socketpair: poll(timeout) waits like pyudev's
    (select.poll with the timeout) and turns each 'action subsystem name' datagram into a Device."""

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sizes: list[int] = []
        self.failure: OSError | None = None  # raised by the next poll(), as pyudev raises POLLERR/POLLNVAL

    def fileno(self) -> int:
        return self.sock.fileno()

    def start(self) -> None:
        pass

    def set_receive_buffer_size(self, size: int) -> None:
        self.sizes.append(size)

    def poll(self, timeout: float | None = None) -> Device | None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
        notifier = select.poll()
        notifier.register(self.sock, select.POLLIN)
        if not notifier.poll(None if timeout is None else int(timeout * 1000)):
            return None
        action, subsystem, name = self.sock.recv(4096).decode().split(" ")
        return Device(action or None, subsystem, name)

    def send(self, action: str, subsystem: str, name: str) -> None:
        self.peer.send(f"{action} {subsystem} {name}".encode())

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


@pytest.fixture
def pair() -> Iterator[PairMonitor]:
    mon = PairMonitor()
    yield mon
    mon.close()


def test_drain_of_an_idle_socket_returns_at_once(pair: PairMonitor) -> None:
    """drain() never waits for uevents: on an empty socket it returns nothing straight away."""
    km = KernelMonitor(monitor=pair)
    t0 = time.monotonic()
    assert km.drain() == []
    assert time.monotonic() - t0 < 0.5


def test_a_module_uevent_without_an_action_comes_out_with_an_empty_action(pair: PairMonitor) -> None:
    """A module uevent whose ACTION is missing is passed on with action '' (the daemon re-reads /sys anyway)."""
    km = KernelMonitor(monitor=pair)
    pair.send("", "module", "nf_nat")
    assert km.drain() == [ModuleEvent("", "nf_nat")]


def test_a_closed_socket_names_pyudevs_reason(pair: PairMonitor) -> None:
    """The ValueError pyudev raises for a closed socket becomes MonitorClosed with the same text, so the
    monitor.failed record says why."""
    km = KernelMonitor(monitor=pair)
    pair.failure = ValueError("I/O operation on closed socket")  # type: ignore[assignment]
    with pytest.raises(MonitorClosed, match="I/O operation on closed socket"):
        km.drain()


def test_pollnval_is_a_closed_monitor_even_when_the_fd_number_is_open_again(pair: PairMonitor) -> None:
    """pyudev's POLLNVAL ('File descriptor not open') means the monitor's socket is gone, even when its fd
    number already belongs to another socket: MonitorClosed with pyudev's text, never an Overrun that
    would read and resize someone else's socket."""
    km = KernelMonitor(monitor=pair)
    pair.failure = OSError(f"File descriptor not open: {pair.fileno()}")
    with pytest.raises(MonitorClosed, match=f"^File descriptor not open: {pair.fileno()}$"):
        km.drain()
    assert pair.sizes == [km.rcvbuf]  # only the initial size: nothing grew


def test_an_error_on_an_fd_that_is_gone_is_a_closed_monitor_naming_both(pair: PairMonitor) -> None:
    """A POLLERR whose fd has disappeared by the time SO_ERROR is read is MonitorClosed naming pyudev's
    error and the errno of the lookup."""
    km = KernelMonitor(monitor=pair)
    spare = os.dup(pair.fileno())
    os.close(spare)  # a descriptor number that is certainly closed
    pair.fileno = lambda: spare  # type: ignore[method-assign]
    pair.failure = OSError(f"Error while polling fd: {spare}")
    with pytest.raises(MonitorClosed, match=rf"^Error while polling fd: {spare} \(Bad file descriptor\)$"):
        km.drain()


def test_overrun_reason_starts_with_pyudevs_error(pair: PairMonitor) -> None:
    """The Overrun text keeps pyudev's own message (it carries no errno), then SO_ERROR and the new buffer."""
    km = KernelMonitor(rcvbuf=4096, monitor=pair)
    pair.failure = OSError(f"Error while polling fd: {pair.fileno()}")
    with pytest.raises(Overrun) as raised:
        km.drain()
    assert str(raised.value) == (f"Error while polling fd: {pair.fileno()} (SO_ERROR=0); "
                                 "receive buffer now 8192 bytes")
    assert pair.sizes == [4096, 8192]


# -- MonitorSupervisor ---------------------------------------------------------------------------------

class OverrunSource:
    """A UeventSource whose every drain() is an overrun; its fileno() can be made to misbehave."""

    def __init__(self, fileno: int | OSError) -> None:
        self._fileno = fileno

    def fileno(self) -> int:
        if isinstance(self._fileno, OSError):
            raise self._fileno
        return self._fileno

    def drain(self) -> list[ModuleEvent]:
        raise Overrun("ENOBUFS (test)")

    def close(self) -> None:
        pass


def supervisor(source: OverrunSource, clock: list[float]) -> MonitorSupervisor:
    sup = MonitorSupervisor(lambda: source, selectors.DefaultSelector(), audit.get_logger(), lambda: clock[0],
                            lambda: 5.0)
    sup.source = source  # already open, whatever its fd is
    return sup


def test_overrun_records_are_rate_limited_and_count_every_overrun_between_them() -> None:
    """The first overrun is reported at once; later ones within OVERRUN_REPORT_EVERY are only counted,
    and the next record (due exactly OVERRUN_REPORT_EVERY after the last) carries that count."""
    clock = [100.0]
    r, w = os.pipe()
    try:
        sup = supervisor(OverrunSource(r), clock)
        with capture_logs() as logs:
            for t in (100.0, 101.0, 102.0, 100.0 + OVERRUN_REPORT_EVERY, 100.0 + OVERRUN_REPORT_EVERY + 1):
                clock[0] = t
                assert sup.drain() == ([], "overrun")
    finally:
        os.close(r)
        os.close(w)
    assert [e["count"] for e in logs if e["event"] == "monitor.overrun"] == [1, 3]
    assert sup.overruns == 1


@pytest.mark.parametrize("fileno", [-1, OSError(9, "Bad file descriptor"), "unregistered"],
                         ids=["fileno-minus-one", "fileno-raises", "never-registered"])
def test_overrun_from_a_source_that_cannot_be_unregistered_never_raises(fileno: object) -> None:
    """An overrun on a source whose fd is already unregistered, closed (-1) or unreadable still comes back
    as a resync request: the supervisor never raises into the loop."""
    clock = [0.0]
    r, w = os.pipe()
    try:
        sup = supervisor(OverrunSource(r if fileno == "unregistered" else fileno), clock)  # type: ignore[arg-type]
        with capture_logs():
            assert sup.drain() == ([], "overrun")
            clock[0] = 1.0
            assert sup.drain() == ([], "overrun")  # a second overrun: the fd is certainly not registered now
    finally:
        os.close(r)
        os.close(w)
    assert sup.resume_at is not None


class FailingSource(OverrunSource):
    def drain(self) -> list[ModuleEvent]:
        raise MonitorClosed("socket closed (test)")


def test_a_failing_source_is_dropped_logged_and_retried_later() -> None:
    """A source whose drain fails is dropped with a monitor.failed record naming the cause and the poll
    interval that covers the gap, asks for a resync, and is reopened MONITOR_RETRY later."""
    clock = [10.0]
    r, w = os.pipe()
    try:
        sup = supervisor(FailingSource(r), clock)
        with capture_logs() as logs:
            assert sup.drain() == ([], "monitor-failed")
    finally:
        os.close(r)
        os.close(w)
    assert sup.source is None and sup.retry_at == 10.0 + MONITOR_RETRY
    assert [(e["event"], e["detail"], e["poll_interval"]) for e in logs] == [
        ("monitor.failed", "MonitorClosed: socket closed (test)", 5.0)]


class BrokenSource(FailingSource):
    """A failing source whose fd is already unusable in one of the ways a dead netlink socket can be."""

    def __init__(self, fileno: int | OSError, close_error: bool = False) -> None:
        super().__init__(fileno)
        self.close_error = close_error

    def close(self) -> None:
        if self.close_error:
            raise OSError(9, "Bad file descriptor")


@pytest.mark.parametrize("how", ["fileno-minus-one", "fileno-raises", "close-raises"])
def test_dropping_a_dead_source_never_raises_and_unregisters_it(how: str) -> None:
    """A failed source is dropped whatever state its fd is in (closed, unreadable, close() failing): drain()
    still answers, and nothing of it stays registered in the loop's selector."""
    clock = [0.0]
    r, w = os.pipe()
    try:
        fileno: int | OSError = r
        if how == "fileno-minus-one":
            fileno = -1
        elif how == "fileno-raises":
            fileno = OSError(9, "Bad file descriptor")
        source = BrokenSource(fileno, close_error=how == "close-raises")
        sup = supervisor(source, clock)
        if how == "close-raises":
            sup.sel.register(r, selectors.EVENT_READ)
        with capture_logs():
            assert sup.drain() == ([], "monitor-failed")
        assert sup.source is None and sup.sel.get_map() is not None and len(sup.sel.get_map()) == 0
    finally:
        os.close(r)
        os.close(w)


def test_a_source_that_cannot_be_opened_is_retried_after_monitor_retry() -> None:
    """A factory that raises leaves no source, logs monitor.failed with the library's reason and the poll
    interval covering the gap, and sets the reopen time MONITOR_RETRY ahead; a new supervisor has no timers."""
    clock = [7.0]

    def factory() -> OverrunSource:
        raise OSError(93, "Protocol not supported")

    sup = MonitorSupervisor(factory, selectors.DefaultSelector(), audit.get_logger(), lambda: clock[0], lambda: 5.0)
    assert sup.deadline is None
    with capture_logs() as logs:
        sup.open()
    assert sup.source is None and sup.retry_at == sup.deadline == 7.0 + MONITOR_RETRY
    assert [(e["event"], e["detail"], e["poll_interval"]) for e in logs] == [
        ("monitor.failed", "OSError: [Errno 93] Protocol not supported", 5.0)]


@pytest.mark.parametrize("how", ["still-registered", "fileno-minus-one", "fileno-raises"])
def test_the_socket_is_watched_again_exactly_overrun_pause_later_without_raising(how: str) -> None:
    """OVERRUN_PAUSE after an overrun tick() watches the source again (at that instant, not later), and a
    source that is still registered, closed (-1) or unreadable does not make it raise."""
    clock = [0.0]
    r, w = os.pipe()
    try:
        source = OverrunSource(r)
        sup = supervisor(source, clock)
        with capture_logs():
            sup.drain()
        assert sup.resume_at == OVERRUN_PAUSE
        sup.tick(OVERRUN_PAUSE - 0.01)
        assert sup.resume_at == OVERRUN_PAUSE and not sup.sel.get_map()
        if how == "still-registered":
            sup.sel.register(r, selectors.EVENT_READ)
        elif how == "fileno-minus-one":
            source._fileno = -1
        else:
            source._fileno = OSError(9, "Bad file descriptor")
        sup.tick(OVERRUN_PAUSE)
        assert sup.resume_at is None
        assert len(sup.sel.get_map()) == (1 if how == "still-registered" else 0)
        source._fileno = r
        for key in list(sup.sel.get_map().values()):
            sup.sel.unregister(key.fileobj)
        sup.retry_at = 40.0
        sup.tick(40.0)  # the reopen is due at that instant too
        assert sup.retry_at is None and sup.source is source
    finally:
        os.close(r)
        os.close(w)
