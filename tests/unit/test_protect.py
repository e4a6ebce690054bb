"""`ctwatchd protect`: the modprobe.d unload guard is written, recognised, shown by check, and removed.

kmod's own modprobe parses the guard here (this kernel has no modules to unload); that
`modprobe -r` then fails and the module stays is shown on a real modular kernel in tests/vm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fakehost import FakeHost
from prereq import need

from ctwatchd import protect
from ctwatchd.kernel import KernelProbe, classify_rule


def ctw(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctwatchd", *args], capture_output=True, text=True, timeout=30,
                          env=os.environ, check=False)


def test_protect_writes_a_remove_guard_for_each_watched_module(loaded: FakeHost) -> None:
    """One `remove <module> /bin/false` per watched module, in the file named; a second run changes nothing."""
    cfg = str(loaded.config())
    r = ctw("protect", "--root", str(loaded.root), "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wrote /etc/modprobe.d/ctwatchd-protect.conf: modprobe -r of nf_conntrack, nf_nat, "
                               "br_netfilter now fails")
    text = (loaded.root / protect.GUARD).read_text()
    rules = [line for line in text.splitlines() if not line.startswith("#")]
    assert rules == ["remove nf_conntrack /bin/false", "remove nf_nat /bin/false", "remove br_netfilter /bin/false"]
    again = ctw("protect", "--root", str(loaded.root), "--config", cfg)
    assert again.returncode == 0 and again.stdout.startswith("already in place:")


def test_the_guard_is_seen_by_the_probe_and_by_check(loaded: FakeHost) -> None:
    """check names the guard per module; it is not a blocker (the modules stay restorable and healthy)."""
    cfg = str(loaded.config())
    assert ctw("protect", "--root", str(loaded.root), "--config", cfg).returncode == 0
    facts = KernelProbe(loaded.root).facts()
    assert set(facts.guards) == {"nf_conntrack", "nf_nat", "br_netfilter"} and not facts.blockers
    r = ctw("check", "--json", "--root", str(loaded.root), "--config", cfg)
    data = json.loads(r.stdout)
    assert r.returncode == 0 and data["status"] == "healthy"
    assert all(m["guard"] and "ctwatchd-protect.conf" in m["guard"] for m in data["modules"])
    table = ctw("check", "--root", str(loaded.root), "--config", cfg).stdout
    assert "unload guard: modprobe -r refused for nf_conntrack, nf_nat, br_netfilter" in table


def test_without_a_guard_check_says_so_and_still_flags_the_runbooks_install_rule(loaded: FakeHost) -> None:
    """No guard: check says how to add one; the runbook's `install … /bin/true` is still a blocker."""
    loaded.unload("nf_conntrack")
    loaded.block("install nf_conntrack /bin/true")
    r = ctw("check", "--root", str(loaded.root), "--config", str(loaded.config()))
    assert "unload guard: none (`ctwatchd protect`" in r.stdout
    assert "blocked" in r.stdout and r.returncode == 1


def test_dry_run_prints_and_remove_takes_it_away(loaded: FakeHost) -> None:
    """--dry-run writes nothing; --remove deletes only a file ctwatchd wrote."""
    cfg = str(loaded.config())
    dry = ctw("protect", "--dry-run", "--root", str(loaded.root), "--config", cfg)
    assert dry.returncode == 0 and "remove nf_nat /bin/false" in dry.stdout
    assert not (loaded.root / protect.GUARD).exists()
    ctw("protect", "--root", str(loaded.root), "--config", cfg)
    gone = ctw("protect", "--remove", "--root", str(loaded.root), "--config", cfg)
    assert gone.returncode == 0 and gone.stdout.startswith("removed /etc/modprobe.d/ctwatchd-protect.conf")
    assert not (loaded.root / protect.GUARD).exists()
    assert KernelProbe(loaded.root).facts().guards == {}


def test_a_foreign_file_of_the_same_name_is_left_alone(loaded: FakeHost) -> None:
    """A file at the guard's path that ctwatchd did not write is neither overwritten nor removed."""
    path = loaded.root / protect.GUARD
    path.write_text("options nf_conntrack hashsize=131072\n")
    for extra in ((), ("--remove",)):
        r = ctw("protect", *extra, "--root", str(loaded.root), "--config", str(loaded.config()))
        assert r.returncode == 1 and "was not written by ctwatchd protect" in r.stderr
    assert path.read_text() == "options nf_conntrack hashsize=131072\n"


def test_remove_rules_that_really_unload_are_not_guards() -> None:
    """`remove x /sbin/modprobe -r --ignore-remove x` still unloads: not a guard; `/bin/false` is."""
    assert classify_rule(["remove", "nf_nat", "/bin/false"]) == ("nf_nat", "remove", True)
    assert classify_rule(["remove", "nf_nat", "/sbin/modprobe", "-r", "--ignore-remove", "nf_nat"]) == \
        ("nf_nat", "remove", False)
    assert classify_rule(["remove", "nf_nat", "/sbin/rmmod", "nf_nat"]) == ("nf_nat", "remove", False)


def test_real_modprobe_parses_the_guard(tmp_path: Path) -> None:
    """kmod's own modprobe reads the guard file as a remove command for the module."""
    modprobe = shutil.which("modprobe") or shutil.which("modprobe", path="/usr/sbin:/sbin")
    need(modprobe is not None, "needs kmod's modprobe")
    assert modprobe is not None
    confdir = tmp_path / "modprobe.d"
    confdir.mkdir()
    (confdir / "ctwatchd-protect.conf").write_text(protect.guard_text(["nf_nat"]))
    r = subprocess.run([modprobe, "-C", str(confdir), "--show-config"], capture_output=True, text=True, timeout=30,
                       check=False)
    assert "remove nf_nat /bin/false" in r.stdout, r.stdout + r.stderr


def test_firewalld_cleanup_on_exit_is_named_by_check_and_protect(loaded: FakeHost) -> None:
    """firewalld's CleanupModulesOnExit=yes unloads with rmmod, past any guard: check and protect name the
    file and line; the last assignment wins, `no` and an absent file say nothing."""
    conf = loaded.root / protect.FIREWALLD_CONF
    conf.parent.mkdir(parents=True)
    conf.write_text("# firewalld\nCleanupModulesOnExit=no\nCleanupModulesOnExit=yes\n")
    cfg = str(loaded.config())
    said = "/etc/firewalld/firewalld.conf:3 sets CleanupModulesOnExit=yes: stopping firewalld unloads"
    r = ctw("check", "--root", str(loaded.root), "--config", cfg, "--json")
    assert any(n.startswith(said) for n in json.loads(r.stdout)["notes"]), r.stdout
    r = ctw("protect", "--root", str(loaded.root), "--config", cfg)
    assert r.returncode == 0 and f"note: {said}" in r.stdout
    conf.write_text("CleanupModulesOnExit=yes\nCleanupModulesOnExit = no\n")
    assert protect.firewalld_cleanup(loaded.root) is None
    conf.write_text('CleanupModulesOnExit="yes"\n')
    assert protect.firewalld_cleanup(loaded.root) == "/etc/firewalld/firewalld.conf:1"
    conf.unlink()
    os.mkfifo(conf)  # never a hang
    assert protect.firewalld_cleanup(loaded.root) is None
    r = ctw("check", "--root", str(loaded.root), "--config", cfg)
    assert "CleanupModulesOnExit" not in r.stdout
