"""Hostile inputs (issue 10, items 2-6, 13, 14, 17 and 18): whatever a broken host or a careless operator
puts in the kernel tree, the configuration or the state file, ctwatchd reads it without raising or
blocking, says what is wrong in one sentence naming the file, exits 2 where it cannot tell, and keeps
restoring.

A FIFO is the sharpest of these inputs: a regression that opens one blocks forever. Every read that
could block runs under a deadline here (a thread joined with a timeout, subprocess timeout=20, the
harness's waits), and on a miss the FIFOs are opened for writing once so the stuck reader gets EOF and
the test fails instead of hanging.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from fakehost import BOOT_ID, RELEASE, FakeHost, executable
from harness import Harness, Logs, cfg_for, events, run_daemon
from prereq import missing

import ctwatchd.check
from ctwatchd import cli
from ctwatchd import config as configmod
from ctwatchd import state as statefile
from ctwatchd.config import Config, ConfigError
from ctwatchd.daemon import Daemon
from ctwatchd.kernel import KernelProbe
from ctwatchd.model import KernelFacts

T = TypeVar("T")
# Seconds a read that must not block, or a start-up, may take, with a wide margin. It is also the
# drivers' patience: well inside run_daemon's 10 s join, so a daemon that dies early is a failure
# reported, not a late SIGTERM reaching pytest itself.
DEADLINE = 5.0
OTHER_BOOT = "00000000-1111-4222-8333-444444444444"


# -- helpers ------------------------------------------------------------------------------------

def ctw(*args: str) -> subprocess.CompletedProcess[str]:
    """`ctwatchd ARGS` as a real process; a hang is a TimeoutExpired failure, not a stuck run."""
    return subprocess.run([sys.executable, "-m", "ctwatchd", *args], capture_output=True, text=True, timeout=20,
                          check=False)


def unblock(*fifos: Path) -> None:
    """Open each FIFO for writing and close it: a reader stuck in open() (a regression) gets EOF."""
    for path in fifos:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody is reading it, which is how it should be
            continue
        os.close(fd)


def within(fn: Callable[[], T], *fifos: Path, seconds: float = DEADLINE) -> T:
    """fn() in a thread, which must finish within `seconds`; on a miss the FIFOs are freed and it fails."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for _ in range(50):
            unblock(*fifos)
            thread.join(0.1)
            if not thread.is_alive():
                break
        raise AssertionError(f"blocked for more than {seconds} s")
    if errors:
        raise errors[0]
    return result[0]


