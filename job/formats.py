"""The formats users deploy with, converted from the run's SavedModel and each checked in its own runtime.

    saved_model   saved_model/                         TensorFlow; `serving_default` takes encoded bytes
    tf_serving    tf_serving/classifier/1/             the same SavedModel where TF Serving and KServe look
    tflite        model.tflite + model.tflite.json     LiteRT, float16 weights, float32 pixels in
    tflite_int8   model_int8.tflite + ….json           LiteRT, full integer, uint8 pixels in and out
    onnx          model.onnx + model.onnx.json         onnxruntime, float32 pixels in

Multi-label models (`with_thresholds`) give two outputs in every format: `scores` [batch, labels] and `above`
[batch, labels], 1.0 where a label's score reaches its threshold (thresholds.json, built in); the SavedModel's
bytes signature adds `labels` [batch, labels] tf.string: the label's name where it is above, else "".

LiteRT and ONNX have no image decoder, so those formats take decoded pixels: RGB, [batch, h, w, 3],
0..255, resized (bilinear, antialiased, no crop) to the training size; the backbone's preprocessing is
inside. Each is described by the JSON beside it. Converters: TensorFlow's own TFLiteConverter on the
SavedModel's `serving_pixels` signature, and Keras' `Model.export(format="onnx")` (tf2onnx).
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from job import logs
from job.errors import StorageError, disk_full

FORMATS = ("saved_model", "tf_serving", "tflite", "tflite_int8", "onnx")
# What `export.formats` means when not set: every format that converted and ran for every backbone of
# the registry (bench/formats.py, docs/BENCHMARKS.md). ONNX fails for the backbones with a Keras
# Normalization layer (EfficientNet, ...), so it is written only when listed.
DEFAULT_FORMATS = ("saved_model", "tf_serving", "tflite", "tflite_int8")
SERVING_NAME = "classifier"  # tf_serving/<name>/<version>/: the model name in TF Serving's URLs
FILES = {"tf_serving": f"tf_serving/{SERVING_NAME}/1", "tflite": "model.tflite",
         "tflite_int8": "model_int8.tflite", "onnx": "model.onnx"}
FLOAT_AGREEMENT = 0.99  # float formats must give the SavedModel's top-1 on at least this share of images
# Float formats: each score within this of the SavedModel's. float16 weights moved them by 0.004 to 0.009 on the
# tests' bases and by 0.06 on an odd one (a non-square input, BatchNormalization statistics far from ImageNet's); an
# export broken short of its decisions (NaN, all zeros, preprocessing lost) moves them by far more.
FLOAT_SCORE_DIFFERENCE = 0.1
# Single-label: an image whose SavedModel top two are closer than this is a near tie, which float16's rounding may
# turn either way; agreement is judged on the other images (one near tie among 37 check images failed a run that had
# trained, exit 1, every score within 0.005 of the SavedModel's), or on every image when all are near ties. A band
# that grew with the measured difference excused any export within FLOAT_SCORE_DIFFERENCE: an all-zeros export of a
# 100-class model whose top scores are 0.04 passed.
NEAR_TIE = 0.02
# When every check image is a near tie (a low-confidence model: many classes, little training), top-1 agreement
# measures rounding, not the export (a correct export agreed on 51 to 78%): each image's largest score difference
# must then stay within this share of its top score (an all-zeros export is 100% of it, a uniform one about 70%).
NEAR_TIE_RELATIVE = 0.25
# Multi-label: the share of the label decisions that may be excused as near ties (_multi_near_ties)
MULTI_NEAR_TIES_SHARE = 0.02
LATENCY_RUNS = 20


class ConversionError(Exception):
    """A format could not be written or failed its check."""


def convert(fmt: str, folder: Path, keras_model, image_size: tuple[int, int], calibration: Iterator[np.ndarray],
            classes: list[str], multi: bool = False) -> Path:
    """Write `fmt` under `folder` (which holds saved_model/ already); its path."""
    path = folder / FILES[fmt]
    try:
        if fmt == "tf_serving":
            shutil.copytree(folder / "saved_model", path)
            return path
        if fmt == "onnx":
            with warnings.catch_warnings():  # tf2onnx's use of deprecated NumPy names
                warnings.simplefilter("ignore", FutureWarning)
                keras_model.export(str(path), format="onnx", verbose=False)
        else:
            path.write_bytes(_tflite(folder / "saved_model", fmt == "tflite_int8", calibration))
    except Exception as e:  # the converters raise anything from ValueError to ConverterError
        full = disk_full(e)
        if full is not None:  # left out as "conversion failed", a default format went missing from a complete run
            raise StorageError(f"{fmt}: no space left on the local disk ({full or folder}) while converting; give "
                               "the pod more ephemeral storage, or point data.cache_dir at a larger volume, and "
                               "rerun the same run_id (it exports again from the trained checkpoint)") from None
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise ConversionError(f"{fmt}: conversion failed: {type(e).__name__}: {first}") from None
    _describe(path, fmt, image_size, classes, multi)
    return path


def _tflite(saved_model: Path, int8: bool, calibration: Iterator[np.ndarray]) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=["serving_pixels"])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if not int8:
        converter.target_spec.supported_types = [tf.float16]
        return converter.convert()
    h_w = None

    def representative():
        nonlocal h_w
        for images in calibration:
            h_w = images.shape[1:3]
            for image in images:
                yield {"images": image[None].astype(np.float32)}
        # A black and a white frame: the input's quantization then spans 0..255 with scale 1, so uint8
        # pixels go in as they are.
        for value in (0.0, 255.0):
            yield {"images": np.full((1, *h_w, 3), value, np.float32)}

    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    with warnings.catch_warnings():  # the calibrator inside TensorFlow's converter uses tf.lite.Interpreter
        warnings.filterwarnings("ignore", r".*tf\.lite\.Interpreter is deprecated", UserWarning)
        return converter.convert()


def _describe(path: Path, fmt: str, image_size: tuple[int, int], classes: list[str], multi: bool = False) -> None:
    if fmt == "tf_serving":
        return
    h, w = image_size
    dtype = "uint8" if fmt == "tflite_int8" else "float32"
    info = {
        "format": fmt,
        "runtime": "onnxruntime" if fmt == "onnx" else "LiteRT (ai-edge-litert) or TensorFlow Lite",
        "input": {"shape": [None, h, w, 3], "dtype": dtype, "layout": "NHWC, RGB", "range": [0, 255],
                  "resize": f"to {h}x{w}, bilinear with antialiasing, no crop (aspect ratio not kept), rounded to "
                            "whole numbers",
                  "preprocessing": "inside the model: feed plain pixels"},
        "output": {"shape": [None, len(classes)], "dtype": "uint8" if fmt == "tflite_int8" else "float32",
                   "meaning": "class probabilities in the order of labels"},
        "labels": classes,
    }
    if multi:
        info["output"] = {"scores": {**info["output"], "meaning": "per-label scores (sigmoid) in the order of labels"},
                          "above": {"shape": [None, len(classes)], "dtype": info["output"]["dtype"],
                                    "meaning": "1 where the label's score reaches its threshold (thresholds.json, "
                                               "built in), else 0: the predicted label set"}}
    if fmt == "onnx":  # its outputs by position (Keras' exporter sorts a multi-label model's by name: above first)
        import onnx

        info["output_names_in_order"] = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    if fmt == "tflite_int8":
        info["input"]["quantization"] = "scale 1, zero point 0: the uint8 pixel values themselves"
        for out in (info["output"].values() if multi else [info["output"]]):
            out["quantization"] = "value = (raw - zero_point) * scale (see the model's output details)"
        if multi:
            info["output"]["above"]["decided"] = ("inside the model on the float score, before the score is rounded "
                                                  "to uint8: a dequantized score may read up to one step (scale) "
                                                  "below a threshold it passed")
    Path(f"{path}.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- running each format in its runtime


@dataclass
class Runner:
    """Classifies a batch of pixels (uint8 [n, h, w, 3]) with one artifact; probabilities [n, classes], or
    multi-label (scores [n, labels], above [n, labels] 0/1)."""

    fmt: str
    predict: Callable[[np.ndarray], np.ndarray | tuple[np.ndarray, np.ndarray]]


def runner(fmt: str, path: Path, multi: bool = False) -> Runner:
    if fmt in ("saved_model", "tf_serving"):
        import tensorflow as tf

        signature = tf.saved_model.load(str(path)).signatures["serving_pixels"]
        if multi:
            def both(x):
                out = signature(images=tf.constant(x, tf.float32))
                return out["scores"].numpy(), out["above"].numpy()

            return Runner(fmt, both)
        return Runner(fmt, lambda x: signature(images=tf.constant(x, tf.float32))["probabilities"].numpy())
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        if multi:
            names = [o.name for o in session.get_outputs()]
            order = sorted(names, key=lambda n: "above" in n)  # [scores, above]

            def both(x):
                out = dict(zip(names, session.run(None, {name: x.astype(np.float32)})))
                return out[order[0]], out[order[1]]

            return Runner(fmt, both)
        return Runner(fmt, lambda x: session.run(None, {name: x.astype(np.float32)})[0])
    return Runner(fmt, _litert_signature(path) if multi else _litert(path))


def _litert_signature(path: Path) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A multi-label LiteRT model through its `serving_pixels` signature: outputs by name, dequantized."""
    from ai_edge_litert.interpreter import Interpreter

    run = Interpreter(model_path=str(path)).get_signature_runner("serving_pixels")
    (name, source), = run.get_input_details().items()
    targets = run.get_output_details()

    def predict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if np.issubdtype(source["dtype"], np.integer) and not np.issubdtype(x.dtype, np.integer):
            x = np.clip(np.round(x), 0, 255)
        out = run(**{name: x.astype(source["dtype"])})
        for key, value in out.items():
            if targets[key]["dtype"] != np.float32:
                scale, zero = targets[key]["quantization"]
                out[key] = (value.astype(np.float32) - zero) * scale
        return out["scores"], out["above"]

    return predict


