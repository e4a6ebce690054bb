"""The daemon's side of the state file: written whenever what it holds changes, failures said once."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ctwatchd import state as statefile
from ctwatchd.core import CoreState
from ctwatchd.model import AuditLog, clean


class StateKeeper:
    def __init__(self, path: Path, log: AuditLog, boot_id: str | None, clock: Callable[[], float]) -> None:
        self.path = path
        self.log = log
        self.boot_id = boot_id
        self.clock = clock
        self._saved: tuple[object, ...] | None = None
        self._error: str | None = None
        self._dropped: tuple[str, ...] = ()

    def move(self, path: Path) -> None:
        """A reload named another state file: write there from now on."""
        if path != self.path:
            self.path = path
            self._saved = None

    def save(self, s: CoreState, status: str, *, stopped: bool = False) -> None:
        key = (dict(s.tuning), s.conntrack_reloaded, s.restarts, status, s.conntrack_instance, s.restarts_owed,
               stopped, dict(s.dependents), dict(s.base_instances))
        if key == self._saved:
            return
        saved = statefile.SavedState(dict(s.tuning), s.conntrack_reloaded, s.restarts, status,
                                     s.conntrack_instance, s.restarts_owed, self.boot_id, os.getpid(),
                                     round(self.clock(), 3), stopped, dict(s.dependents), dict(s.base_instances))
        try:
            dropped = statefile.save(self.path, saved)
        except OSError as exc:
            error = exc.strerror or str(exc)
            if error != self._error:
                self.log.warning("state.failed", path=clean(str(self.path)), detail=clean(error))
                self._error = error
            return
        self._saved = key
        self._error = None
        if dropped and dropped != self._dropped:  # said once, not at every save
            self.log.warning("state.trimmed", path=clean(str(self.path)), detail="; ".join(dropped))
        self._dropped = dropped
