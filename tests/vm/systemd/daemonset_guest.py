"""The DaemonSet's shape on the real kernel: the image built offline and run as the manifest runs it.

Runs in the docker boot after docker_guest.py, as `python3 daemonset_guest.py RESULTS`; stdlib only.
The host wrote /root/image: the imported base's tar, the build context (Containerfile, the wheel and
its dependencies' wheels) and spec.json, the container as packaging/kubernetes/daemonset.yaml and
configmap.yaml declare it (image, args, env, securityContext, mounts, liveness command, grace period,
the ConfigMap's ctwatchd.toml). The host's own ctwatchd.service is stopped first: one repairer at a
time. Facts go to RESULTS/daemonset.json; the host test asserts on them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from docker_guest import FAMILY, container_pid, holders_first, initstate, must, sh, wait_for

RESULTS = Path(sys.argv[1])
IMAGE_DIR = Path("/root/image")
SPEC: dict[str, Any] = json.loads((IMAGE_DIR / "spec.json").read_text())
BASE = "ctwatchd-base:bookworm"
BRIDGE = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
BLOCKER = Path("/etc/modprobe.d/zz-ctwatchd-test-block.conf")
NAME = "ctwatchd"
TEXTFILE_DIR = "/var/lib/node_exporter/textfile_collector"
NODE_EXPORTER = IMAGE_DIR / "prometheus-node-exporter"  # Debian's, copied from the test host
out: dict[str, Any] = {}


def iso(stamp: str) -> float:
    """An RFC 3339 time (docker's has nanoseconds) as seconds since the epoch."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp() + float(f"0.{frac or 0}")


def running(pid: str) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def live(*modules: str) -> bool:
    return all(initstate(m) == "live" for m in modules)


def bridge() -> str | None:
    try:
        return BRIDGE.read_text().strip()
    except OSError:
        return None


def restored() -> bool:
    return live(*FAMILY) and bridge() == "1"


def unload(*modules: str) -> list[str]:
    """rmmod the modules and whatever sits on them, holders first; the names in the order removed."""
    order = holders_first(modules)
    for m in order:
        for _ in range(20):  # a flushed rule's module reference is dropped a moment later (RCU)
            p = sh("rmmod", m)
            if p.returncode == 0 or initstate(m) is None:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"rmmod {m}: {p.stderr.strip()}")
    return order


def config_dir(name: str, toml: str) -> Path:
    """A ConfigMap volume as kubelet lays it out: ctwatchd.toml -> ..data/ctwatchd.toml, ..data -> a
    timestamped directory holding the file, mode 0444 as defaultMode says."""
    d = Path("/root/ds") / name
    stamped = d / "..2026_01_01_00_00_00.000000001"
    stamped.mkdir(parents=True, exist_ok=True)
    (stamped / "ctwatchd.toml").write_text(toml)
    (stamped / "ctwatchd.toml").chmod(0o444)
    for link, target in (("..data", stamped.name), ("ctwatchd.toml", "..data/ctwatchd.toml")):
        if not (d / link).is_symlink():
            (d / link).symlink_to(target)
    return d


def hold_off(toml: str) -> str:
    """The ConfigMap's config with `[hold] enabled = false`, for the steps that unload nf_conntrack or
    nf_nat on the host: the hold (on by default) would refuse that. A [hold] table the ConfigMap has
    already is kept (one header per table in TOML), with its `enabled` line replaced."""
    head, sep, rest = toml.partition("\n[hold]\n")
    if not sep:
        text = toml.rstrip("\n") + "\n\n[hold]\nenabled = false\n"
    else:
        body, nxt, tail = rest.partition("\n[")
        body = "\n".join(line for line in body.split("\n") if not line.replace(" ", "").startswith("enabled="))
        text = f"{head}\n[hold]\nenabled = false\n{body}{nxt}{tail}"
    assert tomllib.loads(text)["hold"]["enabled"] is False, text
    return text


def run_args(config: Path, *, privileged: bool = True) -> list[str]:
    """`docker run` options for the pod spec in spec.json: what kubelet asks of the runtime."""
    args = ["--network", "host"] if SPEC["hostNetwork"] else []
    if SPEC["readOnlyRootFilesystem"]:
        args.append("--read-only")
    if privileged and SPEC["privileged"]:
        args.append("--privileged")
    elif not privileged:  # the manifest's documented variant
        args += ["--cap-drop", "ALL", *(f"--cap-add={c}" for c in SPEC["unprivileged_caps"])]
    for key, value in SPEC["env"].items():
        args += ["-e", f"{key}={value}"]
    for m in SPEC["mounts"]:
        if m["kind"] == "configMap":
            args += ["-v", f"{config}:{m['path']}:ro"]
        elif m["kind"] == "emptyDir":
            args += ["--tmpfs", f"{m['path']}:mode=0700,size={m['size']}"]
        else:
            Path(m["host"]).mkdir(parents=True, exist_ok=True)  # DirectoryOrCreate
            args += ["-v", f"{m['host']}:{m['path']}{':ro' if m['readOnly'] else ''}"]
    return args


