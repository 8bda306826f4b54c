"""The alert rules of the chart (helm/finetune-job/alerts/) with Prometheus' own promtool."""

from __future__ import annotations

import shutil
import subprocess
import sys
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


def _panel_exprs(title: str) -> list[str]:
    sys.path.insert(0, str(ALERTS.parents[2] / "scripts"))
    import render_dashboard

    (panel,) = [p for p in render_dashboard.panels() if p["title"].startswith(title)]
    return [render_dashboard.expand(t["expr"], "r1", "1m") for t in panel["targets"]]


def test_the_current_phase_is_the_scraped_copys_where_both_are_there(tmp_path):
    """Scraped and pushed at once (the README's set-up): the pushed copy lags by up to a push interval, and the Phase,
    Epoch and ETA panels showed two phases at each change (export and finetune, ETA 0). Pushed series have no
    instance label (honor_labels); the scraped copy's phase is taken where it is there, the pushed one's otherwise
    (the pod gone)."""
    scraped, pushed = 'instance="10.0.0.7:8000", job="ml/finetune-job"', 'job="finetune-job"'
    series = []
    for labels, moved_at in ((scraped, 4), (pushed, 6)):  # the pushed copy changes phase 2 minutes later
        head, before, after = f'run_id="r1", worker="0", {labels}', moved_at - 1, 9 - moved_at
        series += [
            {"series": f'finetune_job_phase{{{head}, phase="finetune"}}', "values": f"1x{before} 0x{after}"},
            {"series": f'finetune_job_phase{{{head}, phase="export"}}', "values": f"0x{before} 1x{after}"},
            {"series": f'finetune_job_epoch{{{head}, phase="finetune"}}', "values": "3x9"},
            {"series": f'finetune_job_epochs{{{head}, phase="finetune"}}', "values": "5x9"},
            {"series": f'finetune_job_epoch{{{head}, phase="export"}}', "values": "0x9"},
            {"series": f'finetune_job_epochs{{{head}, phase="export"}}', "values": "0x9"},
        ]
    phase, (epoch, _) = _panel_exprs("Phase")[0], _panel_exprs("Epoch")
    cases = [
        {"expr": phase, "eval_time": "2m", "exp_samples": [{"labels": '{phase="finetune"}', "value": 1}]},
        {"expr": phase, "eval_time": "5m", "exp_samples": [{"labels": '{phase="export"}', "value": 1}]},
        {"expr": epoch, "eval_time": "5m", "exp_samples": [{"labels": '{phase="export"}', "value": 0}]},
    ]
    tests = {"rule_files": [], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": cases}]}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", "t.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Only the pushed copy (the pod gone, or no scraping): its phase.
    tests["tests"][0]["input_series"] = [s for s in series if "instance" not in s["series"]]
    tests["tests"][0]["promql_expr_test"] = [{"expr": phase, "eval_time": "5m",
                                              "exp_samples": [{"labels": '{phase="finetune"}', "value": 1}]}]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", "t.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
