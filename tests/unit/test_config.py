"""The TOML loader: defaults, the documented keys, and one clear sentence for every kind of bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ctwatchd import config
from ctwatchd.config import Config, ConfigError, DockerMode


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "ctwatchd.toml"
    p.write_text(text)
    return p


def test_missing_default_file_means_builtin_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without /etc/ctwatchd/ctwatchd.toml the daemon runs on defaults."""
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    cfg = config.load(None)
    assert cfg == Config()
    assert cfg.modules == ("nf_conntrack", "nf_nat", "br_netfilter")
    assert cfg.sysctl_map == {"net.bridge.bridge-nf-call-iptables": "1", "net.bridge.bridge-nf-call-ip6tables": "1"}


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    """--config PATH that does not exist is a configuration error naming the path."""
    with pytest.raises(ConfigError, match=r"absent\.toml: no such configuration file"):
        config.load(tmp_path / "absent.toml")


def test_full_example_parses(tmp_path: Path) -> None:
    """Every documented key is accepted with its documented meaning."""
    modprobe = tmp_path / "modprobe"  # the key must name an executable that exists, on any host
    modprobe.write_text("#!/bin/sh\n")
    modprobe.chmod(0o755)
    p = write(tmp_path, """
[watch]
modules = ["nf_conntrack", "nf-nat", "br_netfilter", "nf_conntrack"]
poll_interval = 2

[sysctl]
"net.bridge.bridge-nf-call-iptables" = "1"
net.netfilter.nf_conntrack_max = 1048576

[restore]
docker = "if-active"
hooks = [["/usr/bin/systemctl", "try-restart", "kube-proxy.service"]]
modprobe = "MODPROBE"
module_timeout = 5
max_restarts = 2
restart_window = 60

[daemon]
state_file = "/run/x/state.json"
log_format = "json"

[metrics]
textfile = "/var/lib/node_exporter/ctwatchd.prom"
""".replace("MODPROBE", str(modprobe)))
    cfg = config.load(p)
    assert cfg.modules == ("nf_conntrack", "nf_nat", "br_netfilter")
    assert cfg.poll_interval == 2.0
    assert cfg.sysctl_map == {"net.bridge.bridge-nf-call-iptables": "1", "net.netfilter.nf_conntrack_max": "1048576"}
    assert cfg.docker is DockerMode.IF_ACTIVE
    assert cfg.hooks == (("/usr/bin/systemctl", "try-restart", "kube-proxy.service"),)
    assert cfg.modprobe == str(modprobe) and cfg.module_timeout == 5.0
    assert (cfg.max_restarts, cfg.restart_window) == (2, 60.0)
    assert cfg.state_file == Path("/run/x/state.json")
    assert cfg.metrics_textfile == Path("/var/lib/node_exporter/ctwatchd.prom")