def fifo(path: Path) -> Path:
    """A FIFO where a file belongs (replacing it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


def restore_after_ready(h: Harness, module: str, fifos: tuple[Path, ...] = ()) -> Callable[[], None]:
    """A driver: once READY, remove `module` and wait until the daemon has loaded it again."""

    def driver() -> None:
        try:
            h.wait_notify("READY=1", timeout=DEADLINE)
            seen = len(h.read_notify())
            h.host.unload(module)
            h.monitor.send(f"remove {module}")
            h.wait_for(lambda: h.host.is_live(module), timeout=DEADLINE)
            # live is written by the fake modprobe before it exits: wait for the daemon's next STATUS
            # (sent after the restore has finished), or SIGTERM would stop modprobe mid-step
            h.wait_notify(f"{module} live", after=seen, timeout=DEADLINE)
        finally:
            unblock(*fifos)

    return driver


# == item 2: kernel-tree reads never raise =======================================================

@dataclass(frozen=True)
class Tree:
    """One kind of damage to the kernel tree: how to do it, the file a problem must name, what must
    still have been read, and whether the host stays healthy for `check`."""

    damage: Callable[[FakeHost], tuple[Path, ...]]  # returns the FIFOs it made
    problem: str | None  # the host path facts.problems must name (None: the file is read as well as it can)
    holds: Callable[[KernelFacts], bool]
    healthy: bool = True
    shows: str = "\nstatus: "  # what `check` must print, verbatim


def _builtin_not_utf8(host: FakeHost) -> tuple[Path, ...]:
    (host.moddir / "modules.builtin").write_bytes(b"kernel/drivers/\xff\xfe\x80/odd.ko\nkernel/net/sched/sch_fq.ko\n")
    return ()


def _boot_config(host: FakeHost) -> None:
    (host.root / "boot").mkdir(exist_ok=True)
    (host.root / f"boot/config-{RELEASE}").write_text("CONFIG_MODULES=y\nCONFIG_NF_CONNTRACK=m\n")


def _config_gz_random(host: FakeHost) -> tuple[Path, ...]:
    (host.root / "proc/config.gz").write_bytes(bytes(range(256)) * 16)
    _boot_config(host)
    return ()


def _config_gz_truncated(host: FakeHost) -> tuple[Path, ...]:
    whole = gzip.compress("".join(f"CONFIG_X{i}=m\n" for i in range(3000)).encode())
    (host.root / "proc/config.gz").write_bytes(whole[:len(whole) // 2])
    _boot_config(host)
    return ()


def _osrelease_nul(host: FakeHost) -> tuple[Path, ...]:
    (host.root / "proc/sys/kernel/osrelease").write_bytes(f"{RELEASE}\0/../../etc\n".encode())
    # The probe falls back to uname's release; give that release a modules tree as a real host would.
    moddir = host.root / "lib/modules" / os.uname().release
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_bytes((host.moddir / "modules.dep").read_bytes())
    return ()


def _modules_dep_fifo(host: FakeHost) -> tuple[Path, ...]:
    return (fifo(host.moddir / "modules.dep"),)


def _modules_dep_directory(host: FakeHost) -> tuple[Path, ...]:
    (host.moddir / "modules.dep").unlink()
    (host.moddir / "modules.dep").mkdir()
    return ()


def _boot_config_fifo(host: FakeHost) -> tuple[Path, ...]:
    return (fifo(host.root / f"boot/config-{RELEASE}"),)


def _conf_fifo(host: FakeHost) -> tuple[Path, ...]:
    host.block("blacklist br_netfilter", file="zz.conf")
    return (fifo(host.root / "etc/modprobe.d/fifo.conf"),)


def _conf_not_utf8(host: FakeHost) -> tuple[Path, ...]:
    (host.root / "etc/modprobe.d/bad.conf").write_bytes(b"# \xff\xfe\x80\xc3(\nblacklist br_netfilter\n")
    return ()


def _conf_cyrillic(host: FakeHost) -> tuple[Path, ...]:
    host.block("install br_netfilter /bin/false", file="защита.conf")
    host.unload("br_netfilter")
    return ()


def _conf_koi8r(host: FakeHost) -> tuple[Path, ...]:
    # "защита.conf" in KOI8-R: not UTF-8, so Python sees lone surrogates in the name.
    name = os.fsencode(host.root / "etc/modprobe.d") + b"/\xda\xc1\xdd\xc9\xd4\xc1.conf"
    with open(name, "wb") as f:
        f.write(b"install br_netfilter /bin/false\n")
    host.unload("br_netfilter")
    return ()


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


TREES = {
    "builtin-not-utf8": Tree(_builtin_not_utf8, None, lambda f: "sch_fq" in f.builtin),
    "config-gz-random": Tree(_config_gz_random, "/proc/config.gz", lambda f: f.kconfig.get("CONFIG_MODULES") == "y"),
    "config-gz-truncated": Tree(_config_gz_truncated, "/proc/config.gz",
                                lambda f: f.kconfig.get("CONFIG_MODULES") == "y"),
    "osrelease-nul": Tree(_osrelease_nul, "/proc/sys/kernel/osrelease",
                          lambda f: f.release == os.uname().release and "br_netfilter" in f.deps,
                          shows=f"kernel {os.uname().release}\n"),
    "modules-dep-fifo": Tree(_modules_dep_fifo, f"/lib/modules/{RELEASE}/modules.dep", lambda f: f.deps == {}),
    "modules-dep-directory": Tree(_modules_dep_directory, f"/lib/modules/{RELEASE}/modules.dep",
                                  lambda f: f.deps == {}),
    "boot-config-fifo": Tree(_boot_config_fifo, f"/boot/config-{RELEASE}", lambda f: "nf_nat" in f.deps),
    "modprobe-conf-fifo": Tree(_conf_fifo, "/etc/modprobe.d/fifo.conf",
                               lambda f: f.notes["br_netfilter"].source == "/etc/modprobe.d/zz.conf:1"),
    "modprobe-conf-not-utf8": Tree(_conf_not_utf8, None,
                                   lambda f: f.notes["br_netfilter"].source == "/etc/modprobe.d/bad.conf:2"),
    "modprobe-conf-cyrillic": Tree(_conf_cyrillic, None,
                                   lambda f: f.blockers["br_netfilter"].source == "/etc/modprobe.d/защита.conf:1",
                                   healthy=False, shows="in /etc/modprobe.d/защита.conf:1"),
    "modprobe-conf-koi8r": Tree(_conf_koi8r, None,
                                lambda f: f.blockers["br_netfilter"].source.startswith("/etc/modprobe.d/")
                                and _encodable(f.blockers["br_netfilter"].source), healthy=False,
                                shows="in /etc/modprobe.d/\\udcda\\udcc1\\udcdd\\udcc9\\udcd4\\udcc1.conf:1"),
}


@pytest.mark.parametrize("case", TREES)
def test_kernel_facts_never_raise_on_a_hostile_tree(loaded: FakeHost, case: str) -> None:
    """facts() returns at once on a damaged tree, with an unreadable file as a sentence naming it in
    problems and everything else still read."""
    tree = TREES[case]
    fifos = tree.damage(loaded)
    facts = within(KernelProbe(loaded.root).facts, *fifos)
    assert tree.holds(facts), facts
    if tree.problem is None:
        assert facts.problems == ()
    else:
        prefixes = (f"{tree.problem} was not read: ", f"{tree.problem} holds no kernel release ")
        assert [p for p in facts.problems if p.startswith(prefixes)], facts.problems
    assert all("\n" not in p and _encodable(p) for p in facts.problems)


@pytest.mark.parametrize("case", TREES)
def test_check_on_a_hostile_tree_prints_its_table(loaded: FakeHost, case: str) -> None:
    """`ctwatchd check` on a damaged tree completes, prints its table with the problem as a note, and
    exits 0 or 1 by the modules' health, never with a traceback."""
    tree = TREES[case]
    tree.damage(loaded)
    r = ctw("check", "--root", str(loaded.root), "--config", str(loaded.config()))
    assert r.returncode == (0 if tree.healthy else 1), r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stdout.startswith("kernel ") and "\nMODULE " in r.stdout
    assert r.stdout.splitlines()[-1].startswith("status: ") and tree.shows in r.stdout
    assert (f"note: {tree.problem} " in r.stdout) == (tree.problem is not None) and "not re-read" not in r.stdout
    if tree.problem is not None:
        assert f"\nnote: {tree.problem} was not read: " in r.stdout or \
            f"\nnote: {tree.problem} holds no kernel release " in r.stdout


