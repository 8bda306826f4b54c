"""A real training run watched by a real Prometheus (1 s scrapes of the job and of a real Pushgateway):
every metric of CONTRACT section 8 arrives, every dashboard expression works on it, the alert rules
evaluate on it, and a Pushgateway that is down does not fail a run.

RENDER_DASHBOARD_TO=docs/dashboard.png additionally keeps the dashboard picture of the run there.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import BACKBONE, SIZE, need_tool, run_cli, write_config
from servers import PROMETHEUS, PUSHGATEWAY, free_port, prometheus, pushgateway, static_scrape

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "finetune-job" / "alerts" / "rules.yaml"
SCRAPED = "finetune-job-pods"  # `job` label of the series scraped from the job
PUSHED = "finetune-job"  # `job` label of the series pushed through the Pushgateway (its grouping key)
RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval is at these 1 s scrapes (>= 4 scrape intervals)

CONTRACT_METRICS = {  # CONTRACT section 8, as exposed
    "finetune_job_info",
    "finetune_job_phase",
    "finetune_job_epoch",
    "finetune_job_train_loss",
    "finetune_job_train_accuracy",
    "finetune_job_val_loss",
    "finetune_job_val_accuracy",
    "finetune_job_images_processed_total",
    "finetune_job_step_duration_seconds_bucket",
    "finetune_job_step_duration_seconds_sum",
    "finetune_job_step_duration_seconds_count",
    "finetune_job_data_wait_seconds_total",
    "finetune_job_s3_bytes_downloaded_total",
    "finetune_job_s3_bytes_uploaded_total",
    "finetune_job_s3_errors_total",
    "finetune_job_bad_images_total",
    "finetune_job_checkpoints_saved_total",
    "finetune_job_last_success_timestamp_seconds",
}


def _render_module():
    spec = importlib.util.spec_from_file_location(
        "render_dashboard", ROOT / "scripts" / "render_dashboard.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_dashboard = _render_module()


def exposed_names() -> set[str]:
    """Every series name job.metrics defines, as exposed (counters with _total, histograms in parts)."""
    from job import metrics

    suffixes = {
        "gauge": [""],
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "info": ["_info"],
    }
    return {family.name + suffix for family in metrics.REGISTRY.collect() for suffix in suffixes[family.type]}


# RENDER_DASHBOARD_TO makes the observed run longer (and its data larger), so that the picture has learning
# curves worth looking at; the assertions hold either way.
RENDER_TO = os.environ.get("RENDER_DASHBOARD_TO")
EPOCHS = {"head": 8, "finetune": 20} if RENDER_TO else {"head": 2, "finetune": 2}


def training_config(tmp: Path, bucket: str, run_id: str, metrics: dict, weights: str,
                    epochs: dict[str, int] = EPOCHS) -> Path:
    """A run from a pre-trained base (`weights`: a file), so that it has both phases: with `model.weights: none`
    the job skips the head phase and trains from scratch in the fine-tuning phase alone."""
    return write_config(
        tmp / f"{run_id}.yaml",
        run_id=run_id,
        data={"uri": f"s3://{bucket}/datasets/shapes", "image_size": [SIZE, SIZE],
              "cache_dir": str(tmp / f"cache-{run_id}")},  # each run stages (and counts) its own download
        model={"backbone": BACKBONE, "weights": weights},
        train={"batch_size": 8, "head": {"epochs": epochs["head"]},
               "finetune": {"epochs": epochs["finetune"], "unfreeze": 10}, "early_stopping_patience": 0,
               "search": {"learning_rates": []}},  # one fine-tuning phase: the per-phase counts are the subject
        distribution={"cpu_replicas": 0},
        output={"uri": f"s3://{bucket}/models/shapes"},
        metrics={"host": "127.0.0.1", "linger_seconds": 5, **metrics},
        export={"formats": ["saved_model"]},
    )


@pytest.fixture(scope="module")
def observed(s3, base_weights, tmp_path_factory):
    """Two runs under one Prometheus: `ok` pushes to a real Pushgateway, `nogw` to a closed port."""
    from job.sample_data import write_sample_dataset

    need_tool(PROMETHEUS)
    need_tool(PUSHGATEWAY)
    tmp = tmp_path_factory.mktemp("observed")
    write_sample_dataset(tmp / "data", classes=3, per_class=80 if RENDER_TO else 12, size=SIZE, seed=0)
    bucket = s3.bucket()
    s3.upload_dir(tmp / "data", bucket, "datasets/shapes")
    tag = uuid.uuid4().hex[:8]
    runs = {"ok": {"run_id": f"obs-{tag}", "port": free_port()},
            "nogw": {"run_id": f"obs-nogw-{tag}", "port": free_port()}}
    weights = str(base_weights)

    with pushgateway() as gateway:
        scrapes = [static_scrape(SCRAPED, *(f"127.0.0.1:{r['port']}" for r in runs.values())),
                   static_scrape("pushgateway", gateway.address, honor_labels=True)]
        with prometheus(scrapes, rule_files=[str(RULES)]) as prom:
            closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
            configs = {
                "ok": training_config(tmp, bucket, runs["ok"]["run_id"], weights=weights,
                                      metrics={"port": runs["ok"]["port"], "pushgateway": gateway.url}),
                # A short run: it only has to succeed.
                "nogw": training_config(tmp, bucket, runs["nogw"]["run_id"], weights=weights,
                                        metrics={"port": runs["nogw"]["port"], "pushgateway": closed},
                                        epochs={"head": 1, "finetune": 0}),
            }

            def train(name: str) -> None:
                run = runs[name]
                run["start"] = time.time()
                run["result"] = run_cli("train", "--config", str(configs[name]), env=s3.env(), timeout=900)
                run["end"] = time.time()

            with ThreadPoolExecutor(2) as pool:  # side by side: each run has its own port, run_id and window
                list(pool.map(train, runs))
            time.sleep(3)  # the last scrapes of the Pushgateway
            yield {"runs": runs, "prometheus": prom, "gateway": gateway, "tmp": tmp}


def series_names(prom, run: dict, job: str) -> set[str]:
    found = prom.series(
        f'{{__name__=~"finetune_job_.+", run_id="{run["run_id"]}", job="{job}"}}', run["start"], time.time()
    )
    return {s["__name__"] for s in found}


@pytest.mark.slow
def test_runs_succeed(observed):
    for run in observed["runs"].values():
        assert run["result"].returncode == 0, run["result"].stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("job", [SCRAPED, PUSHED])
def test_every_contract_metric_reaches_prometheus(observed, job):
    """Scraped from the job and pushed through the Pushgateway: all of section 8, and all we expose."""
    run = observed["runs"]["ok"]
    names = series_names(observed["prometheus"], run, job)
    assert names >= CONTRACT_METRICS, CONTRACT_METRICS - names
    # No GPU here; a single-label run has no validation mAP (tests/unit/test_metrics.py shows a multi-label one).
    assert exposed_names() - {"finetune_job_device_memory_bytes", "finetune_job_val_map"} <= names


@pytest.mark.slow
def test_every_series_carries_run_id_and_worker(observed):
    run = observed["runs"]["ok"]
    found = observed["prometheus"].series('{__name__=~"finetune_job_.+"}', run["start"], time.time())
    assert found
    for series in found:
        assert series.get("run_id") in {r["run_id"] for r in observed["runs"].values()}, series
        assert series.get("worker") == "0", series


@pytest.mark.slow
def test_final_values_are_consistent(observed):
    """The last scraped values tell the run's story: one number checked against another."""
    prom, run = observed["prometheus"], observed["runs"]["ok"]
    at = run["end"]
    sel = f'run_id="{run["run_id"]}", job="{SCRAPED}"'

    def one(selector: str) -> dict[str, float]:
        """The last value of each series, by its phase or status label."""
        return {
            r["metric"].get("phase", r["metric"].get("status", "")): float(r["value"][1])
            for r in prom.query(f"last_over_time({selector}[30s])", at)
        }

    images = one(f"finetune_job_images_processed_total{{{sel}}}")
    epochs = one(f"finetune_job_epoch{{{sel}}}")
    steps = one(f"finetune_job_steps_per_epoch{{{sel}}}")
    for phase in ("head", "finetune"):
        assert epochs[phase] == EPOCHS[phase]  # no early stopping in these runs
        assert images[phase] == epochs[phase] * steps[phase] * 8  # batch 8, one worker
    assert one(f"finetune_job_run_status{{{sel}}}") == {"running": 0, "succeeded": 1, "failed": 0, "preempted": 0}
    assert one(f"finetune_job_phase{{{sel}}}")["export"] == 1
    dataset_bytes = sum(p.stat().st_size for p in (observed["tmp"] / "data").rglob("*") if p.is_file())
    assert one(f"finetune_job_s3_bytes_downloaded_total{{{sel}}}")[""] >= dataset_bytes
    assert one(f"finetune_job_s3_bytes_uploaded_total{{{sel}}}")[""] > 0
    assert one(f"finetune_job_checkpoints_saved_total{{{sel}}}")[""] >= 1
    assert one(f"finetune_job_bad_images_total{{{sel}}}")[""] == 0
    for name in ("train_accuracy", "val_accuracy"):
        assert all(0 <= v <= 1 for v in one(f"finetune_job_{name}{{{sel}}}").values())
    assert run["start"] <= one(f"finetune_job_last_success_timestamp_seconds{{{sel}}}")[""] <= run["end"]