def test_empty_sysctl_table_means_no_sysctls(tmp_path: Path) -> None:
    """An explicit empty [sysctl] turns the default bridge sysctls off."""
    assert config.load(write(tmp_path, "[sysctl]\n")).sysctls == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[watch]\npoll_interval = 'fast'\n", r"\[watch\] poll_interval must be a number, not a string"),
        ("[watch]\npoll_interval = true\n", r"\[watch\] poll_interval must be a number, not a boolean"),
        ("[watch]\npoll_interval = 0\n", r"\[watch\] poll_interval must be between 0.1 and 3600"),
        ("[watch]\npoll_interval = nan\n", r"\[watch\] poll_interval must be between"),
        ("[watch]\nmodules = 'nf_nat'\n", r"\[watch\] modules must be an array, not a string"),
        ("[watch]\nmodules = ['nf_nat; reboot']\n", r"\[watch\] modules\[0\] must be a plain module name"),
        ("[watch]\nmodules = ['../../evil']\n", r"\[watch\] modules\[0\] must be a plain module name"),
        ("[watch]\nmodules = ['-r']\n", r"\[watch\] modules\[0\] must be a plain module name"),
        ("[watch]\nmodule = ['nf_nat']\n", r"\[watch\] has unknown key\(s\): module"),
        ("[watsh]\n", r"unknown section or key\(s\): watsh"),
        ('[sysctl]\n"net/bridge/x" = "1"\n', r'\[sysctl\] "net/bridge/x" is not a dotted sysctl name'),
        ('[sysctl]\n"net..x" = "1"\n', r'\[sysctl\] "net..x" is not a dotted sysctl name'),
        ('[sysctl]\n"kernel" = "1"\n', r'\[sysctl\] "kernel" is not a dotted sysctl name'),
        ('[sysctl]\n"net.x.y" = true\n', r'\[sysctl\] "net.x.y" must be a string or an integer'),
        ('[sysctl]\n"net.x.y" = "1\\n2"\n', r"value must be one printable line"),
        ("[restore]\ndocker = 'always'\n", r'\[restore\] docker must be "never" or "if-active"'),
        ("[restore]\nhooks = [['systemctl', 'restart', 'docker']]\n",
         r"\[restore\] hooks\[0\]\[0\] must be an absolute path"),
        ("[restore]\nhooks = ['/bin/true']\n", r"\[restore\] hooks\[0\] must be a non-empty array of strings"),
        ("[restore]\nhooks = [[]]\n", r"\[restore\] hooks\[0\] must be a non-empty array"),
        ("[restore]\nhooks = [['/usr/../bin/sh']]\n", r"must be an absolute path without '..'"),
        ("[restore]\nmodprobe = 'modprobe'\n", r"\[restore\] modprobe must be an absolute path"),
        ("[restore]\nmax_restarts = -1\n", r"\[restore\] max_restarts must be between 0 and 1000"),
        ("[restore]\nbackoff_initial = 10\nbackoff_max = 1\n", r"backoff_max must not be smaller"),
        ("[daemon]\nlog_format = 'xml'\n", r'\[daemon\] log_format must be "auto" or "journal" or "console" or "json"'),
        ("[daemon]\nstate_file = 'state.json'\n", r"\[daemon\] state_file must be an absolute path"),
        ("watch = 3\n", r"\[watch\] must be a table, not an integer"),
        ("[watch\nmodules = []\n", r"malformed TOML: .*line 1"),
        ("[watch]\nmodules = [\n", r"malformed TOML: .*end of document"),
    ],
)
def test_bad_input_is_one_sentence_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    """Each mistake is rejected with the file name and the offending key in the message."""
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as exc:
        config.load(p)
    assert str(exc.value).startswith(str(p))
    assert "\n" not in str(exc.value)


def test_invalid_utf8_is_a_config_error(tmp_path: Path) -> None:
    """Binary garbage is reported, not a traceback."""
    p = tmp_path / "bad.toml"
    p.write_bytes(b"\xff\xfe[watch]")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        config.load(p)


def test_unreadable_path_is_a_config_error(tmp_path: Path) -> None:
    """A directory given as the config is reported with its path."""
    with pytest.raises(ConfigError, match=r"is not a regular file \(a directory\); refusing"):
        config.load(tmp_path)


@pytest.mark.parametrize(("uid", "mode", "message"), [
    (1000, 0o644, "owned by uid 1000, not root"),
    (0, 0o664, r"writable by group or others \(mode 0664\)"),
    (0, 0o646, r"writable by group or others \(mode 0646\)"),
])
def test_root_refuses_config_others_can_change(tmp_path: Path, uid: int, mode: int, message: str) -> None:
    """Running as root, a config not owned by root or writable by others is refused."""
    p = write(tmp_path, "")
    st = os.stat(p)
    fake = os.stat_result((mode | 0o100000, st.st_ino, st.st_dev, 1, uid, 0, st.st_size, 0, 0, 0))
    with pytest.raises(ConfigError, match=message):
        config.load(p, euid=0, opener=lambda path: (path.read_bytes(), fake))
    # An unprivileged run (tests, `check` by a user) applies no such rule.
    assert config.load(p, euid=1000, opener=lambda path: (path.read_bytes(), fake)) == Config(path=p)
