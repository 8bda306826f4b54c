"""The README's Serving section says what the job writes: its KServe manifest, TF Serving paths and
REST body name the run's real layout and signature."""

from __future__ import annotations

import base64
import json
import re
import subprocess
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
    for fmt, path in formats.FILES.items():
        assert path.split("/")[0] in SERVING, fmt


def _documented_bodies(folder: Path) -> tuple[str, list[dict], dict]:
    """What the README says of the REST API: the signature and input it names, the request bodies (the one
    in prose, and the one its shell line writes for curl, run as written on a 1.2 MB photo in `folder`) and the
    response's first prediction."""
    import numpy as np
    from PIL import Image

    named = re.search(r"the bytes of the string input `(\w+)` of `(\w+)`", SERVING)
    prose = json.loads(re.search(r"The request body is `(\{.*?\})`", SERVING).group(1))
    line = re.search(r"\n(echo .* > (\S+))\ncurl -s \S+:predict -d @(\S+)\n", SERVING)
    assert line.group(2) == line.group(3)  # curl sends the file the line writes
    noise = np.random.default_rng(0).integers(0, 256, (600, 700, 3)).astype(np.uint8)  # past curl's argument limit
    Image.fromarray(noise).save(folder / "rose.jpg", quality=95)
    assert (folder / "rose.jpg").stat().st_size > 200_000
    subprocess.run(["bash", "-c", line.group(1)], cwd=folder, check=True, timeout=60)
    curl = json.loads((folder / line.group(2)).read_text())
    response = json.loads(re.search(r"# (\{\"predictions\".*\})\n", SERVING).group(1).replace("[...]", "[]"))
    return named.group(1), [prose, curl], {"signature": named.group(2), **response["predictions"][0]}


def test_the_documented_rest_body_fits_the_real_savedmodel_signature(tmp_path):
    """A SavedModel written by the job's own exporter, fed the README's bodies as TF Serving's REST API feeds
    a signature (`instances`: one object per example, keyed by input name; {"b64": ...} becomes the bytes
    of a DT_STRING input), answers with the outputs the README shows."""
    import keras
    import tensorflow as tf

    from job import export

    input_name, bodies, documented = _documented_bodies(tmp_path)
    classes, size = ["roses", "tulips"], (24, 24)
    inputs = keras.Input((*size, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(len(classes), activation="softmax")(pooled))
    export.write_saved_model(model, classes, size, tmp_path / "saved_model")
    signature = tf.saved_model.load(str(tmp_path / "saved_model")).signatures[documented.pop("signature")]
    (spec,) = signature.structured_input_signature[1].values()
    assert list(signature.structured_input_signature[1]) == [input_name]
    assert spec.dtype == tf.string and spec.shape.as_list() == [None]  # b64 is for DT_STRING inputs only
    for body in bodies:
        instances = body["instances"]
        assert all(set(i) == {input_name} and set(i[input_name]) == {"b64"} for i in instances), body
    prose, curl = bodies
    assert prose["instances"][0][input_name]["b64"] == "..."
    batch = tf.constant([base64.b64decode(i[input_name]["b64"]) for i in curl["instances"]])
    out = signature(**{input_name: batch})
    assert set(out) == set(documented)  # the response's keys are the signature's outputs
    assert out["probabilities"].shape == (1, len(classes)) and out["label"].numpy()[0].decode() in classes


def test_the_documented_python_decoding_reads_pixels_as_the_job_does(tmp_path):
    """The LiteRT/ONNX example's decoding, run as written, gives the pixels TensorFlow decodes (before the resize,
    which differs a little by design): Pillow's convert("RGB") had turned a 16-bit grey PNG all white."""
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    block = re.search(r"```python\n(import json, numpy as np\n.*?)```", SERVING, re.S).group(1)
    decoding = block[:block.index("pixels = ")].replace("info = json.load", "# info = json.load")
    decoding = decoding.replace('h, w = info["input"]["shape"][1:3]', "")
    rng = np.random.default_rng(0)
    images = {"grey16.png": Image.fromarray(rng.integers(0, 65536, (9, 7)).astype(np.uint16)),
              "rgb.png": Image.fromarray(rng.integers(0, 256, (9, 7, 3)).astype(np.uint8)),
              "grey.png": Image.fromarray(rng.integers(0, 256, (9, 7)).astype(np.uint8)),
              "rgba.png": Image.fromarray(rng.integers(0, 256, (9, 7, 4)).astype(np.uint8))}
    for name, made in images.items():
        made.save(tmp_path / name)
        scope: dict = {}
        exec(decoding.replace("rose.jpg", str(tmp_path / name)), scope)  # noqa: S102 (the README's own lines)
        read = np.asarray(scope["image"].convert("RGB"))
        decoded = tf.io.decode_image((tmp_path / name).read_bytes(), channels=3, expand_animations=False).numpy()
        np.testing.assert_array_equal(read, decoded, err_msg=name)
