"""`make helm-lint`: lint and render helm/finetune-job with the real Helm engine, no helm binary.

For the chart defaults and for each ci/*-values.yaml: `helm lint --strict` (against each supported
Kubernetes version), then a render whose every manifest is validated against the Kubernetes
OpenAPI schemas of those versions (kubernetes-validate, strict: unknown fields are errors). The
custom resources are not in the core schemas: a JobSet is checked against the OpenAPI schema of
JobSet's published CRD (vendored under tests/deploy/schemas/jobset/, made just as strict), and each
of its Job templates against the core schemas like a plain Job; the Prometheus Operator kinds
(PodMonitor, PrometheusRule) against the structural schemas below. Exits 1 on any finding.

The tests (tests/deploy/test_chart.py) use the same functions.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "finetune-job"
# JobSet's CRD as released (version and checksum in the README next to it).
JOBSET_CRD = ROOT / "tests" / "deploy" / "schemas" / "jobset" / "jobset.x-k8s.io_jobsets.yaml"
KUBE_VERSIONS = ("1.29.0", "1.33.0")
RELEASE = {"name": "finetune", "namespace": "ml", "revision": 1, "is_install": True}

_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": _LABELS,
        "annotations": _LABELS,
    },
}
# The fields of monitoring.coreos.com/v1 this chart uses, as the operator's CRDs define them.
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "podMetricsEndpoints"],
                "properties": {
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}},
                    },
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["port"],
                            "properties": {
                                "port": {"type": "string", "minLength": 1},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": {
                                    "type": "string",
                                    "pattern": "^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$",
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["groups"],
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["expr"],
                                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                        "properties": {
                                            "alert": {"type": "string", "minLength": 1},
                                            "record": {"type": "string", "minLength": 1},
                                            "expr": {"type": ["string", "integer"]},
                                            "for": {"type": "string"},
                                            "keep_firing_for": {"type": "string"},
                                            "labels": _LABELS,
                                            "annotations": _LABELS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural schema as the API server applies it with strict field validation: an object
    schema that lists its properties accepts no other field (unless it preserves unknown fields)."""
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_children(key, value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def strict_children(key: str, value: Any) -> Any:
    if key == "properties":
        return {name: strict(sub) for name, sub in value.items()}
    if key in ("items", "additionalProperties", "not"):
        return strict(value)
    if key in ("anyOf", "allOf", "oneOf"):
        return [strict(sub) for sub in value]
    return value


@functools.cache
def crd_validators(path: Path = JOBSET_CRD) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """One validator per served version of a CRD file: its openAPIV3Schema, strict, with the metadata
    checks the API server makes (the CRD leaves metadata open)."""
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    validators = {}
    for version in crd["spec"]["versions"]:
        schema = strict(version["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = _METADATA
        schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
        validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


def embedded_jobs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The batch/v1 Jobs a JobSet will create, one per replicated Job (its first replica)."""
    name = manifest["metadata"]["name"]
    return [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {**replicated["template"].get("metadata", {}), "name": f"{name}-{replicated['name']}-0"},
            "spec": replicated["template"]["spec"],
        }
        for replicated in manifest["spec"]["replicatedJobs"]
    ]


def value_sets(chart: Path = CHART) -> dict[str, dict[str, Any] | None]:
    """The value sets the chart is checked with: its defaults and each ci/*-values.yaml."""
    sets: dict[str, dict[str, Any] | None] = {"defaults": None}
    for path in sorted((chart / "ci").glob("*-values.yaml")):
        sets[f"ci/{path.name}"] = yaml.safe_load(path.read_text()) or {}
    return sets


def lint(values: dict[str, Any] | None, kube_version: str, chart: Path = CHART) -> list[str]:
    """`helm lint --strict` findings of warning level and above ("icon is recommended" is only info)."""
    report = helm_python.lint(chart, values, strict=True, kube_version=f"v{kube_version}")
    found = [f"{m['path']}: {m['error'].strip()}" for m in report["messages"] if m["severity"] >= 2]
    return found + [e.strip() for e in report["errors"] if not any(e.strip() in f for f in found)]


def render(values: dict[str, Any] | None = None, chart: Path = CHART, **release: Any) -> list[dict[str, Any]]:
    """The manifests a release would apply (hooks included, NOTES.txt not), parsed."""
    with helm_python.Chart.load(chart) as loaded:
        rendered = loaded.render(values, **{**RELEASE, **release})
    return [
        doc
        for name, text in sorted(rendered.items())
        if not name.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def notes(values: dict[str, Any] | None = None, chart: Path = CHART, **release: Any) -> str:
    """The rendered NOTES.txt."""
    with helm_python.Chart.load(chart) as loaded:
        rendered = loaded.render(values, **{**RELEASE, **release})
    return next(text for name, text in rendered.items() if name.endswith("NOTES.txt"))


def validate(manifest: dict[str, Any], kube_version: str) -> str | None:
    """Why `manifest` is invalid for that Kubernetes version, or None."""
    where = f"{manifest.get('kind')}/{manifest.get('metadata', {}).get('name')}"
    key = (manifest.get("apiVersion"), manifest.get("kind"))
    crd = CRD_SCHEMAS.get(key)
    published = crd_validators().get(key)
    try:
        if crd is not None:
            jsonschema.validate(manifest, crd)
        elif published is not None:
            error = jsonschema.exceptions.best_match(published.iter_errors(manifest))
            if error is not None:
                raise error
            for job in embedded_jobs(manifest):
                if problem := validate(job, kube_version):
                    return f"{where}: {problem}"
        else:
            kubernetes_validate.validate(manifest, kube_version, strict=True)
    except jsonschema.ValidationError as e:
        path = ".".join(str(p) for p in e.absolute_path)
        return f"{where} (Kubernetes {kube_version}): {path}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        return f"{where}: {e.message}"
    return None


def check(name: str, values: dict[str, Any] | None, chart: Path = CHART) -> list[str]:
    """Every finding for one value set."""
    problems = [f"lint (Kubernetes {v}): {p}" for v in KUBE_VERSIONS for p in lint(values, v, chart)]
    try:
        manifests = render(values, chart)
    except helm_python.HelmError as e:
        problems.append(f"render: {e}")
    else:
        problems += [p for v in KUBE_VERSIONS for m in manifests if (p := validate(m, v))]
    return [f"{name}: {p}" for p in problems]


def main() -> int:
    problems = []
    for name, values in value_sets().items():
        found = check(name, values)
        print(f"{'FAIL' if found else 'ok  '} {name}")
        problems += found
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
