"""The configuration's edges: every documented range is inclusive at both ends, every rejection is the
exact sentence the operator reads, and the executable trust rule follows symlinks and covers the
defaults of modprobe and systemctl."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from ctwatchd import config
from ctwatchd.config import SYSCTL_DEPTH, SYSCTL_KEY_MAX, Config, ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "ctwatchd.toml"
    p.write_text(text)
    return p


def error(tmp_path: Path, text: str) -> str:
    """The one sentence a bad file gets, with its path replaced by FILE."""
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        config.load(p)
    return str(exc.value).replace(str(p), "FILE")


# (section, key, lowest, highest) as ctwatchd.toml(5) documents them
RANGES = [
    ("watch", "poll_interval", 0.1, 3600),
    ("restore", "module_timeout", 0.1, 600),
    ("restore", "hook_timeout", 0.1, 3600),
    ("restore", "docker_timeout", 0.1, 3600),
    ("restore", "backoff_initial", 0.01, 3600),
    ("restore", "backoff_max", 0.01, 86400),
    ("restore", "restart_window", 1, 86400),
]


@pytest.mark.parametrize(("section", "key", "low", "high"), RANGES, ids=[r[1] for r in RANGES])
def test_documented_ranges_are_inclusive_and_nothing_beyond_them_passes(tmp_path: Path, section: str, key: str,
                                                                         low: float, high: float) -> None:
    """Both ends of each documented range are accepted as that key's value; just outside either end is
    refused with the range named."""
    extra = {"backoff_initial": "backoff_max = 86400\n", "backoff_max": "backoff_initial = 0.01\n"}.get(key, "")
    for value in (low, high):
        cfg = config.load(write(tmp_path, f"[{section}]\n{key} = {value}\n{extra}"))
        assert getattr(cfg, key) == value
    for value in (low / 2, high + 0.5):
        assert error(tmp_path, f"[{section}]\n{key} = {value}\n{extra}") == \
            f"FILE: [{section}] {key} must be between {low:g} and {high:g} seconds, not {value:g}."


@pytest.mark.parametrize(("value", "shown"), [("inf", "inf"), ("-inf", "-inf"), ("1" + "0" * 400, "a huge integer"),
                                              ("5000.0", "5000")])
def test_out_of_range_numbers_are_shown_readably(tmp_path: Path, value: str, shown: str) -> None:
    """Infinities are named as such, an integer beyond any float as 'a huge integer', others in %g."""
    assert error(tmp_path, f"[watch]\npoll_interval = {value}\n") == \
        f"FILE: [watch] poll_interval must be between 0.1 and 3600 seconds, not {shown}."


def test_max_restarts_takes_0_to_1000(tmp_path: Path) -> None:
    """max_restarts accepts both ends of 0..1000 and names the rejected value, or 'a huge integer'."""
    for value in (0, 1000):
        assert config.load(write(tmp_path, f"[restore]\nmax_restarts = {value}\n")).max_restarts == value
    for text, shown in (("-1", "-1"), ("1001", "1001"), ("1" + "0" * 30, "a huge integer")):
        assert error(tmp_path, f"[restore]\nmax_restarts = {text}\n") == \
            f"FILE: [restore] max_restarts must be between 0 and 1000, not {shown}."


def test_backoff_max_equal_to_backoff_initial_is_allowed(tmp_path: Path) -> None:
    """'not less than backoff_initial': equal is fine, smaller is refused naming [restore] backoff_max."""
    cfg = config.load(write(tmp_path, "[restore]\nbackoff_initial = 5\nbackoff_max = 5\n"))
    assert cfg.backoff_initial == cfg.backoff_max == 5.0
    assert error(tmp_path, "[restore]\nbackoff_initial = 5\nbackoff_max = 4\n") == \
        "FILE: [restore] backoff_max must not be smaller than backoff_initial."


def test_every_restore_key_is_read(tmp_path: Path) -> None:
    """hook_timeout, docker_timeout and keep_conntrack_tuning are taken from the file, not defaulted."""
    text = "[restore]\nhook_timeout = 7\ndocker_timeout = 8\nkeep_conntrack_tuning = false\n"
    cfg = config.load(write(tmp_path, text))
    assert (cfg.hook_timeout, cfg.docker_timeout, cfg.keep_conntrack_tuning) == (7.0, 8.0, False)


@pytest.mark.parametrize(("text", "message"), [
    ("[watch]\nmodules = 1.5\n", "FILE: [watch] modules must be an array, not a number."),
    ("[watch]\nmodules = true\n", "FILE: [watch] modules must be an array, not a boolean."),
    ("[watch]\nmodules = {a = 1}\n", "FILE: [watch] modules must be an array, not a table."),
    ("[watch]\npoll_interval = [1]\n", "FILE: [watch] poll_interval must be a number, not an array."),
    ("[watch]\npoll_interval = 1979-05-27T07:32:00Z\n", "FILE: [watch] poll_interval must be a number, not datetime."),
    ("[restore]\nmax_restarts = 'x'\n", "FILE: [restore] max_restarts must be an integer, not a string."),
    ("[restore]\nkeep_conntrack_tuning = 1\n",
     "FILE: [restore] keep_conntrack_tuning must be true or false, not an integer."),
    ("[restore]\ndocker = 1\n", "FILE: [restore] docker must be a string, not an integer."),
    ("[restore]\nmodprobe = '" + "x" * 500 + "'\n",
     "FILE: [restore] modprobe must be an absolute path without '..' or control characters, not '" + "x" * 79
     + "… (422 more characters)."),
    ("sysctl = 3\n", 'FILE: [sysctl] must be a table of "key" = "value", not an integer.'),
    ("[watch]\nmodules = ['nf_nat; reboot']\n",
     "FILE: [watch] modules[0] must be a plain module name (letters, digits, '_' or '-', at most 55), "
     "not 'nf_nat; reboot'."),
    ("[watch]\nfoo = 1\nbar = 2\n", "FILE: [watch] has unknown key(s): bar, foo."),
    ("foo = 1\nbar = 2\n",
     "FILE: unknown section or key(s): bar, foo (known sections: daemon, hold, metrics, restore, sysctl, watch)."),
    ("[restore]\nhooks = ['/bin/true']\n",
     "FILE: [restore] hooks[0] must be a non-empty array of strings (an argv list), not '/bin/true'."),
    ('[restore]\nhooks = [["/bin/echo", "a\\u0000b"]]\n', "FILE: [restore] hooks[0] contains a NUL character."),
    ("[restore]\nsystemctl = 'systemctl'\n",
     "FILE: [restore] systemctl must be an absolute path without '..' or control characters, not 'systemctl'."),
    ("[metrics]\ntextfile = 'ctwatchd.prom'\n",
     "FILE: [metrics] textfile must be an absolute path without '..' or control characters, not 'ctwatchd.prom'."),
    ('[sysctl]\n"net.x" = 18446744073709551616\n', 'FILE: [sysctl] "net.x" must fit in 64 bits, not a huge integer.'),
    ('[sysctl]\n"net.x" = -9223372036854775809\n', 'FILE: [sysctl] "net.x" must fit in 64 bits, not a huge integer.'),
    ("watch = true\n", "FILE: [watch] must be a table, not a boolean."),
    ('[sysctl]\n"net.x" = true\n', 'FILE: [sysctl] "net.x" must be a string or an integer, not a boolean.'),
    ('[sysctl]\n"net.x" = 1.5\n', 'FILE: [sysctl] "net.x" must be a string or an integer, not a number.'),
    ('[sysctl]\n"net/x" = 1\n', "FILE: [sysctl] \"net/x\" is not a dotted sysctl name under /proc/sys "
                                "(letters, digits, '_', '-' separated by '.'; no '/' or '..')."),
    ('[sysctl]\n"net.a\\u001bb" = 1\n', "FILE: [sysctl] 'net.a\\x1bb' is not a dotted sysctl name under /proc/sys "
                                        "(letters, digits, '_', '-' separated by '.'; no '/' or '..')."),
])
def test_each_rejection_is_the_exact_sentence(tmp_path: Path, text: str, message: str) -> None:
    """What the operator reads for each kind of mistake: the file, [section] key, what was expected and
    what was found (escaped, capped), in one sentence."""
    assert error(tmp_path, text) == message


def test_unknown_names_are_shown_capped_and_escaped(tmp_path: Path) -> None:
    """An unknown 500-character section name is shown capped; one with a control character is quoted
    and escaped."""
    long_name = "x" * 500
    assert error(tmp_path, f"{long_name} = 1\n") == \
        f"FILE: unknown section or key(s): {'x' * 80}… (420 more characters) " \
        "(known sections: daemon, hold, metrics, restore, sysctl, watch)."
    weird = "\\u001b" + "y" * 500
    assert error(tmp_path, f'"{weird}" = 1\n') == \
        f"FILE: unknown section or key(s): '\\x1b{'y' * 75}… (426 more characters) " \
        "(known sections: daemon, hold, metrics, restore, sysctl, watch)."


def test_a_document_without_a_file_is_named_as_such() -> None:
    """parse() of a document that came from no file names it 'configuration' / 'built-in configuration'."""
    with pytest.raises(ConfigError) as exc:
        config.parse({"bogus": 1})
    assert str(exc.value).startswith("configuration: unknown section or key(s): bogus")
    with pytest.raises(ConfigError) as exc:
        config.parse({"watch": {"poll_interval": 0}})
    assert str(exc.value) == \
        "built-in configuration: [watch] poll_interval must be between 0.1 and 3600 seconds, not 0."


def test_sysctl_integers_take_the_whole_64_bit_range(tmp_path: Path) -> None:
    """The smallest signed and the largest unsigned 64-bit integers are accepted as sysctl values."""
    cfg = config.load(write(tmp_path, '[sysctl]\n"net.a" = -9223372036854775808\n"net.b" = 18446744073709551615\n'))
    assert cfg.sysctl_map == {"net.a": "-9223372036854775808", "net.b": "18446744073709551615"}


def test_sysctl_names_up_to_the_limit_are_accepted(tmp_path: Path) -> None:
    """A sysctl name of exactly SYSCTL_KEY_MAX characters is fine; one more is refused."""
    name = "net." + "a" * (SYSCTL_KEY_MAX - 4)
    assert config.load(write(tmp_path, f'[sysctl]\n"{name}" = 1\n')).sysctl_map == {name: "1"}
    assert "is not a dotted sysctl name" in error(tmp_path, f'[sysctl]\n"{name}a" = 1\n')


def test_sysctl_tables_nest_exactly_as_deep_as_documented(tmp_path: Path) -> None:
    """Unquoted keys nesting SYSCTL_DEPTH tables are read; one level more is refused, naming the depth."""
    deepest = ".".join(["a"] * SYSCTL_DEPTH + ["b"])
    assert config.load(write(tmp_path, f"[sysctl]\n{deepest} = 1\n")).sysctl_map == {deepest: "1"}
    message = error(tmp_path, f"[sysctl]\na.{deepest} = 1\n")
    assert message.startswith(f"FILE: [sysctl] nests deeper than {SYSCTL_DEPTH} levels (at ")


def test_quoted_keys_after_a_nested_table_are_all_kept(tmp_path: Path) -> None:
    """Mixing forms keeps every key in file order, whichever comes first."""
    cfg = config.load(write(tmp_path, '[sysctl]\nnet.ipv4.ip_forward = 1\n"kernel.pid_max" = 65536\n'
                                      "net.core.somaxconn = 4096\n"))
    assert cfg.sysctls == (("net.ipv4.ip_forward", "1"), ("net.core.somaxconn", "4096"), ("kernel.pid_max", "65536"))


def test_a_config_larger_than_the_limit_is_refused_whole(tmp_path: Path) -> None:
    """A file over MAX_BYTES is refused with one sentence, never parsed in part."""
    p = tmp_path / "big.toml"
    p.write_bytes(b"#" * (config.MAX_BYTES + 1))
    with pytest.raises(ConfigError) as exc:
        config.load(p)
    assert str(exc.value) == f"{p}: larger than {config.MAX_BYTES} bytes; refusing it rather than reading part of it."


def test_a_config_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    """MAX_BYTES is the largest size accepted, not the smallest refused."""
    p = tmp_path / "big.toml"
    p.write_bytes(b"[watch]\npoll_interval = 2\n" + b"#" * (config.MAX_BYTES - 27) + b"\n")
    assert p.stat().st_size == config.MAX_BYTES
    assert config.load(p).poll_interval == 2.0


def test_what_the_file_opener_reports_is_named_exactly(tmp_path: Path) -> None:
    """An unreadable file and an oversized read each give one sentence naming the path and the cause."""
    p = tmp_path / "c.toml"

    def denied(path: Path) -> tuple[bytes, os.stat_result]:
        raise PermissionError(13, "Permission denied")

    with pytest.raises(ConfigError) as exc:
        config.load(p, opener=denied)
    assert str(exc.value) == f"{p}: cannot read the configuration: Permission denied."
    st = os.stat(tmp_path)
    with pytest.raises(ConfigError) as exc:
        config.load(p, euid=1000, opener=lambda path: (b"#" * (config.MAX_BYTES + 1), st))
    assert str(exc.value) == f"{p}: larger than {config.MAX_BYTES} bytes; refusing it rather than reading part of it."


@pytest.mark.parametrize(("uid", "mode", "message"), [
    (1000, 0o644, "{p} is owned by uid 1000, not root; refusing it because ctwatchd runs its hooks as root."),
    (0, 0o664, "{p} is writable by group or others (mode 0664); refusing it because ctwatchd runs as root and "
               "takes orders from it."),
])
def test_a_config_others_could_change_is_refused_with_the_reason(tmp_path: Path, uid: int, mode: int,
                                                                  message: str) -> None:
    """As root, the refusal names the file, who owns it or its mode, and why that matters."""
    p = write(tmp_path, "")
    st = os.stat(p)
    fake = os.stat_result((mode | stat.S_IFREG, st.st_ino, st.st_dev, 1, uid, 0, st.st_size, 0, 0, 0))
    with pytest.raises(ConfigError) as exc:
        config.load(p, euid=0, opener=lambda path: (b"", fake))
    assert str(exc.value) == message.format(p=p)


def test_an_integer_too_long_to_parse_is_malformed_toml_with_pythons_reason(tmp_path: Path) -> None:
    """A 5000-digit integer is 'malformed TOML' with the reason the parser gave, not a traceback."""
    message = error(tmp_path, "[watch]\npoll_interval = " + "9" * 5000 + "\n")
    assert message.startswith("FILE: malformed TOML: Exceeds the limit") and "digits" in message


# -- the executable trust rule ------------------------------------------------------------------------

def fake_stat(modes: dict[str, tuple[int, int]], missing: tuple[str, ...] = (),
              broken: dict[str, OSError] | None = None) -> Callable[[str], os.stat_result]:
    """stat() of an imaginary tree: path -> (uid, mode); unnamed paths are root-owned 0755 directories,
    names in `missing` do not exist and those in `broken` raise."""
    def stat_fn(path: str) -> os.stat_result:
        if path in missing:
            raise FileNotFoundError(2, "No such file or directory", path)
        if broken and path in broken:
            raise broken[path]
        uid, mode = modes.get(path, (0, stat.S_IFDIR | 0o755))
        return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))
    return stat_fn


EXE = stat.S_IFREG | 0o755
TRUSTED = {"/usr/sbin/modprobe": (0, EXE), "/sbin/modprobe": (0, EXE), "/usr/bin/systemctl": (0, EXE),
           "/bin/systemctl": (0, EXE)}


def resolve(links: dict[str, str]) -> Callable[[str], str]:
    return lambda path: links.get(path, path)


@pytest.mark.parametrize("which", ["hook", "modprobe", "default-modprobe"])
def test_trust_follows_symlinks_to_a_directory_others_can_write(which: str) -> None:
    """An executable that is a symlink into a directory others can write is refused as root, whether it is
    a hook, a configured modprobe or the default one: the resolved path is checked, not only the name."""
    target = {"hook": "/usr/local/bin/hook", "modprobe": "/opt/sbin/modprobe", "default-modprobe": "/usr/sbin/modprobe"}
    exe = target[which]
    cfg = Config(hooks=((exe,),) if which == "hook" else (), modprobe=exe if which == "modprobe" else None)
    modes = {**TRUSTED, exe: (0, EXE), "/srv/drop/real": (0, EXE), "/srv/drop": (1000, stat.S_IFDIR | 0o777)}
    with pytest.raises(ConfigError, match=r"refused: its directory '/srv/drop' is owned by uid 1000"):
        config.check_executables(cfg, 0, fake_stat(modes), resolve({exe: "/srv/drop/real"}))


def test_a_configured_modprobe_does_not_exempt_the_default_systemctl() -> None:
    """With modprobe configured, the default systemctl that exists is still held to the rule."""
    modes = {**TRUSTED, "/opt/modprobe": (0, EXE), "/usr/bin/systemctl": (0, stat.S_IFREG | 0o777)}
    with pytest.raises(ConfigError) as exc:
        config.check_executables(Config(modprobe="/opt/modprobe"), 0, fake_stat(modes), resolve({}))
    assert str(exc.value) == ("built-in configuration: [restore] systemctl (default) '/usr/bin/systemctl' refused: "
                              "it is writable by group or others (mode 0777), and ctwatchd runs it as root.")


def test_the_second_default_location_is_checked_when_the_first_is_absent() -> None:
    """When /usr/sbin/modprobe does not exist, /sbin/modprobe is the one used, and it is checked."""
    modes = {**TRUSTED, "/sbin/modprobe": (1000, EXE)}
    with pytest.raises(ConfigError) as exc:
        config.check_executables(Config(), 0, fake_stat(modes, missing=("/usr/sbin/modprobe",)), resolve({}))
    assert str(exc.value) == ("built-in configuration: [restore] modprobe (default) '/sbin/modprobe' refused: it is "
                              "owned by uid 1000, not root, and ctwatchd runs it as root.")


@pytest.mark.parametrize("mode", [0o100, 0o010, 0o001])
def test_any_execute_bit_makes_a_file_executable(mode: int) -> None:
    """User, group or other execute permission each count as executable (what root's execve needs)."""
    config.check_executable_trust("hook", "/x/hook", 1000, fake_stat({"/x/hook": (1000, stat.S_IFREG | mode)}))
    with pytest.raises(ConfigError, match="is not executable"):
        config.check_executable_trust("hook", "/x/hook", 1000, fake_stat({"/x/hook": (1000, stat.S_IFREG | 0o644)}))


def test_executables_that_cannot_be_looked_at_are_named_with_the_cause() -> None:
    """A stat or realpath failure on the executable or a directory above it is a sentence naming both."""
    denied = PermissionError(13, "Permission denied")
    with pytest.raises(ConfigError) as exc:
        config.check_executable_trust("W", "/x/hook", 0, fake_stat({}, broken={"/x/hook": denied}))
    assert str(exc.value) == "W '/x/hook' cannot be checked: Permission denied."
    with pytest.raises(ConfigError) as exc:
        config.check_executable_trust("W", "/x/hook", 0, fake_stat({"/x/hook": (0, EXE)}, broken={"/x": denied}))
    assert str(exc.value) == "W '/x/hook': '/x' cannot be checked: Permission denied."

    def unresolvable(path: str) -> str:
        raise ValueError("embedded null byte")

    with pytest.raises(ConfigError) as exc:
        config.check_executable_trust("W", "/x/hook", 0, fake_stat({"/x/hook": (0, EXE)}), unresolvable)
    assert str(exc.value) == "W '/x/hook' cannot be resolved: embedded null byte."
