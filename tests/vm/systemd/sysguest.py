"""Boot the debootstrapped root (see build-root.sh) under real systemd as PID 1.

The guest is started with ``vng --systemd --rw``: its root is the host directory
itself (shared over 9p), so files put into the root before the boot are seen
by the guest and whatever the guest writes under ``/ctwatchd-test`` is read by
the host afterwards.  One boot per root at a time (a lock file enforces it).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
CACHE = Path(os.environ.get("CTWATCHD_VM_CACHE", REPO / ".cache" / "vm"))
SYSROOT = CACHE / "sysroot"
KERNEL_DIR = Path(os.environ.get("CTWATCHD_VM_KERNEL", CACHE / "kernel"))
WHEELS = CACHE / "wheels"
VENV_BIN = REPO / ".venv" / "bin"
TEST_UNIT = "ctwatchd-vmtest.service"
GUEST_DIR = "ctwatchd-test"  # /ctwatchd-test in the guest, ROOT/ctwatchd-test on the host

_UNIT = f"""\
[Unit]
Description=ctwatchd VM test script
After=multi-user.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/bash /{GUEST_DIR}/run.sh
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec={{timeout}}
"""

_RUNNER = f"""\
#!/bin/bash
set -o pipefail
cd /{GUEST_DIR}
echo "ctwatchd-vmtest: start"
bash ./script.sh 2>&1 | tee results/output.txt
status=$?
echo "$status" > results/status
journalctl -b --no-pager -o short-monotonic > results/journal.txt 2>&1
echo "ctwatchd-vmtest: exit $status"
sync
"""


@dataclass(frozen=True)
class SystemdRun:
    """Outcome of one guest boot."""

    status: int | None  # exit status of the test script; None if it never finished
    console: str  # everything vng/QEMU/the guest printed
    elapsed: float  # seconds from vng start to its exit
    results: Path  # host copy of the guest's /ctwatchd-test/results
    timed_out: bool

    @property
    def output(self) -> str:
        """The test script's own stdout+stderr."""
        return _read(self.results / "output.txt")

    @property
    def journal(self) -> str:
        return _read(self.results / "journal.txt")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def vng_binary() -> Path | None:
    found = VENV_BIN / "vng"
    if found.exists():
        return found
    which = shutil.which("vng")
    return Path(which) if which else None


def find_kernel() -> tuple[str, Path] | None:
    """(version, vmlinuz) of the extracted test kernel, if ready."""
    version_file = KERNEL_DIR / "VERSION"
    if not version_file.exists():
        return None
    version = version_file.read_text().strip()
    vmlinuz = KERNEL_DIR / "boot" / f"vmlinuz-{version}"
    return (version, vmlinuz) if vmlinuz.exists() else None


def missing_prerequisites(root: Path = SYSROOT) -> list[str]:
    """Human-readable list of what is missing to boot ``root``; empty if all is there."""
    missing = []
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 (apt-get install qemu-system-x86)")
    if vng_binary() is None:
        missing.append("vng (pip install virtme-ng into .venv)")
    kernel = find_kernel()
    if kernel is None:
        missing.append(f"kernel ({KERNEL_DIR}/VERSION)")
    if not (root / ".ctwatchd-sysroot").exists():
        missing.append(f"root {root} (run {HERE / 'build-root.sh'})")
    elif kernel is not None and not (root / "lib" / "modules" / kernel[0] / "modules.dep").exists():
        missing.append(f"modules {kernel[0]} in {root} (run {HERE / 'build-root.sh'})")
    return missing


def build_root(timeout: float = 900) -> Path:
    """Run build-root.sh (cached: fast when the root is already there)."""
    proc = subprocess.run(
        ["bash", str(HERE / "build-root.sh")],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return Path(proc.stdout.strip().splitlines()[-1])


def install_files(root: Path, files: Mapping[str, str | bytes | Path], mode: int = 0o644) -> list[Path]:
    """Put files into the root: guest absolute path -> text, bytes or a host file to copy.

    The root is reused by every boot, so returns the host paths written, for removal.
    """
    written = []
    for guest_path, content in files.items():
        dest = root / guest_path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, dest)
        elif isinstance(content, bytes):
            dest.write_bytes(content)
        else:
            dest.write_text(content)
        dest.chmod(mode)
        written.append(dest)
    return written


def remove_tree(root: Path, guest_path: str) -> None:
    """Remove a guest directory from the root (the root is reused by every boot)."""
    target = (root / guest_path.lstrip("/")).resolve()
    if not target.is_relative_to(root.resolve()) or target == root.resolve():
        raise ValueError(f"{guest_path} is not below the root")
    shutil.rmtree(target, ignore_errors=True)


