"""The Helm chart helm/finetune-job, through the real Helm engine (helm-python-sdk, no helm binary).

Lint and render with the defaults and every ci/*-values.yaml, Kubernetes schema validation (the
JobSet against JobSet's published CRD), the values schema, the "restricted" Pod Security Standard,
where credentials go, the multi-worker wiring of both workload kinds (the rendered TF_CONFIG shell
wrapper is executed), the JobSet's failure policy, Kueue labels, the TensorBoard Deployment and
Service, and, marked slow, the rendered Job's command, args and environment running the real job end
to end against an S3 server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import helm_python
import pytest
import yaml
from conftest import BACKBONE

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import helm_lint  # noqa: E402  (scripts/ is not a package)

CHART = helm_lint.CHART
VALUE_SETS = helm_lint.value_sets()
VENV_BIN = Path(sys.executable).parent
CONFIG_FILE = "/etc/finetune-job/config.yaml"

helm_python.disable_logging()


render = (
    helm_lint.render
)  # (values, **release) -> manifests; release "finetune" in namespace "ml", revision 1


def only(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[m['metadata']['name'] for m in found]}"
    return found[0]


def kinds(manifests: list[dict[str, Any]]) -> list[str]:
    return sorted(m["kind"] for m in manifests)


def workload(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The training workload: the Job or the JobSet."""
    (found,) = [m for m in manifests if m["kind"] in ("Job", "JobSet")]
    return found


