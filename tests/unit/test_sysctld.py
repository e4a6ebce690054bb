"""sysctl.d files that fight the desired values: named with file:line, logged once, won after udev is done.

The fight itself is played by a thread standing in for the udev rule of sysctl.d(5): each time
br_netfilter is loaded anew it writes the file's value back a moment later, as systemd-sysctl does.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from fakehost import FakeHost
from harness import FakeMonitor, Harness, cfg_for, events

from ctwatchd.model import Setting
from ctwatchd.sysctld import conflicts, effective, normalize_key, parse, read_settings, sysctl_files

BRIDGE = "net.bridge.bridge-nf-call-iptables"
DESIRED = ((BRIDGE, "1"), ("net.bridge.bridge-nf-call-ip6tables", "1"))


def test_parse_reads_keys_values_and_lines() -> None:
    """'#' and ';' comments, blank lines, '-' (ignore errors), '/' separators: key, value and file:line."""
    text = ("# comment\n; other\n\nnet.bridge.bridge-nf-call-iptables = 0\n-net/ipv4/ip_forward=1\n"
            "  kernel.x  =  a b \n")
    assert list(parse(text, "/etc/sysctl.d/x.conf")) == [
        Setting(BRIDGE, "0", "/etc/sysctl.d/x.conf:4"),
        Setting("net.ipv4.ip_forward", "1", "/etc/sysctl.d/x.conf:5"),
        Setting("kernel.x", "a b", "/etc/sysctl.d/x.conf:6"),
    ]


def test_normalize_key_takes_the_first_separator() -> None:
    """As systemd-sysctl: the first of '/' and '.' is the separator; the other is part of a name."""
    assert normalize_key("net/ipv4/conf/eth0.100/rp_filter") == "net.ipv4.conf.eth0/100.rp_filter"
    assert normalize_key("net.ipv4.conf.eth0/100.rp_filter") == "net.ipv4.conf.eth0/100.rp_filter"
    assert normalize_key("/net/bridge/x") == "net.bridge.x"


def test_the_last_assignment_wins() -> None:
    """A later file (and a later line) overrides an earlier one."""
    eff = effective([("/usr/lib/sysctl.d/50-default.conf", f"{BRIDGE} = 0\n"),
                     ("/etc/sysctl.d/99-ok.conf", f"{BRIDGE}=1\n")])
    assert eff[BRIDGE].source == "/etc/sysctl.d/99-ok.conf:1" and conflicts(DESIRED, eff) == []


def test_conflicts_exact_and_glob() -> None:
    """A contrary value is a conflict whether named exactly or by a glob; an equal one is not."""
    eff = effective([("/etc/sysctl.d/a.conf", "net.bridge.* = 0\nnet.bridge.bridge-nf-call-ip6tables = 1\n")])
    found = conflicts(DESIRED, eff)
    assert [(c.key, c.setting.source) for c in found] == [(BRIDGE, "/etc/sysctl.d/a.conf:1")]
    assert str(found[0]) == "/etc/sysctl.d/a.conf:1 sets net.bridge.bridge-nf-call-iptables = 0, ctwatchd wants 1"


@pytest.mark.parametrize(("first", "then", "conflict"), [
    ("net.bridge.* = 0", f"{BRIDGE} = 1", None),  # the exact key comes later: it wins
    (f"{BRIDGE} = 1", "net.bridge.* = 0", "/etc/sysctl.d/b.conf:1"),  # the glob comes later: it wins
    ("net.bridge.* = 1", "net.*.bridge-nf-call-iptables = 0", "/etc/sysctl.d/b.conf:1"),  # the later glob
    ("net.*.bridge-nf-call-iptables = 0", "net.bridge.* = 1", None),
])
def test_between_an_exact_key_and_a_glob_the_later_assignment_wins(first: str, then: str,
                                                                   conflict: str | None) -> None:
    """Plain keys are looked up and globs matched, but the order of assignment still decides."""
    eff = effective([("/etc/sysctl.d/a.conf", first + "\n"), ("/etc/sysctl.d/b.conf", then + "\n")])
    found = [c.setting.source for c in conflicts([(BRIDGE, "1")], eff)]
    assert found == ([conflict] if conflict else [])


def test_conflicts_are_computed_when_the_facts_change_not_per_look(loaded: FakeHost,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A sysctl.d with 52k per-interface keys made every look match each desired key against each of
    them (a core busy at poll_interval = 1): now one computation per facts and desired sysctls."""
    from ctwatchd import verdict
    from ctwatchd.config import Config
    from ctwatchd.core import CoreState
    from ctwatchd.kernel import KernelProbe

    (loaded.root / "etc/sysctl.d").mkdir(parents=True)
    for n in range(2):  # two files under the 1 MB limit each
        (loaded.root / f"etc/sysctl.d/9{n}-ifaces.conf").write_text(
            "".join(f"net.ipv4.conf.veth{n}x{i}.rp_filter = 2\n" for i in range(26_000)) + f"{BRIDGE} = 0\n")
    calls: list[int] = []
    real = conflicts

    def counted(desired: object, settings: object) -> object:
        calls.append(1)
        return real(desired, settings)  # type: ignore[arg-type]

    monkeypatch.setattr(verdict, "conflicts", counted)
    inspector = verdict.Inspector(KernelProbe(loaded.root))
    cfg = Config()
    looks = [inspector.look(cfg, CoreState(), float(t)) for t in range(5)]
    assert len(calls) == 1
    assert all(str(lk.conflicts[0]).startswith("/etc/sysctl.d/91-ifaces.conf:26001") for lk in looks)
    inspector.look(Config(sysctls=((BRIDGE, "0"),)), CoreState(), 6.0)  # other desired values: computed again
    assert len(calls) == 2
    inspector.refresh()  # new facts (a file changed): computed again
    inspector.look(Config(sysctls=((BRIDGE, "0"),)), CoreState(), 7.0)
    assert len(calls) == 3