@pytest.mark.parametrize("case", TREES)
def test_daemon_on_a_hostile_tree_stays_up_and_restores(h: Harness, case: str) -> None:
    """The daemon started on a damaged tree reaches READY and still restores a removed nf_nat."""
    tree = TREES[case]
    fifos = tree.damage(h.host)
    d = within(lambda: h.daemon(cfg_for(h.host)), *fifos)
    code, logs, _ = run_daemon(d, restore_after_ready(h, "nf_nat", fifos))
    assert code == 0 and h.host.is_live("nf_nat")
    assert events(logs, "restore.finished")[-1]["result"] == "ok", [e for e in logs if "restore" in e.get("event", "")]
    assert not events(logs, "daemon.internal_error")
    if tree.problem is not None:
        assert any(p.startswith((f"{tree.problem} was not read: ", f"{tree.problem} holds no kernel release "))
                   for p in d.inspector.facts.problems)


@pytest.mark.parametrize("spoil", ["modules-dep-fifo", "modules-dep-directory", "modprobe-conf-fifo"])
def test_daemon_survives_a_tree_going_bad_after_start(h: Harness, spoil: str) -> None:
    """A tree file turned into a FIFO or a directory while the daemon runs: the changed fingerprint makes
    it re-read the facts, it logs the problem naming the file and restores the removed module."""
    dep = h.host.moddir / "modules.dep"
    conf = h.host.root / "etc/modprobe.d/fifo.conf"
    target = conf if spoil == "modprobe-conf-fifo" else dep
    shown = "/" + str(target.relative_to(h.host.root))
    d = h.daemon(cfg_for(h.host))

    def driver() -> None:
        try:
            h.wait_notify("READY=1", timeout=DEADLINE)
            before = os.stat(dep).st_mtime
            if spoil == "modules-dep-directory":
                dep.unlink()
                dep.mkdir()
            else:
                fifo(target)
            os.utime(target, (before + 100, before + 100))
            os.utime(conf.parent, (before + 100, before + 100))
            h.host.unload("nf_nat")
            h.monitor.send("remove nf_nat")
            h.wait_for(lambda: h.host.is_live("nf_nat"), timeout=DEADLINE)
        finally:
            unblock(target)

    code, logs, _ = run_daemon(d, driver)
    problems = [e["detail"] for e in events(logs, "facts.problem")]
    assert code == 0 and h.host.is_live("nf_nat")
    assert [p for p in problems if p.startswith(f"{shown} was not read: ")], problems
    assert not events(logs, "daemon.internal_error")