def fetch_wheels(requirements: Sequence[str], dest: Path = WHEELS, timeout: float = 600) -> list[Path]:
    """Build/download wheels of ``requirements`` (and their deps) on the host into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [str(VENV_BIN / "pip")] if (VENV_BIN / "pip").exists() else ["python3", "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--quiet", "--wheel-dir", str(dest), "--find-links", str(dest), *requirements],
        check=True,
        timeout=timeout,
    )
    return sorted(dest.glob("*.whl"))


def _chroot(root: Path, *argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root", "LANG": "C.UTF-8"}
    return subprocess.run(
        ["chroot", str(root), *argv], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def install_wheel(
    root: Path,
    wheel: Path,
    *,
    find_links: Sequence[Path] = (WHEELS,),
    venv: str = "/opt/ctwatchd",
    system_site_packages: bool = False,
    timeout: float = 300,
) -> str:
    """Create ``venv`` in the root (via chroot) and pip-install ``wheel`` offline.

    ``find_links`` are wheel files or directories of wheels for the dependencies (see
    fetch_wheels); with ``system_site_packages`` Debian's python3-* packages count too.
    Returns the guest path of the venv. Raises CalledProcessError with pip's output.
    """
    stage = root / "tmp" / "ctwatchd-wheels"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for item in (wheel, *find_links):
        for whl in sorted(item.glob("*.whl")) if item.is_dir() else [item]:
            shutil.copy2(whl, stage / whl.name)
    guest_stage = "/tmp/ctwatchd-wheels"
    steps = [
        ["python3", "-m", "venv", "--clear", *(["--system-site-packages"] if system_site_packages else []), venv],
        [
            f"{venv}/bin/pip",
            "install",
            "--no-index",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--find-links",
            guest_stage,
            f"{guest_stage}/{wheel.name}",
        ],
    ]
    try:
        for argv in steps:
            proc = _chroot(root, *argv, timeout=timeout)
            if proc.returncode:
                raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return venv


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _install_test(root: Path, test_script: str, timeout: float) -> Path:
    guest = root / GUEST_DIR
    shutil.rmtree(guest, ignore_errors=True)
    (guest / "results").mkdir(parents=True)
    (guest / "script.sh").write_text(test_script)
    (guest / "run.sh").write_text(_RUNNER)
    unit_dir = root / "etc" / "systemd" / "system"
    (unit_dir / TEST_UNIT).write_text(_UNIT.format(timeout=f"{int(timeout)}s"))
    wants = unit_dir / "multi-user.target.wants" / TEST_UNIT
    wants.parent.mkdir(exist_ok=True)
    wants.unlink(missing_ok=True)
    wants.symlink_to(f"/etc/systemd/system/{TEST_UNIT}")
    return guest


def boot_systemd(
    root: Path,
    test_script: str,
    *,
    timeout: float,
    results: Path,
    memory: str = "1G",
    cpus: int = 1,  # 2 vCPUs under TCG on a busy 2-core host: 4x slower boots
    append: Sequence[str] = (),
) -> SystemdRun:
    """Boot ``root`` with systemd as PID 1, run ``test_script`` (bash) once multi-user.target
    is reached, power off. ``results`` (host dir) receives output.txt, status, journal.txt,
    console.txt and anything else the script writes to ./results (its working directory is /ctwatchd-test).
    """
    kernel = find_kernel()
    vng = vng_binary()
    if kernel is None or vng is None:
        raise FileNotFoundError(", ".join(missing_prerequisites(root)))
    argv = [
        str(vng),
        "--run",
        str(kernel[1]),
        "--root",
        str(root),
        "--rw",
        "--systemd",
        "--disable-kvm",
        "--force-9p",
        "--verbose",
        "--name",
        "ctwatchd-vm",
        "--memory",
        memory,
        "--cpus",
        str(cpus),
    ]
    for arg in ("systemd.show_status=1", *append):
        argv += ["--append", arg]
    env = dict(os.environ, PATH=f"{vng.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    with _locked(root):
        guest = _install_test(root, test_script, timeout)
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)  # vng, virtme-run and qemu share this session
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
        elapsed = time.monotonic() - start
        (root / "etc/systemd/system/multi-user.target.wants" / TEST_UNIT).unlink(missing_ok=True)
        results.mkdir(parents=True, exist_ok=True)
        shutil.copytree(guest / "results", results, dirs_exist_ok=True)
    console = out.decode(errors="replace")
    (results / "console.txt").write_text(console)
    status_text = _read(results / "status").strip()
    return SystemdRun(
        status=int(status_text) if status_text.isdigit() else None,
        console=console,
        elapsed=elapsed,
        results=results,
        timed_out=timed_out,
    )


@contextmanager
def ctwatchd_installed(root: Path, work: Path, files: Mapping[str, str | bytes | Path]) -> Iterator[str]:
    """ctwatchd as a user installs it from a checkout: a wheel into a venv over Debian's python3-pyudev,
    -structlog and -sdnotify, /usr/bin/ctwatchd, the unit, the catalog, plus `files` (a config, drop-ins).
    Everything is removed again afterwards (the root is shared by every boot). Yields the venv path."""
    wheels = work / "wheels"
    subprocess.run([str(VENV_BIN / "python"), "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                    str(wheels), str(REPO)], check=True, timeout=300)
    venv = install_wheel(root, next(wheels.glob("ctwatchd-*.whl")), find_links=(), system_site_packages=True)
    written = install_files(root, {
        "/etc/systemd/system/ctwatchd.service": REPO / "systemd/ctwatchd.service",
        "/usr/lib/systemd/catalog/ctwatchd.catalog": REPO / "systemd/ctwatchd.catalog",
        **files,
    })
    link = root / "usr/bin/ctwatchd"
    link.unlink(missing_ok=True)
    link.symlink_to(f"{venv}/bin/ctwatchd")
    try:
        yield venv
    finally:
        for path in written:
            path.unlink(missing_ok=True)
        link.unlink(missing_ok=True)
        remove_tree(root, venv)
