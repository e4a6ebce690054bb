from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from fakehost import FakeHost
from harness import Harness


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