def test_search_path_and_override_order(host: FakeHost) -> None:
    """systemd's order: /etc hides the same file name in /usr/lib; sorted by name across directories;
    /etc/sysctl.conf last (once, also when 99-sysctl.conf links to it)."""
    root = host.root
    for d, name, text in (("usr/lib/sysctl.d", "10-a.conf", f"{BRIDGE} = 0\n"),
                          ("etc/sysctl.d", "10-a.conf", "kernel.y = 1\n"),
                          ("run/sysctl.d", "20-b.conf", f"{BRIDGE} = 0\n"),
                          ("usr/local/lib/sysctl.d", "30-c.conf", "kernel.z = 1\n")):
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / d / name).write_text(text)
    (root / "etc/sysctl.conf").write_text(f"{BRIDGE} = 1\n")
    (root / "etc/sysctl.d/99-sysctl.conf").symlink_to("../sysctl.conf")
    files = [str(p.relative_to(root)) for p in sysctl_files(root)]
    assert files == ["etc/sysctl.d/10-a.conf", "run/sysctl.d/20-b.conf", "usr/local/lib/sysctl.d/30-c.conf",
                     "etc/sysctl.d/99-sysctl.conf"]
    problems: list[str] = []
    eff = read_settings(root, problems)
    assert eff[BRIDGE].source == "/etc/sysctl.d/99-sysctl.conf:1" and problems == []


def test_a_fifo_in_sysctl_d_is_a_problem_not_a_hang(host: FakeHost) -> None:
    """A FIFO named like a sysctl.d file is reported and skipped at once."""
    (host.root / "etc/sysctl.d").mkdir(parents=True)
    os.mkfifo(host.root / "etc/sysctl.d/50-fifo.conf")
    problems: list[str] = []
    assert read_settings(host.root, problems) == {}
    assert problems == ["/etc/sysctl.d/50-fifo.conf was not read: is not a regular file (a FIFO)"]


def udev_rule(host: FakeHost, stop: threading.Event, value: str = "0") -> threading.Thread:
    """What `RUN+="systemd-sysctl --prefix=/net/bridge"` does: after each new load, write the file's value.
    New loads are counted in the fake modprobe's log: a reload can come and go between two polls, and a
    recreated directory may get the old inode number back."""
    log = host.root / "loads.log"

    def loads() -> int:
        try:
            return log.read_text().split().count("br_netfilter")
        except OSError:
            return 0

    def run() -> None:
        seen = loads()
        while not stop.is_set():
            now = loads()
            if now != seen:
                time.sleep(0.3)  # udev runs its rules after the kernel's event
                with contextlib.suppress(OSError):
                    host.sysctl(BRIDGE).write_text(value + "\n")
            seen = now
            time.sleep(0.01)

    return threading.Thread(target=run, daemon=True)


def test_daemon_wins_after_udev_and_names_the_conflict_once(h: Harness) -> None:
    """A sysctl.d file saying 0 and the udev rule applying it after each load: the value is 1 again within
    2 s of every reload and stays; one sysctl.conflict record naming 99-test.conf:1, however many loads."""
    (h.host.root / "etc/sysctl.d").mkdir(parents=True)
    (h.host.root / "etc/sysctl.d/99-test.conf").write_text(f"{BRIDGE} = 0\n")
    stop = threading.Event()
    fighter = udev_rule(h.host, stop)
    samples: list[tuple[int, float, str | None]] = []

    def driver() -> None:
        h.wait_notify("READY=1")
        fighter.start()
        for n in range(3):
            h.host.unload("br_netfilter")
            h.monitor.send("remove br_netfilter")
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3.5:
                samples.append((n, time.monotonic() - t0, h.host.read_sysctl(BRIDGE)))
                h.read_notify()  # as systemd would: a full notify queue would stall the daemon's sends
                time.sleep(0.05)
        stop.set()

    code, logs = h.run(h.daemon(cfg_for(h.host, poll_interval=60.0)), driver)
    fighter.join()
    assert code == 0
    for n in range(3):
        late = [v for i, t, v in samples if i == n and t >= 2.0]
        assert late and set(late) == {"1"}, (n, [(round(t, 2), v) for i, t, v in samples if i == n])
        assert any(v == "0" for i, _, v in samples if i == n), "the udev stand-in never fought"
    found = events(logs, "sysctl.conflict")
    assert len(found) == 1 and found[0]["source"] == "/etc/sysctl.d/99-test.conf:1" and found[0]["key"] == BRIDGE


