"""The packaging: man pages, example config, .deb, .rpm, sdist/wheel, node-problem-detector, Kubernetes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from pkgsupport import PACKAGING, REPO, Built, module, project_version, require_module, require_tools, run, unavailable

from ctwatchd import audit, cli
from ctwatchd import config as configmod

VERSION = project_version()
DOCS = REPO / "docs"
EXAMPLE = PACKAGING / "ctwatchd.toml"
NPD = PACKAGING / "node-problem-detector/ctwatchd-monitor.json"
K8S = PACKAGING / "kubernetes"
DEPENDS = ("python3-pyudev", "python3-structlog", "python3-sdnotify", "kmod", "libudev1")
# Config fields and the TOML key that sets each; `path` is not a key, `sysctls` is the [sysctl] table.
FIELD_KEYS = {f.name: f.name for f in dataclasses.fields(configmod.Config)} | {
    "metrics_textfile": "textfile", "hold": "enabled", "hold_masquerade": "masquerade"}
FIELD_KEYS.pop("path")
FIELD_KEYS.pop("sysctls")
SETTING = re.compile(r'^# ("?[A-Za-z][\w.-]*"? = .*)$')


def ctwatchd_exe() -> Path:
    exe = Path(sys.executable).parent / "ctwatchd"
    if not exe.exists():
        unavailable(f"no ctwatchd next to {sys.executable}: pip install -e . first")
    return exe


def private_copy(src: Path, dest: Path) -> Path:
    """A copy owned by us with mode 0644, which ctwatchd trusts even when run as root."""
    shutil.copyfile(src, dest)
    dest.chmod(0o644)
    return dest


def uncommented(text: str) -> str:
    """The example config with every `# key = value` line and the `# [sysctl]` header switched on."""
    lines = []
    for line in text.splitlines():
        m = SETTING.match(line)
        lines.append(m.group(1) if m else "[sysctl]" if line == "# [sysctl]" else line)
    return "\n".join(lines) + "\n"


# --- man pages -------------------------------------------------------------------------------------

def test_man_pages_render_without_warnings(man_pages: Built) -> None:
    """Both pages build from their scdoc sources and render with groff -ww and man --warnings silently."""
    assert sorted(p.name for p in man_pages.files) == ["ctwatchd.8", "ctwatchd.toml.5"]
    for page in man_pages.files:
        done = run(["groff", "-man", "-Tutf8", "-ww", "-z", page], env={"LC_ALL": "C.UTF-8"})
        assert done.stderr == "", done.stderr
        if shutil.which("man"):
            done = run(["man", "--warnings", "-l", page], env={"MANWIDTH": "80", "LC_ALL": "C.UTF-8",
                                                               "MAN_KEEP_FORMATTING": "0"})
            assert done.stderr == "", done.stderr
            plain = re.sub(r".\x08", "", done.stdout)  # no pager: man overstrikes bold text
            assert "NAME" in plain and "SEE ALSO" in plain


def test_ctwatchd_8_documents_every_command_option_and_interface() -> None:
    """ctwatchd(8) names every subcommand and option, the environment, signals, journal fields and events."""
    text = (DOCS / "ctwatchd.8.scd").read_text()
    parser = cli.build_parser()
    words: set[str] = set()
    for action in parser._actions:  # argparse has no public way to list subcommands and options
        words.update(s for s in action.option_strings if s.startswith("--"))
        for name, sub in (getattr(action, "choices", None) or {}).items():
            if isinstance(sub, type(parser)):
                words.add(name)
                words.update(s for a in sub._actions for s in a.option_strings if s.startswith("--"))
    words |= {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "SIGHUP", "SIGTERM", "SIGINT",
              "CTWATCHD_EVENT", "MODULE", "ACTION", "RESULT", "DURATION_MS", "MESSAGE_ID",
              "/etc/ctwatchd/ctwatchd.toml", "/run/ctwatchd/state.json", "ctwatchd.catalog", "EXIT STATUS"}
    words |= set(audit.EVENTS)
    assert sorted(w for w in words if w not in text) == []


def test_ctwatchd_toml_5_documents_every_key_with_its_default() -> None:
    """ctwatchd.toml(5) names every section and key, and the built-in default of each plain one."""
    text = (DOCS / "ctwatchd.toml.5.scd").read_text()
    missing = [k for k in [*FIELD_KEYS.values(), "[watch]", "[sysctl]", "[restore]", "[hold]", "[daemon]",
                           "[metrics]"]
               if k not in text]
    assert missing == []
    defaults = configmod.DEFAULTS
    for name, key in FIELD_KEYS.items():
        value = getattr(defaults, name)
        if isinstance(value, float):
            assert re.search(rf"\*{re.escape(key)}\*.*?Default:\s+\*{value!r}\*", text, re.S), key
        elif isinstance(value, bool | int):
            assert re.search(rf"\*{re.escape(key)}\*.*?Default:\s+\*{str(value).lower()}\*", text, re.S), key


def test_ctwatchd_toml_5_names_every_metric() -> None:
    """ctwatchd.toml(5) lists every metric ctwatchd/metrics.py defines, under its exposed name."""
    source = (REPO / "ctwatchd/metrics.py").read_text()
    names = [f"{name}_total" if kind == "Counter" else name
             for kind, name in re.findall(r'prom\.(Gauge|Counter|Histogram)\(\s*"(ctwatchd_\w+)"', source)]
    assert names, "no metrics found in ctwatchd/metrics.py"
    text = (DOCS / "ctwatchd.toml.5.scd").read_text()
    assert [n for n in names if f"*{n}*" not in text] == []


# --- example configuration -----------------------------------------------------------------------

def test_example_config_is_exactly_the_built_in_defaults(tmp_path: Path) -> None:
    """packaging/ctwatchd.toml, as shipped (all commented), loads to the built-in defaults."""
    path = private_copy(EXAMPLE, tmp_path / "ctwatchd.toml")
    assert configmod.load(path) == dataclasses.replace(configmod.DEFAULTS, path=path)


def test_example_config_uncommented_is_valid_and_covers_every_key(tmp_path: Path) -> None:
    """Switching on every commented setting gives a valid file that sets every key to its default."""
    path = tmp_path / "all.toml"
    path.write_text(uncommented(EXAMPLE.read_text()))
    path.chmod(0o644)
    cfg = configmod.load(path)
    data = tomllib.loads(path.read_text())
    keys = {k for table in data.values() for k in table if not k.startswith("net.")}
    assert sorted(set(FIELD_KEYS.values()) - keys) == []
    expected = dataclasses.replace(configmod.DEFAULTS, path=path, modprobe=cfg.modprobe, systemctl=cfg.systemctl,
                                   iptables=cfg.iptables, journalctl=cfg.journalctl,
                                   metrics_textfile=cfg.metrics_textfile)
    assert cfg == expected
    assert cfg.modprobe == "/usr/sbin/modprobe" and cfg.systemctl == "/usr/bin/systemctl"
    assert cfg.iptables == "/usr/sbin/iptables" and cfg.journalctl == "/usr/bin/journalctl"


def test_example_config_passes_ctwatchd_check(tmp_path: Path) -> None:
    """`ctwatchd check --config packaging/ctwatchd.toml` exits 0 or 1 (healthy or degraded), never 2."""
    path = private_copy(EXAMPLE, tmp_path / "ctwatchd.toml")
    done = run([ctwatchd_exe(), "check", "--config", path], ok=(0, 1), timeout=60)
    assert "status:" in done.stdout


# --- Debian ------------------------------------------------------------------------------------------

def deb_file(deb: Built) -> Path:
    return next(p for p in deb.files if p.suffix == ".deb")


def test_deb_installs_the_expected_files(deb: Built) -> None:
    """The .deb holds the program, module, unit, catalog, conffile and both man pages, and nothing in /usr/local."""
    listing = run(["dpkg-deb", "-c", deb_file(deb)]).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    expected = {
        "/usr/bin/ctwatchd", "/etc/ctwatchd/ctwatchd.toml", "/lib/systemd/system/ctwatchd.service",
        "/usr/lib/systemd/catalog/ctwatchd.catalog", "/usr/share/man/man8/ctwatchd.8.gz",
        "/usr/share/man/man5/ctwatchd.toml.5.gz", "/usr/lib/python3/dist-packages/ctwatchd/cli.py",
        "/usr/share/doc/ctwatchd/copyright", "/usr/share/ctwatchd/audit/ctwatchd.rules",
        "/usr/share/ctwatchd/prometheus/ctwatchd-alerts.yml",
    }
    assert sorted(expected - paths) == []
    assert [p for p in paths if p.startswith("/usr/local")] == []
    assert (deb.outdir / "lintian.txt").exists()


def test_deb_control_conffiles_and_scripts(deb: Built) -> None:
    """Depends names Debian's libraries, the config is a conffile, and the unit is enabled, started and restarted."""
    pkg = deb_file(deb)
    fields = run(["dpkg-deb", "-f", pkg, "Package", "Version", "Architecture", "Depends"]).stdout
    assert "Package: ctwatchd" in fields and f"Version: {VERSION}-" in fields and "Architecture: all" in fields
    depends = fields.split("Depends:", 1)[1]
    assert [d for d in DEPENDS if not re.search(rf"\b{re.escape(d)}\b", depends)] == []
    info = subprocess.run(["dpkg-deb", "-I", str(pkg), "conffiles", "postinst"], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    assert "/etc/ctwatchd/ctwatchd.toml" in info
    assert "deb-systemd-helper enable 'ctwatchd.service'" in info
    assert "_dh_action=restart" in info  # restart after upgrade, see debian/rules


def test_deb_lintian_has_no_errors_or_unexplained_warnings(deb: Built) -> None:
    """lintian exits 0 on the build (no errors), and prints no E: or W: tag that is not overridden."""
    report = (deb.outdir / "lintian.txt").read_text()
    tags = [line for line in report.splitlines() if re.match(r"^[EW]: ", line)]
    assert tags == [], report


def test_deb_runs_on_debians_own_python_libraries(deb: Built, tmp_path: Path) -> None:
    """The packaged ctwatchd, unpacked, runs `--version` and `check` on /usr/bin/python3 with bookworm's libraries."""
    require_tools("dpkg-deb")
    for name in ("pyudev", "structlog", "sdnotify"):
        require_module(name, "/usr/bin/python3")
    root = tmp_path / "root"
    run(["dpkg-deb", "-x", deb_file(deb), root])
    env = {"PYTHONPATH": str(root / "usr/lib/python3/dist-packages"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    exe = root / "usr/bin/ctwatchd"
    assert exe.read_text().startswith("#!/usr/bin/python3\n")
    assert run(["/usr/bin/python3", exe, "--version"], env=env).stdout.strip() == f"ctwatchd {VERSION}"
    conf = private_copy(root / "etc/ctwatchd/ctwatchd.toml", tmp_path / "ctwatchd.toml")
    run(["/usr/bin/python3", exe, "check", "--config", conf], env=env, ok=(0, 1), timeout=60)


# --- RPM ---------------------------------------------------------------------------------------------

def test_rpm_lists_the_expected_files_config_and_scriptlets(rpm: Built) -> None:
    """rpmbuild -bb made a noarch RPM whose file list, %config(noreplace), Requires and scriptlets are right."""
    pkg = next(p for p in rpm.files if p.name.endswith(".noarch.rpm"))
    assert pkg.name == f"ctwatchd-{VERSION}-1.noarch.rpm"
    files = set(run(["rpm", "-qpl", pkg]).stdout.split())
    expected = {"/usr/bin/ctwatchd", "/etc/ctwatchd/ctwatchd.toml", "/usr/lib/systemd/system/ctwatchd.service",
                "/usr/lib/systemd/catalog/ctwatchd.catalog", "/usr/share/man/man8/ctwatchd.8",
                "/usr/share/man/man5/ctwatchd.toml.5", "/usr/share/ctwatchd/audit/ctwatchd.rules",
                "/usr/share/ctwatchd/prometheus/ctwatchd-alerts.yml"}
    assert sorted(expected - {re.sub(r"\.gz$", "", f) for f in files}) == []
    assert any(re.fullmatch(r"/usr/lib/python3\.\d+/site-packages/ctwatchd/cli\.py", f) for f in files)
    assert [f for f in files if f.startswith("/usr/local")] == []
    assert run(["rpm", "-qp", "--configfiles", pkg]).stdout.split() == ["/etc/ctwatchd/ctwatchd.toml"]
    noreplace = run(["rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", pkg]).stdout
    assert re.search(r"^/etc/ctwatchd/ctwatchd.toml c?n", noreplace, re.M), noreplace
    requires = run(["rpm", "-qpR", pkg]).stdout
    for dep in ("python3dist(pyudev)", "python3dist(structlog)", "python3dist(sdnotify)", "kmod"):
        assert dep in requires
    scripts = run(["rpm", "-qp", "--scripts", pkg]).stdout
    assert "preset ctwatchd.service" in scripts and "try-restart ctwatchd.service" in scripts
    assert "disable --now ctwatchd.service" in scripts


# --- sdist and wheel ---------------------------------------------------------------------------------

def test_sdist_and_wheel_build_and_pass_twine(python_dists: Built) -> None:
    """python -m build makes the sdist and the wheel from it, and twine check passes both."""
    names = sorted(p.name for p in python_dists.files)
    assert names == [f"ctwatchd-{VERSION}-py3-none-any.whl", f"ctwatchd-{VERSION}.tar.gz"]
    assert python_dists.output.count("PASSED") == 2
    with zipfile.ZipFile(python_dists.outdir / names[0]) as whl:
        members = whl.namelist()
        assert "ctwatchd/cli.py" in members
        entry = whl.read(f"ctwatchd-{VERSION}.dist-info/entry_points.txt").decode()
    assert "ctwatchd = ctwatchd.cli:main" in entry


def test_sdist_carries_unit_catalog_config_and_man_sources(python_dists: Built) -> None:
    """The sdist holds what distribution packages install besides the Python code, and their recipes."""
    with tarfile.open(python_dists.outdir / f"ctwatchd-{VERSION}.tar.gz") as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {"systemd/ctwatchd.service", "systemd/ctwatchd.catalog", "packaging/ctwatchd.toml",
              "docs/ctwatchd.8.scd", "docs/ctwatchd.toml.5.scd", "packaging/rpm/ctwatchd.spec",
              "packaging/debian/control", "packaging/build-man.sh", "MANIFEST.in",
              "packaging/audit/ctwatchd.rules", "packaging/prometheus/ctwatchd-alerts.yml"}
    assert sorted(wanted - names) == []
    assert [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".deb", ".rpm"))] == []


@pytest.fixture(scope="module")
def image_venv(python_dists: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the Containerfile builds: a venv on bookworm's python3 with the wheel and its [metrics] extra."""
    require_tools("/usr/bin/python3")
    require_module("ensurepip", "/usr/bin/python3")
    containerfile = (K8S / "Containerfile").read_text()
    assert re.search(r"^ARG BASE=docker\.io/library/debian:bookworm-slim$", containerfile, re.M)
    assert len(re.findall(r"^FROM \$\{BASE\}", containerfile, re.M)) == 2
    assert '"$wheel[metrics]"' in containerfile
    wheel = next(p for p in python_dists.files if p.suffix == ".whl")
    copy = re.search(r"^COPY dist/ (\S+)/$", containerfile, re.M)
    glob = re.search(r"wheel=\$\(echo (\S+)\)", containerfile)
    assert copy and glob and Path(f"{copy.group(1)}/{wheel.name}").match(glob.group(1))
    venv = tmp_path_factory.mktemp("image") / "opt-ctwatchd"
    run(["/usr/bin/python3", "-m", "venv", venv], timeout=300)
    run([venv / "bin/pip", "install", "-q", "--disable-pip-version-check", f"{wheel}[metrics]"], timeout=600)
    return venv


def image_config(tmp_path: Path) -> Path:
    """The ConfigMap's ctwatchd.toml, with its host paths (state, metrics) moved below tmp_path."""
    text = configmap_toml()
    text = text.replace("/var/lib/node_exporter/textfile_collector", str(tmp_path / "textfile"))
    text = text.replace("/run/ctwatchd", str(tmp_path / "run"))
    (tmp_path / "textfile").mkdir()
    (tmp_path / "run").mkdir(mode=0o700)
    conf = tmp_path / "ctwatchd.toml"
    conf.write_text(text)
    conf.chmod(0o644)
    return conf


def test_image_venv_runs_ctwatchd_check(image_venv: Path, tmp_path: Path) -> None:
    """In the image's venv, `ctwatchd --version` and `ctwatchd check` with the ConfigMap's config work."""
    assert run([image_venv / "bin/ctwatchd", "--version"]).stdout.strip() == f"ctwatchd {VERSION}"
    run([image_venv / "bin/ctwatchd", "check", "--config", image_config(tmp_path)], ok=(0, 1), timeout=60)


def test_image_venv_daemon_writes_metrics_and_stops_on_sigterm(image_venv: Path, tmp_path: Path) -> None:
    """`ctwatchd run` with the ConfigMap's config on a healthy fake host writes the textfile, exits 0 on SIGTERM."""
    conf = image_config(tmp_path)
    root = fake_root(tmp_path / "host", with_modules=True)
    prom = tmp_path / "textfile/ctwatchd.prom"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "JOURNAL_STREAM")}
    with subprocess.Popen([str(image_venv / "bin/ctwatchd"), "run", "--config", str(conf), "--root", str(root),
                           "--no-uevents"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env) as proc:
        deadline = time.monotonic() + 30
        while not prom.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    metrics = prom.read_text()
    assert re.search(r"^ctwatchd_healthy 1\.0$", metrics, re.M), metrics
    assert '"event": "daemon.stopping"' in output or '"event":"daemon.stopping"' in output, output


# --- node-problem-detector ---------------------------------------------------------------------------

GO_DURATION = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"
NPD_SCHEMA: dict[str, Any] = {
    # node-problem-detector's CustomPluginConfig (pkg/custompluginmonitor/types), strict about names.
    "type": "object",
    "required": ["plugin", "pluginConfig", "source", "conditions", "rules"],
    "additionalProperties": False,
    "properties": {
        "plugin": {"const": "custom"},
        "pluginConfig": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "invoke_interval": {"type": "string", "pattern": GO_DURATION},
                "timeout": {"type": "string", "pattern": GO_DURATION},
                "max_output_length": {"type": "integer", "minimum": 1},
                "concurrency": {"type": "integer", "minimum": 1},
                "enable_message_change_based_condition_update": {"type": "boolean"},
                "skip_initial_status": {"type": "boolean"},
            },
        },
        "source": {"type": "string", "minLength": 1},
        "metricsReporting": {"type": "boolean"},
        "conditions": {"type": "array", "items": {
            "type": "object", "required": ["type", "reason", "message"], "additionalProperties": False,
            "properties": {"type": {"type": "string", "pattern": "^[A-Z][A-Za-z]+$"},
                           "reason": {"type": "string", "pattern": "^[A-Z][A-Za-z]+$"},
                           "message": {"type": "string"}}}},
        "rules": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["type", "reason", "path"], "additionalProperties": False,
            "properties": {"type": {"enum": ["temporary", "permanent"]},
                           "condition": {"type": "string"},
                           "reason": {"type": "string", "pattern": "^[A-Z][A-Za-z]+$"},
                           "path": {"type": "string", "pattern": "^/"},
                           "args": {"type": "array", "items": {"type": "string"}},
                           "timeout": {"type": "string", "pattern": GO_DURATION},
                           "invoke_interval": {"type": "string", "pattern": GO_DURATION}}}},
    },
}