# == item 3: out-of-range integers and deep dotted keys ==========================================

HUGE = {
    "400-digits": "[watch]\npoll_interval = " + "9" * 400 + "\n",
    "5000-digits": "[watch]\npoll_interval = " + "9" * 5000 + "\n",
    "deep-dotted-key": "[sysctl]\n" + "a." * 3000 + "b = 1\n",
    "duplicate-sysctl": ('[sysctl]\n"net.bridge.bridge-nf-call-iptables" = "1"\n'
                         '[sysctl.net.bridge]\nbridge-nf-call-iptables = "0"\n'),
}
HUGE_MESSAGE = {
    "400-digits": "[watch] poll_interval must be between 0.1 and 3600 seconds, not a huge integer",
    "5000-digits": "malformed TOML",
    "deep-dotted-key": "[sysctl] nests deeper than",
    "duplicate-sysctl": '[sysctl] "net.bridge.bridge-nf-call-iptables" is given twice',
}


@pytest.mark.parametrize("case", HUGE)
def test_huge_or_deep_config_is_a_config_error(tmp_path: Path, case: str) -> None:
    """A 400- or 5000-digit integer, a 3000-level dotted key or a sysctl named twice is one short ConfigError
    naming the file, not an OverflowError, ValueError or RecursionError."""
    p = tmp_path / "c.toml"
    p.write_text(HUGE[case])
    with pytest.raises(ConfigError) as exc:
        configmod.load(p)
    text = str(exc.value)
    assert text.startswith(f"{p}: ") and HUGE_MESSAGE[case] in text and len(text) < 1000 and "\n" not in text


@pytest.mark.parametrize("case", HUGE)
def test_run_with_a_huge_or_deep_config_exits_2(loaded: FakeHost, tmp_path: Path, case: str) -> None:
    """`ctwatchd run --config` on such a file exits 2 (RestartPreventExitStatus) with the file named."""
    p = tmp_path / "c.toml"
    # A fake root and a private state file: should a regression accept the file, the daemon it starts
    # touches nothing real before the timeout ends it.
    p.write_text(HUGE[case] + f'\n[daemon]\nstate_file = "{tmp_path}/state.json"\n')
    r = ctw("run", "--no-uevents", "--root", str(loaded.root), "--config", str(p))
    assert r.returncode == 2 and f"ctwatchd: {p}: " in r.stderr and "Traceback" not in r.stderr


