"""The uevent layer: KernelMonitor (the netlink adapter below the UeventSource seam), the real pyudev
kernel monitor on this host, and MonitorSupervisor inside the real daemon loop.

KernelMonitor is tested against a pyudev-shaped monitor on a real socket, the idea of pyudev's own
tests/plugins/fake_monitor.py, here on netlink: a NETLINK_USERSOCK socket joined to a multicast
group, fed by a second NETLINK_USERSOCK socket broadcasting datagrams in the kernel's uevent format.
Overfilling the receiver's small buffer makes the kernel itself flag the overrun (netlink_overrun:
sk_err = ENOBUFS), so the POLLERR, the bare OSError pyudev raises for it, the SO_ERROR read that clears
it and the buffer growth are all real. Joining a NETLINK_USERSOCK group needs CAP_NET_ADMIN: those
tests skip without root, and fail under CI.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import FakeMonitor, Harness, cfg_for, events, run_daemon
from prereq import missing, need

from ctwatchd.uevents import (
    DRAIN_LIMIT,
    OVERRUN_PAUSE,
    RCVBUF,
    RCVBUF_MAX,
    KernelMonitor,
    ModuleEvent,
    MonitorClosed,
    Overrun,
)

NETLINK_USERSOCK = 2  # <linux/netlink.h>: reserved for user-mode socket protocols, 32 multicast groups
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # what libudev's set_receive_buffer_size uses
SETPRIV = shutil.which("setpriv")
LO_UEVENT = Path("/sys/class/net/lo/uevent")


# -- a pyudev-shaped monitor on a real netlink socket ---------------------------------------------

@dataclass(frozen=True)
class FakeDevice:
    """The pyudev.Device attributes KernelMonitor reads."""

    action: str
    subsystem: str
    sys_name: str


def parse_uevent(data: bytes) -> FakeDevice | None:
    """A kernel uevent datagram ("ACTION@DEVPATH\\0KEY=VALUE\\0…") as libudev reads it; None for what
    libudev drops (no ACTION@DEVPATH header, or no ACTION, DEVPATH or SUBSYSTEM)."""
    header, *fields = data.rstrip(b"\0").split(b"\0")
    if b"@" not in header:
        return None
    props = dict(f.decode().split("=", 1) for f in fields if b"=" in f)
    if not {"ACTION", "DEVPATH", "SUBSYSTEM"} <= props.keys():
        return None
    return FakeDevice(props["ACTION"], props["SUBSYSTEM"], props["DEVPATH"].rsplit("/", 1)[-1])


class PyudevShapedMonitor:
    """pyudev.Monitor's surface on a real NETLINK_USERSOCK socket joined to one multicast group.

    poll() does what pyudev's Monitor.poll does: select.poll() on the fd; POLLNVAL or POLLERR raise a
    bare OSError (pyudev/_os/poll.py), so an overrun raises until SO_ERROR is read; a closed socket
    (fileno() -1) raises ValueError from select.poll.register; otherwise one datagram is received and
    returned as a device, skipping what libudev drops, or None when nothing is queued.
    """

    def __init__(self, group: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
        try:
            self.sock.bind((0, group))
        except OSError:
            self.sock.close()
            raise
        self.started = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def start(self) -> None:
        self.started = True

    def set_receive_buffer_size(self, size: int) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)  # libudev: EPERM without CAP_NET_ADMIN

    def poll(self, timeout: float | None = None) -> FakeDevice | None:
        self.start()
        notifier = select.poll()
        notifier.register(self, select.POLLIN)  # ValueError for a closed socket: its fileno() is -1
        ready = notifier.poll(None if timeout is None else int(timeout * 1000))
        for fd, mask in ready:
            if mask & select.POLLNVAL:
                raise OSError(f"File descriptor not open: {fd!r}")
            if mask & select.POLLERR:
                raise OSError(f"Error while polling fd: {fd!r}")
        if not any(mask & select.POLLIN for _, mask in ready):
            return None
        while True:  # libudev's receive loops past messages it drops
            try:
                data = self.sock.recv(8192, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            device = parse_uevent(data)
            if device is not None:
                return device

    def close(self) -> None:
        self.sock.close()


class UeventSender:
    """Broadcasts kernel-formatted uevents to a NETLINK_USERSOCK multicast group."""

    def __init__(self, group: int) -> None:
        self.group = group
        self.seqnum = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
        self.sock.bind((0, 0))

    def send(self, action: str, devpath: str, subsystem: str) -> None:
        self.seqnum += 1
        msg = (f"{action}@{devpath}\0ACTION={action}\0DEVPATH={devpath}\0SUBSYSTEM={subsystem}\0"
               f"SEQNUM={self.seqnum}\0").encode()
        # The group gets its copy first; the unicast part to port 0 has no kernel socket behind it
        # for NETLINK_USERSOCK and is refused, which is expected.
        with contextlib.suppress(ConnectionRefusedError):
            self.sock.sendto(msg, (0, self.group))

    def module(self, action: str, name: str) -> None:
        self.send(action, f"/module/{name}", "module")

    def close(self) -> None:
        self.sock.close()


def free_usersock_group() -> int:
    """The bit mask of a NETLINK_USERSOCK multicast group no socket in this namespace has joined."""
    used = 0
    with open("/proc/net/netlink") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[1]) == NETLINK_USERSOCK:
                used |= int(fields[3], 16)
    free = [1 << bit for bit in range(31, 0, -1) if not used & (1 << bit)]
    if not free:
        missing("every NETLINK_USERSOCK multicast group is in use on this host")
    return free[0]


@pytest.fixture
def netlink() -> Iterator[tuple[PyudevShapedMonitor, UeventSender]]:
    """A pyudev-shaped monitor and a sender on a free NETLINK_USERSOCK multicast group."""
    need(os.geteuid() == 0, "joining a NETLINK_USERSOCK multicast group needs root (CAP_NET_ADMIN)")
    group = free_usersock_group()
    try:
        mon = PyudevShapedMonitor(group)
    except OSError as exc:
        missing(f"cannot join a NETLINK_USERSOCK multicast group here: {exc}")
    sender = UeventSender(group)
    try:
        yield mon, sender
    finally:
        sender.close()
        mon.close()


def rcvbuf(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def poll_mask(fd: int) -> int:
    """The fd's poll(2) events right now; reading them does not clear a socket error."""
    notifier = select.poll()
    notifier.register(fd, select.POLLIN)
    return sum(mask for _, mask in notifier.poll(0))


