"""A small NETLINK_NETFILTER client for nf_tables: just what the hold needs, in the standard library.

Wire format (linux/netlink.h, linux/netfilter/nfnetlink.h, nf_tables.h): every message is an
nlmsghdr, then nfgenmsg, then attributes. nf_tables takes changes only inside a batch
(BATCH_BEGIN … BATCH_END), applies the batch atomically, and answers each message sent with
NLM_F_ACK with one NLMSG_ERROR (error 0 is the ACK). Integers inside attributes are big-endian.

The socket is behind `NetlinkSocket` (send, recv, close): tests drive this module through a real
socketpair or a real nf_tables in a network namespace of their own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

NETLINK_NETFILTER = 12  # Python's socket module lacks the constant
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x200, 0x400, 0x800
NLM_F_CAPPED, NLM_F_ACK_TLVS = 0x100, 0x200  # in an NLMSG_ERROR
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_DELTABLE = 0, 1, 2
NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN = 3, 4
NFT_MSG_NEWRULE, NFT_MSG_GETRULE = 6, 7

NFTA_TABLE_NAME, NFTA_TABLE_FLAGS, NFTA_TABLE_USE, NFTA_TABLE_USERDATA, NFTA_TABLE_OWNER = 1, 2, 3, 6, 7
NFT_TABLE_F_DORMANT, NFT_TABLE_F_OWNER = 0x1, 0x2
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK, NFTA_CHAIN_TYPE = 1, 3, 4, 7
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME = 1
NFTNL_UDATA_TABLE_COMMENT = 0  # libnftnl's TLV in NFTA_TABLE_USERDATA, what `nft list` shows as comment

NFPROTO_IPV4 = 2
NF_INET_POST_ROUTING = 4
NF_IP_PRI_NAT_SRC = 100

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid (host order)
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (res_id big-endian, packed by hand)
_ATTR = struct.Struct("=HH")
REPLY_TIMEOUT = 5.0  # nf_tables answers within the send; this bounds a wedged or hostile peer
RECV_SIZE = 1 << 17  # larger than any datagram nfnetlink sends (a dump part is at most 32 KiB)


class NetlinkSocket(Protocol):
    def send(self, data: bytes, /) -> int: ...
    def recv(self, size: int, /) -> bytes: ...
    def settimeout(self, value: float | None, /) -> None: ...
    def close(self) -> None: ...


class NetlinkError(Exception):
    """A request the kernel refused, or a reply we cannot read; the message is one sentence."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code  # the errno the kernel answered, None for a transport or parse problem


def open_socket() -> socket.socket:
    """A NETLINK_NETFILTER socket in this process's network namespace, bound, extended ACKs on."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    except OSError as exc:
        raise NetlinkError(f"cannot open a NETLINK_NETFILTER socket: {strerror(exc.errno)}", exc.errno) from None
    try:
        sock.bind((0, 0))
        with contextlib.suppress(OSError):  # the kernel's error texts are a courtesy (Linux 4.12)
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
    except OSError as exc:
        sock.close()
        raise NetlinkError(f"cannot bind a NETLINK_NETFILTER socket: {strerror(exc.errno)}", exc.errno) from None
    return sock


# -- encoding -----------------------------------------------------------------------------------
def attr(kind: int, payload: bytes) -> bytes:
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def string(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def be32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">i" if value < 0 else ">I", value))


def message(kind: int, flags: int, seq: int, family: int, attrs: Iterable[bytes] = (), *,
            res_id: int = 0) -> bytes:
    body = _NFGEN.pack(family, 0, socket.htons(res_id)) + b"".join(attrs)
    return _HDR.pack(_HDR.size + len(body), kind, flags, seq, 0) + body


def nft(msg: int) -> int:
    return NFNL_SUBSYS_NFTABLES << 8 | msg


def table_comment(text: str) -> bytes:
    raw = text.encode()[:127] + b"\0"
    return bytes((NFTNL_UDATA_TABLE_COMMENT, len(raw))) + raw


# -- decoding -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    kind: int
    flags: int
    seq: int
    payload: bytes  # after the nlmsghdr


def parse_messages(data: bytes) -> list[Message]:
    """Every whole message in one datagram; NetlinkError for a length that does not fit."""
    out: list[Message] = []
    offset = 0
    while offset + _HDR.size <= len(data):
        length, kind, flags, seq, _pid = _HDR.unpack_from(data, offset)
        if length < _HDR.size or offset + length > len(data):
            raise NetlinkError(f"a netlink reply is truncated or malformed (length {length} at byte {offset} "
                               f"of {len(data)})")
        out.append(Message(kind, flags, seq, data[offset + _HDR.size:offset + length]))
        offset += (length + 3) & ~3
    if offset < len(data) and data[offset:].strip(b"\0"):
        raise NetlinkError(f"a netlink reply ends in {len(data) - offset} bytes that are no message")
    return out


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attributes by type (the nested flag cleared); the last of a repeated type wins."""
    return dict(iter_attrs(data))


def iter_attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > len(data):
            raise NetlinkError(f"a netlink attribute is truncated (length {length} at byte {offset} of {len(data)})")
        yield kind & NLA_TYPE_MASK, data[offset + _ATTR.size:offset + length]
        offset += (length + 3) & ~3