def go_seconds(duration: str) -> float:
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9.]+)(ns|us|µs|ms|s|m|h)", duration))


def test_npd_config_follows_the_custom_plugin_format() -> None:
    """The monitor config validates against NPD's CustomPluginConfig shape and NPD's own Validate() rules."""
    jsonschema = module("jsonschema")
    data = json.loads(NPD.read_text())
    jsonschema.validate(data, NPD_SCHEMA)
    conditions = {c["type"] for c in data["conditions"]}
    global_timeout = go_seconds(data["pluginConfig"]["timeout"])
    assert go_seconds(data["pluginConfig"]["invoke_interval"]) > global_timeout
    for rule in data["rules"]:
        assert go_seconds(rule.get("timeout", "0s")) <= global_timeout  # NPD refuses a larger rule timeout
        if rule["type"] == "permanent":
            assert rule["condition"] in conditions  # NPD: a permanent problem needs a default condition
    assert data["rules"][0]["condition"] == "ConntrackModulesMissing"
    assert "/usr/bin/ctwatchd check" in data["rules"][0]["args"][-1]


def test_npd_config_rejects_a_typo() -> None:
    """The structural check is not vacuous: a misspelled key fails it."""
    jsonschema = module("jsonschema")
    data = json.loads(NPD.read_text())
    data["pluginConfig"]["invoke_intervall"] = data["pluginConfig"].pop("invoke_interval")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, NPD_SCHEMA)