def reload_rejected(h: Harness, spoil: Callable[[Path], object]) -> tuple[Logs, Daemon, Config, Path, float]:
    """Start on a good file, spoil it, SIGHUP; then prove the old config still restores. Returns the logs,
    the daemon, the old config, the path and the seconds from SIGHUP to the READY=1 after RELOADING=1."""
    path = h.host.config('[sysctl]\n"net.bridge.bridge-nf-call-iptables" = "1"\n')
    old = configmod.load(path)
    d = h.daemon(old, reload_config=lambda: configmod.load(path))
    took: list[float] = []

    def driver() -> None:
        try:
            h.wait_notify("READY=1", timeout=DEADLINE)
            spoil(path)
            n = len(h.read_notify())
            t0 = time.monotonic()
            os.kill(os.getpid(), signal.SIGHUP)
            h.wait_notify("READY=1", after=h.wait_notify("RELOADING=1", after=n, timeout=DEADLINE), timeout=DEADLINE)
            took.append(time.monotonic() - t0)
            h.host.unload("nf_nat")
            h.monitor.send("remove nf_nat")
            h.wait_for(lambda: h.host.is_live("nf_nat"), timeout=DEADLINE)
        finally:
            unblock(path)

    code, logs, _ = run_daemon(d, driver)
    assert code == 0
    return logs, d, old, path, took[0]


@pytest.mark.parametrize("case", HUGE)
def test_sighup_with_a_huge_or_deep_config_keeps_the_old_one(h: Harness, case: str) -> None:
    """SIGHUP after the file got such a value: config.rejected naming the file, the old config kept and
    still restoring."""
    logs, d, old, path, _ = reload_rejected(h, lambda p: p.write_text(HUGE[case]))
    rejected = events(logs, "config.rejected")
    assert len(rejected) == 1 and rejected[0]["error"].startswith(f"{path}: ")
    assert HUGE_MESSAGE[case] in rejected[0]["error"]
    assert d.cfg is old and not events(logs, "config.loaded") and not events(logs, "daemon.internal_error")


# == item 4 and 6: the state file is a directory or a FIFO =========================================

def spoil_state(host: FakeHost, kind: str) -> Path:
    path = host.root / "run/state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "directory":
        path.mkdir()
    else:
        fifo(path)
    return path


@pytest.mark.parametrize("kind", ["directory", "FIFO"])
def test_daemon_with_a_bad_state_file_reaches_ready_and_restores(h: Harness, kind: str) -> None:
    """The state file is a directory or a FIFO: the daemon says so once (state.ignored; state.failed once
    when it cannot be replaced), sends READY and restores."""
    path = spoil_state(h.host, kind)
    h.host.unload("nf_nat")
    d = within(lambda: h.daemon(cfg_for(h.host)), path)

    def driver() -> None:
        try:
            h.wait_notify("READY=1", timeout=DEADLINE)
        finally:
            unblock(path)

    code, logs, _ = run_daemon(d, driver)
    assert code == 0 and h.host.is_live("nf_nat") and any("READY=1" in m for m in h.messages)
    ignored = events(logs, "state.ignored")
    assert len(ignored) == 1 and ignored[0]["detail"] == f"it is not a regular file (a {kind})"
    failed = events(logs, "state.failed")
    if kind == "directory":
        assert len(failed) == 1 and failed[0]["detail"] == os.strerror(errno.EISDIR) and path.is_dir()
    else:  # rename() replaces the FIFO's name: the next start finds a real state file
        assert failed == [] and statefile.load(path) is not None


