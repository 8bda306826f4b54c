"""What flip test-time augmentation would be worth on the job's default models (issue 20's candidate), measured
before building it into the exported signature.

    .venv/bin/python bench/flip_probe.py TASKS BACKBONE SEEDS OUT.json     e.g. fashion-15,fashion-60 mobilenet_v2 1

Runs the job's defaults as the quality bench does (`quality.job_run`, the task and the weights in an S3 server on
127.0.0.1), then scores the exported SavedModel through its bytes-in signature on the validation and test files:
the images as they are (`plain`), mirrored (`flip`), and the mean of the two softmax outputs (`tta`).
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import quality
import quality_data
import tensorflow as tf
from run import S3Server, child_env


def score(serve, classes: list[str], folder: Path) -> dict:
    """Accuracy and loss of the plain, mirrored and averaged softmax outputs on one split's files."""
    files = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / c).glob("*.png"))]
    raw = [p.read_bytes() for p, _ in files]
    mirrored = [tf.io.encode_png(tf.image.flip_left_right(tf.io.decode_png(b))).numpy() for b in raw]
    labels = np.array([i for _, i in files])

    def probabilities(images: list[bytes]) -> np.ndarray:
        return np.concatenate([serve(image_bytes=tf.constant(images[i:i + 256]))["probabilities"].numpy()
                               for i in range(0, len(images), 256)])

    plain, flip = probabilities(raw), probabilities(mirrored)
    out = {}
    for name, probs in (("plain", plain), ("flip", flip), ("tta", (plain + flip) / 2)):
        right = probs[np.arange(len(labels)), labels]
        out[name] = {"accuracy": float((probs.argmax(1) == labels).mean()),
                     "loss": float(-np.log(np.clip(right, 1e-7, 1)).mean())}
    return out


def main(argv: list[str]) -> int:
    tasks, backbone, seeds, out_path = argv[0].split(","), argv[1], [int(s) for s in argv[2].split(",")], Path(argv[3])
    cache = Path(__file__).resolve().parent / "cache"
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    s3 = S3Server()
    try:
        env = child_env(s3.endpoint)
        _, folders = quality.upload(s3, "full", cache, env, [backbone],
                                    [t for t in quality_data.tasks(False) if t.name in tasks])
        with tempfile.TemporaryDirectory(prefix="flip-probe-") as d:
            tmp = Path(d)
            for task in tasks:
                for seed in seeds:
                    r = quality.job_run(task, seed, "job_default", {}, tmp, env, backbone=backbone)
                    artifacts = tmp / "runs" / f"{task}-{backbone}-job_default-s{seed}"
                    classes = (artifacts / "labels.txt").read_text().split()
                    serve = tf.saved_model.load(str(artifacts / "saved_model")).signatures["serving_default"]
                    key = f"{task}, {backbone}, s{seed}"
                    results[key] = {**{split: score(serve, classes, folders[task] / split)
                                       for split in ("validation", "test")},
                                    "job": {k: r[k] for k in ("validation", "test")}}
                    out_path.write_text(json.dumps(results, indent=1) + "\n")
                    print(key, {split: {k: round(v["accuracy"], 3) for k, v in results[key][split].items()}
                                for split in ("validation", "test")}, flush=True)
    finally:
        s3.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