def test_without_the_settle_looks_udev_would_win_until_the_next_poll(h: Harness,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim's other side: with no settle looks, the udev stand-in's 0 stands until the next poll."""
    monkeypatch.setattr("ctwatchd.core.SETTLE_AFTER", ())
    stop = threading.Event()
    fighter = udev_rule(h.host, stop)
    values: list[str | None] = []

    def driver() -> None:
        h.wait_notify("READY=1")
        fighter.start()
        h.host.unload("br_netfilter")
        h.monitor.send("remove br_netfilter")
        time.sleep(2.5)
        values.append(h.host.read_sysctl(BRIDGE))
        stop.set()

    h.run(h.daemon(cfg_for(h.host, poll_interval=60.0)), driver)
    fighter.join()
    assert values == ["0"]


def test_check_names_the_conflicting_file_and_line(loaded: FakeHost) -> None:
    """check prints the conflict with file:line, in the table and the JSON."""
    (loaded.root / "etc/sysctl.d").mkdir(parents=True)
    (loaded.root / "etc/sysctl.d/99-test.conf").write_text(f"# RHEL-style\n{BRIDGE} = 0\n")
    cfg = str(loaded.config())
    table = subprocess.run([sys.executable, "-m", "ctwatchd", "check", "--root", str(loaded.root), "--config", cfg],
                           capture_output=True, text=True, timeout=30, check=False).stdout
    assert "conflict: /etc/sysctl.d/99-test.conf:2 sets net.bridge.bridge-nf-call-iptables = 0, ctwatchd wants 1" \
        in table
    data = json.loads(subprocess.run([sys.executable, "-m", "ctwatchd", "check", "--json", "--root",
                                      str(loaded.root), "--config", cfg], capture_output=True, text=True,
                                     timeout=30, check=False).stdout)
    assert data["conflicts"] == ["/etc/sysctl.d/99-test.conf:2 sets net.bridge.bridge-nf-call-iptables = 0, "
                                 "ctwatchd wants 1"]


def test_editing_sysctl_d_is_noticed_without_a_reload(h: Harness) -> None:
    """A sysctl.d file added while the daemon runs is read at the next look that needs work (fingerprint)."""

    def driver() -> None:
        h.wait_notify("READY=1")
        (h.host.root / "etc/sysctl.d").mkdir(parents=True)
        (h.host.root / "etc/sysctl.d/99-late.conf").write_text(f"{BRIDGE} = 0\n")
        h.host.unload("br_netfilter")
        h.monitor.send("remove br_netfilter")
        h.wait_for(lambda: h.host.is_live("br_netfilter"))
        time.sleep(0.3)

    _, logs = h.run(h.daemon(cfg_for(h.host)), driver)
    assert [e["source"] for e in events(logs, "sysctl.conflict")] == ["/etc/sysctl.d/99-late.conf:1"]


def test_udevs_announcement_makes_the_daemon_look_again_at_once(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """udevd announces a module's add once its rules (RUN+= included) have run: that is when the value it
    put back is looked at, not a settle timer later (timers off here, poll once a minute)."""
    monkeypatch.setattr("ctwatchd.core.SETTLE_AFTER", ())
    udev = FakeMonitor()
    path = h.host.sysctl(BRIDGE)
    fixed_after: list[float] = []

    def driver() -> None:
        h.wait_notify("READY=1")
        h.host.unload("br_netfilter")
        h.monitor.send("remove br_netfilter")
        h.wait_for(lambda: h.host.is_live("br_netfilter") and h.host.read_sysctl(BRIDGE) == "1")
        time.sleep(0.2)
        path.write_text("0\n")  # the udev rule ran ...
        t0 = time.monotonic()
        udev.send("add br_netfilter")  # ... and udevd says so
        h.wait_for(lambda: h.host.read_sysctl(BRIDGE) == "1", timeout=5)
        fixed_after.append(time.monotonic() - t0)

    try:
        code, logs = h.run(h.daemon(cfg_for(h.host, poll_interval=60.0), udev=udev), driver)
    finally:
        udev.close()
    assert code == 0 and fixed_after and fixed_after[0] < 1.0
    assert [e.get("source") for e in events(logs, "module.event")] == ["kernel", "udev"]
