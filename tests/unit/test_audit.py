"""Audit records: the journald field mapping, the native protocol over a real socket, the catalog."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import structlog

from ctwatchd import audit
from ctwatchd.config import LogFormat

CATALOG = Path(__file__).resolve().parents[2] / "systemd" / "ctwatchd.catalog"


def parse_native(data: bytes) -> dict[str, str]:
    """Decode journald's native datagram format (both the = and the binary-length forms)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            out[k.decode()] = v.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            out[line.decode()] = data[nl + 9:nl + 9 + size].decode()
            i = nl + 9 + size + 1
    return out


def test_fields_are_indexed_by_the_documented_names() -> None:
    """MODULE, ACTION, RESULT, DURATION_MS, CTWATCHD_EVENT, MESSAGE_ID, PRIORITY are set."""
    fields = audit.journal_fields({"event": "restore.step", "module": "nf_nat", "action": "load-module",
                                   "result": "ok", "duration_ms": 12.5, "detail": "initstate live",
                                   "message": "m", "skipme": None}, "info")
    assert fields["MODULE"] == "nf_nat" and fields["ACTION"] == "load-module" and fields["RESULT"] == "ok"
    assert fields["DURATION_MS"] == "12.5"
    assert fields["CTWATCHD_EVENT"] == "restore.step"
    assert fields["CTWATCHD_DETAIL"] == "initstate live"
    assert fields["MESSAGE_ID"] == audit.EVENTS["restore.step"].message_id
    assert fields["PRIORITY"] == "6" and fields["SYSLOG_IDENTIFIER"] == "ctwatchd"
    assert "CTWATCHD_SKIPME" not in fields
    assert audit.journal_fields({"event": "x"}, "error")["PRIORITY"] == "3"


def test_message_templates_render_sentences() -> None:
    """Every event has a readable MESSAGE even when fields are missing."""
    msg = audit.render_message("restore.step", {"action": "load-module", "module": "nf_nat", "result": "ok",
                                                "duration_ms": 3.0, "detail": None})
    assert msg == "restore step load-module nf_nat: ok in 3.0 ms"
    assert audit.render_message("module.event", {}) == "? reported ? of module ?"
    assert audit.render_message("module.event", {"source": "udev", "action": "add", "module": "br_netfilter"}) \
        == "udev reported add of module br_netfilter"


def test_message_ids_are_unique_journald_ids() -> None:
    """MESSAGE_IDs are 128-bit lowercase hex and distinct per event type."""
    ids = [e.message_id for e in audit.EVENTS.values()]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_catalog_documents_every_message_id() -> None:
    """systemd/ctwatchd.catalog has an entry for every MESSAGE_ID ctwatchd emits (journalctl -x)."""
    text = CATALOG.read_text()
    documented = set(re.findall(r"^-- ([0-9a-f]{32})$", text, re.M))
    assert documented == {e.message_id for e in audit.EVENTS.values()}


