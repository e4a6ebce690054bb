"""sd_notify over a real AF_UNIX datagram socket, and the watchdog interval rules."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ctwatchd.notify import Notifier, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    return s, path


def test_ready_status_watchdog_reach_systemd(notify_socket: tuple[socket.socket, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call is one datagram with the documented assignments."""
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier()
    assert n.ready("healthy")
    lines = sock.recv(4096).decode().splitlines()
    assert lines[:2] == ["READY=1", "STATUS=healthy"] and lines[2] == f"MAINPID={os.getpid()}"
    n.status("degraded: nf_nat absent\nsecond line")
    assert sock.recv(4096) == b"STATUS=degraded: nf_nat absent second line"
    n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.reloading(123)
    assert sock.recv(4096).decode().splitlines()[:2] == ["RELOADING=1", "MONOTONIC_USEC=123"]
    n.stopping()
    assert sock.recv(4096).startswith(b"STOPPING=1")
    sock.close()


def test_abstract_socket_address_is_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTIFY_SOCKET=@name means the abstract namespace."""
    name = f"ctwatchd-test-{os.getpid()}"
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    try:
        assert Notifier().watchdog()
        assert s.recv(100) == b"WATCHDOG=1"
    finally:
        s.close()


def test_no_notify_socket_is_a_silent_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd nothing is sent and nothing fails."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.ready("x") and not n.watchdog()


def test_socket_pointing_nowhere_reports_once_and_never_raises(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead NOTIFY_SOCKET is reported once per kind of error; the daemon goes on."""
    errors: list[str] = []
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    n = Notifier(on_error=errors.append)
    for _ in range(5):
        assert not n.watchdog()
    assert len(errors) == 1


def test_notifier_reconnects_when_systemd_comes_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failure the next message tries a fresh connection."""
    path = tmp_path / "later.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    n = Notifier()
    assert not n.watchdog()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(2)
    try:
        assert n.watchdog()
        assert s.recv(100) == b"WATCHDOG=1"
    finally:
        s.close()


@pytest.mark.parametrize(("env", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_and_only_ours(env: dict[str, str], expected: float | None) -> None:
    """Half of WATCHDOG_USEC, and only when WATCHDOG_PID is unset or our pid."""
    assert watchdog_interval(env, 4242) == expected
