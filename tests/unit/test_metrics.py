"""job.metrics against real HTTP scraping and a real Pushgateway (Debian's prometheus-pushgateway)."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error

import pytest
from conftest import need_tool
from prometheus_client.parser import text_string_to_metric_families
from servers import PUSHGATEWAY, free_port, get, pushgateway
from structlog.testing import capture_logs

from job import metrics


@pytest.fixture(scope="module")
def gateway():
    need_tool(PUSHGATEWAY)
    with pushgateway() as pg:
        yield pg


@pytest.fixture
def run():
    """start() with test defaults (127.0.0.1, a free port, no linger); the run is finished afterwards."""
    started = {}

    def _start(**overrides) -> dict:
        kwargs = dict(
            run_id="run-a",
            backbone="mobilenet_v2",
            version="9.9.9",
            port=free_port(),
            host="127.0.0.1",
            linger_seconds=0,
            push_interval_seconds=0.2,
        )
        kwargs.update(overrides)
        metrics.start(**kwargs)
        started.update(kwargs)
        return kwargs

    yield _start
    if started:
        metrics.finish(False)


def scrape(port: int) -> dict[str, list]:
    """/metrics over HTTP, parsed: {family name: [samples]}."""
    text = get(f"http://127.0.0.1:{port}/metrics").decode()
    return {family.name: (family.type, family.samples) for family in text_string_to_metric_families(text)}


def with_samples(families: dict) -> set[str]:
    """Names of the families that have series (HELP/TYPE are exposed for empty ones too)."""
    return {name for name, (_, samples) in families.items() if samples}


def value(families: dict, sample_name: str, **labels) -> float:
    family = families[sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")]
    found = [s.value for s in family[1] if s.name == sample_name and labels.items() <= s.labels.items()]
    assert len(found) == 1, (sample_name, labels, family)
    return found[0]


def group(gateway, run_id: str, **extra) -> dict | None:
    """The Pushgateway group of job finetune-job + run_id (+ extra grouping labels), or None."""
    wanted = {"job": "finetune-job", "run_id": run_id, **extra}
    found = [g["metrics"] for g in gateway.groups() if g["labels"] == wanted]
    return found[0] if found else None


def pushed_value(grp: dict, name: str, **labels) -> float | None:
    for family_name, family in grp.items():
        for m in family["metrics"]:
            if family_name == name and labels.items() <= m["labels"].items():
                return float(m["value"])
    return None


def registry_value(name: str, run_id: str, **labels) -> float | None:
    """A sample of the in-process registry (what the next scrape or push will carry)."""
    return metrics.REGISTRY.get_sample_value(name, {"run_id": run_id, "worker": "0", **labels})


def wait_until(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"not true after {timeout} s: {predicate}")


def test_works_without_start_and_imports_no_tensorflow():
    """The validate command and unit code call the functions without start(); no TF at import."""
    code = """
