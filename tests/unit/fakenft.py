"""nf_tables' side of a NETLINK_NETFILTER socket, on a real socketpair.

A thread reads each datagram the client sends, parses it as the kernel does (batches, GETs, dumps)
against a small model of the tables, and answers with the kernel's message layout. Faults are set
per message type: an errno, silence, a flag dropped, bytes that are no message, a stale reply first.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field

from ctwatchd import nftnl as n

ERR_HDR = struct.Struct("=IHHII")


@dataclass
class Table:
    flags: int
    owner: int
    chains: dict[str, str | None] = field(default_factory=dict)  # name -> base chain type
    exprs: list[str] = field(default_factory=list)


def ack(seq: int, error: int, request: bytes, text: str | None = None) -> bytes:
    flags = n.NLM_F_CAPPED
    tail = b""
    if text is not None:
        flags |= n.NLM_F_ACK_TLVS
        tail = n.string(n.NLMSGERR_ATTR_MSG, text)
    body = struct.pack("=i", -error) + request[:16] + tail
    return ERR_HDR.pack(16 + len(body), n.NLMSG_ERROR, flags, seq, 0) + body


def reply(kind: int, seq: int, attrs: list[bytes], flags: int = 0) -> bytes:
    data = bytearray(n.message(kind, flags, seq, n.NFPROTO_IPV4, attrs))
    return bytes(data)


class FakeNfTables:
    PORT = 4242  # the first connection's port id; each further connect() gets the next

    def __init__(self) -> None:
        self.tables: dict[str, Table] = {}
        self.refuse: dict[int, int] = {}  # nft message type -> errno for it
        self.silent: set[int] = set()  # message types never answered
        self.drop_flags = 0  # flags the "kernel" takes but does not keep
        self.garbage: bytes | None = None  # sent instead of the next answer
        self.stale_first = False  # an old reply with another seq before each answer
        self.requests: list[int] = []  # every message type received, in order
        self.connections = 0
        self.closed = threading.Event()  # set when a connection's client end closed
        self._kernels: list[socket.socket] = []
        self.lock = threading.Lock()
        self.port = self.PORT

    def connect(self) -> socket.socket:
        client, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        port = self.PORT + self.connections
        self.connections += 1
        self._kernels.append(kernel)
        threading.Thread(target=self._serve, args=(kernel, port), daemon=True).start()
        return client

    def close(self) -> None:
        for k in self._kernels:
            k.close()

    # -- the kernel side -------------------------------------------------------------------
    def _serve(self, kernel: socket.socket, port: int) -> None:
        while True:
            try:
                data = kernel.recv(1 << 17)
            except OSError:
                break
            if not data:
                break  # the client closed its end: an owner's tables go with it
            with self.lock:
                self.port = port
                out = self._answer(n.parse_messages(data), data)
                if self.garbage is not None:
                    out, self.garbage = [self.garbage], None
                if self.stale_first:
                    out.insert(0, ack(1, 0, b"\0" * 16))
            for chunk in out:
                kernel.send(chunk)
        with self.lock:
            self.tables = {k: t for k, t in self.tables.items() if t.owner != port}
        self.closed.set()

    def _answer(self, msgs: list[n.Message], raw: bytes) -> list[bytes]:
        if msgs and msgs[0].kind == n.NFNL_MSG_BATCH_BEGIN:
            return [b"".join(self._batch(msgs[1:-1]))] if len(msgs) > 2 else []
        out: list[bytes] = []
        for m in msgs:
            out += self._get(m)
        return out

    def _batch(self, msgs: list[n.Message]) -> list[bytes]:
        staged = {k: Table(t.flags, t.owner, dict(t.chains), list(t.exprs)) for k, t in self.tables.items()}
        acks: list[bytes] = []
        failed = False
        for m in msgs:
            self.requests.append(m.kind & 0xFF)
            err = self._apply(staged, m)
            failed |= bool(err)
            if m.kind & 0xFF in self.silent:
                continue
            if err or m.flags & n.NLM_F_ACK:
                acks.append(ack(m.seq, err, m.payload))
        if not failed:
            self.tables = staged
        return acks

    def _apply(self, staged: dict[str, Table], m: n.Message) -> int:
        import errno

        kind = m.kind & 0xFF
        if kind in self.refuse:
            return self.refuse[kind]
        a = n.parse_attrs(m.payload[4:])
        if kind == n.NFT_MSG_NEWTABLE:
            name = n.attr_str(a.get(n.NFTA_TABLE_NAME)) or ""
            if name in staged:
                return errno.EPERM if staged[name].owner not in (0, self.port) else errno.EEXIST
            flags = (n.attr_u32(a.get(n.NFTA_TABLE_FLAGS)) or 0) & ~self.drop_flags
            staged[name] = Table(flags, self.port if flags & n.NFT_TABLE_F_OWNER else 0)
            return 0
        if kind == n.NFT_MSG_DELTABLE:
            name = n.attr_str(a.get(n.NFTA_TABLE_NAME)) or ""
            if name not in staged:
                return errno.ENOENT
            if staged[name].owner not in (0, self.port):
                return errno.EPERM
            del staged[name]
            return 0
        if kind == n.NFT_MSG_NEWCHAIN:
            table = staged.get(n.attr_str(a.get(n.NFTA_CHAIN_TABLE)) or "")
            if table is None:
                return errno.ENOENT
            table.chains[n.attr_str(a.get(n.NFTA_CHAIN_NAME)) or ""] = n.attr_str(a.get(n.NFTA_CHAIN_TYPE))
            return 0
        if kind == n.NFT_MSG_NEWRULE:
            table = staged.get(n.attr_str(a.get(n.NFTA_RULE_TABLE)) or "")
            if table is None:
                return errno.ENOENT
            for _, elem in n.iter_attrs(a.get(n.NFTA_RULE_EXPRESSIONS, b"")):
                table.exprs.append(n.attr_str(n.parse_attrs(elem).get(n.NFTA_EXPR_NAME)) or "")
            return 0
        return errno.EOPNOTSUPP

    def _get(self, m: n.Message) -> list[bytes]:
        import errno

        kind = m.kind & 0xFF
        self.requests.append(kind)
        if kind in self.silent:
            return []
        if kind in self.refuse:
            return [ack(m.seq, self.refuse[kind], m.payload)]
        a = n.parse_attrs(m.payload[4:])
        if kind == n.NFT_MSG_GETTABLE:
            name = n.attr_str(a.get(n.NFTA_TABLE_NAME)) or ""
            t = self.tables.get(name)
            if t is None:
                return [ack(m.seq, errno.ENOENT, m.payload)]
            attrs = [n.string(n.NFTA_TABLE_NAME, name), n.be32(n.NFTA_TABLE_FLAGS, t.flags)]
            if t.flags & n.NFT_TABLE_F_OWNER:
                attrs.append(n.be32(n.NFTA_TABLE_OWNER, t.owner))
            return [reply(n.nft(n.NFT_MSG_NEWTABLE), m.seq, attrs) + ack(m.seq, 0, m.payload)]
        done = ERR_HDR.pack(20, n.NLMSG_DONE, n.NLM_F_MULTI, m.seq, 0) + b"\0\0\0\0"
        parts: list[bytes] = []
        for tname, t in self.tables.items():
            if kind == n.NFT_MSG_GETCHAIN:
                for cname, ctype in t.chains.items():
                    attrs = [n.string(n.NFTA_CHAIN_TABLE, tname), n.string(n.NFTA_CHAIN_NAME, cname)]
                    if ctype:
                        attrs.append(n.string(n.NFTA_CHAIN_TYPE, ctype))
                    parts.append(reply(n.nft(n.NFT_MSG_NEWCHAIN), m.seq, attrs, n.NLM_F_MULTI))
            elif kind == n.NFT_MSG_GETRULE:
                for expr in t.exprs:
                    elem = n.nested(n.NFTA_LIST_ELEM, n.string(n.NFTA_EXPR_NAME, expr))
                    parts.append(reply(n.nft(n.NFT_MSG_NEWRULE), m.seq, [
                        n.string(n.NFTA_RULE_TABLE, tname), n.nested(n.NFTA_RULE_EXPRESSIONS, elem)], n.NLM_F_MULTI))
        return [b"".join(parts) + done]
