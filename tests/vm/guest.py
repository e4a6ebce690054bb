"""Boot a real modular Debian kernel under QEMU (TCG) with virtme-ng.

The guest sees this machine's filesystem read-only as its root, so it can run
the project's virtualenv; ``rwdir`` is shared writable at the same path and is
where a guest script leaves its results.  ``bash tests/vm/prepare.sh`` installs
everything this module needs, and both kernels: Debian bookworm's (KERNEL_ROOT, the default) and
bullseye's 5.10 (BULLSEYE_KERNEL_ROOT, for ``boot(..., kernel=BULLSEYE_KERNEL_ROOT)``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# A kernel is a directory as tests/vm/fetch-kernel.sh lays it out: VERSION, boot/vmlinuz-<ver>,
# lib/modules/<ver>/modules.dep.
KERNEL_ROOT = REPO / ".cache" / "vm" / "kernel"  # Debian bookworm's 6.1: the tier's kernel
BULLSEYE_KERNEL_ROOT = REPO / ".cache" / "vm" / "kernel-bullseye"  # Debian bullseye's 5.10: no owner tables
PREPARE = "bash tests/vm/prepare.sh"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# vng joins its arguments into a shell command line without quoting them.
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+-]+$")


@dataclass(frozen=True)
class GuestRun:
    """Outcome of one guest boot."""

    returncode: int | None  # exit status of the guest script; None: it never finished
    vng_returncode: int | None  # None when killed on timeout
    console: str  # kernel console and script output, in order
    elapsed: float  # wall-clock seconds for the whole boot
    timed_out: bool


def venv_dir() -> Path:
    return Path(os.environ.get("VENV") or REPO / ".venv")


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def find_vng() -> Path | None:
    candidate = venv_dir() / "bin" / "vng"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("vng")
    return Path(found) if found else None


def kernel_version(kernel: Path = KERNEL_ROOT) -> str | None:
    try:
        return (kernel / "VERSION").read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def kernel_image(kernel: Path = KERNEL_ROOT) -> Path | None:
    version = kernel_version(kernel)
    if version is None:
        return None
    image = kernel / "boot" / f"vmlinuz-{version}"
    modules_dep = kernel / "lib" / "modules" / version / "modules.dep"
    return image if image.is_file() and modules_dep.is_file() else None


def _which_sbin(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def vm_available(kernel: Path = KERNEL_ROOT) -> str | None:
    """None if the VM tier can run here, else one sentence saying what is missing."""
    missing: list[str] = []
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 (Debian qemu-system-x86)")
    if shutil.which("busybox") is None:
        missing.append("busybox (Debian busybox-static)")
    if _which_sbin("modprobe") is None or _which_sbin("depmod") is None:
        missing.append("modprobe/depmod (Debian kmod)")
    if find_vng() is None:
        missing.append(f"vng (virtme-ng in {venv_dir()})")
    if kernel_image(kernel) is None:
        shown = kernel.relative_to(REPO) if kernel.is_relative_to(REPO) else kernel
        missing.append(f"the guest kernel in {shown}/")
    if not venv_python().is_file():
        missing.append(f"the project virtualenv python ({venv_python()})")
    if not missing:
        return None
    return f"VM tests need {', '.join(missing)}: run `{PREPARE}` (as root)."


def _check_path(path: Path) -> str:
    text = str(path)
    if not _SAFE_PATH.match(text):
        raise ValueError(f"path unusable with vng (spaces or shell characters): {text!r}")
    return text


def vng_command(rwdir: Path, entry: Path, memory: str, cpus: int, kernel: Path = KERNEL_ROOT) -> list[str]:
    """The vng argv booting the cached ``kernel`` and running ``entry`` as root."""
    vng = find_vng()
    image = kernel_image(kernel)
    if vng is None or image is None:
        raise RuntimeError(vm_available(kernel) or "VM prerequisites missing")
    return [
        str(vng),
        "--run", _check_path(image),
        "--disable-kvm",  # nested KVM is unusable on these machines: TCG
        "--force-9p",  # no virtiofsd here: skip vng's ~5 s wait for it
        "--verbose",  # without it the guest console is lost
        "--user", "root",
        "--memory", memory,
        "--cpus", str(cpus),
        f"--rwdir={_check_path(rwdir)}",
        "--exec", f"bash {_check_path(entry)}",
    ]  # fmt: skip


def _wrapper(rwdir: Path, script: Path, rc_file: Path) -> str:
    q = shlex.quote
    return "\n".join(
        [
            f"export PATH={GUEST_PATH}",
            f"export RESULTS={q(str(rwdir))} REPO={q(str(REPO))}",
            f"export PY={q(str(venv_python()))}",
            'cd "$RESULTS" || exit 99',
            f"bash {q(str(script))}",
            f"echo $? > {q(str(rc_file))}",
            "sync",
            "",
        ]
    )


def boot(
    script: str,
    *,
    timeout: float,
    rwdir: Path,
    memory: str = "1G",
    cpus: int = 2,
    kernel: Path = KERNEL_ROOT,
) -> GuestRun:
    """Boot the guest on ``kernel`` (a cached kernel directory, bookworm's by default), run ``script``
    with bash as root in it, and power off.

    In the guest the script starts in ``rwdir`` with ``$RESULTS`` (= rwdir),
    ``$REPO`` and ``$PY`` (the project venv's python) set.  Its exit status is
    read back from a file in rwdir, since vng cannot always return it (without
    udevd in the guest, vng falls back to the console and exits 255).
    """
    rwdir = rwdir.resolve()
    control = rwdir / ".guest"
    control.mkdir(parents=True, exist_ok=True)
    script_file = control / "script.sh"
    entry = control / "entry.sh"
    rc_file = control / "rc"
    rc_file.unlink(missing_ok=True)
    script_file.write_text(script, encoding="utf-8")
    entry.write_text(_wrapper(rwdir, script_file, rc_file), encoding="utf-8")
    argv = vng_command(rwdir, entry, memory, cpus, kernel)
    env = dict(os.environ)
    # vng runs virtme-run by name: its directory must be on PATH.
    env["PATH"] = os.pathsep.join([str(Path(argv[0]).parent), env.get("PATH", "")])

    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=rwdir,
        start_new_session=True,  # so a timeout can kill qemu too
    )
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    elapsed = time.monotonic() - start

    console = out.decode("utf-8", errors="replace")
    (control / "console.log").write_text(console, encoding="utf-8")
    try:
        returncode: int | None = int(rc_file.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        returncode = None
    return GuestRun(
        returncode=returncode,
        vng_returncode=None if timed_out else proc.returncode,
        console=console,
        elapsed=elapsed,
        timed_out=timed_out,
    )
