"""Prerequisites of unit tests that need root or a tool: skipped with one line, failed under CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(why: str) -> NoReturn:
    """Skip with `why`; with CI set, where nothing may skip silently, fail instead (tests/vm's rule)."""
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set, so this is a failure)", pytrace=False)
    pytest.skip(why)


def need(ok: bool, why: str) -> None:
    """Go on when `ok`; otherwise skip, or fail under CI."""
    if not ok:
        missing(why)