def dashboard_targets() -> list[tuple[str, str]]:
    return [
        (f"{p['title']} / {t['refId']}", t["expr"]) for p in render_dashboard.panels() for t in p["targets"]
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("panel", "expr"), dashboard_targets(), ids=[name for name, _ in dashboard_targets()]
)
def test_dashboard_expression_returns_data(observed, panel, expr):
    """Each expression of the dashboard, as Grafana would send it, is accepted and has data for the run."""
    # so that pushed and scraped series both match; `instance` only tells the two copies apart (the current phase)
    assert "job=" not in expr and "instance=" not in expr.replace('instance=""', "").replace('instance!=""', "")
    run = observed["runs"]["ok"]
    result = observed["prometheus"].query_range(
        render_dashboard.expand(expr, run["run_id"], RATE_INTERVAL), run["start"], run["end"] + 3
    )
    if "device_memory_bytes" in expr:
        assert result == []  # no GPU on this machine: the panel stays empty rather than wrong
        return
    if "val_map" in expr:
        assert result == []  # a single-label run: the multi-label mAP stays empty (tests/unit/test_metrics.py)
        return
    values = [float(v) for series in result for _, v in series["values"]]
    assert any(math.isfinite(v) for v in values), f"{panel}: no data"


@pytest.mark.slow
def test_pushgateway_holds_the_final_metrics(observed):
    run = observed["runs"]["ok"]
    groups = [g for g in observed["gateway"].groups() if g["labels"].get("run_id") == run["run_id"]]
    assert [g["labels"] for g in groups] == [{"job": PUSHED, "run_id": run["run_id"]}]
    pushed = groups[0]["metrics"]

    def value(name: str, **labels) -> float:
        (found,) = [
            float(m["value"]) for m in pushed[name]["metrics"] if labels.items() <= m["labels"].items()
        ]
        return found

    assert value("finetune_job_run_status", status="succeeded") == 1
    assert run["start"] <= value("finetune_job_last_success_timestamp_seconds") <= run["end"]
    assert value("finetune_job_push_errors_total") == 0
    # The final push carries the final numbers: the same as the last scrape of the job itself.
    scraped = observed["prometheus"].query(
        f'last_over_time(finetune_job_images_processed_total{{run_id="{run["run_id"]}", job="{SCRAPED}"}}'
        "[1h])",
        run["end"],
    )
    assert {r["metric"]["phase"]: float(r["value"][1]) for r in scraped} == {
        phase: value("finetune_job_images_processed_total", phase=phase) for phase in ("head", "finetune")
    }