def start(name: str, config: Path, *extra: str, **kw: Any) -> float:
    must("docker", "run", "-d", "--name", name, *run_args(config, **kw), *extra, SPEC["image"], *SPEC["args"])
    return time.monotonic()


def logs(name: str) -> dict[str, Any]:
    p = sh("docker", "logs", name, timeout=60)
    streams = {"stdout": p.stdout.splitlines(), "stderr": p.stderr.splitlines()}
    parsed: dict[str, list[dict[str, Any]]] = {k: [] for k in streams}
    other: list[str] = []
    for stream, lines in streams.items():
        for line in lines:
            try:
                parsed[stream].append(json.loads(line))
            except ValueError:
                other.append(f"{stream}: {line[:300]}")
    entries = [e for v in parsed.values() for e in v]
    return {"json_lines": {k: len(v) for k, v in parsed.items()}, "not_json": other[:20], "entries": entries,
            "events": sorted({str(e.get("event")) for e in entries}),
            "hook_runs_ok": sum(1 for e in entries if e.get("event") == "restore.step"
                                and e.get("action") == "run-hook" and e.get("result") == "ok")}


def liveness(name: str) -> int:
    return sh("docker", "exec", name, *SPEC["liveness"], timeout=120).returncode


def check_rc(name: str) -> int:
    return sh("docker", "exec", name, "ctwatchd", "check", timeout=120).returncode


def scrape() -> dict[str, float]:
    """node_exporter's ctwatchd_* and node_nf_conntrack_entries samples, by series."""
    text = sh("curl", "-s", "--max-time", "10", "http://127.0.0.1:9100/metrics", timeout=30).stdout
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("ctwatchd_", "node_nf_conntrack_entries ")):
            series, _, value = line.rpartition(" ")
            try:
                samples[series] = float(value)
            except ValueError:
                continue
    return samples


