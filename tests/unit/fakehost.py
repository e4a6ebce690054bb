"""A temporary host tree that behaves like a modular kernel, for the injected-root seams.

FakeHost lays out proc/, sys/module/, lib/modules/<release>/ and modprobe.d below a temp dir, and
writes a `modprobe` executable that "loads" modules in that tree the way the kernel would: it
creates /sys/module/<m>/initstate and the sysctl files the module owns, at their kernel defaults.
"""

from __future__ import annotations

import os
import shutil
import stat
import textwrap
from pathlib import Path

RELEASE = "6.1.0-28-amd64"
BOOT_ID = "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b"

# module -> (path in modules.dep, dependencies)
MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "nf_defrag_ipv4": ("kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko.xz", ()),
    "nf_defrag_ipv6": ("kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko.xz", ()),
    "libcrc32c": ("kernel/lib/libcrc32c.ko.xz", ()),
    "nf_conntrack": ("kernel/net/netfilter/nf_conntrack.ko.xz", ("nf_defrag_ipv6", "nf_defrag_ipv4", "libcrc32c")),
    "nf_nat": ("kernel/net/netfilter/nf_nat.ko.xz", ("nf_conntrack", "nf_defrag_ipv6", "nf_defrag_ipv4",
                                                      "libcrc32c")),
    "stp": ("kernel/net/802/stp.ko.xz", ()),
    "bridge": ("kernel/net/bridge/bridge.ko.xz", ("stp",)),
    "br_netfilter": ("kernel/net/bridge/br_netfilter.ko.xz", ("bridge", "stp")),
    # conntrack helpers an operator loads by hand (collateral restore)
    "nf_conntrack_ftp": ("kernel/net/netfilter/nf_conntrack_ftp.ko.xz", ("nf_conntrack",)),
    "nf_nat_ftp": ("kernel/net/netfilter/nf_nat_ftp.ko.xz", ("nf_nat", "nf_conntrack_ftp", "nf_conntrack")),
}

CONNTRACK_DEFAULTS = {
    "nf_conntrack_max": "262144",
    "nf_conntrack_buckets": "65536",
    "nf_conntrack_tcp_timeout_established": "432000",
    "nf_conntrack_udp_timeout": "30",
    "nf_conntrack_tcp_loose": "1",
    "nf_conntrack_tcp_be_liberal": "0",
}
BRIDGE_DEFAULTS = {"bridge-nf-call-iptables": "1", "bridge-nf-call-ip6tables": "1",
                   "bridge-nf-call-arptables": "1"}


