"""`make bench-quality`: the job's default recipe against a plain-Keras script on transfer tasks.

    .venv/bin/python bench/quality.py [--quick] [--ablation] [--seeds 3] [--tasks a,b] [--recipes a,b]

A MobileNetV2 base is pre-trained once on Fashion-MNIST *source* classes (cached in bench/cache/),
then every task transfers it to *target* classes it never saw (bench/quality_data.py). On each task,
side by side on exactly the same image files, for each seed:

- `job_default`: `finetune-job train` as a subprocess, data and weights in S3 on 127.0.0.1, with a config
  that names only data, backbone, weights, image size and seed (plus where to write and no metrics port);
- `keras_seeds_recipe`: bench/keras_recipe.py, the seeds' recipe as a user would write it in Keras;
- lower bounds: `job_head_only` (no fine-tuning) and `job_weights_none` (no pre-trained base); the latter
  also alone on `fashion-easy-200` (three distinct classes, 200 images each), where from scratch must learn.

The multi-label task (`fashion-multilabel`: 2x2 mosaics of target items, labels in a `labels.jsonl` manifest,
64x64) has its own two rows, scored by mean average precision and micro-F1: `job_default` (`task: multi_label`,
`data.manifest`) and `keras_sigmoid_recipe` (bench/keras_multilabel.py, the job's default recipe with sigmoid
outputs as a user would write it in Keras). It is in the comparison only, not the ablation.

`--ablation` runs instead one recipe per row, each the default with one choice changed, and reports
what each choice is worth on validation accuracy (how the defaults were chosen) and on test accuracy.
Results: bench/results/quality.json (or quality-ablation.json) and the tables of docs/QUALITY.md.
`--quick` is the comparison on two tiny tasks (one single-label, one multi-label) and one seed, without the
choices' rows and from scratch, for the test suite: it checks only that it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import quality_data  # noqa: E402
from run import S3Server, child_env, load_average, log, machine  # noqa: E402

CLI = str(Path(sys.executable).parent / "finetune-job")
BUCKET = "quality"
IMAGE_SIZE = [32, 32]
SOURCE = {"full": {"per_class": 2000, "epochs": 10, "batch_size": 32, "augment": True, "bn_momentum": 0.9},
          "quick": {"per_class": 40, "epochs": 2, "batch_size": 16, "augment": False, "bn_momentum": 0.8}}

FORMATS_TASK = "fashion-60"
ALL_FORMATS = ["saved_model", "tf_serving", "tflite", "tflite_int8", "onnx"]
SCORES = ("accuracy", "loss", "macro_f1", "balanced_accuracy")  # of each run, from the job's metrics.json
SUMMARY = ("accuracy", "macro_f1", "balanced_accuracy")  # mean ± std over seeds

# The multi-label task's rows (comparison only): what each run adds to `multilabel_data`'s config.
MULTILABEL = {
    "job_default": {},
    "keras_sigmoid_recipe": None,  # bench/keras_multilabel.py
    # The multi-label choices, measured on validation like the single-label ablation: the single-label fine-tuning
    # rate (the multi-label default is job.recipe.MULTI_LABEL_FINETUNE_RATE), no positive weights, early stopping
    # on validation mAP instead of the loss.
    "job_finetune_lr_1e-4": {"train": {"finetune": {"learning_rate": 1.0e-4}}},
    "job_positive_weight_none": {"train": {"class_weight": "none"}},
    "job_early_stopping_val_map": {"train": {"early_stopping_metric": "val_map"}},
}
MULTILABEL_IMAGE_SIZE = [2 * quality_data.MOSAIC_CELL] * 2  # the mosaics' own size: nothing is resized
MULTILABEL_SCORES = ("map", "micro_f1", "macro_f1", "subset_accuracy", "loss")
MULTILABEL_SUMMARY = ("map", "micro_f1")
KERAS_THRESHOLD = 0.5  # what a simple script does; the job picks its thresholds on validation (thresholds.json)

# The comparison: what each run adds to the config that names only data, backbone, weights, size and seed.
COMPARISON = {
    "job_default": {},
    "keras_seeds_recipe": None,  # bench/keras_recipe.py
    "keras_job_recipe": None,  # bench/keras_job_recipe.py: the strongest simple script (issue 20)
    "keras_job_recipe_batch_16": None,  # the same at batch 16
    "job_head_only": {"train": {"finetune": {"epochs": 0}}},
    # 0.2's defaults: fine-tuning at 1e-4 alone, no search, no moving average (issue 20: today's time and scores).
    "job_v02_defaults": {"train": {"search": {"learning_rates": []}, "finetune": {"average_epochs": 0.0}}},
    # The defaults plus a moving average of the fine-tuned weights over 2 epochs (measured, not a default).
    "job_average_on": {"train": {"finetune": {"average_epochs": 2.0}}},
    # A longer fine-tune (its cap binds on many runs: the best epoch is often the 9th or 10th), and the head's too.
    "job_finetune_epochs_20": {"train": {"finetune": {"epochs": 20}}},
    "job_epochs_20": {"train": {"head": {"epochs": 20}, "finetune": {"epochs": 20}}},
    # Smaller batches: more steps per epoch where an epoch is a few steps (15 images per class: 3 at 32).
    "job_batch_16": {"train": {"batch_size": 16}},
    # A third, lower rate in the search (the losing ones cost a rung each).
    "job_search_3e-5": {"train": {"search": {"learning_rates": [1.0e-4, 3.0e-4, 3.0e-5]}}},
    # Once validation has chosen, trained again on training + validation images (train.refit).
    "job_refit": {"train": {"refit": True}},
    # Early stopping that lets the 10 fine-tuning epochs run (the best epoch still kept).
    "job_patience_10": {"train": {"early_stopping_patience": 10}},
    # Where an epoch is 3 steps (15 images per class at batch 32), patience 3 stops after 9 steps without a better
    # validation loss and 10 epochs cap the fine-tuning at 30 steps: what a floor in steps (patience >= 30 steps,
    # fine-tuning >= 100) would make of fashion-15 (the larger tasks have >= 10 steps an epoch: unchanged).
    "job_patience_10_finetune_34": {"train": {"early_stopping_patience": 10, "finetune": {"epochs": 34}}},
    # The two choices the ablation of 2026-12-05 (MobileNetV2) found ahead on validation on most tasks, for the
    # other backbone: augmentation during fine-tuning (the preset, flip + translation) and label smoothing.
    "job_finetune_augment": {"train": {"finetune": {"augment": True}}},
    "job_label_smoothing_0.1": {"train": {"label_smoothing": 0.1}},
    # Layer-wise rate decay (issue 20's last candidate): the base's first layer at 0.3 of the rate, geometric to the
    # full rate at its last layer and the head.
    "job_layer_decay_0.3": {"train": {"finetune": {"layer_decay": 0.3}}},
    "job_weights_none": {"model": {"weights": "none"}},
    # Only on the imbalanced task (on balanced ones `auto` weights every class 1): what `auto` does.
    "job_class_weight_none": {"train": {"class_weight": "none"}},
}
# The comparison's rows that measure the defaults' choices (0.2's recipe, each choice alone): the full bench only.
CHOICES = {"job_v02_defaults", "job_average_on", "job_finetune_epochs_20", "job_epochs_20",
           "job_batch_16", "job_search_3e-5", "job_refit",
           "job_patience_10", "job_patience_10_finetune_34", "job_finetune_augment", "job_label_smoothing_0.1",
           "job_layer_decay_0.3", "keras_job_recipe_batch_16"}
# Not in the quick mode either: training from scratch (20 epochs, the quick mode's longest run: 71 s of its 248 s
# alone here) is run end to end by tests/e2e/test_from_scratch.py, its schedule included.
QUICK_LEFT_OUT = {"job_weights_none"}
# A script and its arguments after the backbone; the strongest simple script also at batch 16 (issue 20: a script
# can take a smaller batch as easily as the job).
SCRIPTS = {"keras_seeds_recipe": ("keras_recipe.py",), "keras_job_recipe": ("keras_job_recipe.py",),
           "keras_job_recipe_batch_16": ("keras_job_recipe.py", "16")}
# The bench's backbones, each pre-trained here the same way on the source classes; the first is the default one
# (its results are keyed by the task's name alone, the others' by "task, backbone").
BACKBONES = ("mobilenet_v2", "efficientnet_b0")
MINORITY_ONLY = {"job_class_weight_none", "class_weight_none"}
# Training from scratch on an easy task (comparison only): three distinct Fashion-MNIST classes, 200 training
# images each. On the transfer tasks `weights: none` is a lower bound far under the others; here it must learn
# (issue 17: it used to exit 0 with a constant classifier at chance). Only the from-scratch row runs on it.
SCRATCH_TASK = quality_data.Task("fashion-easy-200", "fashion", 200, 50, 200, classes=("trouser", "bag", "sneaker"),
                                 note="three distinct classes, 200 training images each: from scratch must learn")
SCRATCH_RECIPES = {"job_weights_none"}
# The ablation: the default with one choice changed per row (docs/QUALITY.md, "What each choice is worth"). Setting
# train.finetune.learning_rate turns the search off (job/config.py), so `search_off` is fine-tuning at 1e-4 alone
# (0.2's recipe) and the two rate rows are that rate alone. Not rows: choices the comparison's candidates measured on
# both backbones (batch 16, 20 fine-tuning epochs: bit for bit the default, the refit), and a second augmentation
# (0.2's ablation: flip + rotation + zoom hurt as flip + translation did).
ABLATION = {
    "default": {},
    "search_off": {"train": {"search": {"learning_rates": []}}},
    "finetune_lr_3e-4": {"train": {"finetune": {"learning_rate": 3.0e-4}}},
    "finetune_lr_3e-5": {"train": {"finetune": {"learning_rate": 3.0e-5}}},
    "finetune_unfreeze_30": {"train": {"finetune": {"unfreeze": 30}}},
    "finetune_augment_true": {"train": {"finetune": {"augment": True}}},
    "average_2": {"train": {"finetune": {"average_epochs": 2.0}}},
    "lr_schedule_cosine": {"train": {"lr_schedule": "cosine"}},
    "label_smoothing_0.1": {"train": {"label_smoothing": 0.1}},
    "early_stopping_val_accuracy": {"train": {"early_stopping_metric": "val_accuracy"}},
    "weight_decay_0.01": {"train": {"weight_decay": 0.01}},
    "head_units_0": {"model": {"head_units": 0}},
    "class_weight_none": {"train": {"class_weight": "none"}},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- one run of each kind


def task_key(task: str, backbone: str) -> str:
    return task if backbone == BACKBONES[0] else f"{task}, {backbone}"


def pretrained_base(mode: str, cache: Path, env: dict, backbone: str = BACKBONES[0]) -> Path:
    """The source-pretrained base (a .weights.h5 file), trained once per parameters and backbone."""
    params = {**SOURCE[mode], "backbone": backbone, "size": IMAGE_SIZE, "classes": quality_data.SOURCE}
    out = cache / f"base-{quality_data.source_key(params)}.weights.h5"
    if out.is_file():
        return out
    log(f"pre-training the base on {len(quality_data.SOURCE)} source classes x {params['per_class']} images "
        f"(once, cached in {out.parent})")
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; import quality_data as q; "
            "from job.sample_data import pretrain_base; p = json.loads(sys.argv[2]); "
            "x, y = q.source_images(p['per_class']); "
            "pretrain_base(x, y, Path(sys.argv[3]), epochs=p['epochs'], batch_size=p['batch_size'], "
            "augment=p['augment'], bn_momentum=p['bn_momentum'], backbone=p['backbone'])")
    tmp = out.with_name(f"part-{out.name}")
    subprocess.run([sys.executable, "-c", code, str(HERE), json.dumps(params), str(tmp)], check=True, env=env)
    tmp.replace(out)
    return out


def multilabel_data(task: str) -> dict:
    """The config that makes a job run multi-label on the task's manifest (not a recipe choice: the data)."""
    return {"task": "multi_label", "data": {"manifest": f"s3://{BUCKET}/tasks/{task}/{quality_data.MANIFEST}",
                                            "image_size": MULTILABEL_IMAGE_SIZE}}