def train_pod(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The training pods' template: the Job's, or that of the JobSet's one replicated Job."""
    found = workload(manifests)
    if found["kind"] == "JobSet":
        (replicated,) = found["spec"]["replicatedJobs"]
        return replicated["template"]["spec"]["template"]
    return found["spec"]["template"]


def job_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = train_pod(manifests)["spec"]["containers"]
    return container


def job_config(manifests: list[dict[str, Any]]) -> str:
    """The config.yaml the Job mounts."""
    (text,) = [
        m["data"]["config.yaml"] for m in manifests if m["kind"] == "ConfigMap" and "config.yaml" in m["data"]
    ]
    return text


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def pod_specs(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pod spec: the training pods' template (Job or JobSet), TensorBoard's and the helm test pod."""
    specs = [train_pod(manifests)["spec"]]
    specs += [m["spec"]["template"]["spec"] for m in manifests if m["kind"] == "Deployment"]
    return specs + [m["spec"] for m in manifests if m["kind"] == "Pod"]


def keys_anywhere(document: Any) -> set[str]:
    """Every mapping key in a manifest, at any depth."""
    if isinstance(document, dict):
        return set(document).union(*(keys_anywhere(v) for v in document.values()))
    if isinstance(document, list):
        return set().union(*(keys_anywhere(v) for v in document))
    return set()


# ------------------------------------------------------------------ lint, render, Kubernetes schemas


@pytest.mark.parametrize("kube_version", helm_lint.KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_lint_strict(value_set: str, kube_version: str) -> None:
    assert helm_lint.lint(VALUE_SETS[value_set], kube_version) == []


def test_ci_values_cover_the_features() -> None:
    assert set(VALUE_SETS) >= {
        "defaults",
        "ci/gpu-values.yaml",
        "ci/multiworker-values.yaml",
        "ci/jobset-values.yaml",
        "ci/monitoring-values.yaml",
        "ci/existing-secret-values.yaml",
        "ci/tensorboard-values.yaml",
    }


@pytest.mark.parametrize("kube_version", helm_lint.KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_manifests_are_valid_kubernetes(value_set: str, kube_version: str) -> None:
    manifests = render(VALUE_SETS[value_set])
    assert {"Job", "JobSet"} & set(kinds(manifests))
    # Core kinds: Kubernetes' own OpenAPI schemas (strict: unknown fields fail). JobSet, PodMonitor
    # and PrometheusRule are CRDs, absent from those schemas: the JobSet is checked against JobSet's
    # published CRD (and its Job template as a batch/v1 Job), the others against helm_lint.CRD_SCHEMAS.
    problems = [p for m in manifests if (p := helm_lint.validate(m, kube_version))]
    assert problems == []


def test_validation_catches_a_broken_manifest() -> None:
    job = only(render(), "Job")
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    job["spec"]["completionz"] = 1
    assert helm_lint.validate(job, "1.29.0")
    monitor = only(render(VALUE_SETS["ci/monitoring-values.yaml"]), "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = 8000
    assert helm_lint.validate(monitor, "1.33.0")


@pytest.mark.parametrize(
    ("break_it", "complaint"),
    [
        (lambda js: js["spec"].update(replicatedJobz=[]), "'replicatedJobz' was unexpected"),
        (lambda js: js["spec"]["network"].update(enableDNSHostnames="yes"), "spec.network.enableDNSHostnames"),
        (lambda js: js["spec"]["failurePolicy"]["rules"][0].update(action="Retry"), "rules.0.action"),
        (lambda js: js["spec"]["failurePolicy"]["rules"][1].pop("name"), "'name' is a required property"),
        (lambda js: js["spec"]["replicatedJobs"][0].update(replicas="1"), "replicatedJobs.0.replicas"),
        (lambda js: js["metadata"].update(name="Flowers_1"), "metadata.name"),
        # The Job template is also checked as a batch/v1 Job of the oldest supported Kubernetes.
        (
            lambda js: js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0].update(
                imagePullPolicy=3
            ),
            "containers.0.imagePullPolicy",
        ),
        # A Job field the CRD (built on a newer Kubernetes) knows and Kubernetes 1.29 does not.
        (lambda js: js["spec"]["replicatedJobs"][0]["template"]["spec"].update(managedBy="x"), "'managedBy'"),
    ],
)
def test_jobset_validation_catches_a_broken_jobset(break_it: Any, complaint: str) -> None:
    assert ("jobset.x-k8s.io/v1alpha2", "JobSet") in helm_lint.crd_validators()
    jobset = only(render(VALUE_SETS["ci/jobset-values.yaml"]), "JobSet")
    assert helm_lint.validate(jobset, "1.29.0") is None
    break_it(jobset)
    problem = helm_lint.validate(jobset, "1.29.0")
    assert problem and complaint in problem


def test_vendored_jobset_crd_is_the_published_file() -> None:
    import hashlib

    folder = helm_lint.JOBSET_CRD.parent
    readme = (folder / "README.md").read_text()
    digest = hashlib.sha256(helm_lint.JOBSET_CRD.read_bytes()).hexdigest()
    assert f"SHA-256: `{digest}`" in readme and "v0.12.0" in readme
    assert "Apache License" in (folder / "LICENSE").read_text()


def test_make_helm_lint_passes() -> None:
    result = subprocess.run(
        [sys.executable, str(Path(helm_lint.__file__))], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_defaults_render_the_expected_objects() -> None:
    assert kinds(render()) == ["ConfigMap", "Job", "Pod", "ServiceAccount"]


# ------------------------------------------------------------------ values.yaml and values.schema.json


def test_every_value_is_documented_by_a_comment_starting_with_its_name() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for number, line in enumerate(lines):
        key = re.match(r"^(\s*)([A-Za-z_][\w.-]*):", line)
        if not key:
            continue
        indent, name = key.groups()
        above = number - 1
        block = []
        while above >= 0 and lines[above].startswith(f"{indent}#"):
            block.insert(0, lines[above].strip())
            above -= 1
        if not block or not block[0].startswith(f"# {name}:"):
            undocumented.append(f"line {number + 1}: {name}")
    assert undocumented == []


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_schema_accepts_the_shipped_values(value_set: str) -> None:
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(VALUE_SETS[value_set]))


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicas": 2}, "additional properties 'replicas'"),
        ({"image": {"registry": "x"}}, "additional properties 'registry'"),
        ({"workers": -1}, "/workers"),
        ({"workers": 0}, "/workers"),
        ({"workers": "3"}, "/workers"),
        ({"backoffLimit": -1}, "/backoffLimit"),
        ({"activeDeadlineSeconds": "1d"}, "/activeDeadlineSeconds"),
        ({"podMonitor": {"enabled": "yes"}}, "/podMonitor/enabled"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"multiWorker": {"port": 70000}}, "/multiWorker/port"),
        ({"s3": {"endpointUrl": "minio:9000"}}, "/s3/endpointUrl"),
        ({"config": {"train": {"batch_size": "big"}}}, "/config/train/batch_size"),
        ({"config": {"model": {"backbone": "ResNet50"}}}, "/config/model/backbone"),
        ({"config": {"data": {"image_size": [180]}}}, "/config/data/image_size"),
        ({"config": {"run_id": "a b"}}, "/config/run_id"),
        ({"config": {"run_id": ".hidden"}}, "/config/run_id"),
        ({"config": {"trian": {}}}, "additional properties 'trian'"),
        ({"config": {"metrics": {"port": -5}}}, "/config/metrics/port"),
        # Each rendered a pod or resource the API server refuses, or put credentials in plain text (a probe's).
        ({"resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"nvidia.com/gpu": "0.5"}}},
         "/resources/limits/nvidia.com~1gpu"),
        ({"resources": {"requests": {"cpu": "1", "memory": "1Gi", "gpu": 1}}}, "/resources/requests"),
        ({"helmTest": {"resources": {"requests": {"cpu": "lots"}}}}, "/helmTest/resources/requests/cpu"),
        ({"nameOverride": "FineTune"}, "/nameOverride"),
        ({"kueue": {"priorityClass": "p" * 64}}, "/kueue/priorityClass"),
        ({"s3": {"endpointUrl": "https://AKIA:s3cr3t@minio:9000"}}, "/s3/endpointUrl"),
        ({"pushgateway": {"url": "http://user:pass@pg:9091"}}, "/pushgateway/url"),
        ({"pushgateway": {"url": "http://user:pa/ss@pg:9091"}}, "/pushgateway/url"),  # `/` in the password got past
        ({"s3": {"endpointUrl": "https://AKIA:s3/cr3t@minio:9000"}}, "/s3/endpointUrl"),
        ({"config": {"s3": {"endpoint_url": "https://AKIA:s3cr3t@minio:9000"}}}, "/config/s3/endpoint_url"),
        # As the job's config refuses them (it did; the schema did not).
        ({"config": {"data": {"cache_dir": ""}}}, "/config/data/cache_dir"),
        ({"config": {"metrics": {"pushgateway": "ftp://x"}}}, "/config/metrics/pushgateway"),
        ({"config": {"metrics": {"linger_seconds": 1e10}}}, "/config/metrics/linger_seconds"),
        ({"workload": {"kind": "Pod"}}, "/workload/kind"),
        ({"workload": {"kind": "jobset"}}, "/workload/kind"),
        ({"workload": {"type": "Job"}}, "additional properties 'type'"),
        ({"kueue": {"priorityClass": "High Priority"}}, "/kueue/priorityClass"),
        ({"resources": None}, "missing property 'resources'"),
        ({"resources": {"requests": None}}, "missing property 'requests'"),
        ({"resources": {"requests": {"cpu": None}}}, "missing property 'cpu'"),
        ({"resources": {"requests": {"memory": None}}}, "missing property 'memory'"),
        ({"resources": {"requests": {"cpu": "two"}}}, "/resources/requests/cpu"),
        ({"tensorboard": {"enabled": "yes"}}, "/tensorboard/enabled"),
        ({"tensorboard": {"from": "bucket/models"}}, "/tensorboard/from"),
        ({"tensorboard": {"port": 0}}, "/tensorboard/port"),
        ({"tensorboard": {"service": {"type": "Ingress"}}}, "/tensorboard/service/type"),
        ({"tensorboard": {"resources": {"requests": {"memory": None}}}}, "missing property 'memory'"),
        ({"tensorboard": {"logdir": "/tmp"}}, "additional properties 'logdir'"),
        (
            {"cache": {"persistence": {"accessModes": ["ReadWriteSometimes"]}}},
            "/cache/persistence/accessModes",
        ),
        # Each rendered a pod or claim the API server refuses (or YAML that did not parse), after the install began.
        ({"podLabels": {"team": "ml team"}}, "/podLabels/team"),
        ({"podLabels": {"team": "x" * 64}}, "/podLabels/team"),
        ({"podLabels": {"my team": "ml"}}, "invalid propertyName 'my team'"),
        ({"extraEnv": [{"name": "FOO", "value": 1}]}, "/extraEnv/0/value"),
        ({"priorityClassName": "Training"}, "/priorityClassName"),
        ({"tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}]},
         "/tolerations/0"),
        ({"tolerations": [{"key": "k", "operator": "Exists", "tolerationSeconds": 30}]}, "/tolerations/0"),
        ({"cache": {"persistence": {"storageClass": "Fast SSD"}}}, "/cache/persistence/storageClass"),
        # The job refused each at start, after the pod was scheduled; the schema took them.
        ({"config": {"model": {"backbone": "resnet_50"}}}, "/config/model/backbone"),
        ({"config": {"data": {"image_size": [16, 16]}}}, "/config/data/image_size/0"),
        ({"config": {"data": {"image_size": [224, 8192]}}}, "/config/data/image_size/1"),
        ({"config": {"train": {"finetune": {"unfreeze": "12"}}}}, "/config/train/finetune/unfreeze"),
        ({"config": {"train": {"finetune": {"unfreeze": "-1"}}}}, "/config/train/finetune/unfreeze"),
        ({"config": {"train": {"finetune": {"unfreeze": "1.5"}}}}, "/config/train/finetune/unfreeze"),
        # The job writes the cache: a read-only claim failed at the first staged image.
        ({"cache": {"persistence": {"accessModes": ["ReadOnlyMany"]}}}, "/cache/persistence/accessModes"),
        ({"podMonitor": {"interval": "90"}}, "/podMonitor/interval"),
        ({"resources": {"requests": {"cpu": "-1", "memory": "1Gi"}}}, "/resources/requests/cpu"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(complaint)):
        render(values)


def test_schema_accepts_the_new_values() -> None:
    values = {
        "workload": {"kind": "JobSet"},
        "workers": 4,
        "kueue": {"queueName": "team-a", "priorityClass": "batch.low-1"},
        "resources": {"requests": {"cpu": 0.5, "memory": "2Gi", "nvidia.com/gpu": 1},
                      "limits": {"nvidia.com/gpu": 1}},  # (a GPU request without its limit: the API refused the pod)
        "tensorboard": {
            "enabled": True,
            "from": "s3://bucket/models/flowers",
            "port": 8080,
            "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
            "service": {"type": "LoadBalancer"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        },
        # what the API server takes, next to what the schema now refuses (test_schema_rejects_bad_values)
        "podLabels": {"example.com/team": "ml_team-1.a", "empty": ""},
        "priorityClassName": "training.high-1",
        "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
                        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "extraEnv": [{"name": "A", "value": "1"},
                     {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                     {"name": "AWS_SESSION_TOKEN", "valueFrom": {"secretKeyRef": {"name": "sts", "key": "token"}}},
                     {"name": "DOCS", "value": "https://example.com/models"},
                     {"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": "/var/run/secrets/eks/token"},  # a path
                     {"name": "TOKENIZERS_PARALLELISM", "value": "false"}],  # no credential word
        # valid quantities and durations the schema refused
        "tmp": {"sizeLimit": ".5Gi"},
        "cache": {"sizeLimit": "1e9", "persistence": {"accessModes": ["ReadOnlyMany", "ReadWriteMany"]}},
        "podMonitor": {"interval": "1m30s"},
        "helmTest": {"resources": {"requests": {"cpu": ".5", "memory": "256Mi"}}},
        "config": {"model": {"backbone": "efficientnet_v2_b0"}, "train": {"finetune": {"unfreeze": "block_16"}}},
    }
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(values))
    assert {"JobSet", "Deployment", "Service"} <= set(kinds(render(values)))


def test_the_schemas_backbones_are_the_jobs() -> None:
    # The schema's pattern took any lower_snake_case name (resnet_50), which the job refused once the pod ran.
    from job.backbones import BACKBONES

    schema = json.loads((CHART / "values.schema.json").read_text())
    model = schema["properties"]["config"]["properties"]["model"]["properties"]
    assert model["backbone"]["enum"] == sorted(BACKBONES)


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"s3": {"accessKeyId": "AKIA", "secretAccessKey": "s", "existingSecret": "creds"}}, "not both"),
        ({"s3": {"accessKeyId": "AKIA"}}, "go together"),
        ({"podMonitor": {"enabled": True}, "config": {"metrics": {"port": 0}}}, "needs config.metrics.port"),
        # each worker trained alone (mirrored: the chief exported its own model as the run's) or failed, exit 1
        ({"workers": 3, "config": {"distribution": {"strategy": "mirrored"}}},
         "config.distribution.strategy mirrored trains on one node, but workers is 3"),
        ({"workers": 2, "workload": {"kind": "JobSet"}, "config": {"distribution": {"strategy": "one_device"}}},
         "config.distribution.strategy one_device trains on one node, but workers is 2"),
        ({"config": {"distribution": {"strategy": "multi_worker"}}}, "multi_worker needs several workers"),
        # Prometheus scraped nothing: the job served /metrics inside the pod only
        ({"podMonitor": {"enabled": True}, "config": {"metrics": {"host": "127.0.0.1"}}},
         "config.metrics.host 127.0.0.1 serves /metrics inside the pod only"),
        ({"podMonitor": {"enabled": True}, "config": {"metrics": {"host": "LOCALHOST"}}},
         "config.metrics.host localhost serves /metrics inside the pod only"),
        ({"extraEnv": [{"name": "FINETUNE_DISTRIBUTION__STRATEGY", "value": "mirrored"}], "workers": 2,
          "config": {"distribution": {"strategy": "multi_worker"}}},
         "extraEnv: FINETUNE_DISTRIBUTION__STRATEGY is set by the chart, or read by its checks"),
        # appended after the chart's own, each won silently: /metrics moved off the PodMonitor's port, another run ran
        ({"extraEnv": [{"name": "FINETUNE_METRICS__PORT", "value": "9000"}]},
         "extraEnv: FINETUNE_METRICS__PORT is set by the chart"),
        ({"extraEnv": [{"name": "AWS_ACCESS_KEY_ID", "value": "x"}]},
         "extraEnv: AWS_ACCESS_KEY_ID is set by the chart"),
        # credentials in the pod spec in plain text (the chart's own URLs refuse user:password@)
        ({"extraEnv": [{"name": "AWS_SESSION_TOKEN", "value": "x"}]},
         "extraEnv: AWS_SESSION_TOKEN holds a credential: take it from a Secret"),
        ({"extraEnv": [{"name": "AWS_ENDPOINT_URL", "value": "http://u:p/w@minio:9000"}]},
         "extraEnv: AWS_ENDPOINT_URL: a URL with user:password@ would be in the pod spec in plain text"),
        # rendered with ReadWriteOnce: pods on other nodes hung on a multi-attach error, waiting for each other
        ({"workers": 2, "cache": {"persistence": {"enabled": True}}},
         "cache.persistence: the claim is shared by the 2 workers' pods, which run on several nodes: its "
         "accessModes need ReadWriteMany (got [ReadWriteOnce])"),
    ],
)
def test_contradictory_values_fail_with_a_message(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(complaint)):
        render(values)


def _model_fields(model: Any) -> dict[str, Any]:
    from pydantic import BaseModel

    return {
        name: _model_fields(field.annotation)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        else None
        for name, field in model.model_fields.items()
    }


def _schema_fields(schema: dict[str, Any]) -> dict[str, Any]:
    return {
        name: _schema_fields(sub) if "properties" in sub else None
        for name, sub in schema["properties"].items()
    }


def test_values_schema_config_has_the_keys_of_the_jobs_config() -> None:
    from job.config import Config

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert _schema_fields(schema["properties"]["config"]) == _model_fields(Config)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_config_is_accepted_by_the_job(value_set: str, tmp_path: Path) -> None:
    from job import config

    # A small float: Helm's toYaml writes 1e-5 as 1e-05, which YAML 1.1 reads as a string.
    values = {**(VALUE_SETS[value_set] or {})}
    values["config"] = {**values.get("config", {}), "train": {"finetune": {"learning_rate": 1e-5}}}
    manifests = render(values)
    path = tmp_path / "config.yaml"
    path.write_text(job_config(manifests))
    env = {k: v for k, v in env_of(job_container(manifests)).items() if isinstance(v, str)}
    resolved = config.load(path, environ=env)
    assert resolved.run_id == env["FINETUNE_RUN_ID"]
    assert resolved.data.cache_dir == "/var/cache/finetune-job"
    assert resolved.train.finetune.learning_rate == pytest.approx(1e-5)


# ------------------------------------------------------------------ the Job


def test_job_policies() -> None:
    job = only(
        render({"backoffLimit": 5, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 0}), "Job"
    )
    spec = job["spec"]
    assert spec["backoffLimit"] == 5
    assert spec["activeDeadlineSeconds"] == 3600
    assert spec["ttlSecondsAfterFinished"] == 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == 60
    fail, ignore, stopped = spec["podFailurePolicy"]["rules"]
    assert fail == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "train", "operator": "In", "values": [2, 3]},
    }
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    # When one of several workers is evicted, the others stop with it (exit 143) without the condition: counted,
    # each eviction used up workers - 1 of backoffLimit.
    assert stopped == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "train", "operator": "In", "values": [143]},
    }
    # Large numbers as integers: `{{ .Values.x }}` printed 1e+07, which the API server's schema refuses.
    long = render({"activeDeadlineSeconds": 10_000_000, "ttlSecondsAfterFinished": 20_000_000,
                   "terminationGracePeriodSeconds": 30_000_000, "backoffLimit": 10_000_000})
    assert only(long, "Job")["spec"]["backoffLimit"] == 10_000_000
    assert [p for m in long if (p := helm_lint.validate(m, "1.29.0"))] == []
    assert only(long, "Job")["spec"]["activeDeadlineSeconds"] == 10_000_000
    assert train_pod(long)["spec"]["terminationGracePeriodSeconds"] == 30_000_000
    unlimited = only(render({"activeDeadlineSeconds": None, "ttlSecondsAfterFinished": None}), "Job")["spec"]
    assert "activeDeadlineSeconds" not in unlimited and "ttlSecondsAfterFinished" not in unlimited


def test_job_name_and_run_id_change_with_the_revision() -> None:
    first, second = render(revision=1), render(revision=2, is_install=False, is_upgrade=True)
    assert only(first, "Job")["metadata"]["name"] == "finetune-finetune-job-1"
    assert only(second, "Job")["metadata"]["name"] == "finetune-finetune-job-2"
    assert env_of(job_container(first))["FINETUNE_RUN_ID"] == "finetune-1"
    assert env_of(job_container(second))["FINETUNE_RUN_ID"] == "finetune-2"
    # A configured run_id wins (and stays the same across revisions: the run resumes).
    fixed = render({"config": {"run_id": "flowers-v7"}}, revision=9)
    assert env_of(job_container(fixed))["FINETUNE_RUN_ID"] == "flowers-v7"


def test_long_release_names_stay_within_dns_limits() -> None:
    manifests = render({"workers": 12}, name="a" * 53, revision=123456)
    job = only(manifests, "Job")["metadata"]["name"]
    assert len(f"{job}-11") <= 63  # Indexed Job pod hostnames; the job-name label of the pods
    assert len(only(manifests, "Service")["metadata"]["name"]) <= 63
    assert len(only(manifests, "Pod")["metadata"]["name"]) <= 63


@pytest.mark.parametrize("kind", ["Job", "JobSet"])
def test_long_release_names_alike_at_the_start_name_different_workloads(kind: str) -> None:
    # Cut without more, `flowers-efficientnet-b0-lr-sweep-2024-06-01-trial-01` and `...-02` both made the Job
    # `flowers-efficientnet-b0-lr-sweep-2024-06-01-tria-1` (and one TensorBoard name): the second install failed.
    values = {"workload": {"kind": kind}, "workers": 2, "config": {"distribution": {"strategy": "multi_worker"}},
              "tensorboard": {"enabled": True}}
    names = []
    for release in ("flowers-efficientnet-b0-lr-sweep-2024-06-01-trial-01",
                    "flowers-efficientnet-b0-lr-sweep-2024-06-01-trial-02"):
        manifests = render(values, name=release)
        tensorboard = [m["metadata"]["name"] for m in manifests if m["kind"] == "Deployment"]
        names.append((workload(manifests)["metadata"]["name"], *tensorboard))
        assert [p for m in manifests if (p := helm_lint.validate(m, "1.29.0"))] == []
    assert all(a != b for a, b in zip(*names)), names
    assert all(len(n) <= 63 for n in names[0] + names[1])
    short = render({"workload": {"kind": kind}})  # a name that fits is not touched
    assert workload(short)["metadata"]["name"] == "finetune-finetune-job-1"


def test_what_the_new_checks_leave_working() -> None:
    # Dotted override names made Jobs, ConfigMaps and Secrets the API takes (a Service refuses them: the fullname
    # helper says so where one renders); a config key from a ConfigMap through extraEnv, and a Pushgateway as
    # host:port or an IPv6 address, as the job and prometheus_client take them.
    from_map = {"name": "FINETUNE_DATA__URI", "valueFrom": {"configMapKeyRef": {"name": "ds", "key": "uri"}}}
    manifests = render({"fullnameOverride": "flowers.v2", "extraEnv": [from_map],
                        "pushgateway": {"url": "[fd00::1]:9091"}, "config": {"metrics": {"pushgateway": "pg:9091"},
                                                                            "s3": {"endpoint_url": "HTTPS://m:9000"}}})
    assert only(manifests, "Job")["metadata"]["name"] == "flowers.v2-1"
    assert from_map in job_container(manifests)["env"]


def test_container_command_config_and_environment() -> None:
    extra = [{"name": "AWS_CA_BUNDLE", "value": "/etc/ssl/certs/ca.pem"}]
    manifests = render(
        {
            "pushgateway": {"url": "http://pgw:9091"},
            "s3": {"endpointUrl": "http://minio:9000"},
            "extraEnv": extra,
        }
    )
    assert [p for m in manifests if (p := helm_lint.validate(m, "1.29.0"))] == []
    container = job_container(manifests)
    assert container["command"] == ["finetune-job"]
    assert container["args"] == ["train", "--config", CONFIG_FILE]
    env = env_of(container)
    assert env["FINETUNE_METRICS__PUSHGATEWAY"] == "http://pgw:9091"
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    assert env["HOME"] == "/tmp" and env["KERAS_HOME"] == "/tmp/.keras"
    assert env["AWS_CA_BUNDLE"] == "/etc/ssl/certs/ca.pem"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[env["FINETUNE_DATA__CACHE_DIR"]] == "cache"
    assert mounts[os.path.dirname(CONFIG_FILE)] == "config"
    assert container["ports"] == [{"name": "metrics", "containerPort": 8000, "protocol": "TCP"}]
    config = yaml.safe_load(job_config(manifests))
    values = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    assert config.keys() == values.keys()
    assert config["data"]["uri"] == values["data"]["uri"]
    assert "endpoint_url" not in json.dumps(config) and "pushgateway" not in json.dumps(config)


def test_writable_volumes() -> None:
    pod = only(render(), "Job")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tmp"]["emptyDir"]["sizeLimit"] == "4Gi"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["cache"] == {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["tmp"] == "/tmp" and mounts["dshm"] == "/dev/shm"


def test_cache_on_a_persistent_volume_claim() -> None:
    manifests = render({"cache": {"persistence": {"enabled": True, "size": "80Gi", "storageClass": "fast"}}})
    claim = only(manifests, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "80Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    # "-", as other charts spell "no class" (a volume made beforehand binds): rendered as YAML that did not parse
    unclassed = render({"cache": {"persistence": {"enabled": True, "storageClass": "-"}}})
    assert only(unclassed, "PersistentVolumeClaim")["spec"]["storageClassName"] == ""
    assert "storageClassName" not in only(render({"cache": {"persistence": {"enabled": True}}}),
                                          "PersistentVolumeClaim")["spec"]  # the cluster's default class
    volumes = {v["name"]: v for v in only(manifests, "Job")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # The helm test pod must not wait for a ReadWriteOnce claim the Job holds.
    test_volumes = {v["name"]: v for v in only(manifests, "Pod")["spec"]["volumes"]}
    assert "emptyDir" in test_volumes["cache"]

    existing = render({"cache": {"persistence": {"enabled": True, "existingClaim": "datasets"}}})
    assert "PersistentVolumeClaim" not in kinds(existing)
    volumes = {v["name"]: v for v in only(existing, "Job")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "datasets"


def test_gpu_values() -> None:
    manifests = render(VALUE_SETS["ci/gpu-values.yaml"])
    pod = only(manifests, "Job")["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["priorityClassName"] == "training"
    config = yaml.safe_load(job_config(manifests))
    assert config["model"]["weights"] == "/opt/finetune-job/weights/resnet50.h5"


def test_scheduling_values_pass_through() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    }
    values = {
        "affinity": affinity,
        "podLabels": {"team": "vision"},
        "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
        "imagePullSecrets": [{"name": "regcred"}],
    }
    pod = only(render(values), "Job")["spec"]["template"]
    assert pod["spec"]["affinity"] == affinity
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["metadata"]["labels"]["team"] == "vision"
    assert pod["metadata"]["annotations"] == values["podAnnotations"]


KUEUE_LABELS = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class")


@pytest.mark.parametrize("kind", ["Job", "JobSet"])
def test_kueue_labels_on_both_kinds_only_when_set(kind: str) -> None:
    plain = workload(render({"workload": {"kind": kind}}))
    assert plain["kind"] == kind
    assert not set(KUEUE_LABELS) & plain["metadata"]["labels"].keys()
    queued = workload(render({"workload": {"kind": kind}, "kueue": {"queueName": "team-a", "priorityClass": "low"}}))
    labels = queued["metadata"]["labels"]
    assert (labels["kueue.x-k8s.io/queue-name"], labels["kueue.x-k8s.io/priority-class"]) == ("team-a", "low")
    only_queue = workload(render({"workload": {"kind": kind}, "kueue": {"queueName": "team-a"}}))
    assert "kueue.x-k8s.io/priority-class" not in only_queue["metadata"]["labels"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_no_hard_coded_suspend_and_requests_always_set(value_set: str) -> None:
    """Kueue suspends and resumes the workload itself and admits on the containers' requests."""
    manifests = render(VALUE_SETS[value_set])
    assert "suspend" not in keys_anywhere(workload(manifests))
    for pod in pod_specs(manifests):
        for container in pod["containers"]:
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), container["name"]


# ------------------------------------------------------------------ security


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Violations of the Kubernetes "restricted" Pod Security Standard (v1.29+), plus a read-only root."""
    found = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(field)
    allowed_volumes = {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
    for volume in pod.get("volumes", []):
        kind = (set(volume) - {"name"}).pop()
        if kind not in allowed_volumes:
            found.append(f"volume {volume['name']}: {kind}")
    pod_sc = pod.get("securityContext", {})
    if pod_sc.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    if pod_sc.get("sysctls"):
        found.append("sysctls")
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container.get("securityContext", {})
        name = container["name"]
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) in (0, None):
            found.append(f"{name}: runAsUser")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation")
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            found.append(f"{name}: capabilities.drop")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities.add")
        profile = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if profile not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile")
        if sc.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: readOnlyRootFilesystem")
        if any("hostPort" in p for p in container.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_pods_meet_the_restricted_pod_security_standard(value_set: str) -> None:
    values = VALUE_SETS[value_set] or {}
    specs = pod_specs(render(values))
    assert len(specs) == (3 if values.get("tensorboard", {}).get("enabled") else 2)
    for pod in specs:
        assert restricted_violations(pod) == []
        assert pod["automountServiceAccountToken"] is False


def test_the_checker_sees_violations() -> None:
    pod = pod_specs(render())[0]
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    pod["hostNetwork"] = True
    context = pod["containers"][0]["securityContext"]
    for field in ("allowPrivilegeEscalation", "capabilities", "readOnlyRootFilesystem"):
        del context[field]
    assert set(restricted_violations(pod)) == {
        "hostNetwork",
        "volume host: hostPath",
        "train: allowPrivilegeEscalation",
        "train: capabilities.drop",
        "train: readOnlyRootFilesystem",
    }


def test_service_account_with_irsa_annotations_and_no_token() -> None:
    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/trainer"}
    manifests = render({"serviceAccount": {"annotations": role}})
    account = only(manifests, "ServiceAccount")
    assert account["metadata"]["annotations"] == role
    assert account["automountServiceAccountToken"] is False
    assert (
        only(manifests, "Job")["spec"]["template"]["spec"]["serviceAccountName"]
        == account["metadata"]["name"]
    )
    # IRSA: no credentials anywhere, the AWS SDK uses the web identity token EKS injects.
    assert "Secret" not in kinds(manifests)
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & env_of(job_container(manifests)).keys()


def test_s3_credentials_appear_only_in_the_secret() -> None:
    key_id, secret = "AKIAWIRINGTEST0000001", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzzzSECRET"
    values = {"s3": {"accessKeyId": key_id, "secretAccessKey": secret}}
    manifests = render(values)
    secret_manifest = only(manifests, "Secret")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret_manifest["data"].items()}
    assert decoded == {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
    forms = {key_id, secret, *(base64.b64encode(s.encode()).decode() for s in (key_id, secret))}
    elsewhere = [m for m in manifests if m is not secret_manifest] + [helm_lint.notes(values)]
    leaks = [form for doc in elsewhere for form in forms if form in json.dumps(doc)]
    assert leaks == []
    for pod in pod_specs(manifests):
        env = env_of(pod["containers"][0])
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[variable] == {
                "secretKeyRef": {"name": secret_manifest["metadata"]["name"], "key": variable}
            }


def test_existing_secret() -> None:
    manifests = render(VALUE_SETS["ci/existing-secret-values.yaml"])
    assert "Secret" not in kinds(manifests)
    assert "ServiceAccount" not in kinds(manifests)
    pod = only(manifests, "Job")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "trainer"
    env = env_of(pod["containers"][0])
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "minio-credentials", "key": "root-user"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "minio-credentials", "key": "root-password"}
    }
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert pod["containers"][0]["image"].startswith("registry.example.com/ml/finetune-job@sha256:")


# ------------------------------------------------------------------ multi-worker


def test_single_worker_has_no_multi_worker_parts() -> None:
    manifests = render()
    job = only(manifests, "Job")
    assert "Service" not in kinds(manifests)
    assert "completionMode" not in job["spec"] and "subdomain" not in job["spec"]["template"]["spec"]
    assert "TF_CONFIG_CLUSTER" not in env_of(job_container(manifests))


def test_multiworker_indexed_job_and_headless_service() -> None:
    manifests = render(VALUE_SETS["ci/multiworker-values.yaml"])
    job, service = only(manifests, "Job"), only(manifests, "Service")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-training"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod = job["spec"]["template"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    # The Service selects exactly this Job's pods (Kubernetes adds the job-name label to them).
    pod_labels = {**pod["metadata"]["labels"], "batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert ports["worker"] == service["spec"]["ports"][0]["port"] == 12345
    claim = only(manifests, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def run_rendered(
    container: dict[str, Any], env: dict[str, str], **kwargs: Any
) -> subprocess.CompletedProcess:
    return subprocess.run(
        container["command"] + container["args"], env=env, capture_output=True, text=True, **kwargs
    )


@pytest.fixture
def fake_finetune_job(tmp_path: Path) -> Path:
    """A `finetune-job` that prints TF_CONFIG and its arguments, one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "finetune-job"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$TF_CONFIG" "$@"\n')
    fake.chmod(0o755)
    return bin_dir


def test_tf_config_wrapper_runs(fake_finetune_job: Path) -> None:
    manifests = render(VALUE_SETS["ci/multiworker-values.yaml"])
    job, service = only(manifests, "Job"), only(manifests, "Service")
    container = job_container(manifests)
    env = {k: v for k, v in env_of(container).items() if isinstance(v, str)}
    env |= {"PATH": f"{fake_finetune_job}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": "1"}
    result = run_rendered(container, env, timeout=30)
    assert result.returncode == 0, result.stderr
    tf_config, *args = result.stdout.splitlines()
    name, domain = job["metadata"]["name"], service["metadata"]["name"]
    assert json.loads(tf_config) == {
        "cluster": {"worker": [f"{name}-{index}.{domain}:12345" for index in range(3)]},
        "task": {"type": "worker", "index": 1},
    }
    assert args == ["train", "--config", CONFIG_FILE]
    # ...and the job reads it as worker 1 of 3.
    from job.distribute import tf_config_workers

    assert tf_config_workers({"TF_CONFIG": tf_config}) == (1, 3)

    del env["JOB_COMPLETION_INDEX"]
    missing = run_rendered(container, env, timeout=30)
    assert missing.returncode == 2  # a config error: podFailurePolicy fails the Job at once
    assert "JOB_COMPLETION_INDEX" in missing.stderr


# ------------------------------------------------------------------ JobSet


def the_replicated_job(jobset: dict[str, Any]) -> dict[str, Any]:
    (replicated,) = jobset["spec"]["replicatedJobs"]
    return replicated


def test_jobset_runs_the_workers_as_one_replicated_indexed_job() -> None:
    values = VALUE_SETS["ci/jobset-values.yaml"]
    manifests = render(values)
    jobset = only(manifests, "JobSet")
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert [p for v in helm_lint.KUBE_VERSIONS if (p := helm_lint.validate(jobset, v))] == []
    # JobSet makes the workers' headless Service itself; the chart's is for the plain Job only.
    assert not {"Job", "Service"} & set(kinds(manifests))
    replicated = the_replicated_job(jobset)
    assert replicated["replicas"] == 1
    job = replicated["template"]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == values["workers"] == 3
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    assert "subdomain" not in job["template"]["spec"]  # JobSet sets it on the Job it creates
    assert jobset["spec"]["network"] == {
        "enableDNSHostnames": True,
        "subdomain": jobset["metadata"]["name"],
        "publishNotReadyAddresses": True,
    }
    labels = jobset["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-training"
    assert labels["kueue.x-k8s.io/priority-class"] == "training-high"
    assert "suspend" not in keys_anywhere(jobset)
    container = job_container(manifests)
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert env_of(container)["FINETUNE_RUN_ID"] == "flowers-jobset-001"
    assert only(manifests, "Pod")["metadata"]["annotations"]["helm.sh/hook"] == "test"


def test_jobset_hostnames_are_the_ones_jobset_documents() -> None:
    crd = yaml.safe_load(helm_lint.JOBSET_CRD.read_text())
    (version,) = crd["spec"]["versions"]
    network = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["network"]
    documented = network["properties"]["enableDNSHostnames"]["description"]
    assert "<jobSet.name>-<spec.replicatedJob.name>-<job-index>-<pod-index>.<subdomain>" in documented


def test_jobset_tf_config_names_each_workers_stable_hostname(fake_finetune_job: Path) -> None:
    manifests = render(VALUE_SETS["ci/jobset-values.yaml"])
    jobset = only(manifests, "JobSet")
    name, subdomain = jobset["metadata"]["name"], jobset["spec"]["network"]["subdomain"]
    replicated = the_replicated_job(jobset)["name"]
    hostnames = [f"{name}-{replicated}-0-{index}.{subdomain}:12345" for index in range(3)]
    container = job_container(manifests)
    env = {k: v for k, v in env_of(container).items() if isinstance(v, str)}
    from job.distribute import tf_config_workers

    tasks = []
    for index in range(3):
        pod_env = env | {"PATH": f"{fake_finetune_job}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": str(index)}
        result = run_rendered(container, pod_env, timeout=30)
        assert result.returncode == 0, result.stderr
        tf_config, *args = result.stdout.splitlines()
        assert json.loads(tf_config)["cluster"] == {"worker": hostnames}
        assert args == ["train", "--config", CONFIG_FILE]
        tasks.append(json.loads(tf_config)["task"])
        assert tf_config_workers({"TF_CONFIG": tf_config}) == (index, 3)
    assert tasks == [{"type": "worker", "index": index} for index in range(3)]


def job_failure(policy: dict[str, Any], exit_code: int, condition: str | None = None) -> tuple[str, str]:
    """(reason, message) of a Job's Failed condition after its one allowed pod failure (backoffLimit 0),
    worded as the Job controller words them (kubernetes pkg/controller/job/pod_failure_policy.go)."""
    pod = "ml/flowers-worker-0-1-x7k2p"
    for index, rule in enumerate(policy["rules"]):
        on_exit = rule.get("onExitCodes")
        if on_exit and (exit_code in on_exit["values"]) == (on_exit["operator"] == "In"):
            detail = f"Container {on_exit['containerName']} for pod {pod} failed with exit code {exit_code}"
        elif condition and any(c["type"] == condition for c in rule.get("onPodConditions", [])):
            detail = f"Pod {pod} has condition {condition}"
        else:
            continue
        assert rule["action"] == "FailJob"
        return "PodFailurePolicy", f"{detail} matching FailJob rule at index {index}"
    return "BackoffLimitExceeded", "Job has reached the specified backoff limit"


def jobset_action(policy: dict[str, Any], reason: str, message: str) -> str:
    """What JobSet does with a failed child Job: the first rule whose reasons and message patterns
    (RE2, searched) match, else RestartJobSet (pkg/controllers/failure_policy.go)."""
    for rule in policy.get("rules", []):
        if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
            continue
        patterns = rule.get("onJobFailureMessagePatterns")
        if patterns and not any(re.search(pattern, message) for pattern in patterns):
            continue
        return rule["action"]
    return "RestartJobSet"


@pytest.mark.parametrize(
    ("exit_code", "condition", "action"),
    [
        (2, None, "FailJobSet"),  # bad config: a restart cannot help
        (3, None, "FailJobSet"),  # bad data
        (143, "DisruptionTarget", "RestartJobSetAndIgnoreMaxRestarts"),  # preempted, evicted, drained
        (1, None, "RestartJobSet"),  # a crash: all workers restart, counted against maxRestarts
        (4, None, "RestartJobSet"),  # storage error
        (23, None, "RestartJobSet"),
        # stopped after a checkpoint without the condition: the other workers when one is evicted (they share the
        # stop), or `kubectl delete pod`; counted, each eviction of a worker used up maxRestarts
        (143, None, "RestartJobSetAndIgnoreMaxRestarts"),
        (137, None, "RestartJobSet"),  # killed (out of memory, or the grace period ran out): counted
    ],
)
def test_jobset_failure_policy_restarts_all_workers_together(
    exit_code: int, condition: str | None, action: str
) -> None:
    jobset = only(render(VALUE_SETS["ci/jobset-values.yaml"]), "JobSet")
    job = the_replicated_job(jobset)["template"]["spec"]
    assert job["backoffLimit"] == 0  # one failed worker fails its Job at once...
    policy = jobset["spec"]["failurePolicy"]
    assert policy["maxRestarts"] == VALUE_SETS["ci/jobset-values.yaml"]["backoffLimit"] == 5
    assert policy.get("restartStrategy", "Recreate") == "Recreate"  # ...and JobSet recreates every worker
    reason, message = job_failure(job["podFailurePolicy"], exit_code, condition)
    assert jobset_action(policy, reason, message) == action


def test_jobset_fails_when_the_deadline_runs_out() -> None:
    jobset = only(render({"workload": {"kind": "JobSet"}, "activeDeadlineSeconds": 3600}), "JobSet")
    assert the_replicated_job(jobset)["template"]["spec"]["activeDeadlineSeconds"] == 3600
    policy = jobset["spec"]["failurePolicy"]
    assert jobset_action(policy, "DeadlineExceeded", "Job was active longer than specified deadline") == "FailJobSet"


def test_jobset_of_one_worker_has_no_tf_config() -> None:
    manifests = render({"workload": {"kind": "JobSet"}})
    job = the_replicated_job(only(manifests, "JobSet"))["template"]["spec"]
    assert job["completions"] == job["parallelism"] == 1
    container = job_container(manifests)
    assert container["command"] == ["finetune-job"]
    assert "TF_CONFIG_CLUSTER" not in env_of(container)


def test_jobset_names_stay_within_the_jobset_webhooks_limits() -> None:
    """JobSet's webhook rejects a JobSet whose Job, pod (with its 5-character random suffix) or
    subdomain names would not be DNS-1035 labels (pkg/webhooks/jobset_webhook.go)."""
    label = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    for release, revision, workers in (("a" * 53, 123456, 1024), ("flowers", 1, 3)):
        manifests = render({"workload": {"kind": "JobSet"}, "workers": workers}, name=release, revision=revision)
        jobset = only(manifests, "JobSet")
        name, replicated = jobset["metadata"]["name"], the_replicated_job(jobset)
        job_name = f"{name}-{replicated['name']}-{replicated['replicas'] - 1}"
        pod_name = f"{job_name}-{replicated['template']['spec']['completions'] - 1}-abcde"
        for generated in (job_name, pod_name, jobset["spec"]["network"]["subdomain"]):
            assert len(generated) <= 63 and label.match(generated), generated
        assert name.endswith(f"-{revision}")  # a new JobSet for every revision: its failurePolicy is immutable


# ------------------------------------------------------------------ TensorBoard


def test_tensorboard_is_off_by_default() -> None:
    assert not {"Deployment", "Service"} & set(kinds(render()))


def test_tensorboard_deployment_and_service() -> None:
    values = VALUE_SETS["ci/tensorboard-values.yaml"]
    manifests = render(values)
    deployment, service = only(manifests, "Deployment"), only(manifests, "Service")
    assert [p for v in helm_lint.KUBE_VERSIONS for m in (deployment, service) if (p := helm_lint.validate(m, v))] == []
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == job_container(manifests)["image"]
    assert container["command"] == ["finetune-job"]
    assert container["args"] == ["tensorboard", "--from", "s3://bucket/models", "--port", "6006"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 6006}
    assert container["readinessProbe"]["httpGet"]["port"] == "http"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()

    # The Service reaches TensorBoard's pod and nothing else of the release.
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 6006, "targetPort": "http", "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= train_pod(manifests)["metadata"]["labels"].items()

    # The Job's identity, storage access and security context; none of its training settings.
    job_pod, job = train_pod(manifests)["spec"], job_container(manifests)
    for field in ("serviceAccountName", "automountServiceAccountToken", "enableServiceLinks", "securityContext"):
        assert pod["spec"][field] == job_pod[field], field
    assert container["securityContext"] == job["securityContext"]
    assert restricted_violations(pod["spec"]) == []
    env, job_env = env_of(container), env_of(job)
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "HOME"):
        assert env[variable] == job_env[variable], variable
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "minio-credentials", "key": "AWS_ACCESS_KEY_ID"}}
    assert not [name for name in env if name.startswith("FINETUNE_")]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}  # the mirror; the root is read-only
    assert "nodeSelector" not in pod["spec"] and "tolerations" not in pod["spec"]


