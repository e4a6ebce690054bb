"""Smoke test of the VM tier: a real modular kernel, real modprobe/rmmod, real uevents."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import guest

GUEST_SCRIPT = """\
set -u
cat /proc/uptime > uptime_at_start.txt
# Cold start: first python run in this guest, every file read over 9p.
TIMEFORMAT=%R
{{ time "$PY" -c 'import pyudev, structlog'; }} 2> py_import_cold.txt
"$PY" {smoke} "$RESULTS" > smoke_guest.log 2>&1
"""


def test_modules_load_unload_and_uevent(tmp_path: Path) -> None:
    script = GUEST_SCRIPT.format(smoke=shlex.quote(str(guest.HERE / "smoke_guest.py")))
    run = guest.boot(script, timeout=300, rwdir=tmp_path)
    log = (tmp_path / "smoke_guest.log").read_text() if (tmp_path / "smoke_guest.log").exists() else ""
    assert not run.timed_out, run.console[-3000:]
    assert run.returncode == 0, f"guest script failed ({run.returncode}):\n{log}\n{run.console[-3000:]}"

    facts: dict[str, Any] = json.loads((tmp_path / "results.json").read_text())
    facts["boot_wall_seconds"] = round(run.elapsed, 2)
    facts["uptime_at_start"] = (tmp_path / "uptime_at_start.txt").read_text().split()[0]
    facts["py_import_cold_seconds"] = float((tmp_path / "py_import_cold.txt").read_text().strip())
    (tmp_path / "results.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts, indent=2))  # shown with -s; the file stays in tmp_path

    assert facts["uname_r"] == guest.kernel_version()
    assert facts["modprobe"]["rc"] == 0, facts["modprobe"]
    assert facts["initstate"] == dict.fromkeys(("nf_conntrack", "nf_nat", "br_netfilter"), "live")
    removal = facts["remove_br_netfilter"]
    assert removal["rmmod"]["rc"] == 0, removal["rmmod"]
    assert removal["gone"]
    assert any(
        e.get("ACTION") == "remove" and e.get("SUBSYSTEM") == "module" and e.get("DEVPATH") == "/module/br_netfilter"
        for e in removal["events"]
    ), removal["events"]