def upload(s3, mode: str, cache: Path, env: dict, backbones: list[str], tasks: list) -> tuple[dict, dict]:
    """The backbones' pre-trained bases and the tasks' files (written once under `cache`) into the S3 server, where
    `job_run` reads them: ({backbone: base file}, {task name: local folder})."""
    bases = {b: pretrained_base(mode, cache, env, b) for b in backbones}
    items = [(BUCKET, f"weights/{b}.weights.h5", path) for b, path in bases.items()]
    folders = {}
    for task in tasks:
        folders[task.name] = quality_data.write_task(task, cache / "tasks")
        items += [(BUCKET, f"tasks/{task.name}/{p.relative_to(folders[task.name]).as_posix()}", p)
                  for p in sorted(folders[task.name].rglob("*.png"))]
        if task.multi_label:
            items.append((BUCKET, f"tasks/{task.name}/{quality_data.MANIFEST}",
                          folders[task.name] / quality_data.MANIFEST))
    s3.upload(items)
    return bases, folders


def job_run(task: str, seed: int, name: str, extra: dict, tmp: Path, env: dict, scores: tuple = SCORES,
            backbone: str = BACKBONES[0]) -> dict:
    """`finetune-job train` on the task in S3 (artifacts to a local folder); the scores of its metrics.json."""
    run_id = f"{task}-{backbone}-{name}-s{seed}"
    cfg = merge({
        "run_id": run_id,
        "data": {"uri": f"s3://{BUCKET}/tasks/{task}", "image_size": IMAGE_SIZE,
                 "cache_dir": str(tmp / "cache" / run_id)},
        "model": {"backbone": backbone, "weights": f"s3://{BUCKET}/weights/{backbone}.weights.h5"},
        "train": {"seed": seed},
        "output": {"uri": str(tmp / "runs")},
        "metrics": {"port": 0, "linger_seconds": 0},
        "export": {"formats": ["saved_model"]},  # the other formats are checked by `make bench`
    }, extra)
    path = tmp / f"{run_id}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.monotonic()
    with open(tmp / f"{run_id}.log", "w") as out:
        p = subprocess.run([CLI, "train", "--config", str(path)], stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{run_id}: finetune-job exited {p.returncode}; log: {tmp / f'{run_id}.log'}")
    reports = json.loads((tmp / "runs" / run_id / "metrics.json").read_text())
    history = json.loads((tmp / "runs" / run_id / "history.json").read_text())
    search = json.loads((tmp / "runs" / run_id / "manifest.json").read_text()).get("search")
    out = {**{split: _scores(reports[split], scores) for split in ("validation", "test")},
           "seconds": round(seconds, 1), "epochs": {phase: len(records) for phase, records in history.items()},
           **({"search": search} if search else {})}
    if len(reports.get("formats", {})) > 1:
        out["formats"] = reports["formats"]
    return out


def _scores(report: dict, keys: tuple = SCORES) -> dict:
    return {k: round(report[k], 4) for k in keys}


def script_run(script: str, folder: Path, weights: Path, seed: int, tmp: Path, env: dict,
               name: str, *extra: str) -> tuple[dict, float]:
    """(its result JSON, seconds) of a plain-Keras script in bench/ on the task's local files (the very files
    uploaded to S3)."""
    result = tmp / f"{name}.json"
    t0 = time.monotonic()
    with open(tmp / f"{name}.log", "w") as out:
        p = subprocess.run([sys.executable, str(HERE / script), str(folder), str(weights), str(seed), str(result),
                            *extra], stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{name}: {script} exited {p.returncode}; log: {tmp / f'{name}.log'}")
    return json.loads(result.read_text()), seconds


def keras_run(script: str, folder: Path, weights: Path, seed: int, tmp: Path, env: dict, name: str,
              backbone: str, *args: str) -> dict:
    """A plain-Keras script in bench/ (keras_recipe.py, keras_job_recipe.py) on the task's local files."""
    from job import evaluate

    raw, seconds = script_run(script, folder, weights, seed, tmp, env, name, backbone, *args)
    out = {"seconds": round(seconds, 1), **({"epochs": raw["epochs"]} if "epochs" in raw else {})}
    for split in ("validation", "test"):
        import numpy as np

        labels = np.asarray(raw[split]["labels"])
        classes = sorted(p.name for p in (folder / "train").iterdir())
        probs = np.eye(len(classes), dtype=np.float32)[raw[split]["predicted"]]  # one-hot: accuracy, F1, recall
        report = evaluate.report(probs, labels, classes)
        out[split] = {**_scores(report), "loss": round(raw[split]["loss"], 4)}
    return out


def keras_multilabel_run(folder: Path, weights: Path, seed: int, tmp: Path, env: dict, name: str) -> dict:
    """bench/keras_multilabel.py on the task's local files, its scores scored by the job's own code
    (job.multilabel) at the threshold a simple script uses."""
    import numpy as np

    from job import multilabel

    raw, seconds = script_run("keras_multilabel.py", folder, weights, seed, tmp, env, name)
    classes = raw["classes"]
    out = {"seconds": round(seconds, 1), "epochs": raw["epochs"]}
    for split in ("validation", "test"):
        scores, truth = np.asarray(raw[split]["scores"], np.float32), np.asarray(raw[split]["truth"])
        report = multilabel.report(scores, truth, [KERAS_THRESHOLD] * len(classes), classes)
        out[split] = _scores(report, MULTILABEL_SCORES)
    return out


# ---------------------------------------------------------------- the benchmark


def summarize(runs: list[dict], keys: tuple = SUMMARY) -> dict:
    """mean ± std (sample std over seeds) of each score."""
    out = {}
    for split in ("validation", "test"):
        for key in keys:
            values = [r[split][key] for r in runs]
            out[f"{split}_{key}"] = {"mean": round(statistics.mean(values), 4),
                                     "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}
    out["seconds"] = round(statistics.mean(r["seconds"] for r in runs), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny tasks, one seed: shows that it runs")
    parser.add_argument("--ablation", action="store_true", help="one row per recipe choice instead")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--first-seed", type=int, default=1, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    parser.add_argument("--recipes", default="", help="comma-separated recipe names (default: all)")
    parser.add_argument("--backbones", default="", help="comma-separated (default: all of BACKBONES; quick: the first)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other tasks' and recipes' results of the existing --out file (runs in parts)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--docs", default=None, help="markdown file whose tables to refresh ('' for none)")
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (seconds per run are then inflated)")
    parser.add_argument("--report", default="", help="comma-separated result files of one kind: merge them into "
                        "--out and refresh --docs from them, running nothing (the tables from the JSON)")
    args = parser.parse_args(argv)
    if args.report:
        return report_only([Path(f) for f in args.report.split(",")], args.out, args.docs)
    mode = "quick" if args.quick else "full"
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or (1 if args.quick else 3))))
    kind = "ablation" if args.ablation else "comparison"
    recipes = ABLATION if args.ablation else COMPARISON
    if args.recipes:
        recipes = {k: v for k, v in recipes.items() if k in args.recipes.split(",")}
    every_task = quality_data.tasks(args.quick) + ([SCRATCH_TASK] if not args.quick and not args.ablation else [])
    if not args.ablation:
        every_task += quality_data.multilabel_tasks(args.quick)
    multilabel_recipes = {k: v for k, v in MULTILABEL.items() if not args.recipes or k in args.recipes.split(",")}
    if args.quick:  # the comparison only: the choices' rows are measured by the full bench
        multilabel_recipes = {k: v for k, v in multilabel_recipes.items()
                              if k in ("job_default", "keras_sigmoid_recipe")}
        recipes = {k: v for k, v in recipes.items() if k not in CHOICES | QUICK_LEFT_OUT}

    def recipes_of(task: quality_data.Task) -> dict:
        return multilabel_recipes if task.multi_label else recipes

    tasks = [t for t in every_task if not args.tasks or t.name in args.tasks.split(",")]
    out_path = args.out or ROOT / "bench" / "results" / ("quality-ablation.json" if args.ablation else "quality.json")
    docs = Path(args.docs) if args.docs else None if args.docs == "" or args.quick else ROOT / "docs" / "QUALITY.md"

    # quick mode and the ablation: the first backbone unless asked (the comparison's candidates cover the other)
    first_only = args.quick or args.ablation
    backbones = args.backbones.split(",") if args.backbones else list(BACKBONES[:1] if first_only else BACKBONES)
    started = time.time()
    before = load_average()
    args.cache.mkdir(parents=True, exist_ok=True)
    s3 = S3Server()
    results: dict = {}
    try:
        env = child_env(s3.endpoint)
        bases, folders = upload(s3, mode, args.cache, env, backbones, tasks)
        with tempfile.TemporaryDirectory(prefix="bench-quality-") as t:
            tmp = Path(t)

            def one(item):
                task, seed, name, backbone = item
                if task.multi_label:
                    return {"seed": seed, **multilabel_one(task, seed, name, bases[backbone])}
                extra = recipes[name]
                if extra is None:
                    script, *args = SCRIPTS[name]
                    r = keras_run(script, folders[task.name], bases[backbone], seed, tmp, env,
                                  f"{task.name}-{backbone}-{name}-s{seed}", backbone, *args)
                else:
                    if (task.name, seed, name, backbone) == (FORMATS_TASK, seeds[0], "job_default", BACKBONES[0]):
                        # The same run (the recipe is untouched) exporting every format: issue 11's check on
                        # real images. Determinism makes its accuracy the same as without the formats.
                        extra = merge(extra, {"export": {"formats": ALL_FORMATS}})
                    r = job_run(task.name, seed, name, extra, tmp, env, backbone=backbone)
                log(f"{task_key(task.name, backbone)} seed {seed} {name}: test {r['test']['accuracy']:.3f} "
                    f"val {r['validation']['accuracy']:.3f} ({r['seconds']:.0f} s)")
                return {"seed": seed, **r}

            def multilabel_one(task, seed, name, base):
                run_id = f"{task.name}-{name}-s{seed}"
                extra = MULTILABEL[name]
                if extra is None:
                    r = keras_multilabel_run(folders[task.name], base, seed, tmp, env, run_id)
                else:
                    r = job_run(task.name, seed, name, merge(multilabel_data(task.name), extra), tmp, env,
                                MULTILABEL_SCORES)
                log(f"{task.name} seed {seed} {name}: test mAP {r['test']['map']:.3f} "
                    f"micro-F1 {r['test']['micro_f1']:.3f} val mAP {r['validation']['map']:.3f} "
                    f"({r['seconds']:.0f} s)")
                return r

            # Recipes alternate within a seed, so that load from elsewhere falls on all of them alike.
            # The multi-label task, the from-scratch task and the scripts that know only MobileNetV2: first backbone.
            items = [(task, seed, name, b) for b in backbones for task in tasks for seed in seeds
                     for name in recipes_of(task)
                     if (name not in MINORITY_ONLY or task.minority)
                     and (task is not SCRATCH_TASK or name in SCRATCH_RECIPES)
                     and (b == BACKBONES[0] or not (task.multi_label or task is SCRATCH_TASK))]
            with ThreadPoolExecutor(args.jobs) as pool:
                done = list(pool.map(one, items))
            for b in backbones:
                for task in tasks:
                    runs = {name: [r for (t_, _, n, b_), r in zip(items, done) if t_ is task and n == name and b_ == b]
                            for name in recipes_of(task)}
                    keys = MULTILABEL_SUMMARY if task.multi_label else SUMMARY
                    recipes_done = {k: {"runs": v, **summarize(v, keys)} for k, v in runs.items() if v}
                    if recipes_done:
                        results[task_key(task.name, b)] = {"task": {**task_info(task, folders[task.name]),
                                                                    "backbone": b}, "recipes": recipes_done}
    finally:
        s3.close()
    if args.merge and out_path.is_file():
        results = merged(json.loads(out_path.read_text())["tasks"], results)
    report = {
        "kind": kind, "mode": mode, "seeds": seeds,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1), "machine": machine(),
        "load_average": {"before": before, "after": load_average()},
        "conditions": conditions(mode, kind), "tasks": results,
        # the pre-trained bases' digests: runs compare like for like only on the same bases (pre-training on
        # another machine can give other weights, and then other scores for the same seed)
        "bases": {b: hashlib.sha256(path.read_bytes()).hexdigest()[:16] for b, path in bases.items()},
    }
    if any(r["task"]["multi_label"] for r in results.values()):
        report["multilabel_conditions"] = multilabel_conditions()
    if kind == "comparison":
        report["acceptance"] = acceptance(results)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out_path}")
    if docs is not None:
        import quality_report

        quality_report.refresh(docs, report)
        log(f"refreshed the {kind} tables of {docs}")
    return 0


