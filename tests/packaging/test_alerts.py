"""The shipped Prometheus alert rules: promtool accepts them, its unit tests pass, every alert is tested
firing and quiet, and those tests catch a loosened rule."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pkgsupport import PACKAGING, module, require_tools, run

RULES = PACKAGING / "prometheus" / "ctwatchd-alerts.yml"
TESTS = PACKAGING / "prometheus" / "ctwatchd-alerts.test.yml"
DOCS = PACKAGING.parent / "docs" / "alerts.md"
METRICS = PACKAGING.parent / "ctwatchd" / "metrics.py"
ALERTS = {"CtwatchdUnhealthy", "CtwatchdMetricsStale", "CtwatchdRestartBreakerOpen", "CtwatchdRestoresTooFrequent",
          "CtwatchdConntrackAbsent"}


def rules() -> list[dict]:  # type: ignore[type-arg]
    yaml = module("yaml")
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_checks_the_rules() -> None:
    """`promtool check rules`: valid PromQL and templates, the five alerts the README promises."""
    require_tools("promtool")
    done = run(["promtool", "check", "rules", str(RULES)])
    assert "SUCCESS: 5 rules found" in done.stdout, done.stdout + done.stderr
    assert {r["alert"] for r in rules()} == ALERTS


def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules`: each alert fires on the node it should, with its exact labels and
    rendered annotations, and on no other."""
    require_tools("promtool")
    done = run(["promtool", "test", "rules", str(TESTS)], ok=range(256))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """A rule with no case where it must stay quiet could fire always; one with no firing case, never."""
    yaml = module("yaml")
    cases = [c for t in yaml.safe_load(TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    for alert in ALERTS:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert} is never expected to fire"
        assert any(not c["exp_alerts"] for c in mine), f"{alert} is never expected to stay quiet"


def test_every_alert_names_its_runbook_and_uses_only_exported_metrics() -> None:
    """Each alert has a summary and a runbook anchor that exists in docs/alerts.md; each metric it
    reads is one ctwatchd writes."""
    docs = DOCS.read_text()
    exported = METRICS.read_text()
    for rule in rules():
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        page, _, anchor = notes["runbook"].partition("#")
        assert page == "docs/alerts.md" and f"## {rule['alert']}" in docs and anchor == rule["alert"].lower()
        for metric in {w for w in rule["expr"].replace("(", " ").replace("{", " ").split()
                       if w.startswith("ctwatchd_")}:
            assert f'"{metric.removesuffix("_total")}"' in exported, (rule["alert"], metric)


# Each loosening of a rule must make the promtool tests fail, or they do not guard it.
LOOSENED = [
    ("for: 5m", "for: 1m"),                                     # unhealthy: fires during a repair
    ("ctwatchd_healthy == 0", "ctwatchd_healthy == 1"),         # unhealthy: inverted
    ("> 120", "> 600"),                                         # stale: never within the test
    ('{result="ok"}', ""),                                      # too frequent: failures counted
    ("[1h])) > 3", "[1h])) > 2"),                               # too frequent: three is the limit
    ("sum by (instance) (", "max by (instance) ("),             # too frequent: modules not summed
    ("ctwatchd_restart_breaker_open == 1", "ctwatchd_restart_breaker_open >= 0"),
    ("ctwatchd_conntrack_absent == 1\n        for: 2m", "ctwatchd_conntrack_absent == 1\n        for: 0m"),
]


@pytest.mark.parametrize(("old", "new"), LOOSENED, ids=[f"{i}" for i in range(len(LOOSENED))])
def test_the_unit_tests_catch_a_loosened_rule(tmp_path: Path, old: str, new: str) -> None:
    require_tools("promtool")
    text = RULES.read_text()
    assert text.count(old) == 1, old
    (tmp_path / RULES.name).write_text(text.replace(old, new))
    shutil.copy(TESTS, tmp_path / TESTS.name)
    done = run(["promtool", "test", "rules", str(tmp_path / TESTS.name)], ok=range(256))
    assert done.returncode != 0, f"promtool tests still pass with {old!r} -> {new!r}"
