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
from pathlib import Path

import probes
import quality
import tensorflow as tf

ALPHAS = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def interpolated(tuned_dir: Path, head_dir: Path, classes: list[str], folder: Path) -> dict:
    tuned, head = tf.saved_model.load(str(tuned_dir)), tf.saved_model.load(str(head_dir))
    # matched by name: SavedModels written before b3e3bd8 stored them in an order of their own
    heads = {h.name: h for h in head.model_variables}
    assert len(heads) == len(head.model_variables) == len(tuned.model_variables), "variable names are not unique"
    pairs = [(v, heads[v.name]) for v in tuned.model_variables]
    assert all(v.shape == h.shape for v, h in pairs), "the two models' variables differ"
    ends = [(v, v.numpy(), h.numpy()) for v, h in pairs]
    serve = tuned.signatures["serving_default"]
    data = {split: probes.split_files(classes, folder / split) for split in ("validation", "test")}
    out = {}
    for a in ALPHAS:
        for v, ft, lp in ends:
            v.assign(lp + a * (ft - lp) if ft.dtype.kind == "f" else ft)
        out[str(a)] = {split: probes.scores(probes.probabilities(serve, images), labels)
                       for split, (images, labels) in data.items()}
    return out


def main(argv: list[str]) -> int:
    with probes.session(argv, "wise-probe-") as p:
        for task in p.tasks:
            for seed in p.seeds:
                key = f"{task}, {p.backbone}, s{seed}"
                if key in p.results:
                    continue
                recipes = (("job_default", {}), ("job_head_only", quality.COMPARISON["job_head_only"]))
                runs = {name: quality.job_run(task, seed, name, extra, p.tmp, p.env, backbone=p.backbone)
                        for name, extra in recipes}
                art = {name: p.tmp / "runs" / f"{task}-{p.backbone}-{name}-s{seed}" for name in runs}
                classes = (art["job_default"] / "labels.txt").read_text().split()
                p.results[key] = {"alphas": interpolated(art["job_default"] / "saved_model",
                                                         art["job_head_only"] / "saved_model", classes,
                                                         p.folders[task]),
                                  "job": {name: {k: r[k] for k in ("validation", "test", "seconds")}
                                          for name, r in runs.items()}}
                p.out.write_text(json.dumps(p.results, indent=1) + "\n")
                print(key, {a: (round(s["validation"]["accuracy"], 3), round(s["validation"]["loss"], 3),
                                round(s["test"]["accuracy"], 3)) for a, s in p.results[key]["alphas"].items()},
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
