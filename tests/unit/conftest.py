from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from fakehost import FakeHost
from harness import Harness

# As root, ctwatchd refuses to run an executable below a directory others can write, and pytest's
# temporary directories live below /tmp (mode 1777). Root's tests therefore build their trees below
# a root-owned 0700 directory, where the fake modprobe, systemctl and hooks pass that rule honestly.
TRUSTED_BASE = Path("/run/ctwatchd-tests")
# A unit test that hangs (a blocking write, a FIFO read) is a failure, not a stuck CI run.
UNIT_TIMEOUT = 120


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in item.path.resolve().parents:
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT))


@pytest.fixture
def tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        yield tmp_path_factory.mktemp("t")
        return
    TRUSTED_BASE.mkdir(mode=0o700, exist_ok=True)
    os.chown(TRUSTED_BASE, 0, 0)
    TRUSTED_BASE.chmod(0o700)
    path = Path(tempfile.mkdtemp(dir=TRUSTED_BASE))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    """A modular kernel tree with nothing loaded."""
    return FakeHost(tmp_path / "root")


@pytest.fixture
def loaded(host: FakeHost) -> FakeHost:
    """The same tree with nf_conntrack, nf_nat and br_netfilter live, as on a healthy Docker host."""
    host.load("nf_conntrack", "nf_nat", "br_netfilter")
    host.log.unlink()
    return host


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.fixture
def h(loaded: FakeHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    """The in-process daemon harness on a healthy host tree (tests/unit/harness.py)."""
    harness = Harness(loaded, tmp_path, monkeypatch)
    yield harness
    harness.notify.close()
    harness.monitor.close()