@pytest.mark.parametrize("kind", ["directory", "FIFO"])
def test_restore_and_check_with_a_bad_state_file(loaded: FakeHost, kind: str) -> None:
    """The state file is a directory or a FIFO: `restore` restores without a traceback, and `check --json`
    prints valid JSON whose daemon.error names the problem."""
    spoil_state(loaded, kind)
    loaded.unload("nf_nat")
    cfg = str(loaded.config())
    r = ctw("restore", "--root", str(loaded.root), "--config", cfg)
    assert r.returncode == 0 and loaded.is_live("nf_nat"), r.stdout + r.stderr
    assert "Traceback" not in r.stderr and f"ignored: it is not a regular file (a {kind})" in r.stderr
    c = ctw("check", "--json", "--root", str(loaded.root), "--config", cfg)
    assert c.returncode == 0 and "Traceback" not in c.stderr, c.stdout + c.stderr
    daemon = json.loads(c.stdout)["daemon"]
    assert daemon["error"] == f"state file ignored: it is not a regular file (a {kind})"


# == item 5: an unexpected exception in check is "cannot tell" =======================================

def test_unexpected_exception_in_check_is_exit_2(loaded: FakeHost, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Anything check did not foresee is exit 2 (cannot tell), with a one-line reason, never 1 (degraded)."""

    def boom(cfg: Config, root: Path = Path("/"), read_hold: object = None) -> ctwatchd.check.Report:
        raise RuntimeError("surprise\x1b[2J")

    monkeypatch.setattr(ctwatchd.check, "run_check", boom)
    assert cli.main(["check", "--root", str(loaded.root), "--config", str(loaded.config())]) == 2
    err = capsys.readouterr().err
    assert err == "ctwatchd: cannot tell: RuntimeError: surprise\\x1b[2J\n"


# == item 6: FIFOs never block ======================================================================

def test_config_fifo_check_and_run_exit_2_at_once(loaded: FakeHost, tmp_path: Path) -> None:
    """A FIFO at the --config path: check and run exit 2 at once, with a sentence naming it."""
    path = fifo(tmp_path / "c.toml")
    try:
        t0 = time.monotonic()
        c = ctw("check", "--root", str(loaded.root), "--config", str(path))
        r = ctw("run", "--no-uevents", "--root", str(loaded.root), "--config", str(path))
        took = time.monotonic() - t0
    finally:
        unblock(path)
    expected = f"ctwatchd: {path} is not a regular file (a FIFO); refusing to read it as the configuration.\n"
    assert c.returncode == 2 and c.stderr == expected
    assert r.returncode == 2 and r.stderr == expected
    assert took < 10


def test_sighup_with_a_fifo_config_is_rejected_promptly(h: Harness) -> None:
    """SIGHUP after the config file became a FIFO: config.rejected at once, the old config kept."""
    logs, d, old, path, took = reload_rejected(h, fifo)
    rejected = events(logs, "config.rejected")
    assert len(rejected) == 1 and rejected[0]["error"].startswith(f"{path} is not a regular file (a FIFO)")
    assert d.cfg is old and took < 2


def test_dangling_symlink_at_the_default_path_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A symlink at the default path to a missing file is a ConfigError saying so, not silent defaults."""
    link = tmp_path / "ctwatchd.toml"
    link.symlink_to(tmp_path / "gone.toml")
    monkeypatch.setattr(configmod, "DEFAULT_PATH", link)
    with pytest.raises(ConfigError, match=r"ctwatchd\.toml is a symbolic link to '?.*gone\.toml'?, which does not "
                                          r"exist"):
        configmod.load(None)


# == item 13: modprobe and systemctl pass the hooks' trust rule ====================================

def fake_stat(table: dict[str, tuple[int, int]]) -> Callable[[str], os.stat_result]:
    """A stat seam: path -> (uid, mode); anything else does not exist."""

    def stat_fn(path: str) -> os.stat_result:
        if path not in table:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        uid, mode = table[path]
        return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))

    return stat_fn


