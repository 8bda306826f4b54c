"""Scale-out and fault tolerance with real processes, a real S3 server and 127.0.0.1 only:
two workers with TF_CONFIG, SIGTERM and resume, storage faults, a stopped server, kill -9 in the upload."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time

import pytest
from conftest import BACKBONE, CLI, SIZE, free_ports, run_cli, write_config
from fault_proxy import FaultProxy

pytestmark = pytest.mark.slow


def make_config(path, bucket, run_id, cache, **overrides):
    sections = {
        "run_id": run_id,
        "data": {"uri": f"s3://{bucket}/data", "image_size": [SIZE, SIZE], "cache_dir": str(cache)},
        "model": {"backbone": BACKBONE, "weights": f"s3://{bucket}/weights/base.weights.h5", "head_units": 32},
        # One fine-tuning phase (no train.search trials): its resume is the subject (test_search.py: the search's).
        "train": {"batch_size": 16, "head": {"epochs": 2}, "finetune": {"epochs": 2, "unfreeze": 10},
                  "search": {"learning_rates": []},
                  "early_stopping_patience": 0},
        "output": {"uri": f"s3://{bucket}/runs"},
        # A short lease: a run that died without releasing it is taken over within seconds, not minutes;
        # a checkpoint at every epoch's end (the default is by time, every 5 minutes).
        "checkpoint": {"lease_seconds": 6, "every_seconds": 0},
        "metrics": {"port": 0, "linger_seconds": 0},
        "export": {"formats": ["saved_model"]},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, dict):
                    sections[key].setdefault(k, {}).update(v)
                else:
                    sections.setdefault(key, {})[k] = v
        else:
            sections[key] = value
    return write_config(path, **sections)


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


class Running:
    """`finetune-job train` in the background with its JSON log read line by line."""

    def __init__(self, config, env, cwd=None):
        full = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
        self.proc = subprocess.Popen([CLI, "train", "--config", str(config)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=full, cwd=cwd)
        self.lines: list[dict] = []
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.append(json.loads(line))

    def _read_err(self):
        self.stderr = self.proc.stderr.read()

    def wait_for(self, predicate, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in list(self.lines):
                if predicate(r):
                    return r
            if self.proc.poll() is not None:
                self._reader.join(5)
                for r in list(self.lines):
                    if predicate(r):
                        return r
                raise AssertionError(f"exited {self.proc.returncode} before the awaited record: {self.stderr[-2000:]}")
            time.sleep(0.05)
        raise AssertionError("timed out waiting for a log record")

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc


def test_two_workers_stopped_resume_to_identical_weights_and_only_the_chief_writes(s3, dataset, tmp_path):
    def start_both():
        ports = free_ports(2)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        procs = []
        for index in range(2):
            cfg = make_config(tmp_path / f"w{index}.yaml", dataset, "two-workers", tmp_path / f"cache{index}",
                              distribution={"connect_timeout_seconds": 120})
            env = {**s3.env(), "TF_CONFIG": json.dumps({"cluster": cluster,
                                                        "task": {"type": "worker", "index": index}})}
            procs.append(Running(cfg, env))
        return procs

    # SIGTERM to the second worker alone, in fine-tuning: both stop at the same step (the flag rides on the step's
    # all-reduce), the chief saves the checkpoint, both exit 143. The strategy had put TensorFlow's own handler in
    # the job's place: they trained on to the end, or to SIGKILL.
    procs = start_both()
    procs[0].wait_for(lambda r: r["event"] == "epoch done" and r.get("phase") == "head" and r["epoch"] == 2)
    procs[1].proc.send_signal(signal.SIGTERM)
    codes = [p.wait(120) for p in procs]
    assert codes == [143, 143], [p.stderr[-1500:] for p in procs]
    assert all("stopped by SIGTERM" in p.stderr and "Traceback" not in p.stderr for p in procs)
    assert "runs/two-workers/_SUCCESS" not in s3.keys(dataset, "runs/two-workers/")

    procs = start_both()  # the Job's next attempt: resumed, then complete
    codes = [p.wait(600) for p in procs]
    assert codes == [0, 0], [p.stderr[-1500:] for p in procs]
    done = [next(r for r in p.lines if r["event"] == "training done") for p in procs]
    assert done[0]["weights_sha256"] == done[1]["weights_sha256"]
    assert [next(r for r in p.lines if r["event"] == "strategy ready")["workers"] for p in procs] == [2, 2]
    assert procs[0].lines[-1]["status"] == "complete" and procs[1].lines[-1]["status"] == "done (worker)"
    # The other worker waits for the chief's export: it exited as the export began ("The tasks have crashed" in the
    # chief's log), and a chief stopped there could not resume without it.
    uploading = next(r for r in procs[0].lines if r["event"] == "uploading the artifacts")["timestamp"]
    assert procs[1].lines[-1]["timestamp"] > uploading
    assert not any(r["event"] == "checkpoint saved" for r in procs[1].lines)  # the chief alone uploads
    assert all(next(r for r in p.lines if r["event"] == "resuming from checkpoint") for p in procs)
    keys = s3.keys(dataset, "runs/two-workers/")
    assert "runs/two-workers/_SUCCESS" in keys
    manifest = json.loads(s3.client.get_object(Bucket=dataset, Key="runs/two-workers/manifest.json")["Body"].read())
    assert manifest["strategy"]["workers"] == 2 and manifest["strategy"]["kind"] == "multi_worker"

    # It learned: clearly above chance (1/3; about 0.9 here). Exact equality is the workers' weights above, and
    # tests/test_train.py's same-seed runs; one device learning the same task is checked there too.
    assert procs[0].lines[-1]["test_accuracy"] > 0.6, procs[0].lines[-1]


def test_a_worker_alone_fails_clearly_within_the_timeout(s3, dataset, tmp_path):
    ports = free_ports(2)
    tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": 0}}
    cfg = make_config(tmp_path / "c.yaml", dataset, "lonely", tmp_path / "cache",
                      distribution={"connect_timeout_seconds": 10})
    t0 = time.monotonic()
    env = {**s3.env(), "TF_CONFIG": json.dumps(tf_config)}
    result = run_cli("train", "--config", str(cfg), env=env, timeout=120)
    assert time.monotonic() - t0 < 90
    assert result.returncode != 0
    assert "could not reach all 2 workers in TF_CONFIG within 10 s" in result.stderr


def test_workers_that_disagree_fail_at_start_saying_why(s3, dataset, tmp_path):
    """Configs that differ in what trains (an env override on one pod) failed after the first epoch on TensorFlow's
    words ("Collective instance 400 expected type 0"), exit 1; clusters that differ (one worker's TF_CONFIG lists
    another address) read "lost contact with another worker mid-run" before anything ran."""
    def both(configs, clusters) -> list[Running]:
        return [Running(cfg, {**s3.env(), "TF_CONFIG": json.dumps({"cluster": {"worker": cluster},
                                                                   "task": {"type": "worker", "index": i}})})
                for i, (cfg, cluster) in enumerate(zip(configs, clusters))]

    a, b, c = (f"127.0.0.1:{p}" for p in free_ports(3))
    configs = [make_config(tmp_path / f"w{i}.yaml", dataset, "disagree", tmp_path / f"cache{i}",
                           distribution={"connect_timeout_seconds": 60}, train={"head": {"epochs": 1 + i}})
               for i in range(2)]
    procs = both(configs, [[a, b], [a, b]])
    assert [p.wait(120) for p in procs] == [2, 2], [p.stderr[-1500:] for p in procs]
    assert all("finetune-job: error: the workers run different configs in what trains a model: worker(s) 1 differ "
               "from worker 0" in p.stderr for p in procs)
    procs = both([configs[0], configs[0]], [[a, b], [a, c]])
    assert [p.wait(120) for p in procs] == [1, 1], [p.stderr[-1500:] for p in procs]
    for i, p in enumerate(procs):
        assert f"finetune-job: error: worker {i} could not start the cluster of 2 workers in TF_CONFIG (" in p.stderr
        assert "mid-run" not in p.stderr and "Traceback" not in p.stderr
    assert not s3.keys(dataset, "runs/disagree/")  # nothing written: no lease, no checkpoint


def test_sigterm_in_finetuning_checkpoints_and_the_rerun_resumes_through_storage_faults(s3, dataset, tmp_path):
    cfg = make_config(tmp_path / "c.yaml", dataset, "preempted", tmp_path / "cache",
                      train={"finetune": {"epochs": 3}}, checkpoint={"every_steps": 2})
    job = Running(cfg, s3.env())
    job.wait_for(lambda r: r["event"] == "epoch done" and r.get("phase") == "finetune" and r["epoch"] == 1)
    t0 = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    assert job.wait(30) == 143
    assert time.monotonic() - t0 < 30
    assert "stopped by SIGTERM in finetune" in job.stderr and "Traceback" not in job.stderr
    saved = [r for r in job.lines if r["event"] == "checkpoint saved"][-1]
    assert saved["phase"] == "finetune" and saved["epochs_done"] >= 1
    keys = s3.keys(dataset, "runs/preempted/")
    assert "runs/preempted/checkpoints/checkpoint" in keys and "runs/preempted/_SUCCESS" not in keys

    # The same run resumed with fewer fine-tuning epochs and another unfreeze would export weights that were
    # never trained as configured: refused, naming the keys, before any training.
    changed = run_cli("train", "--config", str(cfg), "--set", "train.finetune.epochs=0",
                      "--set", "train.finetune.unfreeze=5", env=s3.env())
    assert changed.returncode == 2, changed.stderr[-2000:]
    assert "train.finetune.epochs: 3 -> 0; train.finetune.unfreeze: 10 -> 5" in changed.stderr
    assert "Traceback" not in changed.stderr and changed.stderr.count("finetune-job: error:") == 1

    # The same config, but a class of the dataset under data.uri renamed (triangle to bird): resumed, the
    # checkpoint's outputs would be trained under other names, and the run used to complete, exit 0, at test
    # accuracy 0.0. Refused (exit 3) before any training; with the dataset restored, it resumes.
    def rename(old: str, new: str) -> None:
        keys = [key for key in s3.keys(dataset, "data/") if f"/{old}/" in key]
        for key in keys:
            s3.client.copy_object(Bucket=dataset, Key=key.replace(f"/{old}/", f"/{new}/"),
                                  CopySource={"Bucket": dataset, "Key": key})
        s3.client.delete_objects(Bucket=dataset, Delete={"Objects": [{"Key": key} for key in keys]})

    rename("triangle", "bird")
    try:
        other = run_cli("train", "--config", str(cfg), env=s3.env())
    finally:
        rename("bird", "triangle")
    assert other.returncode == 3, other.stderr[-2000:]
    assert "has other classes than run preempted's checkpoint was trained on (gone: triangle; new: bird)" in \
        other.stderr
    assert "Traceback" not in other.stderr

    # The same values, and keys that are safe to change: the resumed run goes through a proxy that answers a share
    # of the requests with 500, 503 or a reset connection; each is retried, counted, and the run completes.
    with FaultProxy(s3.endpoint, share=0.15, seed=1) as proxy:
        again = run_cli("train", "--config", str(cfg), "--set", "train.finetune.epochs=3", "--set", "metrics.port=0",
                        "--set", f"s3.endpoint_url={proxy.url}",
                        env={k: v for k, v in s3.env().items() if k != "AWS_ENDPOINT_URL"})
    assert again.returncode == 0, again.stderr[-2000:]
    assert proxy.counts["500"] + proxy.counts["503"] + proxy.counts["reset"] > 5, proxy.counts
    summary = again.records()[-1]
    assert summary["status"] == "complete" and summary["s3_errors"] > 0
    resumed = next(r for r in again.records() if r["event"] == "resuming from checkpoint")
    assert resumed["phase"] == "finetune" and resumed["epochs_done"] == saved["epochs_done"]
    assert resumed["steps_done"] == saved["steps_done"]
    assert not any(r["event"] == "phase started" and r["phase"] == "head" for r in again.records())
    history = json.loads(s3.client.get_object(Bucket=dataset, Key="runs/preempted/history.json")["Body"].read())
    assert [r["epoch"] for r in history["head"]] == [1, 2]
    assert [r["epoch"] for r in history["finetune"]] == [1, 2, 3]  # every configured epoch, once
    assert "runs/preempted/_SUCCESS" in s3.keys(dataset, "runs/preempted/")
    # Its timings are this attempt's: the manifest says where it took over (it did not say it resumed at all).
    manifest = json.loads(s3.client.get_object(Bucket=dataset, Key="runs/preempted/manifest.json")["Body"].read())
    assert manifest["resumed_from"] == {"phase": "finetune", "epochs_done": saved["epochs_done"],
                                        "steps_done": saved["steps_done"]}


def test_stopped_storage_exits_4_within_60_seconds(sample_data, base_weights, tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="t", aws_secret_access_key="t",
                          region_name="us-east-1")
    client.create_bucket(Bucket="stopped-bucket")
    for p in sorted(sample_data.rglob("*.*")):
        client.upload_file(str(p), "stopped-bucket", f"data/{p.relative_to(sample_data).as_posix()}")
    client.upload_file(str(base_weights), "stopped-bucket", "weights/base.weights.h5")
    cfg = make_config(tmp_path / "c.yaml", "stopped-bucket", "stopped", tmp_path / "cache",
                      train={"head": {"epochs": 20}})
    env = {"AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    job = Running(cfg, env)
    job.wait_for(lambda r: r["event"] == "phase started")
    server.stop()
    t0 = time.monotonic()
    assert job.wait(90) == 4
    assert time.monotonic() - t0 < 60
    assert "storage unreachable" in job.stderr and "Traceback" not in job.stderr


def test_kill_9_during_the_upload_never_looks_complete_and_the_rerun_completes(s3, dataset, tmp_path):
    cfg = make_config(tmp_path / "c.yaml", dataset, "killed", tmp_path / "cache", train={"finetune": {"epochs": 1}})
    job = Running(cfg, s3.env())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.proc.poll() is None:
        keys = s3.keys(dataset, "runs/killed/")
        if any(not k.startswith(("runs/killed/checkpoints/", "runs/killed/_LEASE", "runs/killed/tensorboard/"))
               for k in keys):
            job.proc.kill()
            break
        time.sleep(0.02)
    job.wait(30)
    assert job.proc.returncode == -signal.SIGKILL, "the upload finished before it could be interrupted"
    keys = s3.keys(dataset, "runs/killed/")
    assert "runs/killed/_SUCCESS" not in keys, keys
    assert "runs/killed/checkpoints/checkpoint" in keys
    # (an image that exists: a missing one is refused first, exit 2, before the model is looked at)
    refused = run_cli("predict", "--model", f"s3://{dataset}/runs/killed", __file__, env=s3.env(), timeout=120)
    assert refused.returncode == 4 and "not a complete run" in refused.stderr

    again = run_cli("train", "--config", str(cfg), env=s3.env())
    assert again.returncode == 0, again.stderr[-2000:]
    # The killed run never released its lease: the rerun waits until it is stale, then takes it over.
    assert any(r["event"] == "took over a stale lease" for r in again.records())
    resumed = next(r for r in again.records() if r["event"] == "resuming from checkpoint")
    assert resumed["phase"] == "trained"  # nothing is trained twice
    manifest = json.loads(s3.client.get_object(Bucket=dataset, Key="runs/killed/manifest.json")["Body"].read())
    keys = set(s3.keys(dataset, "runs/killed/"))
    assert {f"runs/killed/{name}" for name in manifest["files"]} <= keys
    assert "runs/killed/_SUCCESS" in keys


def test_a_second_job_with_the_same_run_id_exits_4_naming_the_holder(s3, dataset, tmp_path):
    first = Running(make_config(tmp_path / "a.yaml", dataset, "twice", tmp_path / "cache-a",
                                train={"head": {"epochs": 30}}), s3.env())
    taken = first.wait_for(lambda r: r["event"] == "lease taken")
    second = run_cli("train", "--config", str(make_config(tmp_path / "b.yaml", dataset, "twice", tmp_path / "cache-b")),
                     env=s3.env(), timeout=120)
    assert second.returncode == 4, second.stderr[-2000:]
    assert f"is held by {taken['holder']} (renewed " in second.stderr and " s ago)" in second.stderr
    assert second.stderr.count("finetune-job: error:") == 1 and "Traceback" not in second.stderr
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(60) == 143
    assert "runs/twice/_LEASE" not in s3.keys(dataset, "runs/twice/")  # released on the way out


def test_three_workers_that_see_different_datasets_all_exit_3(s3, sample_data, base_weights, tmp_path):
    """Worker 1's training count equals the mean of the three: with a float mean taken per split it ran one
    all-reduce more than the others and the run hung. One exact all-gather on every worker instead."""
    import shutil

    bucket = s3.bucket()
    s3.client.upload_file(str(base_weights), bucket, "weights/base.weights.h5")
    ports = free_ports(3)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(3):  # one config, `data` on each node holding other files (each worker runs in its own folder)
        data = tmp_path / f"node{index}" / "data"
        shutil.copytree(sample_data, data)
        for extra in range(index):  # 90 + 0, 1, 2 training images
            shutil.copy(data / "train/circle/circle_0000.png", data / f"train/circle/extra_{extra}.png")
        cfg = make_config(tmp_path / f"w{index}.yaml", bucket, "three", tmp_path / "cache",
                          data={"uri": "data", "validation_split": 0.0}, train={"batch_size": 18},
                          distribution={"connect_timeout_seconds": 120})
        env = {**s3.env(), "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        procs.append(Running(cfg, env, cwd=data.parent))
    codes = [p.wait(300) for p in procs]
    assert codes == [3, 3, 3], [p.stderr[-1500:] for p in procs]
    for p in procs:
        assert "the workers see different datasets" in p.stderr
        assert "[[90, 0, 30, 0], [91, 0, 30, 0], [92, 0, 30, 0]]" in p.stderr


def test_runs_never_touch_each_others_prefixes(s3, dataset):
    runs = {k.split("/")[1] for k in s3.keys(dataset, "runs/")}
    for run in runs:
        manifest_key = f"runs/{run}/manifest.json"
        if manifest_key in s3.keys(dataset, f"runs/{run}/"):
            manifest = json.loads(s3.client.get_object(Bucket=dataset, Key=manifest_key)["Body"].read())
            assert manifest["run_id"] == run
