"""Source-level rules that must hold everywhere in the package."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ctwatchd"


def calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_no_shell_anywhere() -> None:
    """No shell=True, os.system, os.popen or subprocess.getoutput: argv lists only."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for call in calls(tree):
            name = ast.unparse(call.func)
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                offenders.append(f"{path.name}:{call.lineno} {name}")
            for kw in call.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    offenders.append(f"{path.name}:{call.lineno} shell=")
    assert offenders == []


def test_only_the_runner_starts_processes() -> None:
    """Every subprocess goes through runner.py (timeouts, process group, fixed env)."""
    users = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("subprocess", "pty", "multiprocessing") for n in names):
                users.append(path.name)
    assert sorted(set(users)) == ["runner.py"]


def test_no_wall_clock_in_the_daemon() -> None:
    """Deadlines use time.monotonic; time.time() appears only for exported metric timestamps."""
    offenders = [f"{p.name}:{c.lineno}" for p in PACKAGE.rglob("*.py")
                 for c in calls(ast.parse(p.read_text())) if ast.unparse(c.func) == "time.time"]
    assert [o.split(":")[0] for o in offenders] == ["metrics.py"]
