"""Command line: `ctwatchd run | check | restore`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ctwatchd import __version__, core
from ctwatchd import config as configmod
from ctwatchd.config import ConfigError
from ctwatchd.kernel import KernelProbe
from ctwatchd.model import Outcome, clean

if TYPE_CHECKING:
    from ctwatchd.verdict import Inspector, Look

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctwatchd",
        description="Keep nf_conntrack, nf_nat and br_netfilter loaded; restore them, their sysctls and "
                    "dependent services when they are unloaded.",
        epilog="See ctwatchd(8) and ctwatchd.toml(5).",
    )
    p.add_argument("--version", action="version", version=f"ctwatchd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, metavar="PATH",
                        help=f"configuration file (default {configmod.DEFAULT_PATH}, if it exists)")
        sp.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                        help="read /sys, /proc, /lib/modules and modprobe.d below DIR (default /)")

    run = sub.add_parser("run", help="run the daemon in the foreground (what systemd starts)")
    common(run)
    run.add_argument("--no-uevents", action="store_true",
                     help="do not open the kernel uevent monitor; rely on polling alone")
    chk = sub.add_parser("check", help="diagnose once: exit 0 healthy, 1 degraded, 2 cannot tell")
    common(chk)
    chk.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rst = sub.add_parser("restore", help="reconcile once now: exit 0 done or nothing to do, 1 a step failed")
    common(rst)
    rst.add_argument("--dry-run", action="store_true", help="print the ordered plan and change nothing")
    prt = sub.add_parser("protect", help="make `modprobe -r` of the watched modules fail (a modprobe.d guard)")
    common(prt)
    prt.add_argument("--remove", action="store_true", help="take the guard away again")
    prt.add_argument("--dry-run", action="store_true", help="print what would be written or removed")
    return p


def _hide_unused_extras() -> None:
    """structlog imports rich / better_exceptions when installed, for pretty tracebacks ctwatchd never
    renders; in a long-running daemon that is ~5 MB of RSS and ~15 ms of start-up for nothing."""
    for name in ("rich", "better_exceptions"):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None makes `import name` fail


def cmd_run(args: argparse.Namespace) -> int:
    _hide_unused_extras()
    from ctwatchd import audit
    from ctwatchd.daemon import Daemon
    from ctwatchd.metrics import MetricsUnavailable
    from ctwatchd.notify import Notifier

    try:
        cfg = configmod.load(args.config)
    except ConfigError as exc:
        print(f"ctwatchd: {exc}", file=sys.stderr)
        # The status line is what `systemctl status` shows for the failed start.
        Notifier().status(f"configuration error: {exc}")
        return EXIT_CONFIG
    audit.configure(cfg.log_format)
    monitor_factory = udev_factory = None
    if not args.no_uevents:
        from ctwatchd.uevents import KernelMonitor

        monitor_factory = KernelMonitor
        if (args.root / "run/udev/control").exists():  # udevd runs here (not in a container, say)
            udev_factory = partial(KernelMonitor, source="udev")
    from ctwatchd.hold import Hold

    try:
        daemon = Daemon(cfg, probe=KernelProbe(args.root), log=audit.get_logger(),
                        reload_config=lambda: configmod.load(args.config), monitor_factory=monitor_factory,
                        udev_factory=udev_factory, on_log_format=lambda c: audit.configure(c.log_format),
                        hold=Hold())
    except MetricsUnavailable as exc:
        print(f"ctwatchd: {cfg.path or 'configuration'}: {exc}", file=sys.stderr)
        Notifier().status(f"configuration error: {exc}")
        return EXIT_CONFIG
    return daemon.run()


def _load_config(path: Path | None) -> configmod.Config | None:
    """The configuration, or None once stderr says which file and key are wrong."""
    try:
        return configmod.load(path)
    except ConfigError as exc:
        print(f"ctwatchd: {exc}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    from ctwatchd import hold
    from ctwatchd.check import UNKNOWN, format_json, format_table, run_check

    cfg = _load_config(args.config)
    if cfg is None:
        return UNKNOWN
    try:
        # The hold lives in the kernel, not in a tree: read it only when looking at this host.
        report = run_check(cfg, args.root, hold.look if args.root == Path("/") else None)
        text = format_json(report) if args.json else format_table(report)
        print(text)
    except BrokenPipeError:
        raise  # main(): the reader left, not "cannot tell"
    except Exception as exc:  # "cannot tell" (2), never "degraded" (1): see ctwatchd(8)
        print(f"ctwatchd: cannot tell: {type(exc).__name__}: {clean(str(exc))}", file=sys.stderr)
        return UNKNOWN
    return report.exit_code


def cmd_restore(args: argparse.Namespace) -> int:
    from ctwatchd import audit
    from ctwatchd.executor import Executor
    from ctwatchd.runner import Runner
    from ctwatchd.verdict import Inspector

    cfg = _load_config(args.config)
    if cfg is None:
        return EXIT_CONFIG
    probe = KernelProbe(args.root)
    inspector = Inspector(probe, on_problem=lambda text: print(f"note: {text}", file=sys.stderr))
    resumed = inspector.resume(cfg, time.monotonic())
    if resumed.problem:
        print(f"ctwatchd: state file {clean(str(cfg.state_file))} ignored: {resumed.problem}", file=sys.stderr)
    look = _settled_look(inspector, cfg, resumed.state)
    plan = look.decision.plan
    if not plan:
        print(f"nothing to do: {plan.reason}")
        return 0 if look.decision.health.healthy else 1
    print(f"plan ({plan.reason}):")
    for i, step in enumerate(plan.steps, 1):
        print(f"  {i}. {step.describe()}")
    if plan.skipped_restarts:
        print("  (docker and hooks left out: the restart breaker is open)")
    if args.dry_run:
        return 0
    audit.configure(cfg.log_format)
    result = Executor(cfg, probe, Runner(), audit.get_logger()).execute(plan)
    for r in result.results:
        mark = {Outcome.OK: "ok", Outcome.SKIPPED: "skipped", Outcome.FAILED: "FAILED",
                Outcome.INTERRUPTED: "interrupted"}[r.outcome]
        print(f"{mark:>11}  {r.step.describe()} ({r.duration_ms:.0f} ms){': ' + r.detail if r.detail else ''}")
    if not result.ok:
        return 1
    after = inspector.look(cfg, core.record(cfg, look.decision.state, result, time.monotonic()), time.monotonic())
    if not after.decision.health.healthy:
        print(f"still degraded: {'; '.join(after.decision.health.problems)}")
        return 1
    return 0


def _settled_look(inspector: Inspector, cfg: configmod.Config, state: core.CoreState) -> Look:
    """A look that is not "waiting": a module coming or going is given the daemon's grace to finish,
    after which it is reported stuck instead of "waiting" forever with exit 0."""
    deadline = time.monotonic() + core.TRANSIENT_GRACE + 1.0
    while True:
        now = time.monotonic()
        look = inspector.look(cfg, state, now)
        wake = look.decision.wake_at
        if look.decision.plan or wake is None or now >= deadline or look.decision.state.retry_at is not None:
            return look
        state = look.decision.state
        time.sleep(min(max(0.0, wake - now), 1.0))


def cmd_protect(args: argparse.Namespace) -> int:
    from ctwatchd import protect
    from ctwatchd.verdict import Inspector

    cfg = _load_config(args.config)
    if cfg is None:
        return EXIT_CONFIG
    path = protect.guard_path(args.root)
    shown = "/" + protect.GUARD
    if args.remove:
        if args.dry_run:
            print(f"would remove {shown}" if path.exists() else f"{shown} is not there: nothing to remove")
            return 0
        try:
            _, removed = protect.remove(args.root)
        except protect.ProtectError as exc:
            print(f"ctwatchd: {exc}", file=sys.stderr)
            return 1
        print(f"removed {shown}: modprobe -r unloads the watched modules again" if removed
              else f"{shown} is not there: nothing to remove")
        return 0
    modules = Inspector(KernelProbe(args.root)).look(cfg, core.CoreState(), time.monotonic()).watched
    if args.dry_run:
        print(f"would write {shown}:")
        print(protect.guard_text(modules), end="")
        return 0
    try:
        _, changed = protect.apply(args.root, modules)
    except protect.ProtectError as exc:
        print(f"ctwatchd: {exc}", file=sys.stderr)
        return 1
    print(f"{'wrote' if changed else 'already in place:'} {shown}: modprobe -r of {', '.join(modules)} now fails. "
          "rmmod reads no modprobe.d: while `ctwatchd run` runs, its hold refuses rmmod of nf_conntrack and "
          "nf_nat, and it restores what goes anyway.")
    if (firewalld := protect.firewalld_note(args.root)) is not None:
        print(f"note: {firewalld}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "check": cmd_check, "restore": cmd_restore, "protect": cmd_protect}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `ctwatchd check | head`: the reader left; not our error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