def test_tensorboard_args_are_what_the_cli_accepts() -> None:
    """The rendered arguments parse as `finetune-job tensorboard` options; with its defaults it binds
    every interface (the Service and the readiness probe reach the pod's IP) and mirrors into /tmp,
    the pod's one writable mount."""
    import typer

    from job.cli import app

    deployment = only(render(VALUE_SETS["ci/tensorboard-values.yaml"]), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    subcommand, *options = container["args"]
    command = typer.main.get_command(app).commands[subcommand]
    params = command.make_context(subcommand, options).params
    assert (params["source"], params["port"]) == ("s3://bucket/models", 6006)
    assert params["host"] == "0.0.0.0"
    assert Path(params["folder"]).is_relative_to(container["volumeMounts"][0]["mountPath"])


def test_tensorboard_defaults_to_the_output_uri_and_follows_its_values() -> None:
    role = {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/trainer"}
    values = {
        "tensorboard": {"enabled": True, "port": 8080, "service": {"type": "NodePort"}},
        "config": {"output": {"uri": "s3://models/flowers"}},
        "serviceAccount": {"annotations": role},
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
    }
    manifests = render(values)
    deployment, service = only(manifests, "Deployment"), only(manifests, "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["tensorboard", "--from", "s3://models/flowers", "--port", "8080"]
    assert container["ports"][0]["containerPort"] == service["spec"]["ports"][0]["port"] == 8080
    assert service["spec"]["type"] == "NodePort"
    # IRSA: the service account's identity, no keys; the GPU nodeSelector is the Job's, not TensorBoard's.
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & env_of(container).keys()
    assert "nodeSelector" not in deployment["spec"]["template"]["spec"]


# ------------------------------------------------------------------ monitoring


def test_monitoring_objects() -> None:
    manifests = render(VALUE_SETS["ci/monitoring-values.yaml"])
    pod = only(manifests, "Job")["spec"]["template"]
    monitor = only(manifests, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert ports["metrics"] == 9100  # config.metrics.port of the monitoring values
    assert env_of(pod["spec"]["containers"][0])["FINETUNE_METRICS__PUSHGATEWAY"].startswith("http://")

    rule = only(manifests, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((CHART / "alerts" / "rules.yaml").read_text())["groups"]

    dashboards = {
        m["metadata"]["name"]: m
        for m in manifests
        if m["kind"] == "ConfigMap" and "dashboard" in m["metadata"]["name"]
    }
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert files and len(dashboards) == len(files)
    for configmap in dashboards.values():
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["metadata"]["namespace"] == "monitoring"
        assert configmap["metadata"]["annotations"] == {"grafana_folder": "Training"}
        ((file_name, text),) = configmap["data"].items()
        assert json.loads(text) == json.loads((CHART / "dashboards" / file_name).read_text())


def test_dashboards_of_one_release_name_in_two_namespaces_do_not_collide() -> None:
    # Both in Grafana's namespace under one name: the second install failed on Helm's ownership check, and
    # uninstalling the first took the other's dashboard.
    values = {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}}

    def names(namespace: str, dashboard: dict) -> set[str]:
        manifests = render({"grafanaDashboard": {"enabled": True, **dashboard}}, namespace=namespace)
        return {m["metadata"]["name"] for m in manifests if m["kind"] == "ConfigMap" and "dashboard" in
                m["metadata"]["name"] and m["metadata"]["namespace"] == dashboard.get("namespace", namespace)}

    team_a, team_b = names("team-a", values["grafanaDashboard"]), names("team-b", values["grafanaDashboard"])
    assert team_a and team_b and not team_a & team_b
    assert all(n.startswith("team-a-") and len(n) <= 63 for n in team_a)
    long_a, long_b = (names("a" * 60 + end, values["grafanaDashboard"]) for end in ("-x", "-y"))
    assert not long_a & long_b and all(len(n) <= 63 for n in long_a)  # cut namespaces: still apart
    assert names("ml", {}) == names("ml2", {}) == {"finetune-finetune-job-dashboard-finetune-job"}  # each in its own


def test_monitoring_is_off_by_default_and_port_zero_opens_no_port() -> None:
    manifests = render({"config": {"metrics": {"port": 0}}})
    assert {"PodMonitor", "PrometheusRule"}.isdisjoint(kinds(manifests))
    assert not [m for m in manifests if m["metadata"].get("labels", {}).get("grafana_dashboard")]
    assert "ports" not in job_container(manifests)


# ------------------------------------------------------------------ helm test hook and NOTES


def test_helm_test_hook_validates_with_the_jobs_wiring() -> None:
    manifests = render()
    pod = only(manifests, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (validate,) = pod["spec"]["containers"]
    assert validate["command"] == ["finetune-job"]
    assert validate["args"] == ["validate", "--config", CONFIG_FILE]
    assert validate["env"] == job_container(manifests)["env"]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert "Pod" not in kinds(render({"helmTest": {"enabled": False}}))


def test_notes_say_how_to_follow_the_run() -> None:
    text = helm_lint.notes({"config": {"output": {"uri": "s3://models/flowers/"}}})
    assert "kubectl -n ml logs -f job/finetune-finetune-job-1" in text
    assert "port-forward job/finetune-finetune-job-1 8000:8000" in text
    assert "s3://models/flowers/finetune-1/_SUCCESS" in text
    assert "helm test finetune" in text
    # Revision 1 with the default run id: after an uninstall the name's run may be complete, and the Job then trains
    # nothing (exit 0) without a word in the notes.
    assert "run finetune-1 may be complete\nin storage already" in text and "Set config.run_id" in text
    assert "may be complete" not in helm_lint.notes({}, revision=2)
    assert "may be complete" not in helm_lint.notes({"config": {"run_id": "flowers-v7"}})
    multi = helm_lint.notes(VALUE_SETS["ci/multiworker-values.yaml"])
    assert "-l batch.kubernetes.io/job-name=finetune-finetune-job-1 --prefix" in multi
    jobset = helm_lint.notes(VALUE_SETS["ci/jobset-values.yaml"])
    assert "kubectl -n ml get jobset finetune-finetune-job-1 --watch" in jobset
    assert "-l jobset.sigs.k8s.io/jobset-name=finetune-finetune-job-1 --prefix" in jobset
    assert "--for=condition=Completed jobset/finetune-finetune-job-1" in jobset
    assert "port-forward job/finetune-finetune-job-1-worker-0 8000:8000" in jobset
    assert "LocalQueue gpu-training at priority training-high" in jobset
    tensorboard = helm_lint.notes(VALUE_SETS["ci/tensorboard-values.yaml"])
    assert "port-forward svc/finetune-finetune-job-tensorboard 6006:6006" in tensorboard
    assert "tensorboard" not in text


# ------------------------------------------------------------------ the wiring, end to end


def resolve_env(container: dict[str, Any], manifests: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: values, and secretKeyRefs looked up
    in the rendered Secrets."""
    secrets = {m["metadata"]["name"]: m["data"] for m in manifests if m["kind"] == "Secret"}
    env = {}
    for variable in container["env"]:
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
    return env


def localise(
    container: dict[str, Any], pod: dict[str, Any], manifests: list[dict[str, Any]], root: Path
) -> tuple[list[str], dict[str, str]]:
    """The container's argv and environment with each volume mount path moved under `root`
    (ConfigMap volumes filled with their data); nothing else changes."""
    configmaps = {m["metadata"]["name"]: m["data"] for m in manifests if m["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    moved = {}
    for mount in container["volumeMounts"]:
        local = root / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        source = volumes[mount["name"]]
        if "configMap" in source:
            for file_name, text in configmaps[source["configMap"]["name"]].items():
                (local / file_name).write_text(text)
        moved[mount["mountPath"]] = str(local)

    def rewrite(text: str) -> str:
        for path in sorted(moved, key=len, reverse=True):
            if text == path or text.startswith(path + "/"):
                return moved[path] + text[len(path) :]
        return text

    argv = [rewrite(a) for a in container["command"] + container["args"]]
    env = {k: rewrite(v) for k, v in resolve_env(container, manifests).items()}
    return argv, env


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rendered_job_runs_end_to_end_against_s3(s3_server: str, tmp_path: Path) -> None:
    """s3_server: the moto S3 server of tests/conftest.py, on 127.0.0.1."""
    from job.sample_data import write_sample_dataset

    bucket = "chart-wiring"
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="wiring-key",
        aws_secret_access_key="wiring-secret",
    )
    s3.create_bucket(Bucket=bucket)
    dataset = tmp_path / "dataset"
    write_sample_dataset(dataset, classes=3, per_class=12, size=32, seed=0)
    for path in sorted(p for p in dataset.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"datasets/shapes/{path.relative_to(dataset).as_posix()}")

    values = {
        "s3": {
            "endpointUrl": s3_server,
            "region": "us-east-1",
            "accessKeyId": "wiring-key",
            "secretAccessKey": "wiring-secret",
        },
        "config": {
            "data": {"uri": f"s3://{bucket}/datasets/shapes", "image_size": [32, 32]},
            "model": {"backbone": BACKBONE, "weights": "none"},
            "train": {"batch_size": 16, "head": {"epochs": 2}, "finetune": {"epochs": 1},
                      "search": {"learning_rates": []}},
            "output": {"uri": f"s3://{bucket}/models/shapes"},
            "metrics": {"port": 0, "linger_seconds": 0},
            "export": {"formats": ["saved_model"]},
        },
    }
    manifests = render(values, name="wiring", revision=1)
    path_env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin"}

    # The helm test hook first (it trains nothing), then the Job itself.
    test_pod = only(manifests, "Pod")["spec"]
    argv, env = localise(test_pod["containers"][0], test_pod, manifests, tmp_path / "validate-pod")
    validated = subprocess.run(argv, env=env | path_env, capture_output=True, text=True, timeout=300)
    assert validated.returncode == 0, validated.stdout[-3000:] + validated.stderr[-3000:]

    pod = only(manifests, "Job")["spec"]["template"]["spec"]
    argv, env = localise(pod["containers"][0], pod, manifests, tmp_path / "train-pod")
    assert argv[0] == "finetune-job" and env["FINETUNE_RUN_ID"] == "wiring-1"
    trained = subprocess.run(argv, env=env | path_env, capture_output=True, text=True, timeout=840)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]

    listed = s3.list_objects_v2(Bucket=bucket, Prefix="models/shapes/wiring-1/")
    keys = {o["Key"].removeprefix("models/shapes/wiring-1/") for o in listed.get("Contents", [])}
    assert "_SUCCESS" in keys
    assert "labels.txt" in keys


@pytest.mark.parametrize(("s3", "expected"), [({}, "http://minio.storage:9000"),
                                              ({"endpointUrl": "http://other:9000"}, "http://minio.storage:9000")])
def test_tensorboard_reads_the_storage_the_job_reads(s3: dict, expected: str) -> None:
    # config.s3.endpoint_url reached the Job (its config file) but not TensorBoard, which then read AWS's S3.
    values = VALUE_SETS["ci/tensorboard-values.yaml"]
    values = {**values, "s3": {**values.get("s3", {}), "endpointUrl": ""} | s3,
              "config": {**values.get("config", {}), "s3": {"endpoint_url": "http://minio.storage:9000"}}}
    manifests = render(values)
    tensorboard = env_of(only(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert tensorboard["AWS_ENDPOINT_URL_S3"] == expected == env_of(job_container(manifests))["AWS_ENDPOINT_URL_S3"]


@pytest.mark.parametrize("label", ["app.kubernetes.io/instance", "app.kubernetes.io/component"])
def test_pod_labels_may_not_be_the_charts_own(label: str) -> None:
    # Written twice in the pod template, one was lost: the worker Service and the PodMonitor lost their pods.
    with pytest.raises(Exception, match=f"podLabels: {label} is one of the chart's own labels"):
        render({"podLabels": {label: "x"}, "workers": 2})
    assert train_pod(render({"podLabels": {"team": "vision"}}))["metadata"]["labels"]["team"] == "vision"


@pytest.mark.parametrize("key", ["podMonitor", "prometheusRule", "grafanaDashboard"])
def test_extra_labels_may_not_be_the_charts_own(key: str) -> None:
    # A repeated key rendered twice in metadata.labels: one value silently lost, or the manifest refused.
    values = {"config": {"metrics": {"port": 9100}}, key: {"enabled": True, "labels": {"helm.sh/chart": "x"}}}
    with pytest.raises(Exception, match=f"{key}.labels: helm.sh/chart is one of the chart's own labels"):
        render(values)
    values[key]["labels"] = {"release": "prometheus"}
    kind = {"podMonitor": "PodMonitor", "prometheusRule": "PrometheusRule", "grafanaDashboard": "ConfigMap"}[key]
    theirs = [m for m in render(values)
              if m["kind"] == kind and (kind != "ConfigMap" or "-dashboard-" in m["metadata"]["name"])]
    assert theirs and all(m["metadata"]["labels"]["release"] == "prometheus" for m in theirs)


def test_the_dashboards_sidecar_label_takes_the_users_value_once() -> None:
    # The Grafana sidecar's label value is its own setting (labelValue): `grafana_dashboard: "true"` rendered the key
    # twice, "1" and "true".
    with helm_python.Chart.load(CHART) as loaded:
        rendered = loaded.render({"grafanaDashboard": {"enabled": True, "labels": {"grafana_dashboard": "true"}}},
                                 **helm_lint.RELEASE)
    (text,) = [t for name, t in rendered.items() if name.endswith("dashboards.yaml")]
    assert re.findall(r"^ +grafana_dashboard: .*$", text, re.M) == ['    grafana_dashboard: "true"']


@pytest.mark.parametrize("release", ["1flowers", "my.run"])
def test_a_release_name_kubernetes_refuses_for_a_service_fails_the_render(release: str) -> None:
    # Helm accepts these release names; the Services named after them were refused by the API server (DNS-1035).
    with pytest.raises(Exception, match=f"the resources' name \"{re.escape(release)}-finetune-job\" .* must start "
                                        "with a letter"):
        render({"tensorboard": {"enabled": True, "from": "s3://b/m"}}, name=release)
    assert only(render({"fullnameOverride": "flowers"}, name="1flowers"), "ConfigMap")["metadata"]["name"] \
        .startswith("flowers")
    # Without a Service (one worker, a Job, no TensorBoard) such a name is fine: Jobs and ConfigMaps take it.
    assert workload(render(name=release))["metadata"]["name"].startswith(release)
    for values in ({"workers": 2}, {"workload": {"kind": "JobSet"}}):
        with pytest.raises(Exception, match="must start with a letter"):
            render(values, name=release)


def test_the_metrics_port_may_not_be_the_workers_port() -> None:
    # Two container ports alike: the metrics server and TensorFlow's worker server could not both bind it.
    port = 12345
    with pytest.raises(Exception, match=f"config.metrics.port {port} is multiWorker.port too"):
        render({"workers": 2, "multiWorker": {"port": port}, "config": {"metrics": {"port": port}}})
    assert workload(render({"workers": 1, "multiWorker": {"port": port}, "config": {"metrics": {"port": port}}}))


@pytest.mark.parametrize("limits", [{}, {"nvidia.com/gpu": 1}])
def test_a_gpu_requested_other_than_its_limit_fails_the_render(limits: dict) -> None:
    # A GPU in requests alone, or two requested against a limit of one: the API server refused the pod.
    requests = {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": 2}
    with pytest.raises(Exception, match="resources.requests.nvidia.com/gpu: 2, but resources.limits.nvidia.com/gpu "
                                        "is"):
        render({"resources": {"requests": requests, "limits": {"memory": "1Gi", **limits}}})
    gpu = {"requests": {**requests, "nvidia.com/gpu": 1}, "limits": {"memory": "1Gi", "nvidia.com/gpu": 1}}
    assert job_container(render({"resources": gpu}))["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize(("where", "asked_for", "limit"), [
    ("resources", {"cpu": "4"}, {"cpu": "2"}),
    ("resources", {"memory": "1025Mi"}, {"memory": "1Gi"}),
    ("resources", {"memory": "1G"}, {"memory": "0.9Gi"}),
    ("resources", {"memory": "1073741825"}, {"memory": "1Gi"}),  # one byte over (a rounding margin let it through)
    ("resources", {"ephemeral-storage": "2e9"}, {"ephemeral-storage": "1G"}),
    ("tensorboard.resources", {"memory": "2Gi"}, {"memory": "1Gi"}),
    ("helmTest.resources", {"cpu": "1"}, {"cpu": "500m"}),
])
def test_a_request_above_its_limit_fails_the_render(where: str, asked_for: dict, limit: dict) -> None:
    # The API server refuses such a pod ("must be less than or equal to ... limit"): the Job then created no pod, and
    # `helm install` had said nothing.
    (name, asked), (_, most) = *asked_for.items(), *limit.items()
    values: dict[str, Any] = {"tensorboard": {"enabled": True}}
    section = values
    for part in where.split(".")[:-1]:
        section = section.setdefault(part, {})
    section["resources"] = {"requests": asked_for, "limits": limit}
    complaint = f"{where}.requests.{name}: {asked} is more than {where}.limits.{name}: {most}, which the API server"
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(complaint)):
        render(values)


@pytest.mark.parametrize(("asked_for", "limit"), [("300m", "0.3"), (".7", "700m"), ("1", "1000m"), ("3k", "3e3"),
                                                ("1G", "1e+09"), ("1Gi", "1073741824"), ("1Mi", "1Gi"), (1, "2")])
def test_a_request_at_or_below_its_limit_renders(asked_for: Any, limit: str) -> None:
    # the same quantity written two ways is equal (no rounding taken for "more"), a smaller one renders
    resources = {"requests": {"cpu": asked_for, "memory": asked_for}, "limits": {"cpu": limit, "memory": limit}}
    assert job_container(render({"resources": resources}))["resources"]["requests"]["cpu"] == asked_for


def test_extra_volumes_reach_the_training_pods_and_tensorboard() -> None:
    # A private CA for an https S3 endpoint: AWS_CA_BUNDLE named a file no pod had (read-only root filesystem, no way
    # to mount one), so the job and TensorBoard failed on TLS, exit 4.
    values = {"extraVolumes": [{"name": "s3-ca", "configMap": {"name": "s3-ca"}}],
              "extraVolumeMounts": [{"name": "s3-ca", "mountPath": "/etc/s3-ca", "readOnly": True}],
              "extraEnv": [{"name": "AWS_CA_BUNDLE", "value": "/etc/s3-ca/ca.crt"}],
              "tensorboard": {"enabled": True}}
    for kind in ("Job", "Deployment"):
        pod = only(render(values), kind)["spec"]["template"]["spec"]
        assert {"name": "s3-ca", "configMap": {"name": "s3-ca"}} in pod["volumes"], kind
        (container,) = pod["containers"]
        assert {"name": "s3-ca", "mountPath": "/etc/s3-ca", "readOnly": True} in container["volumeMounts"], kind
        assert env_of(container)["AWS_CA_BUNDLE"] == "/etc/s3-ca/ca.crt", kind
    jobset = only(render({**values, "workload": {"kind": "JobSet"}, "workers": 2}), "JobSet")
    pod = the_replicated_job(jobset)["template"]["spec"]["template"]["spec"]
    assert {"name": "s3-ca", "configMap": {"name": "s3-ca"}} in pod["volumes"]
    with pytest.raises(helm_python.HelmRenderError, match="extraVolumeMounts: \"ca\" is none of extraVolumes"):
        render({**values, "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ca"}]})
    with pytest.raises(helm_python.HelmRenderError, match="extraVolumes: \"tmp\" is a volume of the chart's own"):
        render({"extraVolumes": [{"name": "tmp", "emptyDir": {}}]})
    with pytest.raises(helm_python.HelmRenderError, match="mounts at /tmp, where the chart mounts a volume of its own"):
        render({**values, "extraVolumeMounts": [{"name": "s3-ca", "mountPath": "/tmp"}]})
    with pytest.raises(helm_python.HelmValuesError, match="/extraVolumeMounts/0"):
        render({**values, "extraVolumeMounts": [{"name": "s3-ca"}]})
    # The API server refuses two mounts at one path; one inside the read-only config volume fails the container.
    twice = [{"name": "s3-ca", "mountPath": "/etc/ca"}, {"name": "s3-ca", "mountPath": "/etc/ca/"}]
    with pytest.raises(helm_python.HelmRenderError, match="mounts at /etc/ca/, where the chart mounts a volume of its "
                                                          "own or another of extraVolumeMounts"):
        render({**values, "extraVolumeMounts": twice})
    with pytest.raises(helm_python.HelmRenderError, match="inside the chart's read-only config volume"):
        render({**values, "extraVolumeMounts": [{"name": "s3-ca", "mountPath": "/etc/finetune-job/ca"}]})
