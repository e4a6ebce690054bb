"""Helpers for the packaging tier: running the build scripts, and skipping (or, under CI, failing)
with one line when a build tool is missing."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
INSTALL_HINT = "packaging/install-build-deps.sh"


@dataclass
class Built:
    """What a build script produced, its output, and how long it took."""

    outdir: Path
    output: str
    seconds: float
    files: list[Path] = field(default_factory=list)


def unavailable(what: str) -> None:
    """Skip with one line naming what to install; under CI (env CI non-empty) fail instead."""
    message = f"{what}; install with {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so this is a failure)", pytrace=False)
    pytest.skip(message)


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)}")


def require_module(name: str, python: str = sys.executable) -> None:
    done = subprocess.run([python, "-c", f"import {name}"], capture_output=True, check=False, timeout=60)
    if done.returncode != 0:
        unavailable(f"missing Python module {name} for {python}")


def module(name: str) -> ModuleType:
    require_module(name)
    return importlib.import_module(name)


def run(argv: Sequence[str | Path], *, timeout: float = 900, env: Mapping[str, str] | None = None,
        cwd: Path = REPO, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run argv (no shell); assert its exit status is in `ok`, showing its output if not."""
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False, timeout=timeout,
                          env=full_env, cwd=cwd)
    assert done.returncode in ok, (f"{' '.join(map(str, argv))} exited {done.returncode}\n"
                                   f"--- stdout\n{done.stdout[-6000:]}\n--- stderr\n{done.stderr[-6000:]}")
    return done


def project_version() -> str:
    for line in (REPO / "ctwatchd/__init__.py").read_text().splitlines():
        if line.startswith("__version__ = "):
            return line.split('"')[1]
    raise AssertionError("no __version__ in ctwatchd/__init__.py")