def report_only(files: list[Path], out: Path | None, docs: str | None) -> int:
    """One report from the results of several runs of the bench (its parts, e.g. one backbone or recipe each), with
    each part's own conditions listed; the docs' tables regenerated from it."""
    reports = [json.loads(f.read_text()) for f in files]
    if len({r["kind"] for r in reports}) != 1:
        raise SystemExit("--report: the files are of different kinds (comparison, ablation)")
    report = dict(reports[0])
    for other in reports[1:]:
        report["tasks"] = merged(report["tasks"], other["tasks"])
    # "when": the first part's start, the parts' minutes added up; the load before the first and after the last
    report["seconds"] = round(sum(r["seconds"] for r in reports), 1)
    report["load_average"] = {"before": reports[0]["load_average"]["before"],
                              "after": reports[-1]["load_average"]["after"]}
    report["seeds"] = sorted({run["seed"] for t in report["tasks"].values() for r in t["recipes"].values()
                              for run in r["runs"]})
    # this bench's description (the ablation's lists no scripts)
    kept = {k: v for k, v in report["conditions"].items()
            if report["kind"] == "comparison" or not k.startswith("keras_")}
    report["conditions"] = {**kept, **conditions(report["mode"], report["kind"])}
    report["parts"] = [{"file": f.name, "started": r["started"], "minutes": round(r["seconds"] / 60),
                        "load_average": r["load_average"], "backbones": sorted({t["task"].get("backbone", BACKBONES[0])
                                                                                for t in r["tasks"].values()}),
                        "recipes": sorted({n for t in r["tasks"].values() for n in t["recipes"]})}
                       for f, r in zip(files, reports)]
    if report["kind"] == "comparison":
        report["acceptance"] = acceptance(report["tasks"])
    out = out or ROOT / "bench" / "results" / f"quality{'-ablation' if report['kind'] == 'ablation' else ''}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {out}")
    if docs != "":
        import quality_report

        quality_report.refresh(Path(docs) if docs else ROOT / "docs" / "QUALITY.md", report)
        log(f"refreshed the {report['kind']} tables of {docs or 'docs/QUALITY.md'}")
    return 0