def scraped(until: Any, timeout: float = 60) -> dict[str, float]:
    """Scrape until `until(samples)` holds (the textfile is rewritten at the daemon's next look)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape()
        if until(samples) or time.monotonic() > deadline:
            return {k: v for k, v in samples.items() if not k.startswith("ctwatchd_restore_duration")}
        time.sleep(1)


def step_build() -> None:
    r: dict[str, Any] = out.setdefault("build", {})
    sh("systemctl", "stop", "ctwatchd.service")
    must("systemctl", "start", "docker.service", timeout=300)
    t0 = time.monotonic()
    must("docker", "import", str(IMAGE_DIR / "ctwatchd-base.tar"), BASE, timeout=600)
    r["import_s"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    p = sh("docker", "build", "--network", "none", "--build-arg", f"BASE={BASE}", "--build-arg", "PIP_NO_INDEX=1",
           "-f", str(IMAGE_DIR / "ctx/packaging/kubernetes/Containerfile"), "-t", SPEC["image"],
           str(IMAGE_DIR / "ctx"), timeout=1200)
    r["build_s"], r["build_rc"] = round(time.monotonic() - t0, 1), p.returncode
    r["build_tail"] = (p.stdout + p.stderr)[-3000:]
    if p.returncode != 0:
        raise RuntimeError(f"docker build: exit {p.returncode}")
    size = sh("docker", "image", "inspect", "-f", "{{.Size}}", SPEC["image"]).stdout.strip()
    base = sh("docker", "image", "inspect", "-f", "{{.Size}}", BASE).stdout.strip()
    r["image_bytes"], r["base_bytes"] = int(size), int(base)


def step_privileged() -> None:
    """Start with the family unloaded; the container loads it; host rmmods; SIGTERM."""
    r: dict[str, Any] = out.setdefault("privileged", {})
    config = config_dir("config", hold_off(SPEC["config"]))
    # docker's rules hold xt_*/nft_* modules on the family; with them flushed it can be unloaded (the
    # later steps need no docker networking: the pod uses the host's network, the build none).
    for argv in (["iptables", "-t", "nat", "-F"], ["iptables", "-t", "nat", "-X"], ["iptables", "-F"],
                 ["iptables", "-X"], ["nft", "flush", "ruleset"]):
        sh(*argv)
    r["unloaded_before_start"] = unload(*FAMILY)
    r["absent_before_start"] = not any(initstate(m) for m in FAMILY) and bridge() is None
    t0 = start(NAME, config)
    r["start_to_restored_s"] = wait_for(restored, 300, 0.5)
    r["started_s_from"] = round(time.monotonic() - t0, 1)
    r["pid1"] = sh("docker", "exec", NAME, "cat", "/proc/1/comm").stdout.strip()
    r["version"] = sh("docker", "exec", NAME, "ctwatchd", "--version", timeout=120).stdout.strip()
    r["liveness_healthy"], r["check_healthy"] = liveness(NAME), check_rc(NAME)
    removals = []
    for modules in (("br_netfilter",), ("nf_nat", "nf_conntrack")):
        time.sleep(2)
        gone = unload(*modules)
        t0 = time.monotonic()
        back = wait_for(restored, 120, 0.1)
        removals.append({"rmmod": gone, "restored_s": back})
    r["removals"] = removals
    # node_exporter on the host, reading the pod's textfile and the host's conntrack, as on a node.
    NODE_EXPORTER.chmod(0o755)
    exporter = subprocess.Popen([str(NODE_EXPORTER), "--web.listen-address=127.0.0.1:9100",
                                 "--collector.disable-defaults", "--collector.textfile",
                                 f"--collector.textfile.directory={TEXTFILE_DIR}", "--collector.conntrack"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r["scrape_healthy"] = scraped(lambda m: m.get("ctwatchd_healthy") == 1.0)
        # Degraded: a blocker in the host's modprobe.d (mounted read-only), nf_conntrack and nf_nat removed.
        BLOCKER.write_text("install nf_conntrack /bin/true\n")
        time.sleep(1)
        r["blocked_rmmod"] = unload("nf_nat", "nf_conntrack")
        r["scrape_degraded"] = scraped(lambda m: m.get("ctwatchd_conntrack_absent") == 1.0)
        r["check_degraded"], r["liveness_degraded"] = check_rc(NAME), liveness(NAME)
        r["conntrack_while_blocked"] = initstate("nf_conntrack")
        BLOCKER.unlink()
        r["unblocked_to_restored_s"] = wait_for(restored, 120, 0.2)
        r["scrape_restored"] = scraped(lambda m: m.get("ctwatchd_healthy") == 1.0
                                       and "node_nf_conntrack_entries" in m)
    finally:
        exporter.terminate()
        exporter.wait(30)
    r["metrics"] = sorted({line.split("{")[0].split(" ")[0] for line in
                           Path(TEXTFILE_DIR, "ctwatchd.prom").read_text().splitlines()
                           if line.startswith("ctwatchd_")})
    # SIGTERM as kubelet's runtime sends it to PID 1, timed from the kill itself: a `docker stop` adds
    # the CLI's and dockerd's own seconds under TCG (12 s of 19 in one run) to what the daemon takes.
    pid = container_pid(NAME)
    t0, wall = time.monotonic(), time.time()
    os.kill(int(pid), signal.SIGTERM)
    r["sigterm_to_exit_s"] = wait_for(lambda: not running(pid), SPEC["grace"] + 30, 0.05)
    r["exit_code"] = sh("docker", "wait", NAME, timeout=120).stdout.strip()
    r["logs"] = logs(NAME)
    stopping = [e["timestamp"] for e in r["logs"].pop("entries") if e.get("event") == "daemon.stopping"]
    r["stopping_logged_after_s"] = round(iso(stopping[-1]) - wall, 2) if stopping else None
    r["wait_s"] = round(time.monotonic() - t0, 2)
    sh("docker", "rm", "-f", NAME)


def step_cannot_tell() -> None:
    """A broken configuration: check exits 2, and the manifest's liveness command fails on it."""
    r: dict[str, Any] = out.setdefault("cannot_tell", {})
    config = config_dir("broken", SPEC["config"].replace("poll_interval = 5.0", 'poll_interval = "often"'))
    # one container for both (each start costs seconds under TCG): check's own code, then the probe's
    assert SPEC["liveness"][:2] == ["/bin/sh", "-c"], SPEC["liveness"]
    both = f'ctwatchd check >/dev/null 2>&1; echo "check=$?"; {SPEC["liveness"][2]}; echo "liveness=$?"'
    p = sh("docker", "run", "--rm", *run_args(config), "--entrypoint", "/bin/sh", SPEC["image"], "-c", both,
           timeout=300)
    codes = dict(line.split("=", 1) for line in p.stdout.split() if "=" in line)
    r["check_rc"], r["liveness_rc"] = int(codes.get("check", -1)), int(codes.get("liveness", -1))