TOOL = "/opt/ctwatchd-hostile-test/bin/tool"
TRUSTED = {"/": (0, stat.S_IFDIR | 0o755), "/opt": (0, stat.S_IFDIR | 0o755),
           "/opt/ctwatchd-hostile-test": (0, stat.S_IFDIR | 0o755),
           "/opt/ctwatchd-hostile-test/bin": (0, stat.S_IFDIR | 0o755), TOOL: (0, stat.S_IFREG | 0o755)}
OPEN_DIR = {**TRUSTED, "/opt/ctwatchd-hostile-test/bin": (0, stat.S_IFDIR | 0o777)}


@pytest.mark.parametrize("key", ["modprobe", "systemctl"])
def test_root_refuses_modprobe_and_systemctl_in_an_open_directory(tmp_path: Path, key: str) -> None:
    """As root, [restore] modprobe/systemctl in a 0777 directory is refused naming the key, like a hook;
    a root-owned 0755 one is accepted."""
    p = tmp_path / "c.toml"
    p.write_text(f'[restore]\n{key} = "{TOOL}"\n')
    with pytest.raises(ConfigError) as exc:
        configmod.load(p, euid=0, stat_fn=fake_stat(OPEN_DIR))
    assert str(exc.value) == (f"{p}: [restore] {key} '{TOOL}' refused: its directory '/opt/ctwatchd-hostile-test/bin'"
                              " is writable by group or others (mode 0777), and ctwatchd runs it as root.")
    assert getattr(configmod.load(p, euid=0, stat_fn=fake_stat(TRUSTED)), key) == TOOL


@pytest.mark.parametrize("key", ["modprobe", "systemctl"])
def test_root_refuses_modprobe_and_systemctl_on_the_real_filesystem(tmp_path: Path, key: str) -> None:
    """Real files as root: a tool in a 0777 directory is refused naming the key; in a 0755 one it is used."""
    if os.geteuid() != 0:
        missing("the root rules apply to root only")
    tool = executable(tmp_path / "drop" / key, "#!/bin/sh\nexit 0\n")
    p = tmp_path / "c.toml"
    p.write_text(f'[restore]\n{key} = "{tool}"\n')
    (tmp_path / "drop").chmod(0o777)
    with pytest.raises(ConfigError, match=rf"\[restore\] {key} '{tool}' refused: its directory '.*/drop' is "
                                          r"writable by group or others \(mode 0777\)"):
        configmod.load(p, euid=0)
    (tmp_path / "drop").chmod(0o755)
    assert getattr(configmod.load(p, euid=0), key) == str(tool)


# == item 14: a trailing newline passes no validator; module names are at most 55 ====================

@pytest.mark.parametrize(("body", "message"), [
    ('[watch]\nmodules = ["nf_nat\\n"]\n', "[watch] modules[0] must be a plain module name"),
    (f'[watch]\nmodules = ["{"a" * 56}"]\n', "[watch] modules[0] must be a plain module name"),
    ('[sysctl]\n"net.bridge.bridge-nf-call-iptables\\n" = "1"\n', "is not a dotted sysctl name"),
], ids=["module-newline", "module-56", "sysctl-key-newline"])
def test_trailing_newline_and_long_names_are_refused(tmp_path: Path, body: str, message: str) -> None:
    """A module name or sysctl key with a trailing newline, and a 56-character module name, are refused."""
    p = tmp_path / "c.toml"
    p.write_text(body)
    with pytest.raises(ConfigError) as exc:
        configmod.load(p)
    assert str(exc.value).startswith(f"{p}: ") and message in str(exc.value) and "\n" not in str(exc.value)


def test_a_55_character_module_name_is_accepted(tmp_path: Path) -> None:
    """55 characters is the kernel's limit and is accepted."""
    p = tmp_path / "c.toml"
    p.write_text(f'[watch]\nmodules = ["{"a" * 55}"]\n')
    assert configmod.load(p).modules == ("a" * 55,)


