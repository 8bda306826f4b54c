"""Katib: metrics.file lines (job/katib.py) as Katib's File collector reads them; deploy/katib/experiment.yaml
against Katib's Experiment schema, Kubernetes' Job schema, the restricted profile and the job's config."""

import json
import os
import re
import shlex
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from job import config, katib

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import helm_lint  # noqa: E402  (the chart's Kubernetes schema validation)

# Katib v0.19.0, pkg/metricscollector/v1beta1/common/const.go, DefaultFilter.
KATIB_DEFAULT_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
SCHEMA = json.loads((Path(__file__).parent / "data/katib/experiment-v1beta1.schema.json").read_text())
CONFIGMAP, EXPERIMENT = yaml.safe_load_all((ROOT / "deploy/katib/experiment.yaml").read_text())
SPEC = EXPERIMENT["spec"]
VAL = {"loss": 0.25, "accuracy": 0.9312, "macro_f1": 0.9, "per_class": {"a": {"f1": 0.5}}, "confusion_matrix": [[1]]}


def katib_reads(text: str, names: list[str]) -> list[tuple[str, str, str]]:
    """(time, name, value) of `names` as Katib's parseLogsInTextFormat (file-metricscollector.go) records them."""
    return [(row.split(" ", 1)[0], name, value) for row in text.splitlines() if any(n in row for n in names)
            for name, value, *_ in re.findall(KATIB_DEFAULT_FILTER, row) if name in names]


def test_a_line_per_epoch_and_a_final_one(tmp_path):
    path = str(tmp_path / "logs/katib/metrics.log")  # folders created
    for phase, epoch, acc in (("head", 1, 0.5), ("head", 2, 0.75), ("finetune", 1, 0.875)):
        katib.epoch_done(path, phase, {"epoch": epoch, "loss": 1.5, "accuracy": 0.625, "seconds": 3.0,
                                       "val_loss": 0.5, "val_accuracy": acc}, chief=True)
    katib.run_done(path, {"validation": VAL, "test": {**VAL, "accuracy": 0.875}}, chief=True)
    rows = (text := Path(path).read_text()).splitlines()
    assert [r.split()[1] for r in rows[:3]] == ["head_epoch=1", "head_epoch=2", "finetune_epoch=1"]
    assert rows[0].split()[2:] == ["train_loss=1.5", "train_accuracy=0.625", "val_loss=0.5", "val_accuracy=0.5"]
    assert rows[3].split()[1:] == ["val_loss=0.25", "val_accuracy=0.9312", "val_macro_f1=0.9", "test_loss=0.25",
                                   "test_accuracy=0.875", "test_macro_f1=0.9"]
    times, names, values = zip(*katib_reads(text, ["val_accuracy", "val_loss", "test_accuracy"]))
    assert [v for n, v in zip(names, values) if n == "val_accuracy"] == ["0.5", "0.75", "0.875", "0.9312"]
    assert list(times) == sorted(times) and all(re.fullmatch(r"[\d-]{10}T[\d:]{8}\.\d{6}Z", t) for t in times)


def test_multi_label_names_and_no_validation_split(tmp_path):
    path = tmp_path / "m.log"
    katib.epoch_done(str(path), "head", {"epoch": 1, "loss": 0.5, "accuracy": 0.75, "val_loss": 0.25,
                                         "val_map": 0.5}, chief=True)
    katib.epoch_done(str(path), "head", {"epoch": 2, "loss": float("nan"), "accuracy": float("inf")}, chief=True)
    katib.run_done(str(path), {"test": {"loss": 0.5, "map": 0.625, "micro_f1": 0.75, "subset_accuracy": 0.5}},
                   chief=True)
    rows = [r.split()[1:] for r in path.read_text().splitlines()]
    assert rows == [["head_epoch=1", "train_loss=0.5", "train_accuracy=0.75", "val_loss=0.25", "val_map=0.5"],
                    ["head_epoch=2"], ["test_loss=0.5", "test_map=0.625", "test_micro_f1=0.75"]]


