"""The alert rules of the chart (helm/finetune-job/alerts/) with Prometheus' own promtool."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import need_tool

ALERTS = Path(__file__).resolve().parents[2] / "helm" / "finetune-job" / "alerts"
RULES, TESTS = ALERTS / "rules.yaml", ALERTS / "tests.yaml"
EXPECTED = {"FinetuneJobStalled", "FinetuneJobFailed", "FinetuneJobDataWaitHigh", "FinetuneJobS3ErrorsRising"}


def promtool(*args: str, cwd: Path = ALERTS) -> subprocess.CompletedProcess:
    tool = need_tool("promtool")
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_promtool_check_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in result.stdout


def test_promtool_test_rules():
    result = promtool("test", "rules", str(TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_file_is_what_the_prometheusrule_carries():
    """The chart's PrometheusRule carries this file's `groups` as its spec: nothing else may be in it."""
    rules = yaml.safe_load(RULES.read_text())
    assert set(rules) == {"groups"}
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert set(alerts) == EXPECTED
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert {"summary", "description"} <= set(rule["annotations"])
        assert "run_id" in rule["expr"]  # every alert is per run


def test_every_alert_has_firing_and_quiet_tests():
    tests = yaml.safe_load(TESTS.read_text())
    assert tests["rule_files"] == [RULES.name]
    cases = [case for test in tests["tests"] for case in test.get("alert_rule_test", [])]
    for alert in EXPECTED:
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in mine), f"{alert}: no test where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{alert}: no test where it stays quiet"


@pytest.mark.parametrize(
    ("original", "broken"),
    [
        ('phase=~"head|finetune"', 'phase=~".+"'),  # stalled would fire while evaluating
        ("> 0.5", "> 0.9"),  # data wait threshold
        ("max by (run_id, worker, operation)", "sum by (run_id, worker, operation)"),  # double counting
        ("last_over_time(", "max_over_time("),  # a retried run would keep its failure alert
    ],
)
def test_unit_tests_catch_a_broken_rule(tmp_path, original, broken):
    """The promtool tests have teeth: each of these changes to the rules makes them fail."""
    text = RULES.read_text()
    assert original in text
    (tmp_path / RULES.name).write_text(text.replace(original, broken))
    shutil.copy(TESTS, tmp_path / TESTS.name)
    result = promtool("test", "rules", TESTS.name, cwd=tmp_path)
    assert result.returncode != 0, result.stdout
