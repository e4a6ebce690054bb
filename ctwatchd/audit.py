"""Structured audit records: structlog events, sent to journald with indexed fields, or printed.

journald: we speak its native datagram protocol ourselves (systemd.journal(3) "Native Protocol"):
systemd-python needs a C build and structlog-journald needs Python 3.12, and the protocol is forty
lines. Every event name maps to a MESSAGE_ID, so `journalctl MESSAGE_ID=…` and `journalctl -x`
(systemd/ctwatchd.catalog) work, and to a human MESSAGE.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import socket
import stat
import struct
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import structlog

from ctwatchd.config import LogFormat
from ctwatchd.model import AuditLog, clean

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "ctwatchd"


@dataclass(frozen=True)
class EventType:
    message_id: str  # 128-bit id, as journald wants it: 32 lowercase hex digits
    template: str  # str.format over the event's fields; missing fields read as "?"


# The whole audit vocabulary. A test checks that the catalog file documents every one of these.
EVENTS: dict[str, EventType] = {
    "daemon.started": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b01", "ctwatchd {version} started, watching {modules}"),
    "daemon.ready": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b02", "ctwatchd ready: {status}"),
    "daemon.stopping": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b03", "ctwatchd stopping on {signal}"),
    "config.loaded": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b04", "configuration loaded from {path}"),
    "config.rejected": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b05",
                                 "configuration rejected, previous one kept: {error}"),
    "module.event": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b06", "{source} reported {action} of module {module}"),
    "module.state": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b07", "module {module} is {state} ({detail})"),
    "module.blocked": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b08",
                                "module {module} is not loaded and modprobe.d blocks it: {blocker}; "
                                "ctwatchd will not load it"),
    "restore.planned": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b09", "restore planned ({reason}): {plan}"),
    "restore.step": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b0a",
                              "restore step {action} {module}: {result} in {duration_ms} ms {detail}"),
    "restore.finished": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b0b",
                                  "restore {result} in {duration_ms} ms {detail}"),
    "sysctl.write": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b0c", "sysctl {key}={value}: {result} {detail}"),
    "breaker.open": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b0d",
                              "restart breaker open: docker/hook restarts paused after {restarts} in "
                              "{window} s"),
    "breaker.closed": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b0e", "restart breaker closed"),
    "health.changed": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b0f", "health: {status}"),
    "monitor.overrun": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b10",
                                 "uevent monitor lost events ({detail}); resynced from /sys and /proc"),
    "monitor.failed": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b11",
                                "uevent monitor unavailable ({detail}); polling every {poll_interval} s"),
    "state.ignored": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b12", "state file {path} ignored: {detail}"),
    "state.trimmed": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b27",
                               "state file {path} written without what its reader would refuse: {detail}"),
    "state.failed": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b13", "state file {path} not written: {detail}"),
    "watchdog.floored": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b26",
                                  "WATCHDOG_USEC={watchdog_usec} asks for a ping every {asked_s} s; ctwatchd pings "
                                  "every {every_s} s, its floor, and systemd may kill it for missing the "
                                  "watchdog: set WatchdogSec= to a second or more"),
    "notify.failed": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b14", "sd_notify failed: {detail}"),
    "metrics.failed": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b15", "metrics file {path} not written: {detail}"),
    "module.note": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b16", "module {module}: {note}; ctwatchd loads it"),
    "tuning.dropped": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b17",
                                "tuned conntrack values dropped from the snapshot: {keys} (the reloaded "
                                "module does not have or accept them)"),
    "restore.unsettled": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b18",
                                   "restore succeeded {count} times in a row but did not hold ({reason}): "
                                   "something undoes it; next attempt in {retry_in} s"),
    "facts.problem": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b19", "kernel tree: {detail}"),
    "sysctl.conflict": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b1c",
                                 "{source} sets {key} = {value} but ctwatchd wants {want}: ctwatchd writes it "
                                 "back after each module load; change that file to end the fight"),
    "docker.decision": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b1b",
                                 "docker ({mode}): restart={restart}: {reason}"),
    "collateral.given_up": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b25",
                                     "module {module} failed to load {tries} times after its watched modules "
                                     "came back: no longer reloaded with them ({detail})"),
    "docker.baseline": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b24",
                                 "docker's rules that traffic needs, taken {taken}: {present}"),
    "module.removed": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b1d",
                                "module {module} was removed by {culprit}"),
    "hold.acquired": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b1e",
                               "nft table {table} holds {held} loaded: rmmod and modprobe -r of them fail "
                               "while ctwatchd runs"),
    "hold.changed": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b1f", "nft table {table} now holds {held}"),
    "hold.lost": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b20", "the hold (nft table {table}) was lost: {reason}"),
    "hold.unavailable": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b21",
                                  "cannot hold modules with nft table {table}: {reason}; repairing unloads "
                                  "instead"),
    "hold.released": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b22",
                               "nft table {table} released: the modules it held can be unloaded again"),
    "module.refused": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b23",
                                "{culprit} tried to unload {module}; the hold refused it"),
    "daemon.internal_error": EventType("2b6a0c3e0b3f4f0e9a7c1d5e8f3a6b1a",
                                       "internal error at {location}: {detail}; next look in {retry_in} s"),
}

# Fields journald indexes under their own names; the rest are prefixed CTWATCHD_.
PLAIN_FIELDS = {"module": "MODULE", "action": "ACTION", "result": "RESULT", "duration_ms": "DURATION_MS",
                "attribution": "ATTRIBUTION",
                **{f"removed_by_{k}": f"REMOVED_BY_{k.upper()}" for k in (
                    "pid", "comm", "exe", "cmdline", "uid", "auid", "user", "session", "unit", "parents")}}
PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


class _Blank(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


def render_message(event: str, fields: Mapping[str, Any]) -> str:
    kind = EVENTS.get(event)
    if kind is None:
        return event
    values = _Blank({k: ("" if v is None else v) for k, v in fields.items()})
    return clean(" ".join(kind.template.format_map(values).split()), 2000)


def add_message(_logger: object, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Processor: the human sentence for the event, from its template."""
    event_dict.setdefault("message", render_message(str(event_dict.get("event")), event_dict))
    return event_dict


