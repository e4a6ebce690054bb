"""The kernel probe on temporary trees: module states, built-in detection, blockers, deps, sysctls."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
from fakehost import FakeHost

from ctwatchd.kernel import KernelProbe, sysctl_path
from ctwatchd.model import ModuleState


def state(host: FakeHost, name: str) -> ModuleState:
    probe = KernelProbe(host.root)
    return probe.status(name, probe.facts()).state


def test_live_coming_going_come_from_initstate(host: FakeHost) -> None:
    """initstate is the truth for a loaded module."""
    host.load("nf_conntrack")
    assert state(host, "nf_conntrack") is ModuleState.LIVE
    host.set_state("nf_nat", "coming")
    assert state(host, "nf_nat") is ModuleState.COMING
    host.set_state("nf_nat", "going")
    assert state(host, "nf_nat") is ModuleState.GOING


def test_absent_when_on_disk_and_unavailable_when_not(host: FakeHost) -> None:
    """Not loaded and in modules.dep is absent (restorable); not in modules.dep is unavailable."""
    assert state(host, "nf_nat") is ModuleState.ABSENT
    st = KernelProbe(host.root).status("nf_conntrack_ipv4", KernelProbe(host.root).facts())
    assert st.state is ModuleState.UNAVAILABLE
    assert "modules.dep" in st.detail


def test_builtin_from_sys_module_without_initstate(host: FakeHost) -> None:
    """Built-in code with parameters has /sys/module/<m> but no initstate."""
    host.builtin_dir("nf_conntrack")
    assert state(host, "nf_conntrack") is ModuleState.BUILTIN


def test_builtin_from_modules_builtin(host: FakeHost) -> None:
    """modules.builtin lists built-in modules with their would-be paths."""
    (host.moddir / "modules.builtin").write_text("kernel/net/netfilter/nf_nat.ko\n")
    assert state(host, "nf_nat") is ModuleState.BUILTIN


def test_no_module_support_uses_config_gz_and_evidence(tmp_path: Path) -> None:
    """This CI host's case: no /proc/modules, no /lib/modules, /proc/config.gz says =y."""
    host = FakeHost(tmp_path / "r", module_support=False)
    (host.moddir / "modules.dep").unlink()
    host.moddir.rmdir()
    with gzip.open(host.root / "proc/config.gz", "wt") as fh:
        fh.write("# CONFIG_MODULES is not set\nCONFIG_NF_NAT=y\nCONFIG_NF_CONNTRACK=y\n")
    host.write_sysctl("net.bridge.bridge-nf-call-iptables", "1")
    probe = KernelProbe(host.root)
    facts = probe.facts()
    assert not facts.module_support
    assert probe.status("nf_nat", facts).state is ModuleState.BUILTIN
    br = probe.status("br_netfilter", facts)
    assert br.state is ModuleState.BUILTIN and "bridge-nf-call-iptables exists" in br.detail
    legacy = probe.status("nf_conntrack_ipv4", facts)
    assert legacy.state is ModuleState.UNAVAILABLE and "no module support" in legacy.detail


def test_boot_config_is_the_fallback_for_config_gz(host: FakeHost) -> None:
    """/boot/config-$(uname -r) is read when /proc/config.gz is missing."""
    (host.root / "boot").mkdir()
    (host.root / "boot" / f"config-{host.release}").write_text("CONFIG_BRIDGE_NETFILTER=y\nCONFIG_NF_NAT=m\n")
    assert state(host, "br_netfilter") is ModuleState.BUILTIN
    assert state(host, "nf_nat") is ModuleState.ABSENT


@pytest.mark.parametrize(("line", "blocked"), [
    ("install nf_conntrack /bin/true", True),
    ("install nf_conntrack /bin/false", True),
    ("install nf-conntrack /usr/bin/true", True),
    ("install nf_conntrack /bin/sh -c 'exit 0'", True),
    ("install nf_conntrack \\\n  /bin/true", True),
    ("blacklist nf_conntrack", False),  # modprobe ignores it for a module named on its command line
    ("# install nf_conntrack /bin/true", False),
    ("install nf_conntrack /sbin/modprobe --ignore-install nf_conntrack", False),
    ("install nf_conntrack /sbin/modprobe --ignore-install nf_conntrack && /bin/echo ok", False),
    ("options nf_conntrack hashsize=1", False),
    ("remove nf_conntrack /bin/false", False),
])
def test_modprobe_d_blockers(host: FakeHost, line: str, blocked: bool) -> None:
    """An install rule that does not itself load the module blocks it; blacklist does not."""
    path = host.block(line)
    st = KernelProbe(host.root).status("nf_conntrack", KernelProbe(host.root).facts())
    assert (st.state is ModuleState.BLOCKED) is blocked
    if blocked:
        assert st.blocker is not None and "/etc/modprobe.d/protect.conf:1" in st.blocker
        assert path.name in st.detail
    else:
        assert st.state is ModuleState.ABSENT and st.blocker is None


def test_blacklist_is_a_note_and_the_module_is_restored(host: FakeHost) -> None:
    """`blacklist` stops aliases, not `modprobe nf_conntrack`: the module is absent (restorable) and the
    rule is carried as a note naming file and line."""
    host.block("blacklist nf_conntrack")
    st = KernelProbe(host.root).status("nf_conntrack", KernelProbe(host.root).facts())
    assert st.state is ModuleState.ABSENT
    assert st.note is not None and "/etc/modprobe.d/protect.conf:1" in st.note and "blacklist" in st.note


