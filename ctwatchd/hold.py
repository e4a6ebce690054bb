"""The hold: an nftables table owned by the daemon keeps nf_conntrack and nf_nat loaded.

nf_tables takes a module reference for each base chain's type and each rule expression, held while
the object exists, and delete_module(2) refuses a module in use. So a dormant `type nat` chain holds
nft_chain_nat -> nf_nat -> nf_conntrack, a `notrack` rule holds nft_ct -> nf_conntrack, a
`masquerade` rule nft_masq. `flags owner` (Linux 5.12) makes the table the daemon socket's own:
others get EPERM changing or deleting it, `nft flush ruleset` skips it, and the kernel deletes it
when the socket closes, also on SIGKILL. `flags dormant`: no chain is hooked, no packet sees it.

br_netfilter cannot be held this way (nothing in nftables or iptables takes a reference on it).
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass

from ctwatchd import nftnl
from ctwatchd.model import HOLD_TABLE, HoldSpec, HoldView, clean
from ctwatchd.nftnl import NetlinkError, NetlinkSocket

TABLE = "ctwatchd"
FAMILY = nftnl.NFPROTO_IPV4
NAT_CHAIN = "hold_nat"
CT_CHAIN = "hold_ct"
COMMENT = "ctwatchd's hold: keeps nf_conntrack and nf_nat loaded, hooks nothing; stop ctwatchd to release it"
# Errors that say "this kernel cannot": asking again before a reload would only repeat them.
PERMANENT = {errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT, errno.EINVAL}
RETRY_AFTER = 30.0  # seconds before a hold that failed otherwise (EEXIST, EPERM, ENOENT) is tried again


def _create_parts(spec: HoldSpec) -> list[tuple[int, int, int, list[bytes]]]:
    a = nftnl
    create = a.NLM_F_CREATE | a.NLM_F_EXCL
    parts = [(a.nft(a.NFT_MSG_NEWTABLE), create, FAMILY, [
        a.string(a.NFTA_TABLE_NAME, TABLE),
        a.be32(a.NFTA_TABLE_FLAGS, a.NFT_TABLE_F_OWNER | a.NFT_TABLE_F_DORMANT),
        a.attr(a.NFTA_TABLE_USERDATA, a.table_comment(COMMENT)),
    ])]
    if spec.conntrack:
        parts.append((a.nft(a.NFT_MSG_NEWCHAIN), create, FAMILY,
                      [a.string(a.NFTA_CHAIN_TABLE, TABLE), a.string(a.NFTA_CHAIN_NAME, CT_CHAIN)]))
        parts.append(_rule(CT_CHAIN, "notrack"))
    if spec.nat:
        parts.append((a.nft(a.NFT_MSG_NEWCHAIN), create, FAMILY, [
            a.string(a.NFTA_CHAIN_TABLE, TABLE), a.string(a.NFTA_CHAIN_NAME, NAT_CHAIN),
            a.nested(a.NFTA_CHAIN_HOOK, a.be32(a.NFTA_HOOK_HOOKNUM, a.NF_INET_POST_ROUTING),
                     a.be32(a.NFTA_HOOK_PRIORITY, a.NF_IP_PRI_NAT_SRC)),
            a.string(a.NFTA_CHAIN_TYPE, "nat"),
        ]))
        if spec.masquerade:
            parts.append(_rule(NAT_CHAIN, "masq"))
    return parts


def _rule(chain: str, expr: str) -> tuple[int, int, int, list[bytes]]:
    a = nftnl
    return (a.nft(a.NFT_MSG_NEWRULE), a.NLM_F_CREATE | a.NLM_F_APPEND, FAMILY, [
        a.string(a.NFTA_RULE_TABLE, TABLE), a.string(a.NFTA_RULE_CHAIN, chain),
        a.nested(a.NFTA_RULE_EXPRESSIONS, a.nested(a.NFTA_LIST_ELEM, a.string(a.NFTA_EXPR_NAME, expr))),
    ])


def _what(spec: HoldSpec) -> list[str]:
    """What each part of _create_parts(spec) is, for an error sentence."""
    out = [f"table {HOLD_TABLE} (flags owner, dormant)"]
    if spec.conntrack:
        out += [f"chain {CT_CHAIN}", f"the notrack rule in {CT_CHAIN} (nft_ct)"]
    if spec.nat:
        out.append(f"chain {NAT_CHAIN} (type nat hook postrouting: nft_chain_nat, nf_nat)")
        if spec.masquerade:
            out.append(f"the masquerade rule in {NAT_CHAIN} (nft_masq)")
    return out


def _delete_part() -> tuple[int, int, int, list[bytes]]:
    return (nftnl.nft(nftnl.NFT_MSG_DELTABLE), 0, FAMILY, [nftnl.string(nftnl.NFTA_TABLE_NAME, TABLE)])


def _batch_error(acks: dict[int, nftnl.Ack], what: list[str]) -> NetlinkError | None:
    """The first refused part, as one sentence; None when every part was acknowledged."""
    for i, name in enumerate(what):
        ack = acks.get(i)
        if ack is None:
            return NetlinkError(f"creating {name}: the kernel gave no answer")
        if ack.error:
            hint = _HINTS.get(ack.error, "")
            if i == 0 and ack.error == errno.EINVAL:  # how kernels before 5.12 refuse an unknown table flag
                hint = ("; kernels older than 5.12 refuse the owner flag this way (owner tables need Linux 5.12 "
                        "or newer)")
            text = f" ({clean(ack.text, 120)})" if ack.text else ""
            return NetlinkError(f"creating {name} failed: {nftnl.strerror(ack.error)}{text}{hint}", ack.error)
    return None


_HINTS = {
    errno.EOPNOTSUPP: "; owner tables need Linux 5.12 or newer",
    errno.EEXIST: f"; another process made a table {HOLD_TABLE} (another ctwatchd?); "
                  f"`nft list table {HOLD_TABLE}` shows it",
    errno.EPERM: "; ctwatchd needs CAP_NET_ADMIN in the host's network namespace",
    errno.ENOENT: "; a module nf_tables needs for it (nft_chain_nat, nft_ct, nft_masq) is not available",
}


def read_view(conv: nftnl.Conversation) -> HoldView:
    """The hold's table, chains and rules as the kernel reports them; exists=False when there is none."""
    a = nftnl
    try:
        replies = conv.request(a.nft(a.NFT_MSG_GETTABLE), FAMILY, [a.string(a.NFTA_TABLE_NAME, TABLE)])
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:
            return HoldView(False)
        raise
    table = next((m for m in replies if m.kind == a.nft(a.NFT_MSG_NEWTABLE)), None)
    if table is None:
        return HoldView(False)
    attrs = a.parse_attrs(table.payload[4:])
    flags = a.attr_u32(attrs.get(a.NFTA_TABLE_FLAGS)) or 0
    chains: list[str] = []
    for msg in conv.request(a.nft(a.NFT_MSG_GETCHAIN), FAMILY, [a.string(a.NFTA_CHAIN_TABLE, TABLE)], dump=True):
        c = a.parse_attrs(msg.payload[4:])
        if a.attr_str(c.get(a.NFTA_CHAIN_TABLE)) == TABLE and (kind := a.attr_str(c.get(a.NFTA_CHAIN_TYPE))):
            chains.append(kind)
    exprs: list[str] = []
    for msg in conv.request(a.nft(a.NFT_MSG_GETRULE), FAMILY, [a.string(a.NFTA_RULE_TABLE, TABLE)], dump=True):
        r = a.parse_attrs(msg.payload[4:])
        if a.attr_str(r.get(a.NFTA_RULE_TABLE)) != TABLE:
            continue
        for _, elem in a.iter_attrs(r.get(a.NFTA_RULE_EXPRESSIONS, b"")):
            if name := a.attr_str(a.parse_attrs(elem).get(a.NFTA_EXPR_NAME)):
                exprs.append(name)
    return HoldView(True, bool(flags & a.NFT_TABLE_F_OWNER), bool(flags & a.NFT_TABLE_F_DORMANT),
                    a.attr_u32(attrs.get(a.NFTA_TABLE_OWNER)), tuple(chains), tuple(exprs))