import sys, json
from job import metrics
from prometheus_client import generate_latest
assert "tensorflow" not in sys.modules
metrics.set_phase("staging")
metrics.epoch_started("head", 1, 3, 10)
metrics.step_done("head", 8, 0.5, 0.1)
metrics.epoch_done("head", 1, train_loss=0.5, train_accuracy=0.8, val_loss=0.6, val_accuracy=0.7)
metrics.s3_bytes_downloaded(10); metrics.s3_bytes_uploaded(20); metrics.s3_error("GetObject")
metrics.bad_images(2); metrics.checkpoint_saved(); metrics.stage_progress("staging", 40, 6000)
metrics.finish(True)
print(json.dumps({"tf": "tensorflow" in sys.modules, "text": generate_latest(metrics.REGISTRY).decode()}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tf"] is False
    families = {f.name: (f.type, f.samples) for f in text_string_to_metric_families(result["text"])}
    assert value(families, "finetune_job_images_processed_total", phase="head") == 8
    assert value(families, "finetune_job_bad_images_total") == 2
    assert value(families, "finetune_job_stage_items_done", stage="staging") == 40
    assert value(families, "finetune_job_stage_items", stage="staging") == 6000
    assert value(families, "finetune_job_val_accuracy", phase="head") == 0.7
    assert value(families, "finetune_job_last_success_timestamp_seconds") > 0


def test_scraped_metrics_follow_the_run(run):
    opts = run(run_id="run-scrape", worker=0)
    metrics.set_phase("staging")
    metrics.bad_images(3)
    metrics.s3_error("GetObject")
    metrics.s3_error("SomethingNew")  # cardinality stays bounded: counted as "other"

    # The four S3/data counters are called from worker threads.
    threads = [
        threading.Thread(target=lambda: [metrics.s3_bytes_downloaded(7) for _ in range(500)])
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    metrics.s3_bytes_uploaded(1234)

    metrics.set_phase("head")
    metrics.epoch_started("head", 1, 2, 4)
    for _ in range(3):
        metrics.step_done("head", 8, 0.2, 0.05)
    metrics.epoch_done("head", 1, train_loss=1.5, train_accuracy=0.25, val_loss=1.75, val_accuracy=0.5)
    metrics.checkpoint_saved()

    families = scrape(opts["port"])
    for name, (_, samples) in families.items():
        for sample in samples:
            assert sample.labels.get("run_id") == "run-scrape", (name, sample)
            assert sample.labels.get("worker") == "0", (name, sample)
    assert not any(name.endswith("_created") for name in families)
    assert families["finetune_job_images_processed"][0] == "counter"
    assert families["finetune_job_step_duration_seconds"][0] == "histogram"
    assert value(families, "finetune_job_info", backbone="mobilenet_v2", version="9.9.9") == 1
    assert value(families, "finetune_job_phase", phase="head") == 1
    assert value(families, "finetune_job_phase", phase="staging") == 0
    assert value(families, "finetune_job_run_status", status="running") == 1
    assert value(families, "finetune_job_epoch", phase="head") == 1
    assert value(families, "finetune_job_epochs", phase="head") == 2
    assert value(families, "finetune_job_steps_per_epoch", phase="head") == 4
    assert value(families, "finetune_job_epoch_step", phase="head") == 3
    assert value(families, "finetune_job_images_processed_total", phase="head") == 24
    assert value(families, "finetune_job_images_processed_total", phase="finetune") == 0
    assert value(families, "finetune_job_step_duration_seconds_count", phase="head") == 3
    assert value(families, "finetune_job_step_duration_seconds_sum", phase="head") == pytest.approx(0.6)
    assert value(families, "finetune_job_data_wait_seconds_total", phase="head") == pytest.approx(0.15)
    assert value(families, "finetune_job_train_loss", phase="head") == 1.5
    assert value(families, "finetune_job_train_accuracy", phase="head") == 0.25
    assert value(families, "finetune_job_val_loss", phase="head") == 1.75
    assert value(families, "finetune_job_val_accuracy", phase="head") == 0.5
    assert value(families, "finetune_job_s3_bytes_downloaded_total") == 8 * 500 * 7
    assert value(families, "finetune_job_s3_bytes_uploaded_total") == 1234
    assert value(families, "finetune_job_s3_errors_total", operation="GetObject") == 1
    assert value(families, "finetune_job_s3_errors_total", operation="other") == 1
    assert all(s.labels["operation"] in metrics.S3_OPERATIONS for s in families["finetune_job_s3_errors"][1])
    assert value(families, "finetune_job_bad_images_total") == 3
    assert value(families, "finetune_job_checkpoints_saved_total") == 1
    assert "finetune_job_last_success_timestamp_seconds" not in with_samples(families)
    assert "finetune_job_device_memory_bytes" not in with_samples(families)

    with pytest.raises(ValueError, match="unknown phase"):
        metrics.set_phase("warmup")

    metrics.finish(True)
    with pytest.raises(urllib.error.URLError):
        get(f"http://127.0.0.1:{opts['port']}/metrics", timeout=2)
    assert registry_value("finetune_job_run_status", "run-scrape", status="succeeded") == 1


def test_step_buckets_cover_a_millisecond_to_a_minute():
    assert metrics.STEP_BUCKETS[0] <= 0.001 and metrics.STEP_BUCKETS[-1] >= 60
    assert list(metrics.STEP_BUCKETS) == sorted(metrics.STEP_BUCKETS)


def test_start_again_resets_the_registry(run):
    first = run(run_id="run-one", worker=3)
    metrics.bad_images(5)
    metrics.set_phase("head")
    metrics.step_done("head", 8, 0.1, 0.0)
    metrics.finish(True)

    second = run(run_id="run-two", worker=0)
    metrics.bad_images(1)
    families = scrape(second["port"])
    run_ids = {s.labels["run_id"] for _, samples in families.values() for s in samples}
    assert run_ids == {"run-two"}
    assert value(families, "finetune_job_bad_images_total") == 1
    assert value(families, "finetune_job_images_processed_total", phase="head") == 0
    assert value(families, "finetune_job_run_status", status="running") == 1
    assert "finetune_job_last_success_timestamp_seconds" not in with_samples(families)
    with pytest.raises(urllib.error.URLError):
        get(f"http://127.0.0.1:{first['port']}/metrics", timeout=2)


def test_pushgateway_holds_the_final_metrics_on_success(run, gateway):
    run(run_id="run-push-ok", pushgateway=gateway.url)
    metrics.set_phase("finetune")
    metrics.step_done("finetune", 16, 0.3, 0.1)
    # Periodic pushes: the group shows the run while it is running.
    during = wait_until(lambda: group(gateway, "run-push-ok"))
    assert pushed_value(during, "finetune_job_run_status", status="running") == 1

    before = time.time()
    metrics.finish(True)
    final = group(gateway, "run-push-ok")
    assert pushed_value(final, "finetune_job_run_status", status="succeeded") == 1
    assert pushed_value(final, "finetune_job_run_status", status="running") == 0
    assert pushed_value(final, "finetune_job_images_processed_total", phase="finetune", worker="0") == 16
    assert pushed_value(final, "finetune_job_info", backbone="mobilenet_v2") == 1
    assert before - 1 <= pushed_value(final, "finetune_job_last_success_timestamp_seconds") <= time.time() + 1
    assert pushed_value(final, "finetune_job_push_errors_total") == 0


def test_pushgateway_failure_push_has_no_success_timestamp(run, gateway):
    run(run_id="run-push-fail", pushgateway=gateway.url, push_interval_seconds=60)
    metrics.set_phase("head")
    metrics.step_done("head", 8, 0.1, 0.0)
    metrics.finish(False)
    final = group(gateway, "run-push-fail")
    assert final is not None
    assert pushed_value(final, "finetune_job_run_status", status="failed") == 1
    assert pushed_value(final, "finetune_job_images_processed_total", phase="head") == 8
    assert "finetune_job_last_success_timestamp_seconds" not in final


def test_an_attempt_pushes_once_it_holds_the_run(run, gateway):
    # A second attempt of one run id, waiting on the live one's lease, pushed its own "running" values (its counters
    # at 0) into the live one's group every 15 s.
    run(run_id="run-waiting", pushgateway=gateway.url, owned=False)
    metrics.step_done("head", 8, 0.1, 0.0)
    time.sleep(1.0)  # five push intervals
    assert group(gateway, "run-waiting") is None
    metrics.owned()  # the lease taken
    pushed = wait_until(lambda: group(gateway, "run-waiting"))
    assert pushed_value(pushed, "finetune_job_images_processed_total", phase="head") == 8


def test_an_attempt_that_found_its_run_complete_pushes_nothing_at_the_end(run, gateway):
    # It waited for the lease while another attempt completed the run: its final push replaced that run's values.
    run(run_id="run-done-by-another", pushgateway=gateway.url, push_interval_seconds=60)
    metrics.step_done("head", 8, 0.1, 0.0)
    metrics.finish(True, push=False)
    final = group(gateway, "run-done-by-another")  # as its start pushed it: no final push of this attempt's values
    assert pushed_value(final, "finetune_job_run_status", status="succeeded") == 0
    assert pushed_value(final, "finetune_job_run_status", status="running") == 1


def test_a_preempted_run_is_not_reported_failed(run, gateway):
    run(run_id="run-preempted", pushgateway=gateway.url, push_interval_seconds=60)
    metrics.set_phase("finetune")
    metrics.finish(False, preempted=True)
    final = group(gateway, "run-preempted")
    assert pushed_value(final, "finetune_job_run_status", status="preempted") == 1
    assert pushed_value(final, "finetune_job_run_status", status="failed") == 0
    assert "finetune_job_last_success_timestamp_seconds" not in final


def test_only_the_chief_pushes_the_final_summary(run, gateway):
    run(run_id="run-multi", worker=0, is_chief=True, pushgateway=gateway.url)
    metrics.step_done("head", 4, 0.1, 0.0)
    metrics.finish(True)

    run(run_id="run-multi", worker=1, is_chief=False, pushgateway=gateway.url)
    metrics.step_done("head", 4, 0.1, 0.0)
    metrics.step_done("head", 4, 0.1, 0.0)
    # A worker pushes to its own group during the run, leaving the chief's alone ...
    wait_until(
        lambda: (
            pushed_value(
                group(gateway, "run-multi", worker="1") or {},
                "finetune_job_images_processed_total",
                phase="head",
                worker="1",
            )
            == 8
        )
    )
    assert pushed_value(group(gateway, "run-multi"), "finetune_job_images_processed_total", phase="head") == 4
    # ... and removes it at the end: the chief's summary is what stays.
    metrics.finish(True)
    assert group(gateway, "run-multi", worker="1") is None
    chief = group(gateway, "run-multi")
    assert pushed_value(chief, "finetune_job_run_status", status="succeeded", worker="0") == 1


# bcrypt of "s3cret" (the Pushgateway's web config takes hashes only)
_HASH = "$2b$12$DR2Fs3ejOrtztBrX5e1lO.gGHdMDUHY9AVzOnoVReiuYpkae0PZoi"


def test_a_pushgateway_behind_basic_auth_gets_the_urls_credentials_and_the_log_not(run):
    # prometheus_client took `user:pw@host` for the host name: every push failed ("Name or service not known"), exit
    # 0, and the warning printed the password.
    import base64
    import urllib.request

    need_tool(PUSHGATEWAY)
    with pushgateway(web_config=f"basic_auth_users:\n  ml: {_HASH}\n") as pg:
        run(run_id="run-auth", pushgateway=pg.url.replace("://", "://ml:s3cret@"), push_interval_seconds=60)
        metrics.finish(True)
        request = urllib.request.Request(f"{pg.url}/api/v1/metrics", headers={
            "Authorization": "Basic " + base64.b64encode(b"ml:s3cret").decode()})
        with urllib.request.urlopen(request, timeout=10) as reply:
            groups = json.loads(reply.read())["data"]
        assert [g["labels"]["run_id"] for g in groups] == ["run-auth"]
        assert registry_value("finetune_job_push_errors_total", "run-auth") == 0
        with capture_logs() as logs:
            run(run_id="run-refused", pushgateway=pg.url.replace("://", "://ml:wr%40ng@"), push_interval_seconds=60)
            metrics.finish(True)
    (warning,) = [e for e in logs if e["event"] == "pushgateway_failed"]
    assert warning["url"] == pg.url.replace("://", "://***@") and "401" in warning["error"]
    assert warning["worker"] == 0  # an int, as on every other record (it was "0" here alone)
    assert "wr%40ng" not in json.dumps(logs) and "wr@ng" not in json.dumps(logs)


def test_unreachable_pushgateway_is_counted_not_raised(run):
    port = free_port()  # nothing listens there
    with capture_logs() as logs:
        opts = run(run_id="run-no-gateway", pushgateway=f"http://127.0.0.1:{port}", push_interval_seconds=60)
        # The pusher's first push (at start) fails; the run goes on and /metrics still serves.
        wait_until(lambda: registry_value("finetune_job_push_errors_total", "run-no-gateway") == 1)
        metrics.step_done("head", 8, 0.1, 0.0)
        assert value(scrape(opts["port"]), "finetune_job_images_processed_total", phase="head") == 8
        metrics.finish(True)
    assert registry_value("finetune_job_push_errors_total", "run-no-gateway") == 2  # the final push too
    assert registry_value("finetune_job_last_success_timestamp_seconds", "run-no-gateway") > 0
    warnings = [e for e in logs if e["event"] == "pushgateway_failed"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"  # one per outage, not per push
    # logged from the pusher's thread, which has not the run's bound context: the record had no run_id
    assert warnings[0]["run_id"] == "run-no-gateway" and warnings[0]["worker"] == 0


def test_pushgateway_that_never_answers_times_out(run, monkeypatch):
    monkeypatch.setattr(metrics, "PUSH_TIMEOUT_SECONDS", 0.5)
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        run(run_id="run-silent-gateway", pushgateway=url, push_interval_seconds=60)
        metrics.finish(True)
    # One periodic push (at start) and the final one, each given up after the timeout.
    assert registry_value("finetune_job_push_errors_total", "run-silent-gateway") == 2


def test_port_in_use_does_not_stop_the_run(run):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with capture_logs() as logs:
            run(run_id="run-port-taken", port=taken.getsockname()[1])
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["metrics_server_failed"]
    metrics.step_done("head", 8, 0.1, 0.0)
    assert registry_value("finetune_job_images_processed_total", "run-port-taken", phase="head") == 8


def test_linger_keeps_metrics_up_after_finish(run):
    opts = run(run_id="run-linger", linger_seconds=1.5)
    finisher = threading.Thread(target=metrics.finish, args=(True,))
    finisher.start()
    # While finish() lingers, the final state is scrapeable.
    final = wait_until(lambda: scrape(opts["port"]).get("finetune_job_last_success_timestamp_seconds"))
    finisher.join()
    assert final[1][0].value > 0
    with pytest.raises(urllib.error.URLError):
        get(f"http://127.0.0.1:{opts['port']}/metrics", timeout=2)


def test_a_preempted_run_does_not_linger(run):
    # Its grace period is the checkpoint's: a linger of 15-30 s after a slow checkpoint ended in SIGKILL (exit 137,
    # which the chart's Job counts as a failure) where the run had stopped cleanly.
    run(run_id="run-preempted", linger_seconds=600)
    finisher = threading.Thread(target=metrics.finish, args=(False,), kwargs={"preempted": True}, daemon=True)
    finisher.start()
    finisher.join(timeout=60)
    assert not finisher.is_alive()
    assert registry_value("finetune_job_run_status", "run-preempted", status="preempted") == 1


def test_device_memory_is_read_only_from_an_imported_tensorflow(run, monkeypatch):
    """No GPU here: a stand-in for an already imported TensorFlow with one GPU exercises the sampling."""
    calls = []

    def get_memory_info(device):
        calls.append(device)
        return {"current": 123456789, "peak": 2 * 123456789}

    gpu = types.SimpleNamespace(name="/job:localhost/replica:0/task:0/device:GPU:0")
    fake_tf = types.SimpleNamespace(
        config=types.SimpleNamespace(
            list_logical_devices=lambda kind: [gpu] if kind == "GPU" else [],
            experimental=types.SimpleNamespace(get_memory_info=get_memory_info),
        )
    )
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    opts = run(run_id="run-gpu")
    for _ in range(5):
        metrics.step_done("head", 8, 0.01, 0.0)
    assert calls == ["GPU:0"]  # sampled at most every few seconds, not per step
    assert value(scrape(opts["port"]), "finetune_job_device_memory_bytes", device="GPU:0") == 123456789


def test_a_multilabel_epoch_exposes_the_validation_map_and_accuracy(run):
    # CONTRACT section 8 names val_accuracy for every run, val_map besides for multi-label: its binary accuracy
    # (each label decided at 0.5), as train_accuracy is measured; there was none (before that, a NaN series).
    opts = run(run_id="run-map", worker=0)
    metrics.epoch_done("finetune", 2, train_loss=0.3, train_accuracy=0.9, val_loss=0.35, val_accuracy=0.8125,
                       val_map=0.875)
    families = scrape(opts["port"])
    (sample,) = families["finetune_job_val_map"][1]
    assert sample.labels["phase"] == "finetune" and sample.value == 0.875
    assert [(s.labels["phase"], s.value) for s in families["finetune_job_val_accuracy"][1]] == [("finetune", 0.8125)]
    metrics.epoch_done("head", 1, train_loss=0.3, train_accuracy=0.9, val_loss=0.35, val_accuracy=0.5)
    assert [s.labels["phase"] for s in scrape(opts["port"])["finetune_job_val_map"][1]] == ["finetune"]


def test_a_rerun_of_a_complete_run_keeps_its_pushed_metrics_and_reports_to_katib_again(run, gateway, tmp_path):
    """`train` on a complete run does nothing: it pushed a fresh registry over the run's group (the success time
    moved to the rerun, the counters 0, the epochs gone), and wrote no Katib line, so a trial pod started again after
    the upload failed its trial for want of the objective."""
    from conftest import run_cli, write_config

    run(run_id="done-1", pushgateway=gateway.url)
    metrics.step_done("finetune", 16, 0.3, 0.1)
    metrics.finish(True)
    before = group(gateway, "done-1")
    assert pushed_value(before, "finetune_job_images_processed_total", phase="finetune") == 16
    folder = tmp_path / "out" / "done-1"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"validation": {"loss": 0.5, "accuracy": 0.75},
                                                     "test": {"accuracy": 0.5}, "formats": {}}))
    (folder / "_SUCCESS").write_text("")
    config = write_config(tmp_path / "c.yaml", run_id="done-1", data={"uri": str(tmp_path / "d")},
                          output={"uri": str(tmp_path / "out")}, model={"weights": "none"},
                          metrics={"pushgateway": gateway.url, "port": 0, "file": str(tmp_path / "katib.txt")})
    result = run_cli("train", "--config", str(config), timeout=120)
    assert result.returncode == 0 and '"status": "already complete"' in result.stdout, result.stderr
    assert group(gateway, "done-1") == before  # push times included: nothing pushed
    (line,) = (tmp_path / "katib.txt").read_text().splitlines()
    assert line.split()[1:] == ["val_loss=0.5", "val_accuracy=0.75", "test_accuracy=0.5"]


def test_a_run_whose_output_storage_fails_at_start_is_pushed_as_failed(gateway, s3, tmp_path):
    """Checking for a complete run before the metrics must not hide a failure from them: an output bucket that does
    not exist is exit 4, and the Pushgateway holds the run as failed (FinetuneJobFailed fires)."""
    from conftest import run_cli, write_config

    config = write_config(tmp_path / "c.yaml", run_id="denied-1", data={"uri": str(tmp_path / "d")},
                          output={"uri": "s3://no-such-bucket-here/runs"}, model={"weights": "none"},
                          metrics={"pushgateway": gateway.url, "port": 0, "linger_seconds": 0})
    result = run_cli("train", "--config", str(config), env=s3.env(), timeout=120)
    assert result.returncode == 4, result.stderr[-1500:]
    assert pushed_value(group(gateway, "denied-1"), "finetune_job_run_status", status="failed") == 1


def test_a_resumed_attempt_starts_from_the_checkpoints_history(run):
    # A resumed attempt's registry was new: its final push, which replaces the group, had no results of the phases
    # an earlier attempt finished; and an epoch resumed mid-way counted its steps from 0, never reaching its total.
    from types import SimpleNamespace

    from job import pipeline

    run(run_id="run-resumed")
    history = {"head": [{"epoch": 1, "loss": 1.5, "accuracy": 0.25, "val_loss": 1.25, "val_accuracy": 0.5},
                        {"epoch": 2, "loss": 0.5, "accuracy": 0.75, "val_loss": None, "val_accuracy": 0.625}],
               "finetune": []}
    pipeline._replay_metrics(SimpleNamespace(state=SimpleNamespace(history=history), multi=False))
    assert registry_value("finetune_job_epoch", "run-resumed", phase="head") == 2
    assert registry_value("finetune_job_train_loss", "run-resumed", phase="head") == 0.5
    assert registry_value("finetune_job_val_accuracy", "run-resumed", phase="head") == 0.625
    assert math.isnan(registry_value("finetune_job_val_loss", "run-resumed", phase="head"))  # null: not finite
    assert registry_value("finetune_job_epoch", "run-resumed", phase="finetune") is None
    metrics.epoch_started("finetune", 2, 3, 6, steps_done=1)
    assert registry_value("finetune_job_epoch_step", "run-resumed", phase="finetune") == 1