def merged(old: dict, new: dict) -> dict:
    """The results of an earlier run with this run's put in: a recipe's runs of other seeds are kept beside the new
    ones (a seed run again replaces its old run), and its mean ± std recomputed over them all."""
    out = {k: {**v, "recipes": dict(v["recipes"])} for k, v in old.items()}
    for key, r in new.items():
        recipes = out.setdefault(key, {"task": r["task"], "recipes": {}})["recipes"]
        for name, result in r["recipes"].items():
            seeds = {run["seed"] for run in result["runs"]}
            runs = [run for run in recipes.get(name, {}).get("runs", []) if run["seed"] not in seeds]
            runs = sorted(runs + result["runs"], key=lambda run: run["seed"])
            keys = MULTILABEL_SUMMARY if r["task"].get("multi_label") else SUMMARY
            recipes[name] = {"runs": runs, **summarize(runs, keys)}
    return out


def task_info(task: quality_data.Task, folder: Path) -> dict:
    """The task as the results describe it; a multi-label one with its positives per split and label."""
    out = task.__dict__ | {"classes": list(task.classes), "multi_label": task.multi_label}
    if task.multi_label:
        rows = quality_data.read_manifest(folder)
        out["images"] = {s: sum(r["split"] == s for r in rows) for s in ("train", "validation", "test")}
        out["positives"] = quality_data.label_counts(rows)
    return out


