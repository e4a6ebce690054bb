"""The runtime state file: atomic, private, and never trusted when it looks wrong."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ctwatchd import state
from ctwatchd.state import SavedState, StateError

GOOD = SavedState({"net.netfilter.nf_conntrack_max": "1048576"}, False, (12.5,), "healthy")


def test_round_trip_with_private_mode(tmp_path: Path) -> None:
    """What is saved loads back equal; the file is 0600 and no temp file is left behind."""
    p = tmp_path / "run/ctwatchd/state.json"
    state.save(p, GOOD)
    assert state.load(p) == GOOD
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert os.listdir(p.parent) == ["state.json"]


def test_absent_file_is_no_state(tmp_path: Path) -> None:
    """No file, no state, no error."""
    assert state.load(tmp_path / "nope.json") is None


@pytest.mark.parametrize(("content", "why"), [
    (b"{not json", "not valid JSON"),
    (b"[]", "not a version 1"),
    (json.dumps({"version": 2, "tuning": {}, "conntrack_reloaded": False}).encode(), "not a version 1"),
    (json.dumps({"version": 1, "tuning": {"net.netfilter.nf_conntrack_max": "1; rm -rf /"},
                 "conntrack_reloaded": False}).encode(), "unexpected tuning entry"),
    (json.dumps({"version": 1, "tuning": {"kernel.modprobe": "/tmp/evil"},
                 "conntrack_reloaded": False}).encode(), "unexpected tuning entry"),
    (json.dumps({"version": 1, "tuning": {"net.netfilter.nf_conntrack_max/../x": "1"},
                 "conntrack_reloaded": False}).encode(), "unexpected tuning entry"),
    (json.dumps({"version": 1, "tuning": [], "conntrack_reloaded": False}).encode(), "mistyped"),
    (json.dumps({"version": 1, "tuning": {}, "conntrack_reloaded": False, "restarts": ["x"]}).encode(),
     "'restarts'"),
    (b"x" * (state.MAX_BYTES + 10), "larger than"),
])
def test_hostile_or_corrupt_state_is_refused(tmp_path: Path, content: bytes, why: str) -> None:
    """Anything but what ctwatchd writes is refused with a reason, never used."""
    p = tmp_path / "state.json"
    p.write_bytes(content)
    p.chmod(0o600)
    with pytest.raises(StateError, match=why):
        state.load(p)


def test_world_writable_or_symlinked_state_is_refused(tmp_path: Path) -> None:
    """A state file others could have written, or a symlink, is not trusted."""
    p = tmp_path / "state.json"
    state.save(p, GOOD)
    p.chmod(0o666)
    with pytest.raises(StateError, match="writable by group or others"):
        state.load(p)
    link = tmp_path / "link.json"
    link.symlink_to(p)
    with pytest.raises(StateError, match="it is a symbolic link"):
        state.load(link)
