"""Packaging tier: builds the man pages, the .deb, the .rpm, the sdist and wheel once per session.

A missing build tool skips the tests that need it with one line naming what to install
(packaging/install-build-deps.sh); when env CI is non-empty it fails them instead.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `import pkgsupport` also under --import-mode=importlib
    sys.path.insert(0, str(HERE))

from pkgsupport import PACKAGING, Built, require_module, require_tools, run, unavailable  # noqa: E402


def _build(script: str, outdir: Path, env: dict[str, str] | None = None) -> Built:
    start = time.monotonic()
    done = run(["bash", PACKAGING / script, outdir], env=env)
    seconds = time.monotonic() - start
    print(f"\n{script}: {seconds:.1f} s")  # shown with -s; the timings in the report come from here
    return Built(outdir, done.stdout + done.stderr, seconds, sorted(outdir.iterdir()))


@pytest.fixture(scope="session")
def man_pages(tmp_path_factory: pytest.TempPathFactory) -> Built:
    require_tools("scdoc", "groff")
    return _build("build-man.sh", tmp_path_factory.mktemp("man"))


@pytest.fixture(scope="session")
def python_dists(tmp_path_factory: pytest.TempPathFactory) -> Built:
    require_module("build")
    require_module("twine")
    return _build("build-python.sh", tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Built:
    require_tools("dpkg-buildpackage", "dpkg-checkbuilddeps", "lintian", "scdoc")
    unmet = subprocess.run(["dpkg-checkbuilddeps", str(PACKAGING / "debian/control")], capture_output=True,
                           text=True, check=False, timeout=60)
    if unmet.returncode != 0:
        unavailable(unmet.stderr.strip().splitlines()[-1] if unmet.stderr.strip() else "unmet Build-Depends")
    return _build("build-deb.sh", tmp_path_factory.mktemp("deb"))


@pytest.fixture(scope="session")
def rpm(tmp_path_factory: pytest.TempPathFactory, python_dists: Built) -> Built:
    require_tools("rpmbuild", "rpm", "scdoc", "groff")
    for name in ("build", "installer", "setuptools"):
        require_module(name, "/usr/bin/python3")
    sdist = next(p for p in python_dists.files if p.name.endswith(".tar.gz"))
    return _build("build-rpm.sh", tmp_path_factory.mktemp("rpm"), env={"SDIST": str(sdist)})