def conditions(mode: str, kind: str = "comparison") -> dict:
    """The bench's description for the conditions table; the ablation's without the scripts it does not run."""
    out = {
        "backbone": f"{BACKBONES[0]}; {', '.join(BACKBONES[1:])} (results keyed 'task, backbone'), pre-trained alike",
        "image_size": IMAGE_SIZE,
        "base": f"MobileNetV2 pre-trained here from scratch on Fashion-MNIST {', '.join(quality_data.SOURCE)}: "
                + ", ".join(f"{k} {v}" for k, v in SOURCE[mode].items())
                + f"; the targets are {', '.join(quality_data.TARGET)} (fashion tasks) and drawn shapes",
        "storage": "moto S3 server on 127.0.0.1: the job stages the data and the weights from it and writes its "
                   "artifacts and checkpoints to local disk; the Keras script reads the same files from local disk",
        "job_config": "names only data.uri, data.image_size, model.backbone, model.weights, train.seed "
                      "(plus run_id, output.uri, data.cache_dir and metrics.port 0, which do not touch the recipe): "
                      "everything else is the default",
        "keras_job_recipe": "bench/keras_job_recipe.py: the job's default recipe in Keras: Dense 256 + dropout 0.5 "
                            "head up to 10 epochs at 1e-3 on the frozen base; every base layer but BatchNormalization "
                            "up to 10 epochs at 1e-4; BatchNormalization in inference mode; early stopping on val_loss "
                            "patience 3 restoring the best weights; balanced class weights; batch 32",
        "keras_job_recipe_batch_16": "the same script at batch 16 (bench/keras_job_recipe.py ... 16)",
        "keras_seeds_recipe": "bench/keras_recipe.py: Dense 128 + dropout 0.3 head, 10 epochs at 1e-3 on the frozen "
                              "base; top 30 layers 5 epochs at 1e-4; BatchNormalization in inference mode; early "
                              "stopping patience 3 restoring the best weights; batch 64",
        "std": "sample standard deviation over seeds",
        "determinism": "the job runs with TensorFlow op determinism: the same seed gives the same result "
                       "whatever the load, so seeds measure the recipe's own variance",
    }
    if kind == "ablation":
        out = {k: v for k, v in out.items() if not k.startswith("keras_")}
        out["rows"] = ("each the job_config above with the one change its name says (bench/quality.py ABLATION); "
                       "class_weight_none on the imbalanced task only")
    return out


