"""The hold: the netlink client against a fake nf_tables on a real socketpair and against this host's
real nf_tables in a network namespace of its own; the pure target and check rows; the daemon's use."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fakehost import FakeHost
from fakenft import FakeNfTables, ack
from harness import Harness, cfg_for, events
from prereq import need
from structlog.testing import capture_logs

from ctwatchd import core, hold, nftnl
from ctwatchd.audit import get_logger
from ctwatchd.config import ConfigError, parse
from ctwatchd.model import HoldSpec, HoldView, ModuleState, ModuleStatus, Observation
from ctwatchd.nftnl import NetlinkError

FULL = HoldSpec(conntrack=True, nat=True)
MASQ = HoldSpec(conntrack=True, nat=True, masquerade=True)


@pytest.fixture
def nft() -> Iterator[FakeNfTables]:
    fake = FakeNfTables()
    yield fake
    fake.close()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the wire ---------------------------------------------------------------------------------------
def test_attributes_are_padded_to_four_bytes_and_strings_end_in_nul() -> None:
    """nla_len counts the payload without padding; the next attribute starts 4-aligned."""
    a = nftnl.string(1, "ab")
    assert a == struct.pack("=HH", 7, 1) + b"ab\0" + b"\0"
    assert nftnl.parse_attrs(a + nftnl.be32(2, 5)) == {1: b"ab\0", 2: b"\0\0\0\5"}


def test_a_nested_attribute_carries_the_nested_flag_and_reads_back_without_it() -> None:
    """NLA_F_NESTED is set on the wire (the kernel's strict parser wants it) and masked on reading."""
    a = nftnl.nested(4, nftnl.be32(1, 4))
    assert struct.unpack_from("=HH", a)[1] == 4 | nftnl.NLA_F_NESTED
    assert set(nftnl.parse_attrs(a)) == {4}


@pytest.mark.parametrize("data", [
    struct.pack("=IHHII", 40, 2, 0, 1, 0) + b"\0" * 4,  # says 40 bytes, has 20
    struct.pack("=IHHII", 8, 2, 0, 1, 0),  # shorter than its own header
    struct.pack("=IHHII", 20, 2, 0, 1, 0) + b"\0" * 4 + b"\1\2\3",  # trailing bytes that are no message
])
def test_a_truncated_or_malformed_reply_is_one_clear_error(data: bytes) -> None:
    """Never an IndexError or struct.error: a NetlinkError saying what is wrong."""
    with pytest.raises(NetlinkError, match=r"truncated|malformed|no message"):
        nftnl.parse_messages(data)


def test_a_truncated_attribute_is_one_clear_error() -> None:
    with pytest.raises(NetlinkError, match="attribute is truncated"):
        nftnl.parse_attrs(struct.pack("=HH", 12, 1) + b"ab")


def test_the_kernels_extended_ack_text_is_read() -> None:
    """With NETLINK_EXT_ACK the kernel appends a message after the capped header: it reaches the sentence."""
    msg = nftnl.parse_messages(ack(7, errno.EINVAL, b"\0" * 16, text="bad table flags"))[0]
    assert nftnl.parse_ack(msg) == nftnl.Ack(7, errno.EINVAL, "bad table flags")


def test_stale_replies_of_another_sequence_number_are_skipped(nft: FakeNfTables) -> None:
    """An answer to an earlier request that timed out arrives first: it is not taken for ours."""
    nft.stale_first = True
    h = hold.Hold(nft.connect)
    assert h.ensure(FULL).event == "hold.acquired"
    assert h.held == FULL


def test_a_silent_kernel_is_a_bounded_error_not_a_hang(nft: FakeNfTables) -> None:
    """No answer at all: the request gives up after the conversation's timeout with one sentence."""
    nft.silent.add(nftnl.NFT_MSG_GETTABLE)
    conv = nftnl.Conversation(nft.connect(), timeout=0.2)
    with pytest.raises(NetlinkError, match=r"did not answer within 0\.2 s"):
        hold.read_view(conv)


def test_garbage_instead_of_an_answer_is_an_error_and_leaves_nothing(nft: FakeNfTables) -> None:
    """Bytes that are no netlink message: not held, said why, the socket dropped."""
    nft.garbage = b"\xff" * 7 + b"\x01" * 20
    h = hold.Hold(nft.connect)
    change = h.ensure(FULL)
    assert change.event == "hold.unavailable" and not h.held
    assert "malformed" in (change.reason or "") or "truncated" in (change.reason or "")
    assert h.conv is None


# -- the hold against the fake --------------------------------------------------------------------
def test_the_hold_is_one_batch_table_chains_rules_then_read_back(nft: FakeNfTables) -> None:
    """One atomic batch (no half-made table possible), then the flags read back as firewalld does."""
    h = hold.Hold(nft.connect)
    assert h.ensure(FULL).event == "hold.acquired"
    assert nft.requests[:4] == [nftnl.NFT_MSG_NEWTABLE, nftnl.NFT_MSG_NEWCHAIN, nftnl.NFT_MSG_NEWRULE,
                                nftnl.NFT_MSG_NEWCHAIN]
    assert nftnl.NFT_MSG_GETTABLE in nft.requests[4:]
    t = nft.tables["ctwatchd"]
    assert t.flags == nftnl.NFT_TABLE_F_OWNER | nftnl.NFT_TABLE_F_DORMANT
    assert t.chains == {"hold_ct": None, "hold_nat": "nat"} and t.exprs == ["notrack"]


@pytest.mark.parametrize(("code", "name"), [(errno.EINVAL, "EINVAL"), (errno.EOPNOTSUPP, "EOPNOTSUPP")])
def test_a_kernel_without_owner_tables_is_told_once_and_not_asked_again(nft: FakeNfTables, code: int,
                                                                        name: str) -> None:
    """Linux < 5.12 refuses the unknown flag (EINVAL: 5.10's nf_tables_newtable; EOPNOTSUPP where the
    flag mask is checked so): repair-only, one sentence naming the version; asked again on reload."""
    nft.refuse[nftnl.NFT_MSG_NEWTABLE] = code
    h = hold.Hold(nft.connect)
    change = h.ensure(FULL)
    assert change.event == "hold.unavailable"
    assert f"({name})" in (change.reason or "")
    assert "Linux 5.12" in (change.reason or "")
    asked = len(nft.requests)
    assert h.ensure(FULL).event is None and len(nft.requests) == asked
    assert not nft.tables
    h.reset()
    h.ensure(FULL)
    assert len(nft.requests) > asked


def test_a_flag_the_kernel_dropped_means_the_table_is_deleted_again(nft: FakeNfTables) -> None:
    """A table that anyone could delete holds nothing for long: it is removed, and the hold says why."""
    nft.drop_flags = nftnl.NFT_TABLE_F_OWNER
    h = hold.Hold(nft.connect)
    change = h.ensure(FULL)
    assert change.event == "hold.unavailable" and "without the owner flag" in (change.reason or "")
    assert nftnl.NFT_MSG_DELTABLE in nft.requests
    assert "ctwatchd" not in nft.tables


@pytest.mark.parametrize(("code", "words"), [
    (errno.EPERM, "CAP_NET_ADMIN"),
    (errno.ENOENT, "nft_chain_nat"),
    (errno.EINVAL, "Invalid argument (EINVAL)"),
])
def test_a_refused_chain_names_the_part_and_leaves_no_table(nft: FakeNfTables, code: int, words: str) -> None:
    """The batch is all or nothing: a refused chain leaves no table, and the sentence names the chain."""
    nft.refuse[nftnl.NFT_MSG_NEWCHAIN] = code
    change = hold.Hold(nft.connect).ensure(FULL)
    assert change.event == "hold.unavailable"
    assert "chain hold_ct" in (change.reason or "") and words in (change.reason or "")
    assert not nft.tables


def test_a_table_of_that_name_owned_by_another_is_named(nft: FakeNfTables) -> None:
    """A second ctwatchd (or anyone) already owns the name: the sentence says so, not 'needs CAP_NET_ADMIN'."""
    from fakenft import Table

    nft.tables["ctwatchd"] = Table(nftnl.NFT_TABLE_F_OWNER | nftnl.NFT_TABLE_F_DORMANT, owner=999)
    change = hold.Hold(nft.connect).ensure(FULL)
    assert "already exists, owned by netlink port 999" in (change.reason or "")


def test_a_lost_table_is_said_and_re_created(nft: FakeNfTables) -> None:
    """Verified at every look: gone (whatever the cause) -> hold.lost, then made again."""
    h = hold.Hold(nft.connect)
    h.ensure(FULL)
    del nft.tables["ctwatchd"]
    change = h.ensure(FULL)
    assert change.event == "hold.lost" and "is gone; re-created" in (change.reason or "")
    assert nft.tables["ctwatchd"].chains == {"hold_ct": None, "hold_nat": "nat"}


def test_a_refusal_is_retried_only_after_a_while(nft: FakeNfTables) -> None:
    """EPERM is not 'this kernel cannot': tried again after RETRY_AFTER, never at every poll."""
    clock = Clock()
    nft.refuse[nftnl.NFT_MSG_NEWTABLE] = errno.EPERM
    h = hold.Hold(nft.connect, clock=clock)
    h.ensure(FULL)
    asked = len(nft.requests)
    clock.now += hold.RETRY_AFTER - 1
    h.ensure(FULL)
    assert len(nft.requests) == asked
    del nft.refuse[nftnl.NFT_MSG_NEWTABLE]
    clock.now += 2
    assert h.ensure(FULL).event == "hold.acquired"


def test_growing_the_hold_replaces_the_table_in_one_transaction(nft: FakeNfTables) -> None:
    """nft_masq loaded later: delete + create in one batch, so the references never drop to zero."""
    h = hold.Hold(nft.connect)
    h.ensure(FULL)
    before = len(nft.requests)
    assert h.ensure(MASQ).event == "hold.changed"
    batch = nft.requests[before:]  # the verify's GETs, then one batch: delete, then create
    i = batch.index(nftnl.NFT_MSG_DELTABLE)
    assert batch[i + 1] == nftnl.NFT_MSG_NEWTABLE
    assert nft.tables["ctwatchd"].exprs == ["notrack", "masq"]


def test_a_refused_growth_keeps_the_old_table(nft: FakeNfTables) -> None:
    """The replacement is refused (its rule, say): the old table still holds what it held."""
    h = hold.Hold(nft.connect)
    h.ensure(FULL)
    nft.refuse[nftnl.NFT_MSG_NEWRULE] = errno.EINVAL
    change = h.ensure(MASQ)
    assert change.event == "hold.unavailable" and change.held == FULL
    assert nft.tables["ctwatchd"].exprs == ["notrack"]
    assert h.held == FULL


def test_release_closes_the_socket_and_so_the_table_goes(nft: FakeNfTables) -> None:
    h = hold.Hold(nft.connect)
    h.ensure(FULL)
    assert h.release().event == "hold.released"
    assert nft.closed.wait(2) and "ctwatchd" not in nft.tables


def test_nothing_wanted_means_nothing_made(nft: FakeNfTables) -> None:
    """All built in, or [hold] enabled = false: no socket, no table."""
    h = hold.Hold(nft.connect)
    assert h.ensure(HoldSpec()).event is None
    assert nft.requests == []


def test_look_reads_the_table_its_chains_and_rules(nft: FakeNfTables) -> None:
    owner = hold.Hold(nft.connect)  # kept: its socket's end would delete the table
    owner.ensure(MASQ)
    view = hold.read_view(nftnl.Conversation(nft.connect()))
    assert view.exists and view.owner_flag and view.dormant and view.owner == FakeNfTables.PORT
    assert view.spec == MASQ


# -- the pure part ----------------------------------------------------------------------------------
def _obs(**states: ModuleState) -> Observation:
    return Observation("6.1.0", {m: ModuleStatus(m, s) for m, s in states.items()}, {}, 0)


L, A, B = ModuleState.LIVE, ModuleState.ABSENT, ModuleState.BUILTIN


@pytest.mark.parametrize(("states", "held", "masq", "cfg_kw", "want"), [
    ({"nf_conntrack": L, "nf_nat": L}, HoldSpec(), False, {}, FULL),
    ({"nf_conntrack": L, "nf_nat": L}, HoldSpec(), True, {}, MASQ),
    ({"nf_conntrack": L, "nf_nat": L}, HoldSpec(), True, {"hold_masquerade": False}, FULL),
    ({"nf_conntrack": L, "nf_nat": L}, FULL, False, {"hold": False}, HoldSpec()),
    ({"nf_conntrack": L, "nf_nat": A}, HoldSpec(), False, {}, HoldSpec(conntrack=True)),
    ({"nf_conntrack": A, "nf_nat": A}, FULL, False, {}, FULL),  # lost, not shrunk: re-made after the restore
    ({"nf_conntrack": B, "nf_nat": B}, HoldSpec(), True, {}, HoldSpec()),  # built in: nothing to hold
    ({"nf_conntrack": L, "nf_nat": L}, HoldSpec(), True, {"modules": ("nf_conntrack",)}, HoldSpec(conntrack=True)),
])
def test_hold_target(states: dict[str, ModuleState], held: HoldSpec, masq: bool, cfg_kw: dict[str, Any],
                     want: HoldSpec) -> None:
    """Watched, loaded from disk or held already; nft_masq only with a nat chain and only when loaded."""
    cfg = replace(parse({}), **cfg_kw)
    assert core.hold_target(cfg, _obs(**states), held, masq_loaded=masq) == want


def test_check_rows_say_held_not_held_and_why_or_cannot() -> None:
    cfg = parse({})
    obs = _obs(nf_conntrack=L, nf_nat=L, br_netfilter=L)
    view = HoldView(True, True, True, 1, ("nat",), ("notrack",))
    rows = core.hold_rows(cfg, obs, ("nf_conntrack", "nf_nat", "br_netfilter"), view)
    assert rows["nf_conntrack"] == rows["nf_nat"] == "held by ctwatchd (nft table ip ctwatchd)"
    assert rows["br_netfilter"].startswith("cannot be held")
    rows = core.hold_rows(cfg, obs, ("nf_nat",), HoldView(True, False, True, None, ("nat",), ()))
    assert rows["nf_nat"] == "not held: table ip ctwatchd does not hold it"  # no owner flag: anyone deletes it
    rows = core.hold_rows(cfg, obs, ("nf_nat",), HoldView(False, error="EPERM"))
    assert rows["nf_nat"] == "not held: unknown (EPERM)"
    off = parse({"hold": {"enabled": False}})
    assert core.hold_rows(off, obs, ("nf_nat",), HoldView(False))["nf_nat"] == "not held: [hold] enabled = false"
    assert core.hold_rows(cfg, _obs(nf_nat=B), ("nf_nat",), None)["nf_nat"] == "built in: cannot be unloaded"
    old = Observation("5.10.0-32-amd64", {"nf_nat": ModuleStatus("nf_nat", L)}, {}, 0)
    assert core.hold_rows(cfg, old, ("nf_nat",), HoldView(False))["nf_nat"] == (
        "not held: Linux 5.10.0-32-amd64 has no nftables owner tables (5.12 and newer do); "
        "an unload is repaired instead")
    held_anyway = HoldView(True, True, True, 1, ("nat",), ())  # a backport: the kernel's answer wins
    assert core.hold_rows(cfg, old, ("nf_nat",), held_anyway)["nf_nat"].startswith("held by ctwatchd")


@pytest.mark.parametrize(("table", "message"), [
    ({"enabled": "yes"}, r"\[hold\] enabled must be true or false"),
    ({"masquerade": 1}, r"\[hold\] masquerade must be true or false"),
    ({"tables": []}, r"\[hold\] has unknown key\(s\): tables"),
])
def test_hold_config_is_checked(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse({"hold": table})


def test_hold_config_defaults_on() -> None:
    cfg = parse({})
    assert cfg.hold and cfg.hold_masquerade
    assert not parse({"hold": {"enabled": False}}).hold


# -- the daemon -------------------------------------------------------------------------------------
def test_the_daemon_holds_before_ready_says_so_and_releases_on_stop(host: FakeHost, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    nft: FakeNfTables) -> None:
    """READY=1 comes with the table made and STATUS naming what is held; SIGTERM closes the socket."""
    h = Harness(host, tmp_path, monkeypatch)
    at_ready: list[bool] = []

    def driver() -> None:
        h.wait_notify("READY=1")
        at_ready.append("ctwatchd" in nft.tables)

    d = h.daemon(cfg_for(host))
    d.hold = hold.Hold(nft.connect)
    code, logs = h.run(d, driver)
    assert code == 0 and at_ready == [True]
    ready = next(m for m in h.messages if "READY=1" in m)
    assert "held: nf_conntrack nf_nat nft_chain_nat nft_ct" in ready
    acquired = events(logs, "hold.acquired")
    assert len(acquired) == 1 and acquired[0]["table"] == "ip ctwatchd"
    names = [e["event"] for e in logs]
    assert names.index("hold.acquired") < names.index("daemon.ready")
    assert names.index("hold.released") < names.index("daemon.stopping")
    assert nft.closed.wait(2) and not nft.tables


def test_a_kernel_that_cannot_hold_is_said_once_and_the_repair_goes_on(host: FakeHost, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       nft: FakeNfTables) -> None:
    """Repair-only: one hold.unavailable record however many looks, STATUS says why, restores work."""
    nft.refuse[nftnl.NFT_MSG_NEWTABLE] = errno.EOPNOTSUPP
    h = Harness(host, tmp_path, monkeypatch)

    def driver() -> None:
        h.wait_notify("READY=1")
        for _ in range(3):
            host.unload("nf_nat")
            h.monitor.send("remove nf_nat")
            h.wait_for(lambda: host.is_live("nf_nat"))

    d = h.daemon(cfg_for(host))
    d.hold = hold.Hold(nft.connect)
    _, logs = h.run(d, driver)
    assert len(events(logs, "hold.unavailable")) == 1
    assert "EOPNOTSUPP" in events(logs, "hold.unavailable")[0]["reason"]
    assert any("not held: creating table ip ctwatchd" in m for m in h.messages if "READY=1" in m)
    assert host.modprobe_calls().count("nf_nat") == 4


def test_a_hold_that_raises_the_unforeseen_never_stops_the_daemon(host: FakeHost, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug below the hold's seam is an internal error record, and the daemon keeps repairing."""
    class Broken(hold.Hold):
        def ensure(self, want: HoldSpec) -> hold.HoldChange:
            raise RuntimeError("boom")

    h = Harness(host, tmp_path, monkeypatch)

    def driver() -> None:
        h.wait_notify("READY=1")
        host.unload("br_netfilter")
        h.monitor.send("remove br_netfilter")
        h.wait_for(lambda: host.is_live("br_netfilter"))

    d = h.daemon(cfg_for(host))
    d.hold = Broken()
    code, logs = h.run(d, driver)
    assert code == 0
    assert any(e.get("location") == "hold" for e in events(logs, "daemon.internal_error"))


# -- this host's real nf_tables, in a network namespace of its own -------------------------------------
REAL = textwrap.dedent("""
    import errno, os, sys, time
    from ctwatchd import hold, nftnl
    from ctwatchd.model import HoldSpec
    step = sys.argv[1]
    if step == "hold":
        h = hold.Hold()
        print(h.ensure(HoldSpec(True, True, True)).event, flush=True)
        time.sleep(60)
    other = nftnl.Conversation(nftnl.open_socket())
    view = hold.read_view(other)
    print("view", view.exists, view.owner_flag, view.dormant, view.owner, sorted(view.spec.modules))
    acks = other.batch([hold._delete_part()])
    print("delete", errno.errorcode.get(acks[0].error, acks[0].error))
    print("second", hold.Hold().ensure(HoldSpec(True, True)).reason)
""")


def _real_kernel() -> None:
    need(os.geteuid() == 0, "creating network namespaces needs root")
    probe = subprocess.run(["unshare", "-n", sys.executable, "-c", "from ctwatchd import nftnl; nftnl.open_socket()"],
                           check=False, capture_output=True, text=True)
    need(probe.returncode == 0, f"no nf_tables in a new network namespace here: {probe.stderr.strip()[-200:]}")


def test_real_kernel_owner_table_refuses_others_and_goes_with_its_owner(tmp_path: Path) -> None:
    """On this host's kernel: the hold is made with owner and dormant read back, another socket gets
    EPERM deleting it and cannot make a second one, and SIGKILL of the owner deletes the table."""
    _real_kernel()
    script = tmp_path / "real.py"
    script.write_text(REAL)
    # One namespace for the owner and the others: `unshare -n` runs a shell that starts both.
    owner_cmd = (f"{sys.executable} {script} hold & pid=$!; sleep 0.1; "
                 f"while ! [ -s {tmp_path}/started ]; do sleep 0.05; done; "
                 f"{sys.executable} {script} other; kill -KILL $pid; wait $pid; sleep 0.2; "
                 f"{sys.executable} -c 'from ctwatchd import hold; print(\"after\", hold.look().exists)'")
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", owner_cmd.replace(
        f"{script} hold &", f"{script} hold > {tmp_path}/started &")], stdout=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert (tmp_path / "started").read_text().strip() == "hold.acquired"
    lines = out.splitlines()
    view = next(x for x in lines if x.startswith("view"))
    assert view.startswith("view True True True ")
    assert view.endswith("['nf_conntrack', 'nf_nat', 'nft_chain_nat', 'nft_ct', 'nft_masq']")
    assert "delete EPERM" in lines
    second = next(x for x in lines if x.startswith("second"))
    assert "already exists, owned by netlink port" in second
    assert "after False" in lines


def test_real_kernel_release_deletes_the_table(tmp_path: Path) -> None:
    """release() (the daemon's stop) closes the socket, and the kernel deletes the table at once."""
    _real_kernel()
    code = ("from ctwatchd import hold; from ctwatchd.model import HoldSpec; h = hold.Hold(); "
            "print(h.ensure(HoldSpec(True, True)).event, hold.look().exists); h.release(); "
            "print(hold.look().exists)")
    out = subprocess.run(["unshare", "-n", sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["hold.acquired", "True", "False"], out.stderr


def test_real_kernel_check_reads_the_hold_of_the_running_host(tmp_path: Path) -> None:
    """`ctwatchd check --json` beside a process holding: nf_conntrack and nf_nat held, br_netfilter cannot be."""
    _real_kernel()
    script = tmp_path / "real.py"
    script.write_text(REAL)
    conf = tmp_path / "c.toml"
    conf.write_text(f'[daemon]\nstate_file = "{tmp_path}/state.json"\n')
    conf.chmod(0o600)
    cmd = (f"{sys.executable} {script} hold > {tmp_path}/started & pid=$!; "
           f"while ! [ -s {tmp_path}/started ]; do sleep 0.05; done; "
           f"{sys.executable} -m ctwatchd check --json --config {conf}; kill -KILL $pid")
    out = subprocess.run(["unshare", "-n", "sh", "-c", cmd], check=False, capture_output=True, text=True,
                         timeout=60)
    import json

    report = json.loads(out.stdout)
    holds = {m["name"]: m["hold"] for m in report["modules"]}
    on_this_host = {m["name"]: m["state"] for m in report["modules"]}
    assert report["hold"]["exists"] and report["hold"]["owner_flag"] and report["hold"]["dormant"]
    assert "nf_nat" in report["hold"]["held"] and "nft_masq" in report["hold"]["held"]
    for name in ("nf_conntrack", "nf_nat"):  # this host builds them in; a modular one shows them held
        want = "built in: cannot be unloaded" if on_this_host[name] == "built-in" else \
            "held by ctwatchd (nft table ip ctwatchd)"
        assert holds[name] == want


def test_metrics_say_which_modules_are_held(tmp_path: Path) -> None:
    """ctwatchd_module_held{module} is 1 for each held module and back to 0 once released."""
    from ctwatchd.metrics import Metrics
    from ctwatchd.notify import Notifier
    from ctwatchd.report import Reporter

    metrics = Metrics(tmp_path / "m.prom")
    reporter = Reporter(get_logger(), Notifier(), metrics)
    with capture_logs():
        reporter.hold(hold.HoldChange("hold.acquired", FULL))
    metrics.write()
    text = (tmp_path / "m.prom").read_text()
    assert 'ctwatchd_module_held{module="nf_nat"} 1.0' in text
    assert 'ctwatchd_module_held{module="nft_masq"} 0.0' in text
    with capture_logs() as logs:
        reporter.hold(hold.HoldChange("hold.released", HoldSpec(), "released"))
        reporter.hold(hold.HoldChange("hold.released", HoldSpec(), "released"))
    metrics.write()
    assert 'ctwatchd_module_held{module="nf_nat"} 0.0' in (tmp_path / "m.prom").read_text()
    assert [e["event"] for e in logs] == ["hold.released"]  # said once


# -- refused unloads, told --------------------------------------------------------------------------
def test_audit_refusals_are_the_failed_delete_module_calls_only() -> None:
    """success=no is a refusal (a held module 'in use'); a removal that worked is not one, and vice versa."""
    from test_attribution import audit_records

    from ctwatchd.attribution import audit_removals

    now = 1_800_000_000.0
    entries = [*audit_records("1", "nf_nat", now, success="no"), *audit_records("2", "br_netfilter", now)]
    assert [m for _, m, _ in audit_removals(entries, refused=True)] == ["nf_nat"]
    assert [m for _, m, _ in audit_removals(entries)] == ["br_netfilter"]


def test_a_refused_unload_of_a_held_module_is_told_once_naming_who_tried(host: FakeHost, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         nft: FakeNfTables) -> None:
    """With the audit rule's records in the journal: one module.refused record per refused delete_module
    of a held module, with the remover's fields, however many times the journal is asked; a refusal of
    a module the hold does not hold, or one from before the hold, is not told."""
    import json
    import time

    from test_attribution import audit_records

    h = Harness(host, tmp_path, monkeypatch)
    journal = host.root / "journal.json"

    def driver() -> None:
        h.wait_notify("READY=1")
        now = time.time() + 0.5
        entries = [*audit_records("7", "nf_nat", now, success="no", pid=777),
                   *audit_records("8", "br_netfilter", now, success="no", pid=778),
                   *audit_records("9", "nf_conntrack", now - 3600, success="no", pid=779)]
        journal.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
        h.wait_for(lambda: (host.root / "journalctl.log").exists()
                   and len((host.root / "journalctl.log").read_text().splitlines()) >= 4)

    d = h.daemon(cfg_for(host))
    d.hold = hold.Hold(nft.connect)
    d.refusals_every = 0.2
    code, logs = h.run(d, driver)
    refused = events(logs, "module.refused")
    assert code == 0 and len(refused) == 1, refused
    assert refused[0]["module"] == "nf_nat" and refused[0]["removed_by_pid"] == 777
    assert refused[0]["attribution"] == "audit" and "rmmod[777]" in refused[0]["culprit"]


def test_without_a_hold_the_journal_is_not_asked_for_refusals(host: FakeHost, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing held (no hold, or a kernel that cannot): no journalctl every period for nothing."""
    h = Harness(host, tmp_path, monkeypatch)
    d = h.daemon(cfg_for(host))
    d.refusals_every = 0.05

    def driver() -> None:
        h.wait_notify("READY=1")
        import time

        time.sleep(0.5)

    h.run(d, driver)
    assert not (host.root / "journalctl.log").exists()


# -- real kernel bytes, recorded ----------------------------------------------------------------------
RECORDED = json.loads((Path(__file__).parent / "data/nft_replies.json").read_text())
# tests/unit/data/nft_replies.json: what a real nf_tables (RECORDED["kernel"]) answered to Hold.ensure
# (masquerade included), to another process deleting the table, and to a GET of a missing table.


class Replay:
    """A socket answering with the recorded datagrams, in the kernel's order, their sequence numbers
    rewritten: the n-th distinct recorded seq becomes the n-th seq the client asked an answer for.
    A datagram is released once the request it answers has been sent."""

    def __init__(self, datagrams: list[str]) -> None:
        self.recorded = [bytes.fromhex(d) for d in datagrams]
        self.order: list[int] = []  # recorded seqs, by first appearance
        for d in self.recorded:
            for m in nftnl.parse_messages(d):
                if m.seq not in self.order:
                    self.order.append(m.seq)
        self.asked: list[int] = []
        self.pending: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.asked += [m.seq for m in nftnl.parse_messages(data)
                       if m.kind not in (nftnl.NFNL_MSG_BATCH_BEGIN, nftnl.NFNL_MSG_BATCH_END)]
        while self.recorded:
            first = nftnl.parse_messages(self.recorded[0])[0].seq
            if self.order.index(first) >= len(self.asked):
                break
            out = bytearray(self.recorded.pop(0))
            offset = 0
            while offset < len(out):
                length, _, _, seq, _ = struct.unpack_from("=IHHII", out, offset)
                struct.pack_into("=I", out, offset + 8, self.asked[self.order.index(seq)])
                offset += (length + 3) & ~3
            self.pending.append(bytes(out))
        return len(data)

    def recv(self, size: int) -> bytes:
        if not self.pending:
            raise TimeoutError
        return self.pending.pop(0)

    def settimeout(self, value: float | None) -> None:
        pass

    def close(self) -> None:
        pass


def test_recorded_kernel_replies_make_a_hold_with_its_flags_read_back() -> None:
    """The real kernel's acks, table, chain and rule dumps, fed back in order: acquired, holding the
    five modules, with the owner and dormant flags and the owner's port as the kernel reported them."""
    replay = Replay(RECORDED["replies"]["create_and_read_back"])
    h = hold.Hold(lambda: replay)
    change = h.ensure(MASQ)
    assert change.event == "hold.acquired", change
    assert change.held.modules == ("nf_conntrack", "nf_nat", "nft_chain_nat", "nft_ct", "nft_masq")


def test_recorded_kernel_refusals_are_read_as_their_errno() -> None:
    """Another process deleting the owner table: EPERM; a GET of a table that is not there: ENOENT."""
    [eperm] = nftnl.parse_messages(bytes.fromhex(RECORDED["replies"]["delete_by_another_eperm"][0]))
    assert nftnl.parse_ack(eperm).error == errno.EPERM
    [enoent] = nftnl.parse_messages(bytes.fromhex(RECORDED["replies"]["gettable_missing_enoent"][0]))
    assert nftnl.parse_ack(enoent).error == errno.ENOENT
    assert RECORDED["replies"]["gettable_missing_enoent_error"].startswith("No such file or directory (ENOENT)")


def test_recorded_table_reply_carries_owner_and_dormant() -> None:
    """Decoding the kernel's own NEWTABLE message: both flags and the owner attribute."""
    msgs = [m for d in RECORDED["replies"]["create_and_read_back"] for m in nftnl.parse_messages(bytes.fromhex(d))]
    table = next(m for m in msgs if m.kind == nftnl.nft(nftnl.NFT_MSG_NEWTABLE))
    attrs = nftnl.parse_attrs(table.payload[4:])
    assert nftnl.attr_str(attrs[nftnl.NFTA_TABLE_NAME]) == "ctwatchd"
    assert nftnl.attr_u32(attrs[nftnl.NFTA_TABLE_FLAGS]) == nftnl.NFT_TABLE_F_OWNER | nftnl.NFT_TABLE_F_DORMANT
    assert nftnl.attr_u32(attrs.get(nftnl.NFTA_TABLE_OWNER)) is not None