def drain_all(mon: KernelMonitor) -> list[ModuleEvent]:
    out: list[ModuleEvent] = []
    for _ in range(100):
        batch = mon.drain()
        if not batch and not poll_mask(mon.fileno()) & select.POLLIN:
            return out
        out += batch
    raise AssertionError("the monitor never ran dry")


# -- KernelMonitor ---------------------------------------------------------------------------------

def test_only_module_events_come_out_of_drain(netlink: tuple[PyudevShapedMonitor, UeventSender]) -> None:
    """Of a mixed burst of kernel uevents, drain() returns exactly the SUBSYSTEM=module ones, in order,
    as ModuleEvent values, and consumes the rest."""
    mon, sender = netlink
    km = KernelMonitor(monitor=mon)
    assert mon.started and rcvbuf(km.fileno()) >= RCVBUF  # libudev's forced size, as root
    sender.send("add", "/devices/virtual/net/veth0", "net")
    sender.module("remove", "nf_nat")
    sender.send("bind", "/bus/platform/drivers/nf_conntrack", "drivers")  # a watched name, not a module
    sender.send("change", "/devices/virtual/misc/br_netfilter", "misc")
    sender.module("add", "br_netfilter")
    sender.send("add", "/devices/platform/serial8250/tty/ttyS0", "tty")
    assert km.drain() == [ModuleEvent("remove", "nf_nat"), ModuleEvent("add", "br_netfilter")]
    assert not poll_mask(km.fileno()) & select.POLLIN
    assert km.drain() == []


def test_overrun_is_cleared_reported_and_grows_the_buffer(
        netlink: tuple[PyudevShapedMonitor, UeventSender]) -> None:
    """After a real ENOBUFS overrun drain() raises Overrun once, the socket error is cleared so the
    next drains read events again, and the receive buffer has doubled."""
    mon, sender = netlink
    km = KernelMonitor(rcvbuf=4096, monitor=mon)
    before = rcvbuf(km.fileno())
    for i in range(300):  # a few kB of room: most of these overflow it
        sender.module("add", f"m{i}")
    assert poll_mask(km.fileno()) & select.POLLERR, "the kernel did not flag an overrun"
    with pytest.raises(Overrun, match=f"SO_ERROR={errno.ENOBUFS}"):
        km.drain()
    assert not poll_mask(km.fileno()) & select.POLLERR, "SO_ERROR was not cleared"
    assert km.rcvbuf == 8192 and rcvbuf(km.fileno()) == 2 * before
    queued = drain_all(km)  # no second Overrun, no endless OSError
    assert queued and [e.module for e in queued] == [f"m{i}" for i in range(len(queued))]
    sender.module("remove", "nf_nat")
    assert km.drain() == [ModuleEvent("remove", "nf_nat")]


