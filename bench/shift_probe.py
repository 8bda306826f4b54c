"""What shift test-time augmentation would be worth on the job's default models (issue 20's test-time augmentation
candidate, label-preserving this time: the flip probe showed that mirrored Fashion-MNIST items are not the same
class to the fine-tuned models), measured before building anything into the exported signature.

    .venv/bin/python bench/shift_probe.py TASKS BACKBONE SEEDS OUT.json    e.g. fashion-15 mobilenet_v2 1,2,3

Runs the job's defaults as the quality bench does, then scores the exported SavedModel through its bytes-in signature
on the validation and test files: each image as it is and moved by 1 and 2 pixels up, down, left and right (the
edge rows repeated into the gap), and the mean of the softmax outputs of the image and its four 1-pixel moves
(`tta5_1px`, 5x the serving cost), of its four 2-pixel moves (`tta5_2px`), and of all nine (`tta9`).
"""
import sys

import numpy as np
import probes
import tensorflow as tf

MOVES = {f"{axis}{sign * step:+d}": (axis, sign * step) for step in (1, 2) for sign in (1, -1) for axis in "yx"}
MEANS = {"tta5_1px": [m for m in MOVES if m.endswith("1")], "tta5_2px": [m for m in MOVES if m.endswith("2")],
         "tta9": list(MOVES)}


def moved(encoded: bytes, axis: str, by: int) -> bytes:
    """The image moved `by` pixels along `axis`, the edge row (column) repeated into the gap, as PNG."""
    pixels = tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy()
    pad = [(max(by, 0), max(-by, 0)) if a == axis else (0, 0) for a in "yx"] + [(0, 0)]
    padded = np.pad(pixels, pad, mode="edge")
    h, w = pixels.shape[:2]
    start = max(-by, 0)
    out = padded[start:start + h] if axis == "y" else padded[:, start:start + w]
    return tf.io.encode_png(out).numpy()


def score(serve, classes: list[str], folder) -> dict:
    raw, labels = probes.split_files(classes, folder)
    probs = {"plain": probes.probabilities(serve, raw)}
    for name, (axis, by) in MOVES.items():
        probs[name] = probes.probabilities(serve, [moved(b, axis, by) for b in raw])
    out = {name: probes.scores(p, labels) for name, p in probs.items()}
    for name, members in MEANS.items():
        out[name] = probes.scores(np.mean([probs["plain"], *(probs[m] for m in members)], axis=0), labels)
    return out


def main(argv: list[str]) -> int:
    probes.score_defaults(argv, "shift-probe-", score,
                          lambda scores: {k: round(scores[k]["accuracy"], 3) for k in ("plain", *MEANS)})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