def fake_root(base: Path, *, with_modules: bool) -> Path:
    """A /sys, /proc tree: conntrack, NAT and bridge built in and healthy, or not there at all."""
    (base / "proc/sys/kernel").mkdir(parents=True)
    (base / "proc/sys/kernel/osrelease").write_text("6.1.0-test\n")
    (base / "proc/modules").write_text("")  # a modular kernel, nothing loaded
    (base / "sys/module").mkdir(parents=True)
    (base / "lib/modules/6.1.0-test").mkdir(parents=True)
    (base / "lib/modules/6.1.0-test/modules.dep").write_text("")
    if with_modules:
        for name in ("nf_conntrack", "nf_nat", "br_netfilter"):
            (base / "sys/module" / name).mkdir()
        (base / "proc/sys/net/netfilter").mkdir(parents=True)
        (base / "proc/sys/net/netfilter/nf_conntrack_count").write_text("0\n")
        (base / "proc/sys/net/bridge").mkdir(parents=True)
        for key in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
            (base / "proc/sys/net/bridge" / key).write_text("1\n")
    return base


@pytest.mark.parametrize(("case", "status"), [("healthy", 0), ("degraded", 1), ("unknown", 2)])
def test_npd_rule_passes_check_status_and_last_line(tmp_path: Path, case: str, status: int) -> None:
    """Run as NPD runs the rule: the exit status is check's (0 OK, 1 NonOK, 2 Unknown), the message its last line."""
    data = json.loads(NPD.read_text())
    rule = data["rules"][0]
    shim = tmp_path / "ctwatchd"
    roots = {"healthy": fake_root(tmp_path / "ok", with_modules=True),
             "degraded": fake_root(tmp_path / "bad", with_modules=False), "unknown": tmp_path / "nothing"}
    shim.write_text(f'#!/bin/sh\nexec "{ctwatchd_exe()}" "$@" --root "{roots[case]}" --config "{tmp_path}/c.toml"\n')
    shim.chmod(0o755)
    (tmp_path / "c.toml").write_text('[daemon]\nstate_file = "/nonexistent/ctwatchd/state.json"\n')
    (tmp_path / "c.toml").chmod(0o644)
    args = [a.replace("/usr/bin/ctwatchd", str(shim)) for a in rule["args"]]
    done = subprocess.run([rule["path"], *args], capture_output=True, text=True, check=False,
                          timeout=go_seconds(rule["timeout"]))
    limit = data["pluginConfig"]["max_output_length"]
    message = done.stdout.strip()
    assert done.returncode == status, done.stdout + done.stderr
    assert "\n" not in message
    # NPD cuts the output at max_output_length: all of it must fit, naming every module at fault.
    assert len(message) <= limit, (len(message), message)
    if status < 2:
        assert message.startswith(f"status: {case}"), message
    if case != "healthy":
        assert all(f"{m} {'absent' if case == 'degraded' else 'unavailable'}" in message
                   for m in ("nf_conntrack", "nf_nat", "br_netfilter")), message


