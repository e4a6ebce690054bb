"""The command line as a user runs it: a real process, exit codes, output, nothing changed on --dry-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakehost import FakeHost

from ctwatchd import __version__


def ctw(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ctwatchd", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, check=False)


def test_version_and_help() -> None:
    """--version and --help exit 0 and say what they should."""
    v = ctw("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"ctwatchd {__version__}"
    h = ctw("--help")
    assert h.returncode == 0 and all(c in h.stdout for c in ("run", "check", "restore"))
    assert ctw("check", "--help").returncode == 0


def test_check_healthy_exits_0(loaded: FakeHost) -> None:
    """All live and bridge sysctls at 1: healthy, exit 0, a readable table."""
    r = ctw("check", "--root", str(loaded.root), "--config", str(loaded.config()))
    assert r.returncode == 0, r.stderr
    assert "nf_conntrack         live" in r.stdout
    assert r.stdout.rstrip().endswith("status: healthy")


def test_check_degraded_exits_1_and_json_names_the_problems(loaded: FakeHost) -> None:
    """A removed module and a blocker are degraded (1); JSON carries states, blocker and the would-do plan."""
    loaded.unload("br_netfilter")
    loaded.unload("nf_nat")
    loaded.unload("nf_conntrack")
    loaded.block("install nf_conntrack /bin/true")
    r = ctw("check", "--json", "--root", str(loaded.root), "--config", str(loaded.config()))
    assert r.returncode == 1, r.stderr
    data = json.loads(r.stdout)
    assert data["status"] == "degraded"
    states = {m["name"]: m["state"] for m in data["modules"]}
    assert states == {"nf_conntrack": "blocked", "nf_nat": "absent", "br_netfilter": "absent"}
    conntrack = data["modules"][0]
    assert conntrack["blocker"] == "'install nf_conntrack /bin/true' in /etc/modprobe.d/protect.conf:1"
    assert data["conntrack_count"] is None
    assert data["would_do"][0] == "modprobe br_netfilter, then verify /sys/module/br_netfilter/initstate is live"
    assert any("blocked by" in p for p in data["problems"])


def test_checks_last_line_names_every_problem_within_256_characters(loaded: FakeHost) -> None:
    """The last line is what node-problem-detector keeps (256 characters) and shows as the node's
    condition: every module at fault is named there, their details stay in the table above, and a
    blocker line of any length cannot push it past the limit."""
    for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
        loaded.unload(m)
    r = ctw("check", "--root", str(loaded.root), "--config", str(loaded.config()))
    last = r.stdout.rstrip().splitlines()[-1]
    assert r.returncode == 1 and len(last) <= 256, last
    assert all(f"{m} absent" in last for m in ("nf_conntrack", "nf_nat", "br_netfilter")), last
    assert "net.bridge.bridge-nf-call-iptables missing" in last
    assert "absent       not loaded" in r.stdout and "not loaded" not in last  # the detail is in the table only
    loaded.block("install nf_conntrack /bin/true " + "x" * 2000)
    last = ctw("check", "--root", str(loaded.root), "--config", str(loaded.config())).stdout.rstrip().splitlines()[-1]
    assert 254 <= len(last.encode()) <= 256, last  # filled to the byte limit, cut at a character
    assert last.startswith("status: degraded (nf_conntrack blocked by") and last.endswith("…")
    # NPD counts bytes: a blocker file named in Cyrillic must not push the line past 256 of them
    (loaded.root / "etc/modprobe.d/protect.conf").unlink()
    loaded.block("install nf_conntrack /bin/true " + "я" * 300, file="защита.conf")
    last = ctw("check", "--root", str(loaded.root), "--config", str(loaded.config())).stdout.rstrip().splitlines()[-1]
    assert len(last.encode()) <= 256 and last.endswith("…") and "nf_conntrack blocked by" in last, last
    # ... also when it is short in characters but long in bytes: br_netfilter back, so the whole line is
    # under 256 characters yet over 256 bytes, and only a byte count cuts it
    (loaded.root / "etc/modprobe.d/защита.conf").unlink()
    loaded.load("br_netfilter")
    loaded.block("install nf_conntrack /bin/true " + "я" * 80, file="защита.conf")
    last = ctw("check", "--root", str(loaded.root), "--config", str(loaded.config())).stdout.rstrip().splitlines()[-1]
    assert len(last.encode()) <= 256 and last.endswith("…"), (len(last), len(last.encode()))


def test_check_builtin_kernel_is_healthy(tmp_path: Path) -> None:
    """This CI machine's case: no module support, everything built in -> healthy."""
    host = FakeHost(tmp_path / "r", module_support=False)
    host.builtin_dir("nf_conntrack")
    host.write_sysctl("net.netfilter.nf_conntrack_count", "0")
    host.write_sysctl("net.bridge.bridge-nf-call-iptables", "1")
    host.write_sysctl("net.bridge.bridge-nf-call-ip6tables", "1")
    (host.root / "proc/config.gz").write_bytes(__import__("gzip").compress(b"CONFIG_NF_NAT=y\n"))
    r = ctw("check", "--root", str(host.root), "--config", str(host.config()))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("built-in") == 3