def journal_fields(event_dict: Mapping[str, Any], level: str) -> dict[str, str]:
    """Processor core: one event as journald fields (pure; tested directly)."""
    out = {
        "MESSAGE": str(event_dict.get("message") or event_dict.get("event")),
        "PRIORITY": str(PRIORITY.get(level, 6)),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "CTWATCHD_EVENT": str(event_dict.get("event")),
    }
    kind = EVENTS.get(str(event_dict.get("event")))
    if kind is not None:
        out["MESSAGE_ID"] = kind.message_id
    for key, value in event_dict.items():
        if key in ("event", "message", "level", "timestamp") or value is None:
            continue
        name = PLAIN_FIELDS.get(key) or "CTWATCHD_" + "".join(c if c.isalnum() else "_" for c in key).upper()
        if isinstance(value, str):
            out[name] = value
        elif isinstance(value, (list, dict, tuple)):
            out[name] = json.dumps(value, default=str)
        else:
            out[name] = str(value)
    return out


def encode_journal(fields: Mapping[str, str]) -> bytes:
    """The native protocol: KEY=value lines, or KEY\\n<le64 length><bytes>\\n for values with newlines."""
    buf = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            buf += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            buf += key.encode() + b"=" + data + b"\n"
    return bytes(buf)


# Longer lines are cut. Up to PIPE_BUF (4096) a line enters a pipe whole or not at all; a longer one
# may go in pieces, as long as the reader keeps taking them at once.
LINE_LIMIT = 65536
PIPE_BUF = 4096


class SafeStream:
    """Whole lines to a file descriptor (stderr), never blocking and never raising.

    A stalled reader (a journal that stopped reading its stream, a full pipe) must not stop the
    loop, its watchdog pings and its restores: a line that cannot be written at once is dropped and
    counted, and the count is said with the next line that gets through. A reader that is gone
    (EPIPE) ends the writing for good.
    """

    def __init__(self, fd: int = 2) -> None:
        self.fd = fd
        self.dropped = 0
        self.closed = False
        self._sock: socket.socket | None = None
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                # A socket (the journal's stream under systemd) takes MSG_DONTWAIT per call, without
                # changing the descriptor other processes may share.
                self._sock = socket.socket(fileno=os.dup(fd))

    def write_line(self, text: str) -> bool:
        if self.closed:
            self.dropped += 1
            return False
        line = text.replace("\n", " ") + "\n"
        if self.dropped:
            line = f"ctwatchd: {self.dropped} log line(s) dropped: stderr was not writable\n" + line
        data = line.encode("utf-8", "backslashreplace")
        if len(data) > LINE_LIMIT:
            data = data[:LINE_LIMIT - 4] + b"...\n"
        view = memoryview(data)
        try:
            # A file or a 9p/NFS share may take a line in pieces: go on while it takes more at once.
            while view and (n := self._write_now(view)):
                view = view[n:]
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.EBADF, errno.ECONNRESET):
                self.closed = True
        if len(view) == len(data):
            self.dropped += 1
            return False
        if view:  # stalled in the middle: end the piece so the next line starts on its own
            with contextlib.suppress(OSError):
                self._write_now(memoryview(b"\n"))
        self.dropped = 0
        return True

    def _write_now(self, data: memoryview) -> int:
        """Bytes written without waiting; 0 when the reader cannot take any right now."""
        if self._sock is not None:
            try:
                return self._sock.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return 0
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        if not poller.poll(0):
            return 0
        # POLLOUT on a pipe promises one free page: a write of at most PIPE_BUF fits it without
        # blocking; a longer one would wait for the reader until all of it is in.
        return os.write(self.fd, data[:PIPE_BUF])


