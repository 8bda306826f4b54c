"""What flip test-time augmentation would be worth on the job's default models (issue 20's candidate), measured
before building it into the exported signature.

    .venv/bin/python bench/flip_probe.py TASKS BACKBONE SEEDS OUT.json     e.g. fashion-15,fashion-60 mobilenet_v2 1

Runs the job's defaults as the quality bench does (`quality.job_run`, the task and the weights in an S3 server on
127.0.0.1), then scores the exported SavedModel through its bytes-in signature on the validation and test files:
the images as they are (`plain`), mirrored (`flip`), and the mean of the two softmax outputs (`tta`).
"""
import sys
from pathlib import Path

import probes
import tensorflow as tf


def score(serve, classes: list[str], folder: Path) -> dict:
    """Accuracy and loss of the plain, mirrored and averaged softmax outputs on one split's files."""
    raw, labels = probes.split_files(classes, folder)
    mirrored = [tf.io.encode_png(tf.image.flip_left_right(tf.io.decode_png(b))).numpy() for b in raw]
    plain, flip = probes.probabilities(serve, raw), probes.probabilities(serve, mirrored)
    return {name: probes.scores(probs, labels) for name, probs in (("plain", plain), ("flip", flip),
                                                                   ("tta", (plain + flip) / 2))}


def main(argv: list[str]) -> int:
    probes.score_defaults(argv, "flip-probe-", score,
                          lambda scores: {k: round(v["accuracy"], 3) for k, v in scores.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
