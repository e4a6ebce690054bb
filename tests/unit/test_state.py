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


# -- save() writes only what load() accepts (docs/faults.md H32) --------------------------------------
class Records:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, object]]] = []

    def info(self, event: str, **kw: object) -> None:
        self.seen.append((event, kw))

    warning = error = info


HOSTILE_STATES = {
    "300 dependents": SavedState({}, False, dependents={f"nf_dep_{i:03}": ("nf_conntrack",) for i in range(300)}),
    "a tuning value cut at 4096": SavedState({"net.netfilter.nf_conntrack_max": "1" * 4096,
                                              "net.netfilter.nf_conntrack_buckets": "262144"}, True),
    "an empty read from a FIFO": SavedState({"net.netfilter.nf_conntrack_max": "",
                                             "net.netfilter.nf_conntrack_buckets": "262144"}, True),
    "a status of 5000 characters": SavedState({}, False, status="x" * 5000),
    "a dependent with 20 bases": SavedState({}, False, dependents={"nf_many": tuple(f"b{i}" for i in range(20))}),
    "names no module has": SavedState({}, False, dependents={"../x": ("nf_conntrack",), "ok_dep": ("-r",)},
                                      base_instances={"a b": 1, "nf_nat": 7}),
    "odd numbers": SavedState({}, False, (float("nan"), -1.0, 3.0), boot_id="not-a-boot-id", pid=0),
    "a file past 64 KiB": SavedState({}, False, dependents={
        f"m{i:03}{'x' * 40}": tuple(f"b{j}{'y' * 40}" for j in range(16)) for i in range(200)}),
}


@pytest.mark.parametrize("name", HOSTILE_STATES)
def test_what_the_daemon_writes_its_loader_accepts(tmp_path: Path, name: str) -> None:
    """Before: each of these was written as it was and refused at the next start (state.ignored), the
    tuning snapshot and the breaker lost. Now the file loads, keeps what is sound, says what went."""
    p = tmp_path / "state.json"
    dropped = state.save(p, HOSTILE_STATES[name])
    loaded = state.load(p)
    assert loaded is not None
    if name in ("a tuning value cut at 4096", "an empty read from a FIFO"):
        assert loaded.tuning == {"net.netfilter.nf_conntrack_buckets": "262144"} and loaded.conntrack_reloaded
        assert dropped == ("tuning values that are not conntrack integers: net.netfilter.nf_conntrack_max",)
    if name == "300 dependents":
        assert len(loaded.dependents) == state.MAX_DEPENDENTS and "nf_dep_000" in loaded.dependents
        assert dropped == ("44 of 300 remembered dependents (at most 256 are kept)",)
    if name == "a status of 5000 characters":
        assert len(loaded.status) == state.MAX_STATUS and loaded.status.endswith("…")
    if name == "names no module has":
        assert loaded.dependents == {} and loaded.base_instances == {"nf_nat": 7}
    if name == "odd numbers":
        assert (loaded.restarts, loaded.boot_id, loaded.pid) == ((3.0,), None, None)
    if name == "a file past 64 KiB":
        assert loaded.dependents == {} and dropped[-1].startswith("all remembered dependents")


def test_the_keeper_says_what_it_left_out_once(tmp_path: Path) -> None:
    """A daemon saving the same oversized set again and again: one state.trimmed record, not one per save."""
    from ctwatchd.core import CoreState
    from ctwatchd.persist import StateKeeper

    log = Records()
    keeper = StateKeeper(tmp_path / "state.json", log, None, lambda: 1.0)
    many = CoreState(dependents={f"nf_dep_{i:03}": ("nf_conntrack",) for i in range(300)})
    keeper.save(many, "healthy")
    keeper.save(many, "degraded")
    keeper.save(many, "healthy")
    trimmed = [kw for event, kw in log.seen if event == "state.trimmed"]
    assert [kw["detail"] for kw in trimmed] == ["44 of 300 remembered dependents (at most 256 are kept)"]
    assert state.load(tmp_path / "state.json") is not None
