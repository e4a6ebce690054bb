"""Who removed it: /proc at the uevent, the kernel's audit records as journald keeps them, or unknown.

The process table is a fake /proc under the FakeHost root (the same files the kernel has: stat,
cmdline, status, cgroup, loginuid, sessionid, syscall); the journal is a fake journalctl printing
`journalctl -o json` lines taken from a real bookworm guest. A real kernel, a real rmmod under
systemd-run and real audit records are in tests/vm/systemd/test_triggers.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from fakehost import FakeHost
from harness import Harness, cfg_for, events

from ctwatchd import attribution as attr
from ctwatchd import audit
from ctwatchd.attribution import Attributor, Culprit, Proc, ProcScan, audit_removals, unit_of

SELF = 999_999  # the daemon's pid as ProcScan is told it


def fake_proc(root: Path, pid: int, argv: list[str], *, ppid: int = 1, comm: str | None = None,
              cgroup: str = "0::/system.slice/cleanup-job.service\n", uid: int = 0, loginuid: int = 4294967295,
              session: int = 4294967295, syscall: str | None = None) -> Path:
    d = root / "proc" / str(pid)
    d.mkdir(parents=True)
    name = comm or os.path.basename(argv[0])
    (d / "stat").write_text(f"{pid} ({name}) S {ppid} {pid} {pid} 0 -1 4194560 0 0\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (d / "status").write_text(f"Name:\t{name}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    (d / "cgroup").write_text(cgroup)
    (d / "loginuid").write_text(str(loginuid))
    (d / "sessionid").write_text(str(session))
    if syscall is not None:
        (d / "syscall").write_text(syscall)
    return d


def init(root: Path) -> None:
    fake_proc(root, 1, ["/sbin/init"], ppid=0, comm="systemd", cgroup="0::/init.scope\n")


# -- what the kernel files say --------------------------------------------------------------------

@pytest.mark.parametrize(("text", "unit"), [
    ("0::/system.slice/cleanup-job.service\n", "cleanup-job.service"),
    ("0::/user.slice/user-0.slice/session-3.scope\n", "session-3.scope"),
    ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/backup.service\n", "backup.service"),
    ("0::/system.slice/docker-4f1c.scope\n", "docker-4f1c.scope"),
    ("12:pids:/x\n1:name=systemd:/system.slice/firewalld.service\n", "firewalld.service"),
    ("0::/\n", None), ("", None), ("garbage", None),
])
def test_the_unit_is_the_innermost_systemd_unit_of_the_cgroup(text: str, unit: str | None) -> None:
    assert unit_of(text) == unit


def test_audit_fields_unquote_and_unhex() -> None:
    """Quoted values lose their quotes; hex-encoded untrusted strings (a space inside) are decoded."""
    f = attr.audit_fields('arch=c000003e syscall=176 success=yes comm="rmmod" exe=2F746D702F6D7920746F6F6C '
                          'key=(null) stray ppid=1')
    assert f["comm"] == "rmmod" and f["ppid"] == "1" and f["key"] == "(null)" and "stray" not in f
    assert attr.unhex(f["exe"]) == "/tmp/my tool" and attr.unhex("rmmod") == "rmmod"
    assert attr.unhex("726D6D6F64006E665F6E6174") == "rmmod nf_nat"  # a PROCTITLE: NUL-separated argv


def journal_entry(serial: str, kind: str, message: str, when: float) -> dict[str, str]:
    return {"__REALTIME_TIMESTAMP": str(int(when * 1e6)), "_AUDIT_ID": serial, "_AUDIT_TYPE": kind,
            "MESSAGE": message}


def audit_records(serial: str, module: str, when: float, *, pid: int = 4242, syscall: int = 176,
                  success: str = "yes", auid: int = 1000, ses: int = 3) -> list[dict[str, str]]:
    """What journald stored for one audited delete_module (bookworm, 6.1): SYSCALL, PROCTITLE, KERN_MODULE."""
    return [
        journal_entry(serial, "1300", f'arch=c000003e syscall={syscall} success={success} exit=0 a0=55d3 a1=800 '
                      f'a2=0 a3=0 items=0 ppid=812 pid={pid} auid={auid} uid=0 gid=0 euid=0 suid=0 fsuid=0 '
                      f'egid=0 sgid=0 fsgid=0 tty=pts0 ses={ses} comm="rmmod" exe="/usr/bin/kmod" '
                      'subj=unconfined key="ctwatchd-module"', when),
        journal_entry(serial, "1327", "proctitle=726D6D6F64006E665F6E6174", when),
        journal_entry(serial, "1330", f'name="{module}"', when),
    ]


def test_audit_removals_pair_the_syscall_with_its_module_by_serial() -> None:
    """Records of one event share _AUDIT_ID; a load (finit_module), a failed delete and a record with
    no module name are not removals."""
    now = 1_800_000_000.0
    entries = [*audit_records("100", "nf_nat", now),
               *audit_records("101", "nf_nat", now, syscall=313),  # finit_module: a load
               *audit_records("102", "br_netfilter", now, success="no"),
               journal_entry("103", "1300", "arch=c000003e syscall=176 success=yes pid=7 comm=\"x\"", now)]
    found = audit_removals(entries)
    assert len(found) == 1
    when, module, proc = found[0]
    assert (when, module) == (now, "nf_nat")
    assert (proc.pid, proc.ppid, proc.comm, proc.exe, proc.cmdline, proc.auid, proc.session, proc.uid) == \
        (4242, 812, "rmmod", "/usr/bin/kmod", "rmmod nf_nat", 1000, 3, 0)
    assert attr.pick_audit(found, "nf-nat", now + 3) is proc
    assert attr.pick_audit(found, "nf_nat", now + attr.AUDIT_WINDOW + 1) is None
    assert attr.pick_audit(found, "br_netfilter", now) is None


def test_torn_journal_output_is_skipped_line_by_line() -> None:
    lines = [json.dumps(e) for e in audit_records("1", "nf_nat", 1.0)]
    out = "\n".join(["{torn", "[1, 2]", *lines, "\xff"])
    assert len(audit_removals(attr.parse_journal(out))) == 1


# -- /proc at the uevent ----------------------------------------------------------------------------

def test_the_scan_prefers_delete_module_then_a_tool_naming_the_module(tmp_path: Path) -> None:
    """Inside delete_module beats a kmod tool naming the module, which beats one removing something
    else; our own children (a restore's modprobe) and unrelated processes are never picked."""
    root = tmp_path
    init(root)
    fake_proc(root, 50, ["/usr/sbin/modprobe", "-r", "xt_nat"], cgroup="0::/system.slice/cron.service\n")
    scan = ProcScan(root, machine="x86_64", self_pid=SELF)
    proc, why = scan.scan("nf_nat") or (None, "")
    assert proc is not None and proc.pid == 50 and why == "modprobe removing modules was running"
    fake_proc(root, 60, ["rmmod", "nf-nat"], ppid=50, cgroup="0::/system.slice/cleanup-job.service\n",
              loginuid=1000, session=4)
    fake_proc(root, 70, ["/usr/sbin/modprobe", "nf_nat"], ppid=SELF)  # ours, and a load anyway
    fake_proc(root, 80, ["/usr/bin/python3", "daemon.py"])
    proc, why = scan.scan("nf_nat") or (None, "")
    assert proc is not None and proc.pid == 60 and why == "rmmod naming nf_nat was running"
    assert (proc.comm, proc.cmdline, proc.unit, proc.auid, proc.session, proc.uid) == \
        ("rmmod", "rmmod nf-nat", "cleanup-job.service", 1000, 4, 0)
    assert proc.parents == (("modprobe", 50), ("systemd", 1))
    (root / "proc/80/syscall").write_text("176 0x55d3 0x800 0x0 0x0 0x0 0x0 0x7ffc 0x7f12\n")
    proc, why = scan.scan("nf_nat") or (None, "")
    assert proc is not None and proc.pid == 80 and why == "it was inside delete_module(2)"
    assert ProcScan(root, machine="x86_64", self_pid=80).scan("br_netfilter") is not None
    assert ProcScan(root, machine="x86_64", self_pid=SELF).scan("br_netfilter") is not None  # 50 or 60


def test_a_modprobe_loading_is_no_suspect(tmp_path: Path) -> None:
    """A load is not a removal, and the daemon's own children are never suspects."""
    init(tmp_path)
    fake_proc(tmp_path, 50, ["/usr/sbin/modprobe", "nf_nat"])
    fake_proc(tmp_path, 51, ["/usr/sbin/modprobe", "-q", "--", "nf_nat"])
    fake_proc(tmp_path, 52, ["/usr/sbin/rmmod", "nf_nat"], ppid=SELF)  # a child of the daemon itself
    assert ProcScan(tmp_path, machine="x86_64", self_pid=SELF).scan("nf_nat") is None
    assert ProcScan(tmp_path, machine="x86_64", self_pid=SELF + 1).scan("nf_nat") is not None


def test_hostile_process_files_never_hang_or_raise(tmp_path: Path) -> None:
    """A comm with ') (' in it, a FIFO for cmdline, a parent loop, garbage in loginuid: read, bounded."""
    root = tmp_path
    d = fake_proc(root, 60, ["rmmod", "nf_nat"], ppid=61, comm="rm) (x")
    fake_proc(root, 61, ["/bin/sh"], ppid=60)  # a loop: 60 -> 61 -> 60
    (d / "loginuid").write_text("\udcff".encode("utf-8", "surrogateescape").decode("latin-1"))
    fake_proc(root, 62, ["x"])
    (root / "proc/62/cmdline").unlink()
    os.mkfifo(root / "proc/62/cmdline")
    t0 = time.monotonic()
    proc = ProcScan(root, machine="x86_64", self_pid=SELF).read(60)
    assert time.monotonic() - t0 < 5
    assert proc is not None and proc.comm == "rm) (x" and proc.auid is None and proc.parents == (("sh", 61),)
    found = ProcScan(root, machine="x86_64", self_pid=SELF).scan("nf_nat")
    assert found is not None and found[0].pid == 60
    assert ProcScan(root).read(12345) is None


def test_journal_fields_are_indexed_by_their_own_names() -> None:
    """REMOVED_BY_* and ATTRIBUTION, not CTWATCHD_-prefixed: `journalctl REMOVED_BY_UNIT=x.service` works."""
    culprit = Culprit("nf_nat", "audit", Proc(pid=7, comm="rmmod", unit="cleanup-job.service", auid=1000,
                                              parents=(("bash", 6), ("systemd", 1))), user="alice")
    record = {"event": "module.removed", "culprit": culprit.summary(), **culprit.fields()}
    fields = audit.journal_fields(audit.add_message(None, "info", record), "info")
    assert fields["REMOVED_BY_UNIT"] == "cleanup-job.service" and fields["REMOVED_BY_COMM"] == "rmmod"
    assert fields["REMOVED_BY_AUID"] == "1000" and fields["REMOVED_BY_USER"] == "alice"
    assert fields["REMOVED_BY_PARENTS"] == "bash[6] < systemd[1]" and fields["ATTRIBUTION"] == "audit"
    assert fields["MODULE"] == "nf_nat"
    assert fields["MESSAGE"] == "module nf_nat was removed by rmmod[7] in cleanup-job.service, login alice (audit)"
    assert "REMOVED_BY_EXE" not in fields  # unknown is absent, not empty


# -- the daemon: one record per removal, the restore first -------------------------------------------

def remove_and_wait(h: Harness, module: str = "nf_nat") -> None:
    h.wait_notify("READY=1")
    seen = len(h.read_notify())
    h.host.unload(module)
    h.monitor.send(f"remove {module}")
    h.wait_notify("last removal:", after=seen, timeout=15)


def test_a_removal_by_rmmod_in_a_unit_is_named_from_proc(h: Harness) -> None:
    """rmmod nf_nat still in /proc at the uevent: the record names it, its unit and parents, labelled
    proc; STATUS= and the state file's status carry it; the restore was not held up by it."""
    init(h.host.root)
    fake_proc(h.host.root, 4242, ["rmmod", "nf_nat"], ppid=4000, loginuid=0, session=5)
    fake_proc(h.host.root, 4000, ["/bin/bash", "/usr/local/sbin/cleanup"], comm="bash")
    (h.host.root / "etc").mkdir(exist_ok=True)
    (h.host.root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    code, logs = h.run(h.daemon(cfg_for(h.host)), lambda: remove_and_wait(h))
    assert code == 0 and h.host.is_live("nf_nat")
    [rec] = events(logs, "module.removed")
    assert rec["attribution"] == "proc" and rec["module"] == "nf_nat" and rec["removed_by_pid"] == 4242
    assert rec["removed_by_unit"] == "cleanup-job.service" and rec["removed_by_comm"] == "rmmod"
    assert rec["removed_by_user"] == "root" and rec["removed_by_session"] == 5
    assert rec["removed_by_parents"] == "bash[4000] < systemd[1]" and rec["why"] == "rmmod naming nf_nat was running"
    order = [e["event"] for e in logs]
    assert order.index("restore.finished") < order.index("module.removed")
    assert any("last removal: nf_nat by rmmod[4242] in cleanup-job.service, login root (proc)" in m
               for m in h.messages)
    saved = json.loads((h.host.root / "run/state.json").read_text())
    assert "last removal: nf_nat by rmmod[4242]" in saved["status"]
    assert (h.host.root / "journalctl.log").read_text().count("_TRANSPORT=audit") == 1


def test_an_audit_record_wins_and_names_a_process_that_is_gone(h: Harness) -> None:
    """The audit record names pid 4343 (exited at once, not in /proc), its login uid as a user name,
    labelled audit, even with a /proc suspect around."""
    init(h.host.root)
    fake_proc(h.host.root, 4242, ["rmmod", "nf_nat"])
    (h.host.root / "etc").mkdir(exist_ok=True)
    (h.host.root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/a:/bin/sh\n")
    (h.host.root / "journal.json").write_text(
        "\n".join(json.dumps(e) for e in audit_records("900", "nf_nat", time.time(), pid=4343)) + "\n")
    code, logs = h.run(h.daemon(cfg_for(h.host)), lambda: remove_and_wait(h))
    [rec] = events(logs, "module.removed")
    assert code == 0 and rec["attribution"] == "audit"
    assert rec["removed_by_pid"] == 4343 and rec["removed_by_user"] == "alice"
    assert rec["removed_by_cmdline"] == "rmmod nf_nat" and rec["removed_by_exe"] == "/usr/bin/kmod"
    assert "removed_by_unit" not in rec  # gone, and not the pid the scan saw


def test_neither_source_says_unknown(h: Harness) -> None:
    code, logs = h.run(h.daemon(cfg_for(h.host)), lambda: remove_and_wait(h))
    [rec] = events(logs, "module.removed")
    assert code == 0 and rec["attribution"] == "unknown" and not [k for k in rec if k.startswith("removed_by_")]
    assert audit.render_message("module.removed", rec) == \
        "module nf_nat was removed by unknown (no audit record; the caller was gone from /proc)"


def test_attribution_off_writes_no_record_and_runs_no_journalctl(h: Harness) -> None:
    init(h.host.root)
    fake_proc(h.host.root, 4242, ["rmmod", "nf_nat"])

    def driver() -> None:
        h.wait_notify("READY=1")
        h.host.unload("nf_nat")
        h.monitor.send("remove nf_nat")
        h.wait_for(lambda: h.host.is_live("nf_nat"))
        time.sleep(attr.AUDIT_DELAY + 0.5)

    code, logs = h.run(h.daemon(cfg_for(h.host, attribution=False)), driver)
    assert code == 0 and events(logs, "module.removed") == []
    assert not (h.host.root / "journalctl.log").exists()


def test_a_burst_of_removals_asks_the_journal_once(h: Harness) -> None:
    """The family unloaded in one go: three records, one journalctl run."""
    def driver() -> None:
        h.wait_notify("READY=1")
        for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
            h.host.unload(m)
        for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
            h.monitor.send(f"remove {m}")
        h.wait_for(lambda: any("last removal: nf_conntrack" in m for m in h.read_notify()), timeout=15)

    code, logs = h.run(h.daemon(cfg_for(h.host)), driver)
    assert code == 0
    assert sorted(e["module"] for e in events(logs, "module.removed")) == ["br_netfilter", "nf_conntrack", "nf_nat"]
    assert (h.host.root / "journalctl.log").read_text().count("_TRANSPORT=audit") == 1


def test_the_attributor_waits_for_its_scan(tmp_path: Path) -> None:
    """A removal is resolved only once its scan is done, and only when due."""
    clock = [100.0]
    gate = __import__("threading").Event()

    class SlowScan(ProcScan):
        def scan(self, module: str, budget: float = attr.SCAN_BUDGET) -> tuple[Proc, str] | None:
            gate.wait(5)
            return (Proc(pid=5, comm="rmmod"), "rmmod naming nf_nat was running")

    a = Attributor(tmp_path, None, scan=SlowScan(tmp_path), clock=lambda: clock[0], wall=lambda: 0.0)
    a.removed("nf_nat")
    assert a.deadline == 100.0 + attr.AUDIT_DELAY and a.resolve(100.5) == []
    clock[0] = 102.0
    assert a.resolve(102.0) == [] and a.deadline == pytest.approx(102.05)  # scan still running
    gate.set()
    a.pending[0].scan.join(5)
    [c] = a.resolve(102.1)
    assert c.how == "proc" and c.proc is not None and c.proc.pid == 5 and a.deadline is None


def test_metrics_count_removals_by_unit_with_a_bounded_label_set(tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    from ctwatchd.metrics import REMOVAL_UNITS, Metrics
    m = Metrics(tmp_path / "m.prom")
    for i in range(REMOVAL_UNITS + 5):
        m.removal(f"job-{i}.service", "proc")
    m.removal(None, "unknown")
    m.write()
    text = (tmp_path / "m.prom").read_text()
    assert 'ctwatchd_module_removals_total{attribution="proc",unit="other"} 5.0' in text
    assert 'ctwatchd_module_removals_total{attribution="unknown",unit="other"} 1.0' in text
    assert text.count("ctwatchd_module_removals_total{") == REMOVAL_UNITS + 2


def test_check_shows_the_last_removal(loaded: FakeHost) -> None:
    """check prints the daemon's last status, which names the last removal."""
    import subprocess
    import sys
    (loaded.root / "run").mkdir(exist_ok=True)
    h_status = "healthy (nf_conntrack live); last removal: nf_nat by rmmod[7] in x.service (proc)"
    from ctwatchd import state
    state.save(loaded.root / "run/state.json", state.SavedState({}, False, status=h_status, pid=os.getpid()))
    out = subprocess.run([sys.executable, "-m", "ctwatchd", "check", "--root", str(loaded.root), "--config",
                          str(loaded.config())], capture_output=True, text=True, timeout=30, check=False).stdout
    assert "last removal: nf_nat by rmmod[7] in x.service (proc)" in out


def test_an_exiting_rmmod_is_still_named_from_its_stat(tmp_path: Path) -> None:
    """A zombie has no command line left; an rmmod by name is a suspect, below one naming the module."""
    init(tmp_path)
    d = fake_proc(tmp_path, 90, ["rmmod", "br_netfilter"], cgroup="0::/system.slice/cleanup-job.service\n")
    (d / "cmdline").write_bytes(b"")
    scan = ProcScan(tmp_path, machine="x86_64", self_pid=SELF)
    found = scan.scan("nf_nat")
    assert found is not None and found[0].comm == "rmmod" and found[0].unit == "cleanup-job.service"
    assert found[1] == "rmmod was exiting"
    fake_proc(tmp_path, 91, ["/bin/kmod", "rmmod", "nf_nat"])
    found = scan.scan("nf_nat")
    assert found is not None and found[0].pid == 91
    other = tmp_path / "other"
    fake_proc(other, 92, ["sleep", "1"], comm="sleep")
    (other / "proc/92/cmdline").write_bytes(b"")
    assert ProcScan(other, machine="x86_64", self_pid=SELF).scan("nf_nat") is None