def attr_str(value: bytes | None) -> str | None:
    return None if value is None else value.split(b"\0", 1)[0].decode(errors="replace")


def attr_u32(value: bytes | None) -> int | None:
    return None if value is None or len(value) != 4 else int(struct.unpack(">I", value)[0])


@dataclass(frozen=True)
class Ack:
    seq: int
    error: int  # 0 for an ACK, else the (positive) errno
    text: str | None = None  # the kernel's extended ACK message, when it gave one


def parse_ack(msg: Message) -> Ack:
    if len(msg.payload) < 4:
        raise NetlinkError("a netlink error message is truncated")
    (code,) = struct.unpack_from("=i", msg.payload)
    text = None
    if msg.flags & NLM_F_ACK_TLVS and len(msg.payload) >= 4 + _HDR.size:
        inner_len = _HDR.unpack_from(msg.payload, 4)[0]
        start = 4 + (_HDR.size if msg.flags & NLM_F_CAPPED else max(_HDR.size, inner_len))
        start = (start + 3) & ~3
        try:
            text = attr_str(parse_attrs(msg.payload[start:]).get(NLMSGERR_ATTR_MSG))
        except NetlinkError:
            text = None
    return Ack(msg.seq, -code, text or None)


# -- transport ----------------------------------------------------------------------------------
@dataclass
class Conversation:
    """One socket's requests: unique sequence numbers, replies matched to them, stale ones skipped."""

    sock: NetlinkSocket
    clock: Callable[[], float] = time.monotonic
    timeout: float = REPLY_TIMEOUT
    seq: int = field(default_factory=lambda: time.monotonic_ns() >> 8 & 0x7FFF0000)  # not 0: stale replies differ

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return self.seq

    def _recv(self, deadline: float) -> list[Message]:
        left = deadline - self.clock()
        if left <= 0:
            raise NetlinkError(f"the kernel did not answer within {self.timeout:g} s", errno.ETIMEDOUT)
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(RECV_SIZE)
        except TimeoutError:
            raise NetlinkError(f"the kernel did not answer within {self.timeout:g} s", errno.ETIMEDOUT) from None
        except OSError as exc:
            raise NetlinkError(f"reading the netlink socket failed: {strerror(exc.errno)}", exc.errno) from None
        if not data:
            raise NetlinkError("the netlink socket was closed", errno.EPIPE)
        return parse_messages(data)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as exc:
            raise NetlinkError(f"sending to the kernel failed: {strerror(exc.errno)}", exc.errno) from None

    def batch(self, parts: list[tuple[int, int, int, list[bytes]]]) -> dict[int, Ack]:
        """Send (type, flags, family, attrs) as one nf_tables batch, every part acked; the acks by
        the index of their part. A batch the kernel refused as a whole raises NetlinkError."""
        begin = self.next_seq()
        seqs = [self.next_seq() for _ in parts]
        end = self.next_seq()
        data = message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin, 0, res_id=NFNL_SUBSYS_NFTABLES)
        for seq, (kind, flags, family, attrs) in zip(seqs, parts, strict=True):
            data += message(kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq, family, attrs)
        data += message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, end, 0, res_id=NFNL_SUBSYS_NFTABLES)
        self._send(data)
        index = {seq: i for i, seq in enumerate(seqs)}
        acks: dict[int, Ack] = {}
        deadline = self.clock() + self.timeout
        while len(acks) < len(parts):
            for msg in self._recv(deadline):
                if msg.kind != NLMSG_ERROR:
                    continue  # a notification or a stale reply: not ours to answer
                ack = parse_ack(msg)
                if ack.seq in (begin, end) and ack.error:
                    raise NetlinkError(f"the kernel refused the batch: {strerror(ack.error)}", ack.error)
                if ack.seq in index:
                    acks[index[ack.seq]] = ack
        return acks

    def request(self, kind: int, family: int, attrs: list[bytes], *, dump: bool = False) -> list[Message]:
        """A GET: its replies, up to the ACK (or NLMSG_DONE for a dump); an error reply raises."""
        seq = self.next_seq()
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        self._send(message(kind, flags, seq, family, attrs))
        out: list[Message] = []
        deadline = self.clock() + self.timeout
        while True:
            for msg in self._recv(deadline):
                if msg.seq != seq:
                    continue  # a stale reply of an earlier request that timed out
                if msg.kind == NLMSG_ERROR:
                    ack = parse_ack(msg)
                    if ack.error:
                        raise NetlinkError(strerror(ack.error) + (f" ({ack.text})" if ack.text else ""),
                                           ack.error)
                    return out
                if msg.kind == NLMSG_DONE:
                    return out
                out.append(msg)
                if not dump and not msg.flags & NLM_F_MULTI:
                    continue  # the ACK follows


def strerror(code: int | None) -> str:
    """"Operation not permitted (EPERM)": the text and the name a reader can search for."""
    if code is None:
        return "unknown error"
    # errorcode names 95 ENOTSUP; nf_tables' sources and its users say EOPNOTSUPP (the same number on Linux)
    name = "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode.get(code, str(code))
    return f"{os.strerror(code)} ({name})"

