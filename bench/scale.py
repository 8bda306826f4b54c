"""`make bench-scale`: all 70,000 Fashion-MNIST images through one run, three ways, on this machine.

    .venv/bin/python bench/scale.py [--quick] [--out bench/results/scale.json]

The images (Debian `dataset-fashion-mnist`, written once as PNGs into bench/cache/scale/) go into an S3
server on 127.0.0.1 as 70,000 objects, are described by a CSV manifest, and are packed into tar shards
(`finetune-job pack`). For each way, `finetune-job validate`, then `finetune-job train` (staging, the
bad-image check, cached features, head 1 epoch, fine-tuning 2 epochs, evaluation, export of the
SavedModel; the base is a random MobileNetV2 saved once and staged from the same S3 server, since
`model.weights: none` would skip the head phase and train from scratch), with the stage seconds from
the run's manifest, objects/s and bytes/s of staging, peak RSS (wait4) and the disk the cache took; the
shards once more with `data.staging: stream`. A bare paginated boto3 listing of the same bucket is the
yardstick for `validate`, and a copy run on a tenth of the images the one for memory. `--quick` does
the same with 350 images on a MobileNet (v1) base, without train.search's trials, for the test suite: every
upload, the manifest and the pack, then two of the ways (QUICK_WAYS: objects copied, shards streamed), which
between them take each of the bench's own paths; the job's own reading of every way is tested by
tests/e2e/test_datasets.py, and the report's targets for any pick of ways by tests/unit/test_scale_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import quality_data  # noqa: E402
from run import (  # noqa: E402
    BACKBONE,
    CLI,
    QUICK_BACKBONE,
    S3Server,
    child_env,
    load_average,
    log,
    machine,
    peak_rss_run,
    random_base,
    target,
)

BUCKET = "scale"
WAYS = ("objects", "manifest", "shards", "shards_stream", "objects_tenth")
QUICK_WAYS = ("objects", "shards_stream")
IMAGE_SIZE = [32, 32]
# A random base (bench/run.py random_base), so that every way runs the two-phase transfer recipe whose stages
# it times: with `model.weights: none` the job skips the head phase and trains every layer from scratch.
WEIGHTS = f"s3://{BUCKET}/weights/base.weights.h5"


def write_images(folder: Path, per_split: dict[str, int]) -> Path:
    """Fashion-MNIST as PNGs in train/ and test/ class folders (the first n / 10 of each class), once."""
    stamp = folder / ".done.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == per_split:
        return folder
    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)
    for split, source in (("train", "train"), ("test", "t10k")):
        images, labels = quality_data.load_fashion(source)
        picked = [i for c in range(10) for i in (labels == c).nonzero()[0][:per_split[split] // 10]]
        for i in picked:
            path = folder / split / quality_data.FASHION_CLASSES[labels[i]] / f"{split}-{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)
    stamp.write_text(json.dumps(per_split))
    return folder


def upload(s3: S3Server, folder: Path, prefix: str) -> dict:
    files = [p for p in sorted(folder.rglob("*.png"))]
    t0 = time.monotonic()
    s3.upload([(BUCKET, f"{prefix}/{p.relative_to(folder).as_posix()}", p) for p in files])
    return {"objects": len(files), "bytes": sum(p.stat().st_size for p in files),
            "seconds": round(time.monotonic() - t0, 1)}


def bare_listing(s3: S3Server, prefix: str) -> float:
    t0 = time.monotonic()
    n = sum(len(page.get("Contents", [])) for page in
            s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"))
    assert n > 0
    return time.monotonic() - t0


def disk_used(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def one_run(name: str, data: dict, tmp: Path, env: dict, finetune_epochs: int, backbone: str = BACKBONE) -> dict:
    cache = tmp / f"cache-{name}"
    config = tmp / f"{name}.yaml"
    config.write_text(json.dumps({
        "run_id": name,
        "data": {"image_size": IMAGE_SIZE, "cache_dir": str(cache), "validation_split": 0.1, **data},
        "model": {"backbone": backbone, "weights": WEIGHTS},
        "train": {"batch_size": 128, "head": {"epochs": 1}, "finetune": {"epochs": finetune_epochs},
                  "early_stopping_patience": 0},
        "output": {"uri": str(tmp / "out")},
        "metrics": {"port": 0, "linger_seconds": 0},
        "export": {"formats": ["saved_model"]},
    }))
    t0 = time.monotonic()
    seconds, validate = _timed([CLI, "validate", "--config", str(config)], env)
    if validate.returncode != 0:
        raise RuntimeError(f"{name}: validate failed: {validate.stderr[-2000:]}")
    log(f"{name}: validate {seconds:.1f} s; training")
    code, wall, rss = peak_rss_run([CLI, "train", "--config", str(config)], env, tmp / f"{name}.log")
    if code != 0:
        raise RuntimeError(f"{name}: train failed (exit {code}):\n{(tmp / f'{name}.log').read_text()[-3000:]}")
    manifest = json.loads((tmp / "out" / name / "manifest.json").read_text())
    history = json.loads((tmp / "out" / name / "history.json").read_text())
    records = [json.loads(line) for line in (tmp / f"{name}.log").read_text().splitlines() if line.startswith("{")]
    staged = next(r for r in records if r["event"] in ("dataset staged", "dataset surveyed"))
    images = sum(n for per in manifest["dataset"]["counts"].values() for n in per.values())
    timings = manifest["timings"]
    train_images = sum(manifest["dataset"]["counts"]["train"].values())
    epochs = history["finetune"]
    out = {
        "validate_seconds": round(seconds, 2), "train_wall_seconds": round(wall, 1),
        "peak_rss_mib": round(rss / 2**20, 1), "cache_disk_mib": round(disk_used(cache) / 2**20, 1),
        "images": images, "stage_seconds": timings,
        "staging": {"mode": staged["mode"], "downloaded": staged.get("downloaded"), "bytes": staged.get("bytes"),
                    "images_per_s": round(images / timings.get("download_seconds", timings["staging_seconds"]), 1)},
        "finetune_images_per_s": [round(train_images / e["seconds"], 1) for e in epochs],
        "test_accuracy": json.loads((tmp / "out" / name / "metrics.json").read_text())["test"]["accuracy"],
        "seconds": round(time.monotonic() - t0, 1),
    }
    if staged.get("bytes"):
        out["staging"]["bytes_per_s"] = round(staged["bytes"] / timings["download_seconds"], 1)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def _timed(args, env):
    t0 = time.monotonic()
    p = subprocess.run(args, capture_output=True, text=True, env=env)
    return time.monotonic() - t0, p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="350 images: shows that the bench runs")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scale.json")
    parser.add_argument("--cache", type=Path, default=HERE / "cache")
    parser.add_argument("--ways", default="", help="comma-separated ways to run (default all, or objects,shards_stream "
                        "with --quick; e.g. shards,shards_stream); a partial run writes its JSON only, not "
                        "docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    unknown = set(args.ways.split(",")) - set(WAYS) - {""}
    if unknown:
        parser.error(f"--ways: unknown {', '.join(sorted(unknown))} (ways: {', '.join(WAYS)})")
    full = {"train": 60000, "test": 10000}
    sizes = {k: v // (200 if args.quick else 1) for k, v in full.items()}
    tenth = {k: v // 10 for k, v in sizes.items()}
    started, before = time.time(), load_average()
    folder = write_images(args.cache / ("scale-quick" if args.quick else "scale") / "all", sizes)
    small = write_images(args.cache / ("scale-quick" if args.quick else "scale") / "tenth", tenth)
    s3 = S3Server()
    runs, uploads = {}, {}
    try:
        env = child_env(s3.endpoint, args.quick)
        backbone = QUICK_BACKBONE if args.quick else BACKBONE
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as t:
            tmp = Path(t)
            picked = [w for w in args.ways.split(",") if w] or list(QUICK_WAYS if args.quick else WAYS)
            objects_needed = bool({"objects", "manifest", "objects_tenth"} & set(picked))
            if objects_needed:
                log(f"uploading {sum(sizes.values())} objects")
                uploads["objects"] = upload(s3, folder, "objects")
                uploads["tenth"] = upload(s3, small, "tenth")
            s3.upload([(BUCKET, WEIGHTS.removeprefix(f"s3://{BUCKET}/"),
                        random_base(tmp / "base.weights.h5", IMAGE_SIZE, env, backbone))])
            lines = ["path,label,split"] + [f"{p.relative_to(folder).as_posix()},{p.parent.name},{p.parts[-3]}"
                                            for p in sorted(folder.rglob("*.png"))]
            s3.client.put_object(Bucket=BUCKET, Key="manifest.csv", Body=("\n".join(lines) + "\n").encode())
            t0 = time.monotonic()
            packed = subprocess.run([CLI, "pack", "--from", str(folder), "--to", f"s3://{BUCKET}/shards",
                                     "--shard-size", "16MB"], capture_output=True, text=True, env=env)
            if packed.returncode != 0:
                raise RuntimeError(f"pack failed: {packed.stderr[-2000:]}")
            uploads["shards"] = {"pack_seconds": round(time.monotonic() - t0, 1), "said": packed.stdout.strip()}
            listing = min(bare_listing(s3, "objects") for _ in range(2)) if objects_needed else 0.0
            ways = {  # data and fine-tuning epochs of each way (WAYS)
                "objects": ({"uri": f"s3://{BUCKET}/objects", "staging": "copy"}, 2),
                "manifest": ({"uri": f"s3://{BUCKET}/objects", "manifest": f"s3://{BUCKET}/manifest.csv",
                              "staging": "copy"}, 2),
                "shards": ({"uri": f"s3://{BUCKET}/shards", "staging": "copy"}, 2),
                "shards_stream": ({"uri": f"s3://{BUCKET}/shards", "staging": "stream"}, 2),
                "objects_tenth": ({"uri": f"s3://{BUCKET}/tenth", "staging": "copy"}, 2),
            }
            for name, (data, epochs) in ((w, ways[w]) for w in picked):
                log(f"run: {name}")
                runs[name] = one_run(name, data, tmp, env, epochs, backbone)
                log(f"{name}: {json.dumps(runs[name]['stage_seconds'])}")
    finally:
        s3.close()
    report = build_report(args.quick, sizes, uploads, listing, runs)
    report.update(started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                  seconds=round(time.time() - started, 1), machine=machine(),
                  load_average={"before": before, "after": load_average()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for key, t in report["targets"].items():
        print(f"{key:40s} {t['value']:>10} (target {'>=' if t['better'] == 'higher' else '<='} {t['target']}) "
              f"{'met' if t['met'] else 'MISSED'}")
    print(f"wrote {args.out}")
    if not args.quick and not args.ways:
        import quality_report

        quality_report.write_blocks(HERE.parent / "docs" / "BENCHMARKS.md", "scale", {"results": tables(report)})
    return 0


STAGES = ("listing", "download", "bad_image_check", "feature_cache", "head", "finetune", "evaluate", "export",
          "total")


def tables(report: dict) -> str:
    """Markdown: the targets, then per way of keeping the data each stage's seconds, staging rates, memory and disk."""
    runs = report["runs"]
    lines = ["| target | value | limit | |", "|---|---|---|---|"]
    for key, t in report["targets"].items():
        sign = ">=" if t["better"] == "higher" else "<="
        lines.append(f"| {key} | {t['value']} {t['unit']} | {sign} {t['target']} | "
                     f"{'met' if t['met'] else '**missed**'} |")
    lines += ["", "| | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    for stage in STAGES:
        cells = [f"{r['stage_seconds'][f'{stage}_seconds']:.1f}" if f"{stage}_seconds" in r["stage_seconds"] else "–"
                 for r in runs.values()]
        lines.append(f"| {stage}, s | " + " | ".join(cells) + " |")
    rows = {"images": lambda r: f"{r['images']:,}", "validate, s": lambda r: f"{r['validate_seconds']:.1f}",
            "staging, images/s": lambda r: f"{r['staging']['images_per_s']:,.0f}",
            "staging, MB/s": lambda r: f"{r['staging'].get('bytes_per_s', 0) / 1e6:.1f}",
            "fine-tuning, images/s per epoch": lambda r: " / ".join(f"{x:.0f}" for x in r["finetune_images_per_s"]),
            "peak RSS, MiB": lambda r: f"{r['peak_rss_mib']:,.0f}",
            "cache disk left after the run, MiB": lambda r: f"{r['cache_disk_mib']:,.0f}",
            "test accuracy": lambda r: f"{r['test_accuracy']:.3f}"}
    for label, cell in rows.items():
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in runs.values()) + " |")
    lines += ["", f"Bare paginated boto3 listing of the 70,000 objects (the yardstick for `validate`): "
                  f"{report['bare_listing_seconds']} s."]
    return "\n".join(lines)