def multilabel_conditions() -> dict:
    c, blank = quality_data.MOSAIC_CELL, quality_data.MOSAIC_BLANK
    return {
        "images": f"{2 * c}x{2 * c} PNG mosaics of 2x2 cells of {c}x{c}: each cell blank (black, p {blank}) or a "
                  f"Fashion-MNIST item of a target class (28x28 resized to {c}x{c} bilinear, as the base's "
                  f"pre-training images); the labels of an image are the classes present (none to four); train "
                  f"and validation items from Fashion-MNIST's training split, test items from its test split",
        "image_size": MULTILABEL_IMAGE_SIZE,
        "job_config": "the comparison's, plus task: multi_label, data.manifest (labels.jsonl with a split column) "
                      f"and data.image_size {MULTILABEL_IMAGE_SIZE}: everything else is the default",
        "keras_sigmoid_recipe": "bench/keras_multilabel.py: the job's default recipe as a Keras script: Dense 256 "
                                "+ dropout 0.5 head with one sigmoid per label, binary cross-entropy, up to 10 "
                                "epochs at 1e-3 on the frozen base; every base layer but BatchNormalization up to "
                                "10 epochs at 1e-4; BatchNormalization in inference mode; early stopping on val_loss "
                                "patience 3 restoring the best weights; batch 32",
        "scores": "both rows scored by the job's own code (job.multilabel): mAP = macro mean average precision "
                  f"(threshold-free); micro-F1 at the job's thresholds (chosen on validation, so its validation "
                  f"F1 is optimistic) and at {KERAS_THRESHOLD} for the Keras script",
    }


