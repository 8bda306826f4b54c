"""The README's Serving section says what the job writes: its KServe manifest, TF Serving paths and
REST body name the run's real layout and signature."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from job import formats

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
SERVING = README[README.index("## Serving"):README.index("## Metrics")]


def test_the_kserve_manifest_points_at_the_tf_serving_folder():
    block = re.search(r"```yaml\n(apiVersion: serving.kserve.io.*?)```", SERVING, re.S).group(1)
    manifest = yaml.safe_load(block)
    assert manifest["kind"] == "InferenceService" and manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    model = manifest["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "tensorflow"
    # KServe's TensorFlow runtime wants the folder that holds the numbered versions.
    assert model["storageUri"].endswith("/" + formats.FILES["tf_serving"].rsplit("/", 1)[0])


def test_tf_serving_commands_use_the_written_layout_and_signature():
    assert f"tf_serving/{formats.SERVING_NAME}" in SERVING and f"MODEL_NAME={formats.SERVING_NAME}" in SERVING
    assert f"/v1/models/{formats.SERVING_NAME}:predict" in SERVING
    assert '{"instances": [{"image_bytes": {"b64": "..."}}]}' in SERVING
    for fmt, path in formats.FILES.items():
        assert path.split("/")[0] in SERVING, fmt
