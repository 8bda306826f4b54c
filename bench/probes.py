"""What the probes (`flip_probe.py`, `shift_probe.py`, `wise_probe.py`, `ensemble_probe.py`) share: their
arguments, the tasks and bases in an S3 server on 127.0.0.1 as the quality bench has them, the defaults' run, and
scoring an exported SavedModel through its bytes-in signature."""
import contextlib
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import quality
import quality_data
import tensorflow as tf
from run import S3Server, child_env


@contextlib.contextmanager
def session(argv: list[str], prefix: str):
    """TASKS BACKBONE SEEDS OUT.json -> (tasks, backbone, seeds, out: the result file, results: what it holds,
    env and folders for `quality.job_run`, tmp: a folder for the runs), with the task data uploaded."""
    tasks, backbone, seeds, out = argv[0].split(","), argv[1], [int(s) for s in argv[2].split(",")], Path(argv[3])
    s3 = S3Server()
    try:
        env = child_env(s3.endpoint)
        _, folders = quality.upload(s3, "full", Path(__file__).resolve().parent / "cache", env, [backbone],
                                    [t for t in quality_data.tasks(False) if t.name in tasks])
        with tempfile.TemporaryDirectory(prefix=prefix) as d:
            yield SimpleNamespace(tasks=tasks, backbone=backbone, seeds=seeds, out=out, env=env, folders=folders,
                                  tmp=Path(d), results=json.loads(out.read_text()) if out.exists() else {})
    finally:
        s3.close()


def defaults_run(p: SimpleNamespace, task: str, seed: int) -> tuple[dict, list[str], object]:
    """The job's defaults on the task, as the quality bench runs them: (its scores, its classes, its exported
    SavedModel's bytes-in signature)."""
    result = quality.job_run(task, seed, "job_default", {}, p.tmp, p.env, backbone=p.backbone)
    artifacts = p.tmp / "runs" / f"{task}-{p.backbone}-job_default-s{seed}"
    serve = tf.saved_model.load(str(artifacts / "saved_model")).signatures["serving_default"]
    return result, (artifacts / "labels.txt").read_text().split(), serve


def split_files(classes: list[str], folder: Path) -> tuple[list[bytes], np.ndarray]:
    """One split's PNG files (bytes) and their class indices."""
    files = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / c).glob("*.png"))]
    return [p.read_bytes() for p, _ in files], np.array([i for _, i in files])


def probabilities(serve, images: list[bytes]) -> np.ndarray:
    return np.concatenate([serve(image_bytes=tf.constant(images[i:i + 256]))["probabilities"].numpy()
                           for i in range(0, len(images), 256)])


def scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    right = probs[np.arange(len(labels)), labels]
    return {"accuracy": float((probs.argmax(1) == labels).mean()),
            "loss": float(-np.log(np.clip(right, 1e-7, 1)).mean())}


def score_defaults(argv: list[str], prefix: str, score, shown) -> None:
    """The defaults' run per task and seed, each split scored by `score(serve, classes, folder) -> {name: scores}`;
    results keyed "task, backbone, sSEED" into OUT.json after each run (a key already there is not run again), and
    `shown(scores of one split) -> dict` printed."""
    with session(argv, prefix) as p:
        for task in p.tasks:
            for seed in p.seeds:
                key = f"{task}, {p.backbone}, s{seed}"
                if key in p.results:
                    continue
                r, classes, serve = defaults_run(p, task, seed)
                p.results[key] = {**{split: score(serve, classes, p.folders[task] / split)
                                     for split in ("validation", "test")},
                                  "job": {k: r[k] for k in ("validation", "test")}}
                p.out.write_text(json.dumps(p.results, indent=1) + "\n")
                print(key, {split: shown(p.results[key][split]) for split in ("validation", "test")}, flush=True)