def test_native_protocol_over_a_real_datagram_socket(tmp_path: Path) -> None:
    """Records arrive at a journald-like AF_UNIX socket intact, including multi-line values."""
    path = str(tmp_path / "journal.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    try:
        sink = audit.JournalSink(path)
        assert sink.send({"MESSAGE": "two\nlines", "MODULE": "nf_nat"})
        got = parse_native(server.recv(65536))
    finally:
        server.close()
    assert got == {"MESSAGE": "two\nlines", "MODULE": "nf_nat"}


def test_oversized_record_goes_by_memfd(tmp_path: Path) -> None:
    """A record larger than a datagram is passed as a sealed memfd (SCM_RIGHTS), as sd_journal_send does."""
    path = str(tmp_path / "journal.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server.bind(path)
    try:
        sink = audit.JournalSink(path)
        sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = "x" * 400_000
        assert sink.send({"MESSAGE": "big", "CTWATCHD_DETAIL": big})
        _, ancdata, _, _ = server.recvmsg(1024, socket.CMSG_SPACE(4))
        (fd,) = struct.unpack("i", ancdata[0][2][:4])
        with os.fdopen(fd, "rb") as fh:
            fh.seek(0)  # the descriptor shares our write offset; journald mmaps it instead
            got = parse_native(fh.read())
    finally:
        server.close()
    assert got["CTWATCHD_DETAIL"] == big


def test_missing_journal_socket_falls_back_to_stderr(tmp_path: Path) -> None:
    """If journald is gone, the record still reaches stderr (here a real pipe) and nothing raises."""
    r, w = os.pipe()
    try:
        sink = audit.JournalSink(str(tmp_path / "absent.sock"), fallback=audit.SafeStream(w))
        assert not sink.send({"MESSAGE": "restore ok\x1b[2J"})
        line = os.read(r, 4096).decode()
    finally:
        os.close(r)
        os.close(w)
    assert line == "ctwatchd: restore ok\\x1b[2J [journal: No such file or directory]\n"


def test_full_stderr_pipe_never_blocks_and_the_loss_is_counted() -> None:
    """A stderr nobody reads (a full pipe) costs a dropped line, never a blocked daemon; the count is
    said with the next line that gets through."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        os.set_blocking(w, False)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(w, b"x" * 65536)
        os.set_blocking(w, True)  # as stderr is: a plain write now would block forever
        stream = audit.SafeStream(w)
        done = threading.Event()

        def write() -> None:
            for _ in range(50):
                stream.write_line("restore ok")
            done.set()

        threading.Thread(target=write, daemon=True).start()
        assert done.wait(5), "SafeStream blocked on a full pipe"
        assert stream.dropped == 50
        with contextlib.suppress(BlockingIOError):
            while os.read(r, 1 << 20):
                pass
        assert stream.write_line("after")
        assert os.read(r, 4096) == b"ctwatchd: 50 log line(s) dropped: stderr was not writable\nafter\n"
    finally:
        os.close(r)
        os.close(w)


def test_a_long_line_into_an_almost_full_pipe_never_blocks() -> None:
    """A 20 KB line into a pipe with one free page: what fits goes in, the rest is given up, no blocking
    (a plain write of more than PIPE_BUF would wait for the reader)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        os.set_blocking(w, False)
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(w, b"x" * 65536)
        os.set_blocking(w, True)
        os.read(r, 4096)  # one page free
        stream = audit.SafeStream(w)
        done = threading.Event()
        def write() -> None:
            stream.write_line("y" * 20000)
            done.set()

        threading.Thread(target=write, daemon=True).start()
        assert done.wait(5), "a long line blocked on an almost full pipe"
    finally:
        os.close(r)
        os.close(w)


def test_a_share_that_takes_lines_in_pieces_still_gets_whole_lines(tmp_path: Path) -> None:
    """A file that accepts short writes (9p, NFS) gets the whole line, in pieces, not a cut one."""
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    real_write = os.write
    try:
        stream = audit.SafeStream(fd)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("ctwatchd.audit.os.write", lambda f, b: real_write(f, bytes(b[:1000])))
            assert stream.write_line('{"event": "' + "z" * 5000 + '"}')
    finally:
        os.close(fd)
    assert path.read_text() == '{"event": "' + "z" * 5000 + '"}\n'


def test_stderr_reader_gone_is_not_an_exception() -> None:
    """EPIPE (the reader closed) ends the writing quietly instead of raising out of a log call."""
    r, w = os.pipe()
    os.close(r)
    try:
        stream = audit.SafeStream(w)
        assert not stream.write_line("one") and stream.closed
        assert not stream.write_line("two")
    finally:
        os.close(w)


def test_stderr_socket_is_written_without_blocking() -> None:
    """Under systemd stderr is the journal's stream socket: a full one drops lines instead of blocking."""
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                a.send(b"x" * 65536)
        a.setblocking(True)
        stream = audit.SafeStream(a.fileno())
        started = time.monotonic()
        assert not stream.write_line("restore ok")
        assert time.monotonic() - started < 1 and stream.dropped == 1
    finally:
        a.close()
        b.close()


def test_an_oversized_journal_record_that_cannot_go_by_memfd_falls_back(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """memfd_create failing (an old kernel, a seccomp filter) is a fallback line, not an exception."""
    path = str(tmp_path / "journal.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server.bind(path)
    r, w = os.pipe()

    def no_memfd(*_: object) -> int:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    try:
        sink = audit.JournalSink(path, fallback=audit.SafeStream(w))
        sink.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        assert not sink.send({"MESSAGE": "big", "CTWATCHD_DETAIL": "x" * 400_000})
        assert os.read(r, 4096).startswith(b"ctwatchd: big [journal: Message too long]")
    finally:
        server.close()
        os.close(r)
        os.close(w)


def test_journal_stream_must_match_stderr(tmp_path: Path) -> None:
    """JOURNAL_STREAM counts only when it names the file stderr really is."""
    f = tmp_path / "stream"
    f.write_text("")
    fd = os.open(f, os.O_WRONLY)
    try:
        st = os.fstat(fd)
        assert audit.journal_wanted({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd)
        assert not audit.journal_wanted({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fd)
        assert not audit.journal_wanted({"JOURNAL_STREAM": "garbage"}, fd)
        assert not audit.journal_wanted({}, fd)
    finally:
        os.close(fd)


def test_configured_journal_logger_sends_structlog_events(tmp_path: Path) -> None:
    """End to end: a structlog call becomes one journald datagram with the indexed fields."""
    path = str(tmp_path / "journal.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    try:
        assert audit.configure(LogFormat.JOURNAL, journal_socket=path) == "journal"
        structlog.get_logger().warning("module.blocked", module="nf_conntrack", blocker="'install x /bin/true'")
        got = parse_native(server.recv(65536))
    finally:
        server.close()
    assert got["CTWATCHD_EVENT"] == "module.blocked" and got["MODULE"] == "nf_conntrack"
    assert got["PRIORITY"] == "4"
    assert got["MESSAGE"].startswith("module nf_conntrack is not loaded and modprobe.d blocks it")


@pytest.mark.parametrize("fmt", [LogFormat.CONSOLE, LogFormat.JSON])
def test_terminal_formats_are_one_line_per_event(capfd: pytest.CaptureFixture[str], fmt: LogFormat) -> None:
    """On a terminal each event is one readable (or JSON) line on stderr (file descriptor 2)."""
    audit.configure(fmt, env={})
    structlog.get_logger().info("restore.finished", result="ok", duration_ms=41.0)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "restore ok in 41.0 ms" in err[0]


def test_console_lines_escape_terminal_control_sequences(capfd: pytest.CaptureFixture[str]) -> None:
    """A hook's output with an OSC title sequence and BEL is shown escaped, never interpreted."""
    audit.configure(LogFormat.CONSOLE, env={})
    structlog.get_logger().error("restore.step", action="run-hook", result="failed",
                                 detail="/hook exited with status 1: \x1b]0;owned\x07\x1b[2J")
    err = capfd.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert "\\x1b]0;owned\\x07" in err