def test_buffer_growth_stops_at_rcvbuf_max(netlink: tuple[PyudevShapedMonitor, UeventSender]) -> None:
    """An overrun at RCVBUF_MAX still raises Overrun and clears the error, but grows nothing further."""
    mon, sender = netlink
    km = KernelMonitor(rcvbuf=4096, monitor=mon)
    before = rcvbuf(km.fileno())
    km.rcvbuf = RCVBUF_MAX
    for i in range(300):
        sender.module("add", f"m{i}")
    with pytest.raises(Overrun):
        km.drain()
    assert km.rcvbuf == RCVBUF_MAX and rcvbuf(km.fileno()) == before
    assert drain_all(km)


def test_without_cap_net_admin_the_buffer_is_set_with_so_rcvbuf(
        netlink: tuple[PyudevShapedMonitor, UeventSender], monkeypatch: pytest.MonkeyPatch) -> None:
    """When libudev's SO_RCVBUFFORCE is refused (EPERM), the size is asked for with plain SO_RCVBUF."""
    mon, _ = netlink

    def refuse(size: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(mon, "set_receive_buffer_size", refuse)
    size = 96 * 1024  # below rmem_max, and not the default
    KernelMonitor(rcvbuf=size, monitor=mon)
    assert rcvbuf(mon.fileno()) == 2 * size


def test_closed_monitor_raises_monitor_closed(netlink: tuple[PyudevShapedMonitor, UeventSender]) -> None:
    """A monitor whose socket is closed makes drain() raise MonitorClosed, not a bare library error."""
    mon, _ = netlink
    km = KernelMonitor(monitor=mon)
    mon.close()
    with pytest.raises(MonitorClosed):
        km.drain()


def test_fd_closed_under_the_monitor_raises_monitor_closed(
        netlink: tuple[PyudevShapedMonitor, UeventSender]) -> None:
    """The fd closed below a live monitor (POLLNVAL, what real pyudev meets) is MonitorClosed too."""
    mon, _ = netlink
    km = KernelMonitor(monitor=mon)
    fd = mon.sock.detach()
    os.close(fd)
    mon.fileno = lambda: fd  # type: ignore[method-assign]  # libudev keeps reporting its fd number
    with pytest.raises(MonitorClosed):
        km.drain()


def test_drain_is_bounded_by_drain_limit(netlink: tuple[PyudevShapedMonitor, UeventSender]) -> None:
    """With thousands of uevents queued, one drain() returns DRAIN_LIMIT of them and leaves the socket
    readable; later calls return the rest, in order, none lost."""
    mon, sender = netlink
    km = KernelMonitor(monitor=mon)
    total = 4 * DRAIN_LIMIT + 100
    for i in range(total):
        sender.module("add", f"m{i}")
    first = km.drain()
    assert len(first) == DRAIN_LIMIT
    assert poll_mask(km.fileno()) & select.POLLIN
    batches = [first]
    while batch := km.drain():
        batches.append(batch)
        assert len(batches) <= 10
    assert [len(b) for b in batches] == [DRAIN_LIMIT] * 4 + [100]
    assert [e.module for b in batches for e in b] == [f"m{i}" for i in range(total)]


# -- the real pyudev kernel monitor on this host ---------------------------------------------------

def test_real_kernel_monitor_reads_and_drops_a_real_non_module_uevent() -> None:
    """The real pyudev kernel monitor opens without udevd, gets the forced buffer, and a real kernel
    uevent (a synthetic 'change' on lo) is read off the socket by drain() and filtered out."""
    need(os.geteuid() == 0 and os.access(LO_UEVENT, os.W_OK),
         f"writing {LO_UEVENT} (a synthetic kernel uevent) needs root and a writable /sys")
    km = KernelMonitor()
    try:
        fd = km.fileno()
        assert rcvbuf(fd) >= RCVBUF
        drain_all(km)  # whatever the host sent since the open
        LO_UEVENT.write_text("change")
        deadline = time.monotonic() + 5
        while not poll_mask(fd) & select.POLLIN:
            assert time.monotonic() < deadline, "the kernel uevent never arrived"
            time.sleep(0.01)
        assert km.drain() == []
        assert not poll_mask(fd) & select.POLLIN
    finally:
        km.close()


def test_monitor_without_cap_net_admin_falls_back_to_a_plain_buffer() -> None:
    """Without CAP_NET_ADMIN (no SO_RCVBUFFORCE) the monitor still opens: a sandbox without it keeps uevents."""
    need(os.geteuid() == 0 and SETPRIV is not None, "dropping CAP_NET_ADMIN needs root and util-linux setpriv")
    code = ("from ctwatchd.uevents import KernelMonitor\n"
            "m = KernelMonitor(); print('opened', m.fileno() >= 0)\n")
    out = subprocess.run([str(SETPRIV), "--bounding-set", "-net_admin", "--inh-caps", "-net_admin", "--",
                          sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "opened True"


# -- MonitorSupervisor in the real daemon loop ---------------------------------------------------------

class OverrunEveryTime(FakeMonitor):
    """A source whose fd is always readable and whose every drain() is an overrun: an error that
    never clears."""

    def __init__(self) -> None:
        super().__init__()
        self.send("readable")
        self.drains: list[float] = []

    def drain(self) -> list[ModuleEvent]:
        self.drains.append(time.monotonic())
        raise Overrun("ENOBUFS (persistent, test)")


class EndlessStorm(FakeMonitor):
    """A source with DRAIN_LIMIT unrelated module events ready on every drain(), until calm()."""

    def __init__(self) -> None:
        super().__init__()
        self.send("readable")
        self.drains = 0
        self.removal = False
        self.stormy = True

    def drain(self) -> list[ModuleEvent]:
        self.drains += 1
        if not self.stormy:
            with contextlib.suppress(BlockingIOError):
                os.read(self.r, 4096)
            return []
        batch = [ModuleEvent("add", "snd_dummy")] * DRAIN_LIMIT
        if self.removal:
            self.removal = False
            batch[DRAIN_LIMIT // 2] = ModuleEvent("remove", "nf_nat")
        return batch

    def calm(self) -> None:
        self.stormy = False


def notify_arrivals(h: Harness, seconds: float) -> list[tuple[float, str]]:
    """Datagrams on the harness notify socket for `seconds`, each with its arrival time."""
    out: list[tuple[float, str]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            msg = h.notify.recv(4096).decode()
        except (TimeoutError, BlockingIOError):
            continue
        h.messages.append(msg)
        out.append((time.monotonic(), msg))
    return out


def test_persistent_overrun_is_paced_reported_once_and_resynced(h: Harness) -> None:
    """An overrun that never clears costs at most one drain per OVERRUN_PAUSE and one monitor.overrun
    record, watchdog pings go on, and a module removed meanwhile is restored by the resync."""
    h.monitor.close()
    source = OverrunEveryTime()
    h.monitor = source
    seen: dict[str, float] = {}

    def driver() -> None:
        h.wait_notify("READY=1")
        seen["t0"] = time.monotonic()
        h.host.unload("nf_nat")  # no uevent for it: only the resync after an overrun can notice
        arrivals = notify_arrivals(h, 1.5)
        seen["t1"] = time.monotonic()
        seen["pings"] = sum(msg == "WATCHDOG=1" for _, msg in arrivals)
        seen["live"] = h.host.is_live("nf_nat")

    code, logs, _ = run_daemon(h.daemon(cfg_for(h.host), env={"WATCHDOG_USEC": "200000"}), driver)
    drains = [t for t in source.drains if seen["t0"] <= t <= seen["t1"]]
    assert code == 0
    assert 2 <= len(drains) <= 1.5 / OVERRUN_PAUSE + 2, len(drains)
    overruns = events(logs, "monitor.overrun")
    assert len(overruns) == 1 and overruns[0]["count"] == 1, overruns
    assert seen["pings"] >= 8, seen
    assert seen["live"] and h.host.modprobe_calls() == ["nf_nat"]


def test_sustained_storm_does_not_starve_the_watchdog(h: Harness) -> None:
    """With DRAIN_LIMIT unrelated uevents ready on every turn, WATCHDOG=1 keeps arriving about every
    0.1 s and a removal inside the storm is still restored."""
    h.monitor.close()
    storm = EndlessStorm()
    h.monitor = storm
    pings: list[float] = []

    def driver() -> None:
        try:
            h.wait_notify("READY=1")
            pings.extend(t for t, msg in notify_arrivals(h, 1.5) if msg == "WATCHDOG=1")
            h.host.unload("nf_nat")
            storm.removal = True
            h.wait_for(lambda: h.host.is_live("nf_nat"), timeout=5)
        finally:
            storm.calm()  # lets even a starving loop get back to the stop signal

    code, logs, _ = run_daemon(h.daemon(cfg_for(h.host), env={"WATCHDOG_USEC": "200000"}), driver)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert code == 0 and storm.drains > 20
    assert len(pings) >= 8 and max(gaps) < 0.5, (len(pings), gaps)
    assert [e["module"] for e in events(logs, "module.event")] == ["nf_nat"]
    assert h.host.modprobe_calls() == ["nf_nat"]