def test_check_cannot_tell_exits_2(tmp_path: Path) -> None:
    """No /sys or /proc to read: exit 2 and say so."""
    (tmp_path / "empty").mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\nstate_file = "{tmp_path}/s.json"\n')
    r = ctw("check", "--root", str(tmp_path / "empty"), "--config", str(cfg))
    assert r.returncode == 2
    assert "cannot tell" in r.stdout


def test_check_bad_config_exits_2(tmp_path: Path) -> None:
    """A configuration error is exit 2 (cannot tell) with the file named."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[restore]\nhooks = [['relative']]\n")
    r = ctw("check", "--config", str(cfg))
    assert r.returncode == 2 and str(cfg) in r.stderr and "hooks[0][0]" in r.stderr


def test_restore_dry_run_prints_the_plan_and_changes_nothing(loaded: FakeHost) -> None:
    """--dry-run shows the ordered steps and runs no modprobe."""
    for m in ("br_netfilter", "nf_nat", "nf_conntrack"):
        loaded.unload(m)
    r = ctw("restore", "--dry-run", "--root", str(loaded.root), "--config", str(loaded.config()))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "plan (not loaded: nf_conntrack, nf_nat, br_netfilter):"
    assert lines[1].startswith("  1. modprobe nf_conntrack")
    assert lines[2].startswith("  2. modprobe nf_nat")
    assert lines[3].startswith("  3. modprobe br_netfilter")
    assert loaded.modprobe_calls() == []
    assert not loaded.is_live("nf_conntrack")


def test_restore_restores_and_exits_0_then_nothing_to_do(loaded: FakeHost) -> None:
    """restore does the work once; a second run has nothing to do."""
    loaded.unload("br_netfilter")
    cfg = loaded.config()
    r = ctw("restore", "--root", str(loaded.root), "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert loaded.is_live("br_netfilter")
    again = ctw("restore", "--root", str(loaded.root), "--config", str(cfg))
    assert again.returncode == 0 and again.stdout.startswith("nothing to do: healthy")


def test_restore_failure_exits_1(loaded: FakeHost) -> None:
    """A failing modprobe makes restore exit 1 and print the reason."""
    loaded.unload("nf_nat")
    loaded.write_modprobe(exit_code=1, load=False, extra="echo 'modprobe: ERROR: Operation not permitted' >&2")
    r = ctw("restore", "--root", str(loaded.root), "--config", str(loaded.config()))
    assert r.returncode == 1
    assert "FAILED" in r.stdout and "Operation not permitted" in r.stdout


def test_restore_bad_config_exits_2_and_executes_nothing(loaded: FakeHost, tmp_path: Path) -> None:
    """Bad input: exit 2, nothing run."""
    loaded.unload("nf_nat")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[restore]\nmodprobe = "{loaded.modprobe}"\n[watch]\nmodules = ["nf_nat", "a/b"]\n')
    r = ctw("restore", "--root", str(loaded.root), "--config", str(cfg))
    assert r.returncode == 2 and "modules[1]" in r.stderr
    assert loaded.modprobe_calls() == []


def test_run_with_bad_config_exits_2(tmp_path: Path) -> None:
    """The daemon refuses to start on a broken file (exit 2, RestartPreventExitStatus)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[watch]\npoll_interval = -1\n")
    r = ctw("run", "--config", str(cfg))
    assert r.returncode == 2 and "poll_interval" in r.stderr
    assert ctw("run", "--config", str(tmp_path / "missing.toml")).returncode == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_exits_0_on_stop_signals(loaded: FakeHost, sig: signal.Signals) -> None:
    """`ctwatchd run` in the foreground stops cleanly with exit 0 on SIGTERM and SIGINT."""
    p = subprocess.Popen([sys.executable, "-m", "ctwatchd", "run", "--no-uevents", "--root", str(loaded.root),
                          "--config", str(loaded.config())], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        assert p.stderr is not None
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            if "ctwatchd ready" in line:
                break
        p.send_signal(sig)
        assert p.wait(timeout=10) == 0
    finally:
        p.kill()
        p.wait()


def test_old_kernel_plan_adds_the_ipv4_modules_in_the_runbook_order(tmp_path: Path) -> None:
    """A 4.14 kernel whose modules tree has nf_conntrack_ipv4/nf_nat_ipv4: they are planned and loaded in order."""
    from fakehost import MODULES

    modules = dict(MODULES)
    modules["nf_conntrack_ipv4"] = ("kernel/net/ipv4/netfilter/nf_conntrack_ipv4.ko", ("nf_conntrack",))
    modules["nf_nat_ipv4"] = ("kernel/net/ipv4/netfilter/nf_nat_ipv4.ko", ("nf_nat", "nf_conntrack_ipv4",
                                                                           "nf_conntrack"))
    host = FakeHost(tmp_path / "r", release="4.14.0-1-amd64", modules=modules)
    cfg = host.config()
    dry = ctw("restore", "--dry-run", "--root", str(host.root), "--config", str(cfg))
    assert dry.returncode == 0, dry.stderr
    steps = [line.split(". ", 1)[1].split(",")[0] for line in dry.stdout.splitlines()[1:5]]
    assert steps == ["modprobe nf_conntrack", "modprobe nf_conntrack_ipv4", "modprobe nf_nat", "modprobe nf_nat_ipv4"]
    assert ctw("restore", "--root", str(host.root), "--config", str(cfg)).returncode == 0
    assert host.modprobe_calls()[:4] == ["nf_conntrack", "nf_conntrack_ipv4", "nf_nat", "nf_nat_ipv4"]
    assert host.is_live("nf_nat_ipv4")
    # The same tree on a new kernel: the legacy modules are neither planned nor looked at.
    new = FakeHost(tmp_path / "n", release="5.10.0-1-amd64", modules=modules)
    plan = ctw("restore", "--dry-run", "--root", str(new.root), "--config", str(new.config())).stdout
    assert "ipv4" not in plan


def test_run_applies_a_new_log_format_on_sighup(loaded: FakeHost) -> None:
    """`systemctl reload` after changing log_format: the running daemon's next lines are in the new format."""
    cfg = loaded.config()
    p = subprocess.Popen([sys.executable, "-m", "ctwatchd", "run", "--no-uevents", "--root", str(loaded.root),
                          "--config", str(cfg)], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert p.stderr is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("ctwatchd ready" in line for line in lines):
            lines.append(p.stderr.readline())
        cfg.write_text(cfg.read_text().replace('log_format = "console"', 'log_format = "json"'))
        p.send_signal(signal.SIGHUP)
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            lines.append(line)
            if line.startswith("{") and '"config.loaded"' in line:
                break
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
    finally:
        p.kill()
        p.wait()
    loaded_lines = [line for line in lines if "config.loaded" in line]
    assert loaded_lines and json.loads(loaded_lines[-1])["event"] == "config.loaded"


# -- everything check echoes from files is escaped and capped (docs/faults.md H29, H30) ----------------
HOSTILE = "\ud800 \x1b]0;owned\x07\x1b[2J tail"


@pytest.mark.parametrize("as_json", [False, True])
def test_check_echoes_a_hostile_state_status_escaped(loaded: FakeHost, as_json: bool) -> None:
    """A state file whose status holds a lone surrogate, OSC and CSI sequences (valid JSON): printed
    escaped, the exit code the host's (0), never a traceback with 1 (which NPD reads as degraded)."""
    from ctwatchd import state as statefile

    path = loaded.root / "run/state.json"
    path.parent.mkdir(exist_ok=True)
    statefile.save(path, statefile.SavedState({}, False, status="PLACEHOLDER"))
    path.write_text(path.read_text().replace('"PLACEHOLDER"', json.dumps(HOSTILE)))
    r = ctw("check", *(["--json"] if as_json else []), "--root", str(loaded.root), "--config", str(loaded.config()))
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "Traceback" not in r.stderr
    status = json.loads(r.stdout)["daemon"]["status"] if as_json else r.stdout
    assert "\\ud800 \\x1b]0;owned\\x07\\x1b[2J tail" in status


@pytest.mark.parametrize("as_json", [False, True])
def test_check_echoes_a_hostile_sysctl_d_value_escaped_and_capped(loaded: FakeHost, as_json: bool) -> None:
    """A sysctl.d value with ESC, OSC and BEL and 5000 characters: the conflict line is escaped and
    short (before: 5149 characters, the sequences raw)."""
    conf = loaded.root / "etc/sysctl.d/99-evil.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("net.bridge.bridge-nf-call-iptables = 0\x1b]0;owned\x07" + "A" * 5000 + "\n")
    r = ctw("check", *(["--json"] if as_json else []), "--root", str(loaded.root), "--config", str(loaded.config()))
    assert r.returncode in (0, 1), r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    lines = json.loads(r.stdout)["conflicts"] if as_json else [x for x in r.stdout.splitlines()
                                                               if x.startswith("conflict:")]
    assert len(lines) == 1 and len(lines[0]) < 300, lines
    assert "/etc/sysctl.d/99-evil.conf:1 sets net.bridge.bridge-nf-call-iptables = 0\\x1b]0;owned\\x07AAA" in lines[0]


def test_check_failing_while_printing_is_cannot_tell(loaded: FakeHost, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """An unexpected error while the report is formatted or printed is exit 2 with one sentence, never
    a traceback with exit 1."""
    from ctwatchd import check, cli

    def broken(_report: object) -> str:
        raise UnicodeEncodeError("ascii", "\ud800", 0, 1, "surrogates not allowed")

    monkeypatch.setattr(check, "format_table", broken)
    assert cli.main(["check", "--root", str(loaded.root), "--config", str(loaded.config())]) == 2
    assert "cannot tell: UnicodeEncodeError" in capsys.readouterr().err


def test_a_vanished_modules_directory_is_named_with_its_fix(loaded: FakeHost) -> None:
    """/lib/modules/<running release> removed by an upgrade: check says so and what fixes it, and
    `restore` runs no modprobe (it would only fail), rather than "not in …/modules.dep"."""
    import shutil

    loaded.unload("nf_nat")
    shutil.rmtree(loaded.moddir)
    cfg = str(loaded.config())
    r = ctw("check", "--root", str(loaded.root), "--config", cfg)
    assert r.returncode == 1, r.stderr
    row = next(x for x in r.stdout.splitlines() if x.startswith("nf_nat "))
    assert "unavailable" in row and f"/lib/modules/{loaded.release} is gone: reboot into the installed kernel" in row
    assert "modules.dep" not in row
    done = ctw("restore", "--root", str(loaded.root), "--config", cfg)
    assert done.returncode == 1 and loaded.modprobe_calls() == [], done.stdout