def children(pid: str) -> list[tuple[str, str]]:
    """(comm, state) of each child of the container's PID 1 (ctwatchd, `pid` on the host), read through
    the host's /proc: fast, where one `docker inspect` can outlive the orphan."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[1] == pid:
            found.append((comm, fields[0]))
    return found


def step_hooks() -> None:
    """ctwatchd is PID 1: a hook's background child is handed to it and must be reaped. 20 hook runs."""
    r: dict[str, Any] = out.setdefault("hooks", {})
    # The hook also counts its runs in a directory the host sees (cheaper to poll than `docker logs`).
    runs_file = Path("/root/ds/hooklog/runs")
    runs_file.parent.mkdir(parents=True, exist_ok=True)
    runs_file.write_text("")
    toml = SPEC["config"].replace("hooks = []", 'hooks = [["/bin/sh", "-c", "echo ran >>/hooklog/runs; '
                                  'sleep 5 & exit 0"]]\nmax_restarts = 1000')
    start(NAME, config_dir("hooks", toml), "-v", f"{runs_file.parent}:/hooklog")
    wait_for(restored, 300, 0.5)
    # The pod runs on the ConfigMap's defaults here, hold on: its table is in the host's namespace
    # (hostNetwork), owned by the container's ctwatchd, and the host's rmmod of nf_nat is refused.
    r["held_after_s"] = wait_for(lambda: sh("nft", "list", "table", "ip", "ctwatchd").returncode == 0, 60, 0.5)
    nat_before = _instance("nf_nat")
    r["host_rmmod_nf_nat"] = sh("rmmod", "nf_nat").returncode
    r["nf_nat_same"] = nat_before is not None and _instance("nf_nat") == nat_before
    pid = container_pid(NAME)
    runs, orphans = 0, 0
    for i in range(20):
        unload("br_netfilter")
        if wait_for(lambda: len(runs_file.read_text().split()) > i, 90, 0.1) is not None:  # noqa: B023
            runs += 1
        # the hook's `sleep 5`, its shell gone, is ctwatchd's child for a while: what must be reaped
        wait_for(lambda: any(comm == "sleep" for comm, _ in children(pid)), 3, 0.05)
        orphans += sum(1 for comm, _ in children(pid) if comm == "sleep")
    time.sleep(7)  # the last hook's sleep 5 has exited
    r["restores"], r["orphans_seen"] = runs, orphans
    r["hook_runs"] = logs(NAME)["hook_runs_ok"]
    r["zombies"] = [c for c in children(pid) if c[1] == "Z"]
    sh("docker", "rm", "-f", NAME)
    r["released_after_s"] = wait_for(lambda: sh("nft", "list", "table", "ip", "ctwatchd").returncode != 0, 60, 0.5)


def _instance(module: str) -> int | None:
    try:
        return os.stat(f"/sys/module/{module}").st_ino
    except OSError:
        return None


def ready(name: str) -> bool:
    return "daemon.ready" in logs(name)["events"]


def step_unprivileged() -> None:
    """The manifest's documented variant, SYS_MODULE + NET_ADMIN and not privileged: which repairs work.
    A module removal (its sysctls come back at the kernel's defaults, here 1), a bridge sysctl set to 0
    behind its back, and a tuned nf_conntrack_max lost in a reload."""
    r: dict[str, Any] = out.setdefault("unprivileged", {})
    tuned = Path("/proc/sys/net/netfilter/nf_conntrack_max")
    tuned.write_text("131072\n")
    start(NAME, config_dir("config", hold_off(SPEC["config"])), privileged=False)
    r["ready_s"] = wait_for(lambda: ready(NAME), 300, 1.0)
    time.sleep(6)  # a poll: the tuned value is in its snapshot
    r["rmmod"] = unload("br_netfilter")
    r["module_back_s"] = wait_for(lambda: live("br_netfilter"), 120, 0.2)
    BRIDGE.write_text("0\n")
    time.sleep(12)  # two polls and a retry
    r["bridge_after_drift"] = bridge()
    r["rmmod_conntrack"] = unload("nf_nat", "nf_conntrack")
    r["conntrack_back_s"] = wait_for(lambda: live("nf_conntrack", "nf_nat"), 120, 0.2)
    time.sleep(8)
    r["conntrack_max_after"] = tuned.read_text().strip()
    r["check_rc"] = check_rc(NAME)
    r["logs"] = logs(NAME)
    r["failed_steps"] = sorted({f"{e.get('action')}: {str(e.get('detail'))[:160]}" for e in r["logs"].pop("entries")
                                if e.get("event") == "restore.step" and e.get("result") != "ok"})[:6]
    sh("docker", "rm", "-f", NAME)
    BRIDGE.write_text("1\n")  # leave the host as we found it
    tuned.write_text("131072\n")


def main() -> int:
    RESULTS.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name, step in (("build", step_build), ("privileged", step_privileged), ("cannot_tell", step_cannot_tell),
                       ("hooks", step_hooks), ("unprivileged", step_unprivileged)):
        t0 = time.monotonic()
        try:
            step()
        except Exception as exc:
            failed += 1
            out.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
            if name == "build":
                break  # nothing to run without the image
        finally:
            out.setdefault("seconds", {})[name] = round(time.monotonic() - t0, 1)
            (RESULTS / "daemonset.json").write_text(json.dumps(out, indent=2))
    os.sync()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
