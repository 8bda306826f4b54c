"""Markdown tables of a bench/quality.py result, written into docs/QUALITY.md between markers.

The prose of docs/QUALITY.md is written by people; only the text between
`<!-- quality:NAME -->` and `<!-- /quality:NAME -->` is replaced, so a re-run refreshes the numbers
and leaves the reading of them alone.
"""

from __future__ import annotations

from pathlib import Path

LABELS = {
    "job_default": "**job, defaults**",
    "keras_seeds_recipe": "plain Keras, seeds' recipe",
    "keras_job_recipe": "plain Keras, job's recipe",
    "keras_job_recipe_batch_16": "plain Keras, job's recipe, batch 16",
    "job_v02_defaults": "job, 0.2's defaults (no search, no average)",
    "job_average_on": "job, defaults + moving average (2 epochs)",
    "job_head_only": "job, head only (lower bound)",
    # A lower bound on the transfer tasks, and alone on fashion-easy-200, where from scratch must learn.
    "job_weights_none": "job, `weights: none` (from scratch)",
    "job_class_weight_none": "job, `class_weight: none`",
    "keras_sigmoid_recipe": "plain Keras, sigmoid, job's recipe",
}


def _multilabel(r: dict) -> bool:
    return bool(r["task"].get("multi_label"))


def _pm(stat: dict, scale: float = 100.0) -> str:
    return f"{stat['mean'] * scale:.1f} ± {stat['std'] * scale:.1f}"


def comparison_tables(report: dict) -> str:
    lines = []
    tasks = {t: r for t, r in report["tasks"].items() if not _multilabel(r)}  # multi-label: multilabel_tables
    if not tasks:
        return "(no single-label task in this run)"
    names = [n for n in dict.fromkeys(n for r in tasks.values() for n in r["recipes"])  # some only on some tasks
             if n in LABELS]  # the candidates' rows: candidates_table
    counts = {len(x["runs"]) for r in tasks.values() for x in r["recipes"].values()}
    single = "" if counts == {1} else " ¹"  # a results file merged from parts: mark the cells of one seed
    lines.append("Test accuracy, % (mean ± std over seeds " + ", ".join(map(str, report["seeds"])) + ")"
                 + (f"; {single.strip()} one seed only (seed 1)" if single else "") + ":")
    lines.append("")
    lines.append("| task | " + " | ".join(LABELS.get(n, n) for n in names) + " | job − seeds' script | "
                 "**job − best script** |")
    lines.append("|---|" + "---|" * (len(names) + 2))
    acceptance = report.get("acceptance", {})
    margins, best = (acceptance.get(k, {}) for k in ("job_minus_keras_test_accuracy",
                                                      "job_minus_best_script_test_accuracy"))
    for task, r in tasks.items():
        cells = [_pm(r["recipes"][n]["test_accuracy"]) + (single if len(r["recipes"][n]["runs"]) == 1 else "")
                 if n in r["recipes"] else "" for n in names]
        margin = f"{margins[task] * 100:+.1f}" if task in margins else ""
        over_best = f"**{best[task] * 100:+.1f}**" if task in best else ""
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {margin} | {over_best} |")
    lines.append("")
    lines.append("Imbalanced and per-class view (test, %): macro-F1 and balanced accuracy, and validation "
                 "accuracy (what the defaults were chosen on); mean wall time per run in seconds:")
    lines.append("")
    lines.append("| task | recipe | macro-F1 | balanced acc. | validation acc. | s/run |")
    lines.append("|---|---|---|---|---|---|")
    for task, r in tasks.items():
        for n in names:
            if n in r["recipes"]:
                s = r["recipes"][n]
                lines.append(f"| {task} | {LABELS.get(n, n)} | {_pm(s['test_macro_f1'])} | "
                             f"{_pm(s['test_balanced_accuracy'])} | {_pm(s['validation_accuracy'])} | "
                             f"{s['seconds']:.0f} |")
    return "\n".join(lines)


def candidates(report: dict) -> list[str]:
    """The rows that are the defaults with one change (bench/quality.py's CHOICES beyond the labelled ones)."""
    return [n for n in dict.fromkeys(n for r in report["tasks"].values() for n in r["recipes"]) if n not in LABELS]