def test_only_the_chief_writes_and_only_when_set(tmp_path):
    path = tmp_path / "metrics.log"
    katib.epoch_done(str(path), "head", {"epoch": 1, "loss": 0.5, "accuracy": 0.5}, chief=False)
    katib.run_done(str(path), {"test": VAL}, chief=False)
    katib.epoch_done("", "head", {"epoch": 1, "loss": 0.5, "accuracy": 0.5}, chief=True)
    assert not path.exists()


@given(st.floats() | st.integers())
@example(5e-324)
@example(-1.7976931348623157e308)
@example(float("nan"))
def test_values_match_the_default_filter_whole_and_parse_back(value):
    row = katib.line({"m": value, "w": "word"})
    pairs = re.findall(KATIB_DEFAULT_FILTER, row)
    if value != value or value in (float("inf"), float("-inf")):
        assert pairs == []
        return
    ((name, text, *_),) = pairs
    assert name == "m" and row.endswith(f" m={text}") and type(value)(text) == value


def test_set_overrides_reach_the_config(tmp_path):
    (file := tmp_path / "c.yaml").write_text("data: {uri: s3://b/d}\noutput: {uri: s3://b/o}\n")
    sets = ["train.finetune.learning_rate=3e-4", "train.finetune.unfreeze=30", "model.head_units=128",
            "model.head_dropout=0.3", "metrics.file=/var/log/katib/metrics.log"]
    cfg = config.load(file, sets, environ={})
    assert (cfg.train.finetune.learning_rate, cfg.train.finetune.unfreeze) == (3e-4, 30)
    assert (cfg.model.head_units, cfg.model.head_dropout, cfg.metrics.file) == (128, 0.3, "/var/log/katib/metrics.log")
    assert config.load(file, environ={}).metrics.file == ""


def _strict(node):
    """Katib's schemas as a validator reads them strictly (unknown fields fail, like Kubernetes' own)."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        return {"additionalProperties": False, **node} if "properties" in node else node
    return [_strict(v) for v in node] if isinstance(node, list) else node


def test_experiment_matches_katibs_schema_and_its_webhooks_checks():
    schemas = _strict(SCHEMA["components"]["schemas"])
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(schemas)))
    schemas |= {name: {} for name in refs - set(schemas)}  # Kubernetes' own types: the Job is checked below
    jsonschema.validate(EXPERIMENT, {"$ref": "#/components/schemas/v1beta1.Experiment",
                                     "components": {"schemas": schemas}})
    objective, collector = SPEC["objective"], SPEC["metricsCollectorSpec"]
    assert (objective["objectiveMetricName"], objective["additionalMetricNames"]) == ("val_accuracy", ["val_loss",
                                                                                          "test_accuracy"])
    assert collector == {"collector": {"kind": "File"}, "source": {"filter": {"metricsFormat": [KATIB_DEFAULT_FILTER]},
                         "fileSystemPath": {"path": "/var/log/katib/metrics.log", "kind": "File", "format": "TEXT"}}}
    assert (SPEC["parallelTrialCount"], SPEC["maxTrialCount"]) == (2, 12)
    parameters = {p["name"] for p in SPEC["parameters"]}
    used = set(re.findall(r"\$\{trialParameters\.(\w+)\}", json.dumps(SPEC["trialTemplate"]["trialSpec"])))
    declared = {p["name"]: p["reference"] for p in SPEC["trialTemplate"]["trialParameters"]}
    assert used == set(declared) and set(declared.values()) == parameters | {"${trialSpec.Name}"}


def trial_job(assignments: dict[str, str]) -> dict:
    """The trial Job as Katib creates it: the template with the trial's values substituted."""
    text, values = json.dumps(SPEC["trialTemplate"]["trialSpec"]), {"${trialSpec.Name}": "finetune-flowers-1"}
    for p in SPEC["trialTemplate"]["trialParameters"]:
        text = text.replace(f"${{trialParameters.{p['name']}}}", {**values, **assignments}[p["reference"]])
    return {**json.loads(text), "metadata": {"name": "finetune-flowers-1"}}


def candidates() -> list[dict[str, str]]:
    """Each parameter's bounds or choices, one trial each (the others at their first value)."""
    spaces = {p["name"]: p["feasibleSpace"].get("list") or [p["feasibleSpace"]["min"], p["feasibleSpace"]["max"]]
              for p in SPEC["parameters"]}
    first = {name: space[0] for name, space in spaces.items()}
    return [first] + [{**first, name: v} for name, space in spaces.items() for v in space[1:]]