def _litert(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    shape: list[int] = []

    def predict(x: np.ndarray) -> np.ndarray:
        source = interpreter.get_input_details()[0]
        if list(x.shape) != shape:
            interpreter.resize_tensor_input(source["index"], list(x.shape))
            interpreter.allocate_tensors()
            shape[:] = list(x.shape)
            source = interpreter.get_input_details()[0]
        target = interpreter.get_output_details()[0]
        if np.issubdtype(source["dtype"], np.integer) and not np.issubdtype(x.dtype, np.integer):
            x = np.clip(np.round(x), 0, 255)  # float pixels (decoded, resized) to the uint8 input
        interpreter.set_tensor(source["index"], x.astype(source["dtype"]))
        interpreter.invoke()
        out = interpreter.get_tensor(target["index"])
        if target["dtype"] != np.float32:
            scale, zero = target["quantization"]
            out = (out.astype(np.float32) - zero) * scale
        return out

    return predict


def check(run: Runner, pixels: np.ndarray, labels: np.ndarray, reference: np.ndarray | None,
          path: Path) -> dict:
    """Accuracy, agreement with the SavedModel's top-1 (`reference`: its probabilities) on every image and on those
    that are no near tie (`near_ties`: how many are), the largest probability difference, size and single-image
    latency of one format."""
    probs = np.concatenate([run.predict(pixels[i:i + 64]) for i in range(0, len(pixels), 64)])
    predicted = probs.argmax(-1)
    result = {"accuracy": float((predicted == labels).mean()) if len(labels) else None,
              **_size_and_latency(run, pixels, path), "examples": int(len(labels))}
    if reference is not None and len(labels):
        same = predicted == reference.argmax(-1)
        per_image = np.abs(probs - reference).max(-1)  # each image's largest score difference
        top_two = np.sort(reference, axis=-1)[:, -2:] if reference.shape[-1] > 1 else np.zeros((len(reference), 2))
        tie = top_two[:, 1] - top_two[:, 0] < NEAR_TIE
        result["agreement"] = float(same.mean())
        result["near_ties"] = int(tie.sum())
        result["agreement_beyond_near_ties"] = float(same[~tie].mean()) if (~tie).any() else None
        result["max_score_difference"] = round(float(per_image.max()), 6)
        result["max_relative_difference"] = round(float((per_image / np.maximum(reference.max(-1), 1e-12)).max()), 6)
    return result


def check_multi(run: Runner, pixels: np.ndarray, truth: np.ndarray, reference: tuple | None, path: Path) -> dict:
    """Multi-label: mAP and micro-F1 at the built-in thresholds, agreement with the SavedModel's label decisions
    (each image's yes or no for each label; whole label sets too, for information) and the largest score
    difference, size and single-image latency of one format. Whole sets were the bar: with a hundred labels nearly
    every image has one score within float16's rounding of its threshold, and a float LiteRT export failed a run
    that had trained."""
    from job import multilabel

    outs = [run.predict(pixels[i:i + 64]) for i in range(0, len(pixels), 64)]
    scores, above = (np.concatenate([o[k] for o in outs]) for k in (0, 1))
    chosen = above > 0.5
    mean_ap = multilabel.mean_average_precision(scores, truth) if len(truth) else float("nan")
    result = {"map": None if np.isnan(mean_ap) else mean_ap,
              "micro_f1": multilabel.micro_f1(chosen, truth) if len(truth) else None,
              **_size_and_latency(run, pixels, path), "examples": int(len(truth))}
    if reference is not None and len(truth):
        result["agreement"] = float((chosen == reference[1]).mean())
        result["label_set_agreement"] = float(np.all(chosen == reference[1], axis=1).mean())
        result["max_score_difference"] = round(float(np.abs(scores - reference[0]).max()), 6)
        if len(reference) > 2:  # (the thresholds)
            result.update(_multi_near_ties(scores, chosen, reference))
    return result


def _multi_near_ties(scores: np.ndarray, chosen: np.ndarray, reference: tuple) -> dict:
    """A decision the export takes otherwise than the SavedModel is a near tie when the SavedModel's score is within
    NEAR_TIE of the label's threshold, the export's within NEAR_TIE of the SavedModel's, and the export's own
    decision is its score against that threshold: float16's rounding across it, not the export (one such among 45
    decisions failed a run that had trained, exit 1). At most MULTI_NEAR_TIES_SHARE of the decisions are excused
    (past it, none is): an all-zeros export of a low-confidence model, or a constant 0.5 one, is all near ties."""
    ref_scores, ref_chosen, thresholds = reference
    differ = chosen != ref_chosen
    tie = (differ & (np.abs(ref_scores - thresholds) < NEAR_TIE) & (np.abs(scores - ref_scores) < NEAR_TIE)
           & (chosen == (scores >= thresholds)))
    if tie.sum() > max(1, MULTI_NEAR_TIES_SHARE * tie.size):
        tie = np.zeros_like(tie)
    out = {"near_ties": int(tie.sum())}
    if tie.any():
        out["agreement_beyond_near_ties"] = float(1 - (differ & ~tie).mean())
    return out


def _size_and_latency(run: Runner, pixels: np.ndarray, path: Path) -> dict:
    one = pixels[:1]
    run.predict(one)  # warm-up
    times = []
    for _ in range(LATENCY_RUNS):
        t0 = time.perf_counter()
        run.predict(one)
        times.append(time.perf_counter() - t0)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return {"bytes": int(size), "latency_ms_batch1": round(float(np.median(times)) * 1000, 3)}


def export_all(folder: Path, keras_model, image_size: tuple[int, int], classes: list[str],
               requested: list[str] | None, pixels: np.ndarray, labels: np.ndarray,
               calibration: Callable[[], Iterator[np.ndarray]], max_drop: float, fail_on_drop: bool,
               log, multi: bool = False, thresholds: list[float] | None = None,
               attempt: Callable[[str], AbstractContextManager] = lambda fmt: nullcontext()) -> dict[str, dict]:
    """Convert every requested format (None: the defaults) beside saved_model/ and check each on `pixels`.

    A float format must agree with the SavedModel's top-1 on FLOAT_AGREEMENT of the images; int8 reports
    its accuracy drop, flagged past `max_drop` (an error with `fail_on_drop`). A format the user listed
    that fails raises ExportFailed (exit 1); a default one that fails is a warning and an entry here. Each format's
    conversion and check run inside `attempt(fmt)`, which may raise ConversionError (job.export: a converter that
    aborted the process in an earlier attempt).
    """
    from job.errors import ExportFailed

    explicit = requested is not None
    wanted = [f for f in dict.fromkeys(requested if explicit else DEFAULT_FORMATS) if f != "saved_model"]
    reference_run = runner("saved_model", folder / "saved_model", multi)
    judge = check_multi if multi else check
    results = {"saved_model": judge(reference_run, pixels, labels, None, folder / "saved_model")}
    outs = [reference_run.predict(pixels[i:i + 64]) for i in range(0, len(pixels), 64)]
    if multi:
        reference = tuple(np.concatenate([o[k] for o in outs]) if outs else np.zeros((0, len(classes))) for k in (0, 1))
        reference = (reference[0], reference[1] > 0.5, *([np.asarray(thresholds, np.float32)] if thresholds else []))
    else:
        reference = np.concatenate(outs) if outs else np.zeros((0, len(classes)), np.float32)
    for fmt in wanted:
        started = time.monotonic()
        try:
            with attempt(fmt), logs.native_lines_filtered():  # the converters' and LiteRT's info lines
                path = convert(fmt, folder, keras_model, image_size, calibration(), classes, multi)
                try:
                    result = judge(runner(fmt, path, multi), pixels, labels, reference, path)
                except Exception as e:  # the runtime could not load or run it: as bad as not converting
                    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                    raise ConversionError(f"{fmt}: check failed: {type(e).__name__}: {first}") from None
            _judge(fmt, result, results["saved_model"], max_drop, fail_on_drop, log)
        except ConversionError as e:
            _remove(folder / FILES[fmt])
            if explicit:
                raise ExportFailed(f"export.formats: {e}") from None
            log.warning("export format left out", format=fmt, reason=str(e))
            results[fmt] = {"error": str(e)}
            continue
        result["seconds"] = round(time.monotonic() - started, 3)
        results[fmt] = result
        log.info("export format checked", format=fmt, **result)
    return results


def _remove(path: Path) -> None:
    """A failed format leaves nothing behind: its file or folder and its description."""
    if path.is_dir():
        shutil.rmtree(path)
    path.unlink(missing_ok=True)
    Path(f"{path}.json").unlink(missing_ok=True)


def _judge(fmt: str, result: dict, reference: dict, max_drop: float, fail_on_drop: bool, log) -> None:
    agreement = result.get("agreement")
    if agreement is None:
        return  # no images to check on
    if fmt != "tflite_int8":
        ties, beyond_ties = result.get("near_ties", 0), result.get("agreement_beyond_near_ties")
        relative = result.get("max_relative_difference")
        all_ties = bool(ties) and beyond_ties is None and relative is not None  # judged on its scores instead
        if all_ties and not relative <= NEAR_TIE_RELATIVE:
            raise ConversionError(f"{fmt}: every check image is a near tie, and its scores differ from the "
                                  f"SavedModel's by up to {relative:.0%} of an image's top score (at most "
                                  f"{NEAR_TIE_RELATIVE:.0%} expected)")
        excused = ties and beyond_ties is not None
        decided = beyond_ties if excused else agreement
        if not all_ties and decided < FLOAT_AGREEMENT:
            what = "label decisions (image and label)" if "label_set_agreement" in result else "images"
            beyond = "" if not excused else f" beyond {ties} near tie(s) (" + (
                f"scores within {NEAR_TIE} of each other across the threshold)" if "label_set_agreement" in result
                else f"the SavedModel's top two within {NEAR_TIE})")
            raise ConversionError(f"{fmt}: agrees with the SavedModel on {decided:.1%} of {what}{beyond} "
                                  f"(at least {FLOAT_AGREEMENT:.0%} expected)")
        difference = result.get("max_score_difference")  # multi-label: with sparse labels, an export that says no
        if difference is not None and not difference <= FLOAT_SCORE_DIFFERENCE:  # to everything (NaN) agrees on 99%
            raise ConversionError(f"{fmt}: its scores differ from the SavedModel's by up to {difference} (at most "
                                  f"{FLOAT_SCORE_DIFFERENCE} expected of a float format)")
        return
    score = "micro_f1" if "micro_f1" in result else "accuracy"  # multi-label: micro-F1 at the thresholds
    drop = reference[score] - result[score]
    result[f"{score}_drop"] = round(drop, 4)
    result["accuracy_drop_exceeded"] = drop > max_drop
    if drop > max_drop:
        message = (f"{fmt}: {score} {result[score]:.3f} is {drop:.3f} below the SavedModel's "
                   f"(export.max_accuracy_drop {max_drop})")
        if fail_on_drop:
            from job.errors import ExportFailed

            raise ExportFailed(f"{message}; export.fail_on_accuracy_drop is set")
        log.warning("export accuracy drop", format=fmt, reason=message)