class JournalSink:
    """Sends datagrams to journald; falls back to a line on stderr when journald cannot take it."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: SafeStream | None = None) -> None:
        self.path = path
        self.fallback = fallback or SafeStream(2)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, fields: Mapping[str, str]) -> bool:
        try:
            data = encode_journal(fields)
            try:
                # MSG_DONTWAIT: a stalled journald must not stall the daemon (and its watchdog pings).
                self.sock.sendto(data, socket.MSG_DONTWAIT, self.path)
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE and self._send_memfd(data):
                    return True
                reason = exc.strerror or str(exc)
            else:
                return True
        except Exception as exc:  # logging must never raise into the daemon
            reason = f"{type(exc).__name__}: {exc}"
        self.fallback.write_line(f"ctwatchd: {clean(fields.get('MESSAGE', ''), 2000)} [journal: {reason}]")
        return False

    def _send_memfd(self, data: bytes) -> bool:
        """Large records travel as a sealed memfd, as sd_journal_send does."""
        try:
            fd = os.memfd_create("ctwatchd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:
            return False
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))],
                              socket.MSG_DONTWAIT, self.path)
        except OSError:
            return False
        finally:
            os.close(fd)
        return True


class LineLogger:
    """The structlog logger at the end of the chain for console and JSON lines: a SafeStream."""

    def __init__(self, stream: SafeStream) -> None:
        self.stream = stream

    def msg(self, message: str) -> None:
        self.stream.write_line(message)

    debug = info = warning = error = critical = msg


class JournalLogger:
    """The structlog logger at the end of the chain when writing to journald."""

    def __init__(self, sink: JournalSink) -> None:
        self.sink = sink

    def msg(self, **fields: str) -> None:
        self.sink.send(fields)

    debug = info = warning = error = critical = msg


def _to_journal(_logger: object, method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    return journal_fields(event_dict, method if method != "warn" else "warning")


def journal_wanted(env: Mapping[str, str], stderr_fd: int = 2) -> bool:
    """JOURNAL_STREAM names the journal's stream as 'dev:ino'; it counts only if it is our stderr."""
    stream = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(stderr_fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def configure(fmt: LogFormat = LogFormat.AUTO, *, env: Mapping[str, str] | None = None,
              journal_socket: str = JOURNAL_SOCKET, level: int = logging.INFO) -> str:
    """Set up structlog once for the process; returns the sink chosen ("journal", "console" or "json")."""
    env = os.environ if env is None else env
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.JOURNAL if journal_wanted(env) and os.path.exists(journal_socket) else LogFormat.CONSOLE
    processors: list[Any] = [structlog.processors.add_log_level, add_message]
    if fmt is LogFormat.JOURNAL:
        sink = JournalSink(journal_socket)
        processors.append(_to_journal)
        factory: Any = lambda *_: JournalLogger(sink)  # noqa: E731
    elif fmt is LogFormat.JSON:
        processors += [structlog.processors.TimeStamper(fmt="iso"), structlog.processors.JSONRenderer()]
        stream = SafeStream(2)
        factory = lambda *_: LineLogger(stream)  # noqa: E731
    else:
        processors += [structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S"), _console]
        stream = SafeStream(2)
        factory = lambda *_: LineLogger(stream)  # noqa: E731
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    return fmt.value


def _console(_logger: object, _method: str, event_dict: MutableMapping[str, Any]) -> str:
    """One readable line: time, level, the sentence, then the fields for grep."""
    ts = event_dict.pop("timestamp", "")
    level = event_dict.pop("level", "info")
    message = event_dict.pop("message", "")
    event = event_dict.pop("event", "")
    rest = " ".join(f"{k}={clean(str(v), 500)}" for k, v in event_dict.items() if v is not None)
    return f"{ts} {level:<7} {clean(str(message), 2000)} [{event}{' ' + rest if rest else ''}]"


def get_logger() -> AuditLog:
    logger: AuditLog = structlog.get_logger()
    return logger