def candidates_table(report: dict) -> str:
    """Issue 20's candidates, each the defaults with one change on the same files and seeds: per task, the change in
    validation accuracy (what a default is chosen on) and in test accuracy against the defaults, in points."""
    tasks = {t: r for t, r in report["tasks"].items() if not _multilabel(r)}
    lines = ["Each row is the defaults (`job_default`) with one change, on the same files and seeds (mean over the "
             "seeds both have). Δ in accuracy points against the defaults, on validation (what a default is chosen "
             "on), then on test; seconds per run of the change and of the defaults:", "",
             "| change | task | seeds | Δ validation | Δ test | test, change | s/run, change / defaults |",
             "|---|---|---|---|---|---|---|"]
    for name in candidates(report):
        for task, r in tasks.items():
            row, base = r["recipes"].get(name), r["recipes"].get("job_default")
            if not row or not base:
                continue
            seeds = sorted({x["seed"] for x in row["runs"]} & {x["seed"] for x in base["runs"]})

            def mean(x: dict, split: str, seeds=seeds) -> float:
                values = [run[split]["accuracy"] for run in x["runs"] if run["seed"] in seeds]
                return sum(values) / len(values)

            delta = {split: (mean(row, split) - mean(base, split)) * 100 for split in ("validation", "test")}
            lines.append(f"| `{name}` | {task} | {len(seeds)} | {delta['validation']:+.1f} | {delta['test']:+.1f} | "
                         f"{mean(row, 'test') * 100:.1f} | {row['seconds']:.0f} / {base['seconds']:.0f} |")
    return "\n".join(lines)


def multilabel_tables(report: dict) -> str:
    """The multi-label task's rows: mAP and micro-F1 (%, mean ± std over seeds) and the job's margin in mAP."""
    tasks = {t: r for t, r in report["tasks"].items() if _multilabel(r)}
    if not tasks:
        return "(no multi-label task in this run)"
    margins = report.get("acceptance", {}).get("job_minus_keras_test_map", {})
    lines = ["Multi-label, % (mean ± std over seeds " + ", ".join(map(str, report["seeds"])) + "); mAP is the macro "
             "mean average precision, micro-F1 at each row's thresholds; mean wall time per run in seconds:", "",
             "| task | recipe | test mAP | test micro-F1 | validation mAP | validation micro-F1 | s/run |",
             "|---|---|---|---|---|---|---|"]
    for task, r in tasks.items():
        for n, s in r["recipes"].items():
            lines.append(f"| {task} | {LABELS.get(n, n)} | {_pm(s['test_map'])} | {_pm(s['test_micro_f1'])} | "
                         f"{_pm(s['validation_map'])} | {_pm(s['validation_micro_f1'])} | {s['seconds']:.0f} |")
    lines += ["", "job − Keras, test mAP in points: " + (", ".join(f"{t} {m * 100:+.1f}" for t, m in margins.items())
                                                        or "(not both rows)") + "."]
    lines += ["", "Images and positives per label (train / validation / test):", "",
              "| task | images | " + " | ".join(_labels(tasks)) + " |", "|---|---|" + "---|" * len(_labels(tasks))]
    for task, r in tasks.items():
        info, splits = r["task"], ("train", "validation", "test")
        cells = [" / ".join(str(info["positives"][sp].get(c, "")) for sp in splits) if c in info["classes"] else ""
                 for c in _labels(tasks)]
        lines.append(f"| {task} | {' / '.join(str(info['images'][sp]) for sp in splits)} | " + " | ".join(cells) + " |")
    conditions = report.get("multilabel_conditions", {})
    if conditions:
        lines += ["", "Conditions of the multi-label rows (the rest as in the comparison's):", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in conditions.items()]
    return "\n".join(lines)


def _labels(tasks: dict) -> list[str]:
    return sorted({c for r in tasks.values() for c in r["task"]["classes"]})


def formats_table(report: dict) -> str:
    """Each exported format of one default run, checked by the job on the task's test images."""
    for task, r in report["tasks"].items():
        for run in r["recipes"].get("job_default", {}).get("runs", []):
            if "formats" in run:
                lines = [f"{task}, seed {run['seed']}, the job's default recipe exporting every format, each checked "
                         f"by the job in its own runtime on the task's test images:", "",
                         "| format | test accuracy | agreement with the SavedModel | accuracy drop, points | size | "
                         "latency, 1 image |", "|---|---|---|---|---|---|"]
                reference = run["formats"]["saved_model"]["accuracy"]
                for fmt, f in run["formats"].items():
                    if "error" in f:
                        lines.append(f"| {fmt} | {f['error']} | | | | |")
                        continue
                    agreement = "reference" if fmt == "saved_model" else f"{f['agreement'] * 100:.1f}%"
                    lines.append(f"| {fmt} | {f['accuracy'] * 100:.1f}% | {agreement} | "
                                 f"{(reference - f['accuracy']) * 100:.1f} | {f['bytes'] / 1e6:.1f} MB | "
                                 f"{f['latency_ms_batch1']:.2f} ms |")
                return "\n".join(lines)
    return "(no run exported every format)"