def test_blocker_of_a_live_module_is_reported_not_a_state(loaded: FakeHost) -> None:
    """A live module stays live; the blocker is still shown."""
    loaded.block("install nf_conntrack /bin/true")
    st = KernelProbe(loaded.root).status("nf_conntrack", KernelProbe(loaded.root).facts())
    assert st.state is ModuleState.LIVE and st.blocker


def test_etc_file_hides_same_name_in_lib(host: FakeHost) -> None:
    """modprobe.d(5): /etc/modprobe.d/x.conf overrides /lib/modprobe.d/x.conf."""
    host.block("install nf_nat /bin/false", file="x.conf", directory="lib/modprobe.d")
    assert state(host, "nf_nat") is ModuleState.BLOCKED
    host.block("options nf_nat foo=1", file="x.conf", directory="etc/modprobe.d")
    assert state(host, "nf_nat") is ModuleState.ABSENT


def test_modules_dep_parsing_gives_names_and_deps(host: FakeHost) -> None:
    """Compressed module paths become names; deps are names too."""
    facts = KernelProbe(host.root).facts()
    assert facts.deps["nf_nat"][0] == "nf_conntrack"
    assert "br_netfilter" in facts.deps
    assert facts.deps["br_netfilter"] == ("bridge", "stp")


def test_observe_reads_sysctls_count_and_writable_tuning_only(loaded: FakeHost) -> None:
    """The observation carries sysctl values, the conntrack count, and writable nf_conntrack_* values."""
    loaded.write_sysctl("net.netfilter.nf_conntrack_max", "1048576")
    loaded.write_sysctl("net.netfilter.nf_conntrack_readonly_thing", "5", mode=0o444)
    probe = KernelProbe(loaded.root)
    o = probe.observe(probe.facts(), ["nf_conntrack", "nf_nat", "br_netfilter"],
                      ["net.bridge.bridge-nf-call-iptables", "net.bridge.nope"])
    assert o.sysctls == {"net.bridge.bridge-nf-call-iptables": "1", "net.bridge.nope": None}
    assert o.conntrack_count == 0
    assert o.tuning["net.netfilter.nf_conntrack_max"] == "1048576"
    assert "net.netfilter.nf_conntrack_count" not in o.tuning
    assert "net.netfilter.nf_conntrack_readonly_thing" not in o.tuning
    assert set(o.modules) == {"nf_conntrack", "nf_nat", "br_netfilter"}  # exactly what was asked


def test_unreadable_conntrack_count_is_none(host: FakeHost) -> None:
    """A missing or garbage nf_conntrack_count reads as None."""
    probe = KernelProbe(host.root)
    assert probe.conntrack_count() is None
    host.write_sysctl("net.netfilter.nf_conntrack_count", "garbage")
    assert probe.conntrack_count() is None


@pytest.mark.parametrize("key", ["net..x", "net/x", "x", ".net.x", "net.x.", "net.\0.x"])
def test_sysctl_path_never_leaves_proc_sys(tmp_path: Path, key: str) -> None:
    """Keys with traversal or separators are refused before any path is built."""
    with pytest.raises(ValueError, match="not a dotted sysctl name"):
        sysctl_path(tmp_path, key)
    assert sysctl_path(tmp_path, "net.ipv4.ip_forward") == tmp_path / "net/ipv4/ip_forward"


def test_tuning_read_across_a_reload_is_discarded(loaded: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """If nf_conntrack is reloaded while its values are read, the torn read is not offered as tuning."""
    probe = KernelProbe(loaded.root)
    facts = probe.facts()
    real_tuning = probe.tuning

    def reload_midway() -> dict[str, str]:
        values = real_tuning()
        old = loaded.root / "sys/module/nf_conntrack"
        old.rename(loaded.root / "old-instance")  # kept until the new one exists: inodes cannot repeat
        loaded.load("nf_conntrack")
        shutil.rmtree(loaded.root / "old-instance")
        return values

    monkeypatch.setattr(probe, "tuning", reload_midway)
    before = probe.instance("nf_conntrack")
    o = probe.observe(facts, ["nf_conntrack"], [])
    assert o.modules["nf_conntrack"].instance == before != probe.instance("nf_conntrack")
    assert o.tuning == {}
    monkeypatch.undo()
    assert probe.observe(facts, ["nf_conntrack"], []).tuning  # a quiet read is kept


def test_tuning_of_a_module_whose_identity_could_not_be_read_is_discarded(
        loaded: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """initstate said live, then the stat of /sys/module/nf_conntrack failed (removed between the two):
    values read now may be the going module's or none at all, so they are not offered as tuning."""
    probe = KernelProbe(loaded.root)
    facts = probe.facts()
    monkeypatch.setattr(probe, "instance", lambda name: None)
    o = probe.observe(facts, ["nf_conntrack"], [])
    assert o.modules["nf_conntrack"].state.value == "live" and o.modules["nf_conntrack"].instance is None
    assert o.tuning == {}


def test_tuning_read_while_the_module_starts_going_is_discarded(
        loaded: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rmmod` of conntrack during a look: initstate said live, then the kernel marked it going and
    unregistered its sysctls while we read them (the VM saw 8 of 48 keys). No partial tuning is offered."""
    probe = KernelProbe(loaded.root)
    facts = probe.facts()
    real_tuning = probe.tuning

    def going_midway() -> dict[str, str]:
        (loaded.root / "sys/module/nf_conntrack/initstate").write_text("going\n")
        values = real_tuning()
        return dict(list(values.items())[:1])

    monkeypatch.setattr(probe, "tuning", going_midway)
    o = probe.observe(facts, ["nf_conntrack"], [])
    assert o.modules["nf_conntrack"].state.value == "live"  # as read first
    assert o.tuning == {}
