"""VM tier: skipped with one line when prerequisites are missing; failed instead under CI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `import guest` also under --import-mode=importlib
    sys.path.insert(0, str(HERE))

import guest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: boots a real kernel under QEMU (tests/vm)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.vm)


def _require(kernel: Path) -> None:
    missing = guest.vm_available(kernel)
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} (CI is set, so this is a failure)", pytrace=False)
        pytest.skip(missing)


def _kernel(request: pytest.FixtureRequest) -> Path:
    """The kernel a test module boots: its KERNEL (e.g. guest.BULLSEYE_KERNEL_ROOT), else bookworm's."""
    kernel: Path = getattr(request.module, "KERNEL", guest.KERNEL_ROOT)
    return kernel


@pytest.fixture(autouse=True)
def _vm_prerequisites(request: pytest.FixtureRequest) -> None:
    _require(_kernel(request))


@pytest.fixture(scope="module")
def vm_kernel(request: pytest.FixtureRequest) -> Path:
    """The module's kernel, checked before a module-scoped boot uses it (pytest sets those up first)."""
    kernel = _kernel(request)
    _require(kernel)
    return kernel