def ablation_tables(report: dict) -> str:
    """One row per recipe choice: its mean validation and test accuracy over tasks and seeds, and the change
    against the default, per task in validation points."""
    tasks = report["tasks"]
    names = list(dict.fromkeys(n for t in tasks.values() for n in t["recipes"]))  # a row on one task only too
    lines = ["Each row is the default with one choice changed. Δ is in accuracy points against the default (mean "
             "over seeds): per task on **validation** (what a default is chosen on) / on test, then the mean over "
             "tasks on validation and on test; seconds per run, mean over tasks.",
             "", "| recipe | " + " | ".join(f"Δ {t}, val / test" for t in tasks)
             + " | Δ val mean | Δ test mean | s/run |",
             "|---|" + "---|" * (len(tasks) + 3)]

    def avg(xs: list[float]) -> str:
        return f"{sum(xs) / len(xs) * 100:+.1f}" if xs else ""

    def mean(task: str, name: str, split: str) -> float | None:
        r = tasks[task]["recipes"].get(name)
        return r[f"{split}_accuracy"]["mean"] if r else None

    for n in names:
        cells, dv, dt, seconds = [], [], [], []
        for task in tasks:
            v, d = mean(task, n, "validation"), mean(task, "default", "validation")
            if v is None or d is None:
                cells.append("")
                continue
            dv.append(v - d)
            dt.append(mean(task, n, "test") - mean(task, "default", "test"))
            cells.append(f"{dv[-1] * 100:+.1f} / {dt[-1] * 100:+.1f}")
            seconds.append(tasks[task]["recipes"][n]["seconds"])
        per_run = f"{sum(seconds) / len(seconds):.0f}" if seconds else ""
        lines.append(f"| `{n}` | " + " | ".join(cells) + f" | {avg(dv)} | {avg(dt)} | {per_run} |")
    lines.append("")
    lines.append("The default, % (validation / test): " + ", ".join(
        f"{t} {_pm(tasks[t]['recipes']['default']['validation_accuracy'])} / "
        f"{_pm(tasks[t]['recipes']['default']['test_accuracy'])}" for t in tasks
        if "default" in tasks[t]["recipes"]) + ".")
    return "\n".join(lines)


def conditions_table(report: dict) -> str:
    m = report["machine"]
    rows = [("when", f"{report['started']}, {report['seconds'] / 60:.0f} min"),
            ("machine", f"{m['cpu_model']}, {m['cores']} cores, no GPU; load average "
                        f"{report['load_average']['before'][0]} before, {report['load_average']['after'][0]} after"),
            ("software", f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, Python {m['python']}")]
    rows += list(report["conditions"].items())
    for p in report.get("parts", []):
        load = p["load_average"]
        rows.append((f"part: {p['file']}", f"{p['started']}, {p['minutes']} min, load average {load['before'][0]} "
                     f"before, {load['after'][0]} after; backbones {', '.join(p['backbones'])}; "
                     f"rows {', '.join(p['recipes'])}"))
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def refresh(path: Path, report: dict) -> None:
    kind = report["kind"]
    blocks = {f"{kind}": comparison_tables(report) if kind == "comparison" else ablation_tables(report),
              f"{kind}-conditions": conditions_table(report)}
    if kind == "comparison" and candidates(report):
        blocks["candidates"] = candidates_table(report)
    if kind == "comparison":  # a run without an exported-formats run or a multi-label task leaves those tables
        if any("formats" in run for r in report["tasks"].values() for run in r["recipes"].get("job_default", {}).get(
                "runs", [])):
            blocks["formats"] = formats_table(report)
        if any(_multilabel(r) for r in report["tasks"].values()):
            blocks["multilabel"] = multilabel_tables(report)
    write_blocks(path, "quality", blocks)


def write_blocks(path: Path, prefix: str, blocks: dict[str, str]) -> None:
    """Replace the text between `<!-- PREFIX:NAME -->` and `<!-- /PREFIX:NAME -->` with each block's body
    (appended at the end where the markers are missing); the rest of the file is left as it is."""
    text = path.read_text() if path.exists() else ""
    for name, body in blocks.items():
        start, end = f"<!-- {prefix}:{name} -->", f"<!-- /{prefix}:{name} -->"
        block = f"{start}\n{body}\n{end}"
        if start in text and end in text:
            text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
        else:
            text += f"\n{block}\n"
    path.write_text(text)