class FakeHost:
    def __init__(self, root: Path, *, release: str = RELEASE, modules: dict[str, tuple[str, tuple[str, ...]]]
                 | None = None, module_support: bool = True) -> None:
        self.root = root
        self.release = release
        self.modules = dict(MODULES if modules is None else modules)
        (root / "proc/sys/kernel").mkdir(parents=True)
        (root / "proc/sys/kernel/osrelease").write_text(release + "\n")
        (root / "proc/sys/kernel/random").mkdir()
        (root / "proc/sys/kernel/random/boot_id").write_text(BOOT_ID + "\n")
        (root / "proc/sys/net").mkdir(parents=True)
        (root / "sys/module").mkdir(parents=True)
        (root / "etc/modprobe.d").mkdir(parents=True)
        self.moddir = root / "lib/modules" / release
        self.moddir.mkdir(parents=True)
        if module_support:
            (root / "proc/modules").write_text("")
        self.write_modules_dep()
        self.log = root / "modprobe.log"
        self.modprobe = self.write_modprobe()
        self.journalctl = self.write_journalctl()

    # -- layout -------------------------------------------------------------------------------
    def write_modules_dep(self) -> None:
        lines = []
        for path, deps in self.modules.values():
            lines.append(f"{path}: " + " ".join(self.modules[d][0] for d in deps if d in self.modules))
        (self.moddir / "modules.dep").write_text("\n".join(lines) + "\n")

    def write_modprobe(self, *, exit_code: int = 0, load: bool = True, extra: str = "",
                       readonly: tuple[str, ...] = ()) -> Path:
        """An executable standing in for modprobe: loads a module and its deps into this tree."""
        path = self.root / "bin/modprobe"
        path.parent.mkdir(exist_ok=True)
        deps = {name: " ".join(d) for name, (_, d) in self.modules.items()}
        cases = "\n".join(f"    {n}) deps='{d}' ;;" for n, d in deps.items())
        deps_of = "\n".join(f"    {n}) echo '{d}' ;;" for n, d in deps.items())
        script = textwrap.dedent("""\
            #!/bin/sh
            # fake modprobe for ctwatchd tests
            root='{root}'
            echo "$*" >> "$root/modprobe.log"
            {extra}
            deps_of() {{
                case "$1" in
            {deps_of}
                esac
            }}
            load_one() {{
                echo "$1" >> "$root/loads.log"  # what a udev stand-in counts: inode numbers get reused
                mkdir -p "$root/sys/module/$1/holders"
                echo 0 > "$root/sys/module/$1/refcnt"
                for d in $(deps_of "$1"); do  # the kernel lists a module's users in holders/
                    mkdir -p "$root/sys/module/$d/holders" && : > "$root/sys/module/$d/holders/$1"
                done
                case "$1" in
                nf_conntrack)
                    mkdir -p "$root/sys/module/nf_conntrack/parameters"
                    echo 65536 > "$root/sys/module/nf_conntrack/parameters/hashsize"
                    chmod 0600 "$root/sys/module/nf_conntrack/parameters/hashsize"
                    mkdir -p "$root/proc/sys/net/netfilter"
                    echo 0 > "$root/proc/sys/net/netfilter/nf_conntrack_count"
                    chmod 0444 "$root/proc/sys/net/netfilter/nf_conntrack_count"
            {conntrack}
                    ;;
                br_netfilter)
                    mkdir -p "$root/proc/sys/net/bridge"
            {bridge}
                    ;;
                esac
                echo live > "$root/sys/module/$1/initstate"  # last, as the kernel: init (sysctls) is done
            }}
            for m in "$@"; do
                case "$m" in -*) continue ;; esac
                case "$m" in
            {cases}
                *) echo "modprobe: FATAL: Module $m not found in directory /lib/modules/{release}" >&2; exit 1 ;;
                esac
                if [ {load} = 1 ]; then
                    for d in $deps; do [ -e "$root/sys/module/$d/initstate" ] || load_one "$d"; done
                    [ -e "$root/sys/module/$m/initstate" ] || load_one "$m"
                fi
            done
            exit {exit_code}
            """).format(
            root=self.root, extra=extra, cases=cases, deps_of=deps_of, release=self.release, load=1 if load else 0,
            exit_code=exit_code,
            conntrack="\n".join([*(f'        echo {v} > "$root/proc/sys/net/netfilter/{k}"'
                                  for k, v in CONNTRACK_DEFAULTS.items()),
                                *(f'        chmod 0444 "$root/proc/sys/net/netfilter/{k}"' for k in readonly)]),
            bridge="\n".join(f'        echo {v} > "$root/proc/sys/net/bridge/{k}"'
                             for k, v in BRIDGE_DEFAULTS.items()),
        )
        path.write_text(script)
        path.chmod(0o755)
        return path

    def write_journalctl(self) -> Path:
        """A stand-in for journalctl: logs its argv, prints root/journal.json (audit entries) if there."""
        path = self.root / "bin/journalctl"
        path.parent.mkdir(exist_ok=True)
        path.write_text(textwrap.dedent(f"""\
            #!/bin/sh
            echo "$*" >> '{self.root}/journalctl.log'
            [ -e '{self.root}/journal.json' ] && cat '{self.root}/journal.json'
            exit 0
            """))
        path.chmod(0o755)
        return path

    def config(self, body: str = "", *, name: str = "ctwatchd.toml") -> Path:
        """A config file pointing modprobe and the state file into this tree, plus `body`."""
        path = self.root / name
        text = textwrap.dedent(body)
        if "[restore]" in text:
            text = text.replace("[restore]", f'[restore]\nmodprobe = "{self.modprobe}"', 1)
        else:
            text += f'\n[restore]\nmodprobe = "{self.modprobe}"\n'
        if "[daemon]" not in text:
            text += f'\n[daemon]\nstate_file = "{self.root}/run/state.json"\nlog_format = "console"\n'
        if "journalctl" not in text:
            text = text.replace("[daemon]", f'[daemon]\njournalctl = "{self.journalctl}"', 1)
        path.write_text(text)
        return path

    # -- kernel actions -----------------------------------------------------------------------
    def load(self, *names: str) -> None:
        os.spawnv(os.P_WAIT, str(self.modprobe), [str(self.modprobe), *names])

    def unload(self, name: str) -> None:
        shutil.rmtree(self.root / "sys/module" / name, ignore_errors=True)
        for holder in (self.root / "sys/module").glob(f"*/holders/{name}"):
            holder.unlink()
        if name == "nf_conntrack":
            shutil.rmtree(self.root / "proc/sys/net/netfilter", ignore_errors=True)
        if name == "br_netfilter":
            shutil.rmtree(self.root / "proc/sys/net/bridge", ignore_errors=True)

    def set_state(self, name: str, state: str) -> None:
        (self.root / "sys/module" / name).mkdir(parents=True, exist_ok=True)
        (self.root / "sys/module" / name / "refcnt").write_text("0\n")
        (self.root / "sys/module" / name / "initstate").write_text(state + "\n")

    def builtin_dir(self, name: str) -> None:
        """A built-in module with parameters: /sys/module/<name>/parameters, no initstate."""
        (self.root / "sys/module" / name / "parameters").mkdir(parents=True, exist_ok=True)

    def sysctl(self, key: str) -> Path:
        return self.root / "proc/sys" / key.replace(".", "/")

    def read_sysctl(self, key: str) -> str | None:
        try:
            return self.sysctl(key).read_text().strip()
        except OSError:
            return None

    def write_sysctl(self, key: str, value: str, *, mode: int = 0o644) -> None:
        path = self.sysctl(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
        path.chmod(mode)

    def block(self, line: str, file: str = "protect.conf", directory: str = "etc/modprobe.d") -> Path:
        path = self.root / directory / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(line + "\n")
        return path

    def modprobe_calls(self) -> list[str]:
        try:
            return self.log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def is_live(self, name: str) -> bool:
        try:
            return (self.root / "sys/module" / name / "initstate").read_text().strip() == "live"
        except OSError:
            return False


def executable(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path
