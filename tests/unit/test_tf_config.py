"""job.distribute.tf_config_workers: where this worker stands in TF_CONFIG, or one line (exit 2) for a TF_CONFIG
TensorFlow would fail on after start-up. A wrong index, no task type or one address twice were exit 1 with
TensorFlow's traceback (the Job retried them to its backoff limit); TF_CONFIG that is no JSON failed again inside the
error handler, exit 1 with a traceback; `validate` said ok."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from job.distribute import tf_config_workers
from job.errors import ConfigError


def place(tf_config) -> tuple[int, int]:
    return tf_config_workers({"TF_CONFIG": tf_config if isinstance(tf_config, str) else json.dumps(tf_config)})


@given(chief=st.booleans(), workers=st.integers(1, 6), data=st.data())
def test_every_place_in_a_valid_cluster_is_its_own_index(chief, workers, data):
    cluster = {"worker": [f"w{i}:2222" for i in range(workers)], **({"chief": ["c:2222"]} if chief else {})}
    kind = data.draw(st.sampled_from(["worker", "chief"] if chief else ["worker"]))
    index = 0 if kind == "chief" else data.draw(st.integers(0, workers - 1))
    expected = 0 if kind == "chief" else index + chief
    assert place({"cluster": cluster, "task": {"type": kind, "index": index}}) == (expected, workers + chief)


@given(workers=st.integers(1, 6), index=st.one_of(st.integers(), st.text(max_size=3), st.booleans(), st.none(),
                                                   st.floats(allow_nan=False)))
def test_an_index_outside_the_cluster_is_refused(workers, index):
    cluster = {"worker": [f"w{i}:2222" for i in range(workers)]}
    if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < workers:
        assert place({"cluster": cluster, "task": {"type": "worker", "index": index}}) == (index, workers)
    else:
        with pytest.raises(ConfigError, match=r"^TF_CONFIG: task.index .* is not a place in cluster.worker, which "
                                              f"lists {workers} "):
            place({"cluster": cluster, "task": {"type": "worker", "index": index}})


@pytest.mark.parametrize(("tf_config", "complaint"), [
    ('{"cluster": [', "TF_CONFIG is not JSON: "),
    ("[1]", 'TF_CONFIG: expected {"cluster"'),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"index": 1}}, "task.type must be worker .*not None"),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "evaluator", "index": 0}}, "task.type must be worker"),
    ({"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 1}}, "a:1 is listed twice"),
    ({"cluster": {"chief": ["a:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, "a:1 is listed"),
    ({"cluster": {"chief": ["a:1", "b:1"]}, "task": {"type": "chief", "index": 0}}, "2 chiefs"),
    ({"cluster": {"worker": "a:1,b:1"}, "task": {"type": "worker", "index": 0}}, "cluster.worker must be a list"),
    # "unhashable type": exit 1 with a traceback, and another one in the error handler
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": ["worker"]}}, r"task.type must be worker .*\['worker'\]"),
    ({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": {}}}, "task.type must be worker .*not {}"),
])
def test_a_tf_config_tensorflow_would_fail_on_is_one_line(tf_config, complaint):
    with pytest.raises(ConfigError, match=complaint):
        place(tf_config)


def test_no_tf_config_or_a_cluster_of_one_is_one_worker():
    assert tf_config_workers({}) == (0, 1)
    assert place({}) == (0, 1)
    assert place({"cluster": {"worker": ["a:1"]}}) == (0, 1)


def test_a_broken_tf_config_is_exit_2_in_one_line_not_a_traceback(tmp_path):
    # _fail asked TF_CONFIG for the worker count again, inside the handler: exit 1, a traceback.
    (tmp_path / "c.yaml").write_text(f"data: {{uri: {tmp_path}/d}}\noutput: {{uri: {tmp_path}/o}}\n")
    result = subprocess.run([sys.executable, "-m", "job", "train", "--config", str(tmp_path / "c.yaml")],
                            capture_output=True, text=True, timeout=120, env={"TF_CONFIG": '{"cluster": ['})
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["finetune-job: error: TF_CONFIG is not JSON: Expecting value: line 1 column "
                                          "14 (char 13)"]


class _Cluster:
    """Two workers; this one's gather records what it sent and returns `rows`, or raises `fails`."""

    def __init__(self, index=0, rows=None, fails=None):
        self.worker_index, self.num_workers, self.sent, self.rows, self.fails = index, 2, [], rows, fails

    @property
    def is_chief(self):
        return self.worker_index == 0

    def gather(self, values):
        self.sent.append(values)
        if self.fails:
            raise self.fails
        return self.rows or [values, values]


def _digest(*sets) -> int:
    from job import config, pipeline

    cluster = _Cluster()
    cfg = config.load(None, ["data.uri=s3://b/d", "output.uri=s3://b/o", "run_id=r", *sets], environ={})
    pipeline._workers_agree_on_config(cfg, cluster)
    return cluster.sent[0][0]


def test_workers_compare_what_trains_and_where_they_write_not_how_it_is_spelled():
    from job import config, pipeline

    assert _digest() == _digest("data.uri=s3://b/d/") == _digest("output.uri=s3://b/o/") == _digest("metrics.port=9")
    assert _digest() != _digest("train.head.epochs=3")
    assert _digest() != _digest("output.uri=s3://b/other") != _digest("run_id=r2")  # each resumed its own run
    cfg = config.load(None, ["data.uri=/d", "output.uri=/o", "run_id=r"], environ={})
    with pytest.raises(ConfigError, match="the workers run different configs in what trains a model: worker"):
        pipeline._workers_agree_on_config(cfg, _Cluster(rows=[[1], [2]]))


def test_the_chief_past_its_export_is_not_failed_by_a_worker_lost_then():
    # _SUCCESS written: a worker evicted while it waited made the chief exit 1, "the next attempt resumes".
    from types import SimpleNamespace

    from structlog.testing import capture_logs

    from job import pipeline

    lost = RuntimeError("Socket closed")
    with capture_logs() as logs:
        pipeline._meet_at_the_end(SimpleNamespace(cluster=_Cluster(0, fails=lost)))
    assert [r["event"] for r in logs] == ["a worker was lost after the export; the run is complete"]
    with pytest.raises(RuntimeError):  # a worker that loses the chief there: its failure is the chief's
        pipeline._meet_at_the_end(SimpleNamespace(cluster=_Cluster(1, fails=lost)))


def test_a_worker_stopped_with_the_others_exits_143_not_1(tmp_path):
    # Evicted together, the workers that found the chief gone first said "lost contact", exit 1: counted as a failure.
    code = """
import sys, typer
from job import cli, signals
lost = type("UnavailableError", (Exception,), {"__module__": "tensorflow.python.framework.errors_impl"})
signals._requested.set()
try:
    cli._fail(lost("Socket closed"))
except typer.Exit as e:
    sys.exit(e.exit_code)
"""
    env = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}})}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 143, result.stderr
    assert "finetune-job: error: stopped by SIGTERM while another worker stopped (Socket closed)" in result.stderr
