"""What interpolating the fine-tuned weights back towards the head-only model would be worth (weight-space
ensembling, "WiSE-FT", Wortsman et al. 2022; issue 20's fifth round), measured before building it into the job.

    .venv/bin/python bench/wise_probe.py TASKS BACKBONE SEEDS OUT.json     e.g. fashion-15,fashion-60 mobilenet_v2 1

Runs the job's defaults and the head-only run (`train.finetune.epochs: 0`: the same head phase, so the weights the
fine-tuning starts from) as the quality bench does, then scores the defaults' exported SavedModel through its
bytes-in signature with its variables set to (1 - a) * head-only + a * fine-tuned for each a of ALPHAS, on the
validation and test files. BatchNormalization's statistics are the same in both (inference mode throughout).
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

ALPHAS = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def split_files(classes: list[str], folder: Path) -> tuple[list[bytes], np.ndarray]:
    files = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / c).glob("*.png"))]
    return [p.read_bytes() for p, _ in files], np.array([i for _, i in files])


def score(serve, images: list[bytes], labels: np.ndarray) -> dict:
    probs = np.concatenate([serve(image_bytes=tf.constant(images[i:i + 256]))["probabilities"].numpy()
                            for i in range(0, len(images), 256)])
    right = probs[np.arange(len(labels)), labels]
    return {"accuracy": float((probs.argmax(1) == labels).mean()),
            "loss": float(-np.log(np.clip(right, 1e-7, 1)).mean())}


def interpolated(tuned_dir: Path, head_dir: Path, classes: list[str], folder: Path) -> dict:
    tuned, head = tf.saved_model.load(str(tuned_dir)), tf.saved_model.load(str(head_dir))
    # matched by name: the order of a concrete function's captured variables differs from process to process
    heads = {h.name: h for h in head.model_variables}
    assert len(heads) == len(head.model_variables) == len(tuned.model_variables), "variable names are not unique"
    pairs = [(v, heads[v.name]) for v in tuned.model_variables]
    assert all(v.shape == h.shape for v, h in pairs), "the two models' variables differ"
    ends = [(v, v.numpy(), h.numpy()) for v, h in pairs]
    serve = tuned.signatures["serving_default"]
    data = {split: split_files(classes, folder / split) for split in ("validation", "test")}
    out = {}
    for a in ALPHAS:
        for v, ft, lp in ends:
            v.assign(lp + a * (ft - lp) if ft.dtype.kind == "f" else ft)
        out[str(a)] = {split: score(serve, *data[split]) for split in data}
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
        with tempfile.TemporaryDirectory(prefix="wise-probe-") as d:
            tmp = Path(d)
            for task in tasks:
                for seed in seeds:
                    key = f"{task}, {backbone}, s{seed}"
                    if key in results:
                        continue
                    runs = {name: quality.job_run(task, seed, name, extra, tmp, env, backbone=backbone)
                            for name, extra in (("job_default", {}), ("job_head_only", quality.COMPARISON[
                                "job_head_only"]))}
                    art = {name: tmp / "runs" / f"{task}-{backbone}-{name}-s{seed}" for name in runs}
                    classes = (art["job_default"] / "labels.txt").read_text().split()
                    results[key] = {"alphas": interpolated(art["job_default"] / "saved_model",
                                                           art["job_head_only"] / "saved_model", classes,
                                                           folders[task]),
                                    "job": {name: {k: r[k] for k in ("validation", "test", "seconds")}
                                            for name, r in runs.items()}}
                    out_path.write_text(json.dumps(results, indent=1) + "\n")
                    print(key, {a: (round(s["validation"]["accuracy"], 3), round(s["validation"]["loss"], 3),
                                    round(s["test"]["accuracy"], 3)) for a, s in results[key]["alphas"].items()},
                          flush=True)
    finally:
        s3.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