@pytest.mark.parametrize("assignments", candidates())
def test_each_trial_command_sets_existing_config_keys(assignments, tmp_path):
    (file := tmp_path / "config.yaml").write_text(CONFIGMAP["data"]["config.yaml"])
    (container,) = trial_job(assignments)["spec"]["template"]["spec"]["containers"]
    words = shlex.split(container["command"][2].split("&&", 1)[1])
    assert words[:4] == ["finetune-job", "train", "--config", "/etc/finetune-job/config.yaml"]
    cfg = config.load(file, words[5::2], environ={})  # an unknown key or a wrong type raises ConfigError
    assert cfg.run_id == "finetune-flowers-1" and cfg.metrics.file == "/var/log/katib/metrics.log"
    assert cfg.metrics.port == 0 and str(cfg.train.finetune.unfreeze) == assignments["unfreeze"]
    assert (cfg.train.finetune.learning_rate, cfg.model.head_units, cfg.model.head_dropout) == tuple(
        t(assignments[k]) for t, k in ((float, "finetune_learning_rate"), (int, "head_units"), (float, "head_dropout")))


def test_trial_pod_with_katibs_sidecar_is_a_valid_restricted_job():
    job = trial_job(candidates()[0])
    pod = job["spec"]["template"]["spec"]
    assert "/var/log/katib" not in [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]]
    # What Katib's pod webhook adds (pkg/webhook/v1beta1/pod), with katib-config injectSecurityContext: true.
    pod["containers"].append({"name": "metrics-logger-and-collector", "image": "katib/file-metrics-collector",
                              "securityContext": dict(pod["containers"][0]["securityContext"])})
    pod["volumes"].append({"name": "metrics-volume", "emptyDir": {}})
    for c in pod["containers"]:
        c.setdefault("volumeMounts", []).append({"name": "metrics-volume", "mountPath": "/var/log/katib"})
    pod["shareProcessNamespace"] = True
    assert [p for v in helm_lint.KUBE_VERSIONS if (p := helm_lint.validate(job, v))] == []
    for c in pod["containers"]:
        sc, effective = c["securityContext"], {**pod["securityContext"], **c["securityContext"]}
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert effective["runAsNonRoot"] and effective["runAsUser"] > 0 and sc["readOnlyRootFilesystem"]
        assert effective["seccompProfile"] == {"type": "RuntimeDefault"}


def test_a_metrics_file_that_cannot_be_written_is_refused_before_training(tmp_path):
    # A folder (or a place the pod cannot write) failed the run after its first epoch, with a traceback (exit 1).
    from job import katib, pipeline
    from job.config import Config
    from job.errors import ConfigError
    from job.sample_data import write_sample_dataset

    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=f"^config: metrics.file {tmp_path / 'folder'}: a folder, not a file$"):
        katib.check_writable(str(tmp_path / "folder"))
    for below in ("katib.txt", "sub/katib.txt"):  # it said "cannot be written (File exists)", or (Not a directory)
        with pytest.raises(ConfigError, match=f"^config: metrics.file {tmp_path / 'a-file' / below}: "
                                              f"{tmp_path / 'a-file'} is a file, so no file can be below it$"):
            katib.check_writable(str(tmp_path / "a-file" / below))
    (tmp_path / "ro").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(ConfigError, match=f"^config: metrics.file {tmp_path / 'ro' / 'k.txt'}: cannot be "
                                              "written \\(Permission denied\\)$"):
            katib.check_writable(str(tmp_path / "ro" / "k.txt"))
    katib.check_writable(str(tmp_path / "new" / "katib.txt"))
    assert (tmp_path / "new" / "katib.txt").read_text() == ""  # created, no line in it
    write_sample_dataset(tmp_path / "d", classes=2, per_class=3, size=8, seed=0, test_per_class=0)
    cfg = Config.model_validate({"data": {"uri": str(tmp_path / "d")}, "output": {"uri": str(tmp_path / "out")},
                                 "model": {"weights": "none"}, "metrics": {"file": str(tmp_path / "folder")}})
    with pytest.raises(ConfigError, match="metrics.file"):
        pipeline.prepare(cfg)