@pytest.mark.slow
def test_unreachable_pushgateway_is_logged_and_counted(observed):
    run = observed["runs"]["nogw"]
    assert run["result"].returncode == 0
    events = [r for r in run["result"].records() if r.get("event") == "pushgateway_failed"]
    assert len(events) == 1 and events[0]["level"] == "warning", events
    errors = observed["prometheus"].query(
        f'max_over_time(finetune_job_push_errors_total{{run_id="{run["run_id"]}"}}[1h])', time.time()
    )
    assert errors and float(errors[0]["value"][1]) >= 1
    assert not any(g["labels"].get("run_id") == run["run_id"] for g in observed["gateway"].groups())


@pytest.mark.slow
def test_alert_rules_evaluate_on_real_series(observed):
    """The rules load into Prometheus and evaluate on the runs' series without error; none fires."""
    groups = observed["prometheus"].api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {r["name"] for r in rules} == {
        "FinetuneJobStalled",
        "FinetuneJobFailed",
        "FinetuneJobDataWaitHigh",
        "FinetuneJobS3ErrorsRising",
    }
    for rule in rules:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    assert [a for a in observed["prometheus"].api("alerts")["alerts"] if a["state"] == "firing"] == []


@pytest.mark.slow
def test_dashboard_renders_from_the_run(observed, tmp_path):
    prom, run = observed["prometheus"], observed["runs"]["ok"]
    out = render_dashboard.render(prom.url, run["run_id"], run["start"], run["end"] + 3,
                                  tmp_path / "dashboard.png", rate_interval=RATE_INTERVAL)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if RENDER_TO:
        # The picture of the docs: the dashboard as it looks while the run fine-tunes.
        def moments(expr: str) -> list[float]:
            (series,) = prom.query_range(expr, run["start"], run["end"])
            return [float(t) for t, _ in series["values"]]

        sel = f'run_id="{run["run_id"]}", job="{SCRAPED}"'
        first = moments(f"max(finetune_job_info{{{sel}}})")[0]
        finetuning = moments(f'max(finetune_job_phase{{{sel}, phase="finetune"}}) == 1')
        render_dashboard.render(prom.url, run["run_id"], first, finetuning[int(len(finetuning) * 0.6)],
                                ROOT / RENDER_TO, rate_interval=RATE_INTERVAL)


def test_dashboard_is_one_grafana_dashboard_per_run():
    """Fast: what Grafana needs to import it and what makes the run_id filter work."""
    dashboard = json.loads(render_dashboard.DASHBOARD.read_text())
    assert dashboard["uid"] == "finetune-job"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert variables["run_id"]["query"]["query"] == "label_values(finetune_job_info, run_id)"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert 'run_id="$run_id"' in target["expr"], (panel["title"], target["expr"])
            render_dashboard.expand(target["expr"], "some-run", "1m")  # no unknown variables
