"""MODEL_CARD.md of a run, in the manner of Hugging Face model cards: what the model is, what it was
trained on, how well it does (per split and per exported format), how to use it, and where it is weak.
Pure text from the run's own numbers; no TensorFlow.
"""

from __future__ import annotations

LOW_RECALL = 0.8  # classes below this recall on the headline split are named as a known limit


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def render(run_id: str, config: dict, classes: list[str], counts: dict[str, dict[str, int]], reports: dict,
           formats: dict[str, dict], bad_images: int, versions: dict[str, str]) -> str:
    data, model, train = config["data"], config["model"], config["train"]
    h, w = data["image_size"]
    split = "test" if "test" in reports else "validation"
    lines = [
        "---",
        "library_name: keras",
        "pipeline_tag: image-classification",
        f"tags: [finetune-job, {model['backbone']}, transfer-learning]",
        "---",
        "",
        f"# {run_id}: an image classifier of {len(classes)} classes",
        "",
        f"A `keras.applications` **{model['backbone']}** (weights: `{model['weights']}`) fine-tuned by "
        f"finetune-job {versions.get('finetune_job', '')} (TensorFlow {versions.get('tensorflow', '')}) on "
        f"`{data['uri']}`. Classes, in output order: {', '.join(f'`{c}`' for c in classes)}.",
        "",
        "## Intended input",
        "",
        f"Photos or images like the training data, any size: they are resized to {h}x{w} (bilinear, "
        "antialiased, no crop, so the aspect ratio is not kept) and must show one object of one of the classes "
        "above. The SavedModel takes encoded JPEG/PNG/BMP/GIF bytes; LiteRT and ONNX take decoded RGB pixels "
        "(0..255, resized), as the JSON beside each file says. Every image gets one of these classes: "
        "there is no \"none of them\".",
        "",
        "## Training data",
        "",
        "| class | " + " | ".join(counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(str(counts[s].get(c, 0)) for s in counts) + " |")
    lines.append("| **total** | " + " | ".join(str(sum(counts[s].values())) for s in counts) + " |")
    lines += ["", f"{bad_images} image(s) were skipped as undecodable or too large (listed in metrics.json).", "",
              "## Training recipe", "",
              f"- head: {train['head']['epochs']} epochs at {train['head']['learning_rate']} "
              f"({train['head']['mode']}), augment: {train['head']['augment']}",
              f"- fine-tuning: {train['finetune']['epochs']} epochs at {train['finetune']['learning_rate']}, "
              f"unfreeze: {train['finetune']['unfreeze']}, augment: {train['finetune']['augment']}",
              f"- batch {train['batch_size']}, seed {train['seed']}, early stopping on "
              f"{train['early_stopping_metric']} (patience {train['early_stopping_patience']}), label smoothing "
              f"{train['label_smoothing']}, weight decay {train['weight_decay']}, schedule {train['lr_schedule']}, "
              f"class weights {train['class_weight']}",
              "- the complete resolved configuration is `config.yaml`", "", "## Results", "",
              "| split | images | accuracy | macro-F1 | balanced accuracy | loss |", "|---|---|---|---|---|---|"]
    for name, r in reports.items():
        lines.append(f"| {name} | {r['examples']} | {_pct(r['accuracy'])} | {_pct(r['macro_f1'])} | "
                     f"{_pct(r['balanced_accuracy'])} | {r['loss']:.3f} |")
    lines += ["", f"### Exported formats (checked on the {split} split)", "",
              "| format | accuracy | agreement with the SavedModel | size | latency, 1 image, CPU |",
              "|---|---|---|---|---|"]
    for fmt, r in formats.items():
        if "error" in r:
            lines.append(f"| {fmt} | not written: {r['error']} | | | |")
            continue
        agreement = "reference" if fmt == "saved_model" else _pct(r.get("agreement"))
        lines.append(f"| {fmt} | {_pct(r['accuracy'])} | {agreement} | {r['bytes'] / 1e6:.1f} MB | "
                     f"{r['latency_ms_batch1']:.1f} ms |")
    lines += ["", "## Known limits", ""]
    per_class = reports.get(split, {}).get("per_class", {})
    weak = sorted((v["recall"], c) for c, v in per_class.items() if v["recall"] < LOW_RECALL)
    for recall, c in weak:
        lines.append(f"- `{c}`: recall {_pct(recall)} on {split} (its images are often given another class).")
    if not weak:
        lines.append(f"- every class has a recall of at least {_pct(LOW_RECALL)} on {split}.")
    small = min((sum(v.values()) for v in counts.values()), default=0)
    lines += [f"- the smallest split has {small} images: accuracy moves by several points from one sample to "
              "the next at that size.",
              "- the model knows only these classes and has not been checked for fairness or robustness.", "",
              "## How to use", "",
              "```python", "import tensorflow as tf",
              "serve = tf.saved_model.load(\"saved_model\").signatures[\"serving_default\"]",
              "out = serve(image_bytes=tf.constant([open(\"image.jpg\", \"rb\").read()]))",
              "print(out[\"label\"].numpy(), out[\"probabilities\"].numpy())", "```", "",
              "Or `finetune-job predict --model <this run> image.jpg [--format tflite|tflite_int8|onnx]`.", ""]
    return "\n".join(lines)
