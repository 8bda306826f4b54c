"""Which export formats convert reliably, for every backbone of the registry (what `export.formats`
defaults to: job.formats.DEFAULT_FORMATS).

    .venv/bin/python bench/formats.py [--quick] [--out bench/results/formats.json]

For each backbone: the job's model (base + head, random weights: conversion does not depend on the
values) at the backbone's smallest size of at least 64 px, exported as the job exports it (the SavedModel
with its two signatures), then each format converted with job.formats.convert and run in its own runtime
on 8 random images: it converts, it runs, and its probabilities are within 0.02 of the SavedModel's
(float formats), or it converts and runs (int8, whose accuracy the job checks on real images).
Each backbone runs in a process of its own (bench/formats.py --one NAME).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

TOLERANCE = 0.02


def one(name: str, work: Path) -> dict:
    import keras
    import numpy as np

    from job import backbones, export, formats, model

    spec = backbones.get(name)
    size = (max(64, spec.min_size),) * 2
    keras.utils.set_random_seed(0)
    parts = model.build(name, None, size, 5, 64, 0.0)
    folder = work / name
    t0 = time.monotonic()
    export.write_saved_model(parts.model, [f"c{i}" for i in range(5)], size, folder / "saved_model")
    out: dict = {"image_size": list(size), "saved_model_seconds": round(time.monotonic() - t0, 1)}
    pixels = np.random.default_rng(0).integers(0, 256, (8, *size, 3)).astype(np.uint8)
    reference = formats.runner("saved_model", folder / "saved_model").predict(pixels)
    for fmt in ("tflite", "tflite_int8", "onnx"):
        t0 = time.monotonic()
        try:
            path = formats.convert(fmt, folder, parts.model, size, iter([pixels]), [f"c{i}" for i in range(5)])
            probs = formats.runner(fmt, path).predict(pixels)
            diff = float(np.abs(probs - reference).max())
            ok = bool(np.isfinite(probs).all() and probs.shape == reference.shape
                      and (fmt == "tflite_int8" or diff <= TOLERANCE))
            out[fmt] = {"ok": ok, "max_abs_diff": round(diff, 5), "bytes": path.stat().st_size}
        except Exception as e:  # noqa: BLE001 - a failed conversion is the measurement
            out[fmt] = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
        out[fmt]["seconds"] = round(time.monotonic() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small backbones only")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "formats.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        args.out.write_text(json.dumps(one(args.one, args.work)))
        return 0
    from job.backbones import BACKBONES

    names = ["mobilenet_v2", "efficientnet_b0"] if args.quick else list(BACKBONES)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as t:
        for name in names:
            result = Path(t) / f"{name}.json"
            p = subprocess.run([sys.executable, __file__, "--one", name, "--work", t, "--out", str(result)],
                               capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            results[name] = json.loads(result.read_text()) if p.returncode == 0 else {
                "error": p.stderr.strip().splitlines()[-1][:300] if p.stderr.strip() else f"exit {p.returncode}"}
            print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    reliable = [fmt for fmt in ("tflite", "tflite_int8", "onnx")
                if all(r.get(fmt, {}).get("ok") for r in results.values())]
    report = {"backbones": results, "reliable_for_every_backbone": reliable, "tolerance": TOLERANCE}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"reliable for every backbone: {', '.join(reliable) or 'none'}; wrote {args.out}", file=sys.stderr)
    if not args.quick:
        import quality_report

        quality_report.write_blocks(HERE.parent / "docs" / "BENCHMARKS.md", "formats", {"matrix": matrix(report)})
    return 0


def matrix(report: dict) -> str:
    """Markdown: one row per backbone, whether each format converts and runs (and its largest difference
    in probability from the SavedModel), or the error."""
    fmts = ("tflite", "tflite_int8", "onnx")
    lines = ["| backbone | size | " + " | ".join(f"`{f}`" for f in fmts) + " |", "|---|---|" + "---|" * len(fmts)]
    for name, r in report["backbones"].items():
        if "error" in r:
            lines.append(f"| {name} | | {r['error']} | | |")
            continue
        cells = [("ok" if c["ok"] else "**fails**") + (f" (max diff {c['max_abs_diff']})" if "max_abs_diff" in c
                                                       else f": {c.get('error', '')[:120]}") for c in map(r.get, fmts)]
        lines.append(f"| {name} | {r['image_size'][0]} px | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Reliable for every backbone: " + (", ".join(f"`{f}`" for f in report["reliable_for_every_backbone"])
                                                    or "none") + f" (float tolerance {report['tolerance']}).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
