"""Peak RSS of the cached-features path alone (job.dataset.cached_features + one shuffled epoch of
feature_dataset) for N images, 1280 float32 features each (MobileNetV2's), from a tiny stand-in extractor.

    .venv/bin/python bench/feature_rss.py 7000 70000 [--tree DIR]

`--tree` imports `job` from another checkout (say, `git archive v0.2 job | tar -x -C /tmp/old`), to set
two versions side by side. Each N runs in its own process; prints one line per N (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path


def measure(n: int) -> str:
    import keras
    import numpy as np  # noqa: F401
    import tensorflow as tf

    from job import dataset

    x = keras.Input((8,))
    extractor = keras.Model(x, keras.layers.Dense(1280)(x))
    batches = tf.data.Dataset.range(n).map(
        lambda i: (tf.random.stateless_normal([8], tf.stack([i, i])), tf.cast(i % 10, tf.int32))).batch(256)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    before = rss()
    features, labels = dataset.cached_features(extractor, batches, n, ["bench", n], Path(tempfile.mkdtemp()))
    written = rss()
    for _ in dataset.feature_dataset(features, labels, 128, shuffle=True, seed=0):
        pass
    return (f"n={n}: features {features.nbytes / 2**20:.0f} MiB; peak RSS {before:.0f} MiB before, {written:.0f} "
            f"after writing them, {rss():.0f} after an epoch ({dataset.__file__})")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("counts", type=int, nargs="+")
    p.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent))
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        sys.path.insert(0, args.tree)
        print(measure(args.counts[0]), flush=True)
        return 0
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for n in args.counts:
        subprocess.run([sys.executable, __file__, str(n), "--tree", args.tree, "--one"], check=True, env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
