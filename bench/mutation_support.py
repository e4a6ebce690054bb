"""Helpers for bench/mutation.sh (mutmut 3 over ctwatchd); nothing here is imported by ctwatchd or its tests.

`conftest` is written as tests/conftest.py into the throw-away copy that mutmut works in: it runs the
tests selected for a mutant fastest first, so a killed mutant dies on its cheapest test. Order never
changes a verdict, only how long a killed mutant takes.

`cap BUDGET` rewrites mutants/mutmut-stats.json after the stats run: for each mutated function it keeps
the fastest covering tests up to BUDGET seconds (at least MIN_TESTS of them). Without it a surviving
mutant of core.decide() re-runs 148 tests (~50 s) and a full run takes hours on two cores. A mutant
that only a dropped (slower) test would kill is reported as survived: the kill rate is a lower bound.

`unchecked` prints the names of the mutants not tested yet; `table` prints the per-file totals from
mutants/ctwatchd/*.meta (timeouts count as detected).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

# the mutated files, as bench/mutation.sh's MUTATE names them
DEFAULT_FILES = "ctwatchd/core.py ctwatchd/config.py ctwatchd/runner.py ctwatchd/uevents.py ctwatchd/executor.py"
FILES = tuple(Path(p).stem for p in os.environ.get("MUTATE", DEFAULT_FILES).split())
MIN_TESTS = 3
CONFTEST = '''"""Mutation runs only (bench/mutation.sh): the selected tests run fastest first."""
import json
from pathlib import Path


def pytest_collection_modifyitems(items):
    stats = Path("mutmut-stats.json")
    if not stats.exists():
        return
    duration = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: duration.get(item.nodeid.removeprefix("mutants/"), 1e9))
'''
# mutmut's exit codes (mutmut.__main__.status_by_exit_code)
STATUS = {1: "killed", 3: "killed", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", 0: "survived",
          5: "no tests", 33: "no tests", 34: "skipped", 35: "suspicious", 36: "timeout", 37: "caught by type check",
          -11: "segfault", -9: "segfault", None: "not checked"}


def cap(budget: float, stats_path: Path = Path("mutants/mutmut-stats.json")) -> None:
    stats = json.loads(stats_path.read_text())
    duration: dict[str, float] = stats["duration_by_test"]
    before = after = 0.0
    for name, tests in stats["tests_by_mangled_function_name"].items():
        ordered = sorted(tests, key=lambda t: duration.get(t, 0.0))
        kept: list[str] = []
        spent = 0.0
        for t in ordered:
            if len(kept) >= MIN_TESTS and spent + duration.get(t, 0.0) > budget:
                break
            kept.append(t)
            spent += duration.get(t, 0.0)
        before += sum(duration.get(t, 0.0) for t in tests)
        after += spent
        stats["tests_by_mangled_function_name"][name] = kept
    stats_path.write_text(json.dumps(stats))
    print(f"test time per surviving mutant, summed over functions: {before:.0f} s -> {after:.0f} s")


def codes_of(meta_dir: Path, name: str) -> dict[str, int | None]:
    codes: dict[str, int | None] = json.loads((meta_dir / f"{name}.py.meta").read_text())["exit_code_by_key"]
    return codes


def unchecked(meta_dir: Path = Path("mutants/ctwatchd")) -> None:
    for f in FILES:
        for key, code in codes_of(meta_dir, f).items():
            if code is None:
                print(key)


def table(meta_dir: Path = Path("mutants/ctwatchd")) -> None:
    print(f"{'file':<12}{'mutants':>8}{'killed':>8}{'survived':>9}{'timeout':>8}{'no tests':>9}{'other':>6}"
          f"{'kill rate':>10}")
    for f in FILES:
        codes = codes_of(meta_dir, f)
        c = Counter(STATUS.get(v, "other") for v in codes.values())
        total = sum(c.values())
        detected = c["killed"] + c["timeout"]
        other = total - detected - c["survived"] - c["no tests"]
        print(f"{f + '.py':<12}{total:>8}{c['killed']:>8}{c['survived']:>9}{c['timeout']:>8}{c['no tests']:>9}"
              f"{other:>6}{100 * detected / total:>9.1f}%")


if __name__ == "__main__":
    if sys.argv[1] == "conftest":
        Path(sys.argv[2]).write_text(CONFTEST)
    elif sys.argv[1] == "cap":
        cap(float(sys.argv[2]))
    elif sys.argv[1] == "unchecked":
        unchecked()
    elif sys.argv[1] == "table":
        table()