def build_report(quick: bool, sizes: dict, uploads: dict, listing: float, runs: dict) -> dict:
    """The runs and each target whose runs are there: all of them in a full run, those of its ways in a quick
    one or one that `--ways` picked (mode "partial")."""
    later = lambda r: r["finetune_images_per_s"][-1]  # noqa: E731 - after the first epoch
    needs = {
        "shards_stage_vs_objects": (("objects", "shards"), lambda: target(
            runs["objects"]["stage_seconds"]["download_seconds"] / runs["shards"]["stage_seconds"]["download_seconds"],
            5.0, "higher")),
        "peak_rss_all_vs_tenth": (("objects", "objects_tenth"), lambda: target(
            runs["objects"]["peak_rss_mib"] / runs["objects_tenth"]["peak_rss_mib"], 1.1, "lower")),
        "validate_objects_seconds": (("objects",), lambda: target(runs["objects"]["validate_seconds"], 15.0, "lower",
                                                                  "s")),
        "validate_vs_bare_listing": (("objects",), lambda: target(
            runs["objects"]["validate_seconds"] / max(listing, 1e-3), 1.5, "lower")),
        "stream_vs_copy_training_images_per_s": (("shards", "shards_stream"), lambda: target(
            later(runs["shards_stream"]) / later(runs["shards"]), 0.9, "higher")),
    }
    return {
        "mode": "quick" if quick else "full" if set(runs) == set(WAYS) else "partial", "images": sizes,
        "uploads": uploads, "bare_listing_seconds": round(listing, 2), "runs": runs,
        "targets": {key: make() for key, (ways, make) in needs.items() if set(ways) <= set(runs)},
    }

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