def acceptance(results: dict) -> dict:
    """Issue 9's bar (the job against the seeds' script); issue 20's: the job's defaults at least 1.5 points of test
    accuracy above the best simple script (the better of the seeds' and the job's own recipe in Keras) on every
    fashion task of every backbone, and below it on none; and the multi-label task's test mAP against the Keras
    sigmoid script (issue 18)."""
    seeds_margin, best_margin, multilabel = {}, {}, {}
    for task, r in results.items():
        rec = r["recipes"]
        job = rec.get("job_default")
        if not job:
            continue
        if "keras_seeds_recipe" in rec:
            keras = rec["keras_seeds_recipe"]["test_accuracy"]["mean"]
            seeds_margin[task] = round(job["test_accuracy"]["mean"] - keras, 4)
        scripts = [rec[n]["test_accuracy"]["mean"] for n in SCRIPTS if n in rec]
        if scripts:
            best_margin[task] = round(job["test_accuracy"]["mean"] - max(scripts), 4)
        if "keras_sigmoid_recipe" in rec:
            multilabel[task] = round(job["test_map"]["mean"] - rec["keras_sigmoid_recipe"]["test_map"]["mean"], 4)
    fashion = {t: m for t, m in best_margin.items() if t.startswith("fashion")}
    return {"job_minus_keras_test_accuracy": seeds_margin,
            "job_minus_best_script_test_accuracy": best_margin,
            "fashion_at_least_0.015_over_best_script": all(m >= 0.015 for m in fashion.values()) if fashion else None,
            "never_below_best_script": all(m >= 0 for m in best_margin.values()) if best_margin else None,
            "job_minus_keras_test_map": multilabel}

if __name__ == "__main__":
    sys.exit(main())
