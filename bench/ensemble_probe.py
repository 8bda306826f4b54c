"""What averaging the predictions of several runs of the job's defaults would be worth (issue 20's sixth round):
the ceiling of what more training compute buys on the fashion tasks, measured before building anything.

    .venv/bin/python bench/ensemble_probe.py TASKS BACKBONE SEEDS OUT.json     e.g. fashion-15 mobilenet_v2 1,2,3

Runs the job's defaults once per seed as the quality bench does, scores each exported SavedModel through its
bytes-in signature on the validation and test files, then scores the mean of the softmax outputs of every pair of
seeds and of all of them (an ensemble of k runs costs k runs' training and k models' serving).
"""
import itertools
import json
import sys

import numpy as np
import probes

SPLITS = ("validation", "test")


def main(argv: list[str]) -> int:
    with probes.session(argv, "ensemble-probe-") as p:
        for task in p.tasks:
            key = f"{task}, {p.backbone}"
            if key in p.results:
                continue
            probs, labels, runs = {}, {}, {}
            for seed in p.seeds:
                runs[seed], classes, serve = probes.defaults_run(p, task, seed)
                for split in SPLITS:
                    images, labels[split] = probes.split_files(classes, p.folders[task] / split)
                    probs[seed, split] = probes.probabilities(serve, images)
            members = [c for k in range(1, len(p.seeds) + 1) for c in itertools.combinations(p.seeds, k)]
            p.results[key] = {
                "ensembles": {",".join(map(str, c)): {
                    split: probes.scores(np.mean([probs[s, split] for s in c], axis=0), labels[split])
                    for split in SPLITS} for c in members},
                "job": {f"s{s}": {k: r[k] for k in ("validation", "test", "seconds")} for s, r in runs.items()}}
            p.out.write_text(json.dumps(p.results, indent=1) + "\n")
            print(key, {c: round(s["test"]["accuracy"], 3) for c, s in p.results[key]["ensembles"].items()},
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