@pytest.mark.parametrize(("key", "value"), [("net.netfilter.nf_conntrack_max\n", "262144"),
                                            ("net.netfilter.nf_conntrack_max", "262144\n")],
                         ids=["key", "value"])
def test_state_tuning_with_a_trailing_newline_is_refused(tmp_path: Path, key: str, value: str) -> None:
    """A state file whose tuning key or value ends in a newline is refused whole."""
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "conntrack_reloaded": False, "tuning": {key: value}}))
    path.chmod(0o600)
    with pytest.raises(statefile.StateError, match="unexpected tuning entry"):
        statefile.load(path)


# == item 17: a huge rejected value gives a short, escaped error ===================================

def test_huge_rejected_value_gives_a_short_escaped_error(loaded: FakeHost, tmp_path: Path) -> None:
    """A 300 KB docker value starting with ESC and BEL is echoed escaped and capped: under 1 KB."""
    p = tmp_path / "c.toml"
    p.write_text('[restore]\ndocker = "\\u001b]0;owned\\u0007' + "A" * 300_000 + '"\n')
    with pytest.raises(ConfigError) as exc:
        configmod.load(p)
    text = str(exc.value)
    assert text.startswith(f'{p}: [restore] docker must be "never" or "if-active" or "if-needed", not ')
    assert len(text.encode()) < 1024 and "\\x1b]0;owned\\x07AAA" in text
    assert not any(c in text for c in "\x1b\x07\n")
    r = ctw("check", "--root", str(loaded.root), "--config", str(p))
    assert r.returncode == 2 and len(r.stderr.encode()) < 1024 and "\x1b" not in r.stderr and "\x07" not in r.stderr


# == item 18: check says when the daemon that wrote the state is not running =======================

def _cmdline(host: FakeHost, pid: int, argv: bytes) -> None:
    (host.root / f"proc/{pid}").mkdir(parents=True, exist_ok=True)
    (host.root / f"proc/{pid}/cmdline").write_bytes(argv)


@pytest.mark.parametrize(("case", "expected"), [
    ("alive", r"daemon: running \(pid {pid}\): healthy \(as saved\); restart breaker closed$"),
    ("stopped", r"daemon: not running since \d+ s ago \(stopped\); its last status: healthy \(as saved\)$"),
    ("gone", r"daemon: not running since at most \d+ s ago \(pid {gone} is gone\); its last status: healthy"),
    ("recycled", r"daemon: not running since at most \d+ s ago \(pid {pid} is gone\); its last status: healthy"),
    ("other-boot", r"daemon: not running in this boot \(the state file is from an earlier one\); its last status"),
], ids=["alive", "stopped", "gone", "recycled", "other-boot"])
def test_check_says_whether_the_daemon_is_still_running(loaded: FakeHost, case: str, expected: str) -> None:
    """check tells a stopped daemon, a vanished or recycled pid and another boot's state from a running
    daemon, instead of showing the last status as current."""
    pid = os.getpid()
    gone = 4_000_000  # above any pid_max: no such /proc entry in the tree
    argv = b"/usr/bin/sleep\x00300\x00" if case == "recycled" else b"/usr/bin/python3\x00-m\x00ctwatchd\x00run\x00"
    _cmdline(loaded, pid, argv)
    statefile.save(loaded.root / "run/state.json", statefile.SavedState(
        {}, False, status="healthy (as saved)", boot_id=OTHER_BOOT if case == "other-boot" else BOOT_ID,
        pid=gone if case == "gone" else pid, written_at=time.monotonic() - 5, stopped=case == "stopped"))
    r = ctw("check", "--root", str(loaded.root), "--config", str(loaded.config()))
    assert r.returncode == 0, r.stdout + r.stderr
    daemon_line = next(line for line in r.stdout.splitlines() if line.startswith("daemon: "))
    assert re.match(expected.format(pid=pid, gone=gone), daemon_line), daemon_line