def look(connect: Callable[[], NetlinkSocket] = nftnl.open_socket) -> HoldView:
    """`check`'s view of the hold, from a socket of its own; an error is a HoldView, never raised."""
    try:
        sock = connect()
    except NetlinkError as exc:
        return HoldView(False, error=str(exc))
    try:
        return read_view(nftnl.Conversation(sock))
    except NetlinkError as exc:
        return HoldView(False, error=f"the hold cannot be read: {exc}")
    finally:
        sock.close()


@dataclass(frozen=True)
class HoldChange:
    """What ensure() did, for the journal: `event` is None when nothing changed."""

    event: str | None  # "hold.acquired" | "hold.changed" | "hold.lost" | "hold.unavailable" | "hold.released"
    held: HoldSpec
    reason: str | None = None  # why it is not (or no longer) held, one sentence


class Hold:
    """The daemon's hold: one socket kept for the daemon's life, its table checked at every look."""

    def __init__(self, connect: Callable[[], NetlinkSocket] = nftnl.open_socket,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.connect = connect
        self.clock = clock
        self.conv: nftnl.Conversation | None = None
        self.held = HoldSpec()
        self.reason: str | None = None  # why `refused` was not made
        self.refused: HoldSpec | None = None  # the last spec the kernel refused, not asked again until…
        self.permanent = False  # …a reload, when the kernel cannot (EOPNOTSUPP); else until retry_at
        self.retry_at = 0.0

    def ensure(self, want: HoldSpec) -> HoldChange:
        """Make the table hold `want`: verify what is held, re-create what was lost, grow or shrink it."""
        if not want:  # nothing to hold now; a refusal already said stays the reason until it changes
            return self.release() if self.held else HoldChange(None, self.held, self.reason)
        lost = self._verify() if self.held else None
        if self.held and want == self.held:
            return HoldChange(None, self.held)
        if want == self.refused and (self.permanent or self.clock() < self.retry_at):
            if lost is not None:
                return HoldChange("hold.lost", self.held, f"{lost}; not re-created: {self.reason}")
            return HoldChange(None, self.held, None if self.held else self.reason)
        before = self.held
        try:
            self._make(want, replace=bool(before))
        except NetlinkError as exc:
            self.reason, self.refused = str(exc), want
            self.permanent = exc.code in PERMANENT
            self.retry_at = self.clock() + RETRY_AFTER
            if lost is not None:
                return HoldChange("hold.lost", self.held, f"{lost}; re-creating it failed: {self.reason}")
            return HoldChange("hold.unavailable", self.held, self.reason)  # a failed replace keeps the old table
        self.reason, self.refused, self.permanent = None, None, False
        if lost is not None:
            return HoldChange("hold.lost", self.held, f"{lost}; re-created")
        return HoldChange("hold.changed" if before else "hold.acquired", self.held)

    def reset(self) -> None:
        """A configuration reload: a kernel that could not hold is asked again."""
        self.refused, self.reason, self.permanent, self.retry_at = None, None, False, 0.0

    def release(self) -> HoldChange:
        """Close the socket: the kernel deletes the table and the modules unload normally again."""
        was = self.held
        self._close()
        return HoldChange("hold.released" if was else None, HoldSpec(), "released")

    # -- inside -----------------------------------------------------------------------------
    def _verify(self) -> str | None:
        """None when the table is there, ours and whole; else why the hold is lost."""
        if self.conv is None:
            return "the hold's socket is closed"
        try:
            view = read_view(self.conv)
        except NetlinkError as exc:
            self._close()
            return f"the hold's socket failed: {exc}"
        if not view.exists:
            self._close()
            return f"table {HOLD_TABLE} is gone"
        if view.spec != self.held:
            self._close()  # cannot happen while we own it; the next create starts clean
            return f"table {HOLD_TABLE} holds {' '.join(view.spec.modules) or 'nothing'}, not what ctwatchd made"
        return None

    def _make(self, spec: HoldSpec, *, replace: bool) -> None:
        if self.conv is None:
            self.conv = nftnl.Conversation(self.connect(), clock=self.clock)
        conv = self.conv
        parts, what = _create_parts(spec), _what(spec)
        if replace:  # one transaction: the new objects take their references before the old drop theirs
            parts, what = [_delete_part(), *parts], [f"the old table {HOLD_TABLE}", *what]
        try:
            error = _batch_error(conv.batch(parts), what)
        except NetlinkError:
            self._close()
            raise
        if error is not None:
            if error.code in (errno.EPERM, errno.EEXIST) and not replace:
                error = self._taken(error)
            if not replace:
                self._close()
            raise error
        # Read the flags back, as firewalld does: a kernel may take the table and drop a flag.
        try:
            view = read_view(conv)
        except NetlinkError as exc:
            self._discard()
            raise NetlinkError(f"table {HOLD_TABLE} made, but it cannot be read back: {exc}", exc.code) from None
        if not (view.owner_flag and view.dormant) or view.spec != spec:
            self._discard()
            missing = ("the owner flag" if not view.owner_flag else "the dormant flag" if not view.dormant
                       else "all its rules")
            raise NetlinkError(f"the kernel made table {HOLD_TABLE} without {missing}; removed it again",
                               errno.EOPNOTSUPP)
        self.held = spec

    def _taken(self, error: NetlinkError) -> NetlinkError:
        """EPERM or EEXIST on creating the table: say whose table is in the way, when there is one."""
        if self.conv is None:
            return error
        try:
            view = read_view(self.conv)
        except NetlinkError:
            return error
        if not view.exists:
            return error
        whose = (f"owned by netlink port {view.owner} (another ctwatchd?)" if view.owner_flag
                 else "made by another process without the owner flag")
        return NetlinkError(f"table {HOLD_TABLE} already exists, {whose}; `nft list table {HOLD_TABLE}` shows it",
                            error.code)

    def _discard(self) -> None:
        """Never leave a half-made table: delete what we made, then drop the socket."""
        if self.conv is not None:
            with contextlib.suppress(NetlinkError):  # closing the socket deletes an owner table anyway
                self.conv.batch([_delete_part()])
        self._close()

    def _close(self) -> None:
        if self.conv is not None:
            self.conv.sock.close()
            self.conv = None
        self.held = HoldSpec()