# --- Kubernetes --------------------------------------------------------------------------------------

def manifests() -> list[dict[str, Any]]:
    yaml = module("yaml")
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def one(kind: str) -> dict[str, Any]:
    found = [d for d in manifests() if d["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def configmap_toml() -> str:
    return str(one("ConfigMap")["data"]["ctwatchd.toml"])


def test_k8s_manifests_validate_offline() -> None:
    """validate-k8s.sh passes with kubernetes-validate's bundled schemas, without network when we can cut it."""
    require_module("kubernetes_validate")
    argv: list[str | Path] = ["bash", PACKAGING / "validate-k8s.sh"]
    if os.geteuid() == 0 and shutil.which("unshare"):
        probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False, timeout=30)
        if probe.returncode == 0:
            argv = ["unshare", "--net", *argv]  # a network namespace with only a down loopback
    done = run(argv, timeout=300)
    assert done.stdout.count("passed") >= 2 * 4, done.stdout


def test_k8s_validation_rejects_a_broken_manifest(tmp_path: Path) -> None:
    """The schema check is not vacuous: an unknown container field fails strict validation."""
    require_module("kubernetes_validate")
    yaml = module("yaml")
    ds = one("DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(ds))
    done = run([sys.executable, "-m", "kubernetes_validate", "--strict", bad], ok=(1,), timeout=120)
    assert "livenesProbe" in done.stdout + done.stderr


def test_daemonset_design() -> None:
    """hostNetwork, no hostPID, read-only /lib/modules, the ConfigMap at /etc/ctwatchd, the textfile dir, the tag."""
    spec = one("DaemonSet")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert spec["hostNetwork"] is True and spec["hostPID"] is False
    assert container["image"].endswith(f":{VERSION}")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert sorted(m["name"] for m in mounts.values()) == sorted(volumes)
    assert mounts["/lib/modules"]["readOnly"] is True
    assert volumes[mounts["/lib/modules"]["name"]]["hostPath"]["path"] == "/lib/modules"
    assert volumes[mounts["/etc/ctwatchd"]["name"]]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    textfile = volumes[mounts["/var/lib/node_exporter/textfile_collector"]["name"]]
    assert textfile["hostPath"]["path"] == "/var/lib/node_exporter/textfile_collector"
    assert all(m.get("readOnly") for p, m in mounts.items() if p not in ("/run/ctwatchd",
                                                                          "/var/lib/node_exporter/textfile_collector"))
    assert not any(p.startswith("/run/systemd") for p in mounts)
    cfg = configmod.parse(tomllib.loads(configmap_toml()))
    assert cfg.metrics_textfile == Path("/var/lib/node_exporter/textfile_collector/ctwatchd.prom")
    assert cfg.state_file.parent == Path("/run/ctwatchd") and cfg.docker is configmod.DockerMode.NEVER


@pytest.mark.parametrize(("check_status", "probe_ok"), [(0, True), (1, True), (2, False)])
def test_liveness_probe_fails_only_when_check_cannot_tell(tmp_path: Path, check_status: int, probe_ok: bool) -> None:
    """The probe command passes on healthy and degraded and fails on `cannot tell` (exit 2)."""
    (container,) = one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    command = container["livenessProbe"]["exec"]["command"]
    stub = tmp_path / "ctwatchd"
    stub.write_text(f"#!/bin/sh\necho status\nexit {check_status}\n")
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=30,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert (done.returncode == 0) is probe_ok


# --- consistency and tooling -------------------------------------------------------------------------

def test_every_artefact_carries_the_project_version() -> None:
    """debian/changelog, the spec, the DaemonSet image tag and the Containerfile comment agree with __version__."""
    changelog = (PACKAGING / "debian/changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"ctwatchd ({VERSION}-")
    assert re.search(rf"^Version: +{re.escape(VERSION)}$", (PACKAGING / "rpm/ctwatchd.spec").read_text(), re.M)
    assert f"ctwatchd:{VERSION}" in (K8S / "Containerfile").read_text()
    assert one("DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"] == f"ctwatchd:{VERSION}"


def test_scripts_are_strict_and_executable() -> None:
    """Every packaging script is executable bash with `set -euo pipefail` and parses with bash -n."""
    scripts = sorted(PACKAGING.glob("*.sh"))
    assert len(scripts) >= 6
    for script in scripts:
        text = script.read_text()
        if script.name != "lib.sh":  # sourced, inherits the caller's options
            assert os.access(script, os.X_OK) and text.startswith("#!/usr/bin/env bash\n"), script.name
            assert "set -euo pipefail" in text, script.name
        run(["bash", "-n", script])


def test_scripts_pass_shellcheck() -> None:
    """shellcheck finds nothing in the packaging scripts."""
    require_tools("shellcheck")
    run(["shellcheck", *sorted(PACKAGING.rglob("*.sh"))], timeout=120)


def test_install_build_deps_is_a_quick_no_op_when_all_is_there() -> None:
    """With everything installed, install-build-deps.sh changes nothing and takes seconds."""
    require_tools("dpkg-query")
    check = run(["bash", PACKAGING / "install-build-deps.sh", "--check"], ok=(0, 1), timeout=120)
    if check.returncode != 0:
        unavailable(check.stderr.strip().splitlines()[-1])
    start = time.monotonic()
    done = run(["bash", PACKAGING / "install-build-deps.sh"], timeout=120)
    assert time.monotonic() - start < 15
    assert done.stdout.strip().splitlines()[-1] == "packaging build dependencies are installed"
