"""The real pyudev kernel monitor on this host: it opens, drains to nothing, and survives without privileges."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from ctwatchd.uevents import RCVBUF, KernelMonitor


def test_kernel_monitor_opens_and_drains_nothing_when_idle() -> None:
    """A netlink kernel-uevent socket is opened (no udevd needed) and an idle drain returns []."""
    mon = KernelMonitor()
    try:
        assert mon.fileno() >= 0
        assert mon.drain() == [] or all(e.module for e in mon.drain())
        sock = socket.socket(fileno=os.dup(mon.fileno()))
        with sock:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= RCVBUF  # root: forced size
    finally:
        mon.close()


SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None, reason="needs root and util-linux setpriv")
def test_monitor_without_cap_net_admin_falls_back_to_a_plain_buffer() -> None:
    """Without CAP_NET_ADMIN (no SO_RCVBUFFORCE) the monitor still opens: a sandbox without it keeps uevents."""
    code = ("from ctwatchd.uevents import KernelMonitor\n"
            "m = KernelMonitor(); print('opened', m.fileno() >= 0)\n")
    out = subprocess.run([str(SETPRIV), "--bounding-set", "-net_admin", "--inh-caps", "-net_admin", "--",
                          sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "opened True"
