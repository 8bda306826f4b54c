"""The `finetune-job` command line: train, validate, predict.

Only this layer exits: domain code raises typed errors (job.errors) that map to the contract's
exit codes here. Nothing at module level imports TensorFlow, so `--help` is fast.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

import job
from job.files import json_text
from job.layout import FEW, case_clashes, shown


class _OneLineUsage(typer.core.TyperGroup):
    """Usage errors (an unknown option, `--top-k 0`) in one line, exit 2, as every other error: they were a box of
    four lines or more."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except typer.Abort:  # Ctrl-C while the parser runs
            typer.echo("finetune-job: interrupted", err=True)
            sys.exit(130)
        except Exception as e:  # click's UsageError (typer's own copy of click): exit code 2 and a message
            if getattr(e, "exit_code", None) != 2 or not hasattr(e, "format_message"):
                raise
            where, said = e.ctx.command_path if getattr(e, "ctx", None) else "finetune-job", e.format_message()
            if said.strip():  # (no command at all: the help was printed, and nothing more is to say)
                line = f"{' '.join(said.split())} (see {where} --help)"
                _usage_record(line, where)
                typer.echo(f"finetune-job: error: {line}", err=True)
            sys.exit(2)
        sys.exit(code if isinstance(code, int) else 0)


def _usage_record(line: str, where: str) -> None:
    """The `error` log record of a usage error, as every other error has (a shipper alerting on level=error saw
    none); predict's on stderr, where its records go (its stdout holds one line per image)."""
    from job import logs

    logs.setup(stream=sys.stderr if where.endswith(" predict") else None)
    logs.get().error(line, exit_code=2)


app = typer.Typer(
    name="finetune-job",
    help="Fine-tune a keras.applications image classifier on a folder-per-class dataset in S3.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=_OneLineUsage,
)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="YAML config file (CONTRACT section 4).")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one key: --set train.batch_size=64 (dotted path, YAML-typed value)."),
]


class Format(str, enum.Enum):
    saved_model = "saved_model"
    tf_serving = "tf_serving"
    tflite = "tflite"
    tflite_int8 = "tflite_int8"
    onnx = "onnx"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"finetune-job {job.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fine-tune a keras.applications image classifier on a folder-per-class dataset in S3."""


_PEER_ERRORS = {"UnavailableError", "CancelledError", "AbortedError", "DeadlineExceededError"}


def _stop_on_signals() -> None:
    """pack and predict: SIGTERM and Ctrl-C raise Preempted (exit 143, or 130), so that their temporary folders are
    removed and pack says what its destination holds (a SIGTERM left up to a shard, or a model's copy, in /tmp, and
    Ctrl-C was a traceback)."""
    import signal

    from job.errors import Preempted

    def stop(number, _frame):
        name = signal.Signals(number).name
        stopped = Preempted(f"stopped by {name}" + (" (Ctrl-C)" if name == "SIGINT" else ""))
        stopped.exit_code = 130 if name == "SIGINT" else 143
        raise stopped

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, stop)


def _done(code: int) -> None:
    """pack and predict, their work done: a SIGTERM or Ctrl-C now ends the command at once with the exit `code` it
    would have had (the handler above, still there, raised in the closing line or in the interpreter's shutdown: a
    traceback, exit 1, or exit 0 with "Exception ignored"). Not ignored: a shutdown that hangs stays stoppable."""
    import signal

    def end(_number, _frame):
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, end)


def _fail(exc: BaseException, command: str = "") -> None:
    """Log the error and exit with its code: one line for expected errors, a traceback otherwise."""
    from job import logs
    from job.distribute import tf_config_workers
    from job.errors import JobError, Preempted, StorageError, WorkerLost, carried, disk_full, exit_code_for, first_line

    exc = carried(exc)
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C where nothing turned it into Preempted (validate): a traceback
        typer.echo("finetune-job: interrupted", err=True)
        raise typer.Exit(130)
    try:
        several = tf_config_workers()[1] > 1
    except Exception:  # noqa: BLE001 - a broken TF_CONFIG: it failed again here, inside the handler (a traceback)
        several = False
    if several and type(exc).__name__ in _PEER_ERRORS and type(exc).__module__.startswith("tensorflow"):
        first = first_line(exc)
        from job import signals

        if signals.requested():  # this pod was stopped too (an eviction, a drain): 143, not a failure counted
            exc = Preempted(f"stopped by SIGTERM while another worker stopped ({first}); re-run the same run_id to "
                            "resume")
        else:
            exc = WorkerLost(f"lost contact with another worker mid-run ({first}); "
                             "the Job's next attempt resumes from the last checkpoint")
    full = disk_full(exc) if not isinstance(exc, JobError) else None
    if full is not None:
        exc = StorageError(f"no space left on the local disk ({full or type(exc).__name__}); " + (
            "data.cache_dir holds the staged images, their decoded cache and the checkpoints before upload: give "
            "the pod more ephemeral storage, or point data.cache_dir at a larger volume, and rerun the same run_id"
            if command == "train" else "free space there (or set TMPDIR to a larger folder) and run it again"))
    code = exit_code_for(exc)
    if isinstance(exc, Preempted):  # not a failure (run_status "preempted"): an alert on level=error paged for
        logs.get().warning(str(exc), exit_code=code)  # every preemption and node drain
        typer.echo(f"finetune-job: error: {exc}", err=True)
    elif isinstance(exc, JobError):
        logs.get().error(str(exc), exit_code=code)
        typer.echo(f"finetune-job: error: {exc}", err=True)
    else:  # the record has the traceback; the line is one line
        logs.get().exception("unexpected error", exit_code=code)
        typer.echo(f"finetune-job: unexpected error: {type(exc).__name__}: {' '.join(str(exc).split())}", err=True)
    if several and "tensorflow" in sys.modules:
        # TensorFlow's exit waits at a shutdown barrier for every worker (minutes when one is gone).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code)


def _load(path: Path, sets: list[str] | None):
    from job import config, logs

    logs.setup()
    cfg = config.load(path, sets or [])
    logs.bind(run_id=cfg.run_id)
    return cfg


@app.command()
def train(config: ConfigOption, set_: SetOption = None) -> None:
    """Run the job: stage the dataset, train head then fine-tune, evaluate, export to storage."""
    from job import logs, metrics, signals
    from job.distribute import tf_config_workers

    try:
        signals.install()
        cfg = _load(config, set_)
        from job import pipeline
        from job.errors import JobError

        try:
            done = pipeline.complete_run(cfg)  # before the metrics: a push would replace the run's final values
        except JobError:  # (storage denied, say): raised again by train below, where the metrics record the failure
            done = None
        if done:
            logs.get().info("run finished", **done)
            return
        worker, _ = tf_config_workers()
        metrics.start(run_id=cfg.run_id, backbone=cfg.model.backbone, version=job.__version__, worker=worker,
                      is_chief=worker == 0, host=cfg.metrics.host, port=cfg.metrics.port,
                      pushgateway=cfg.metrics.pushgateway,
                      linger_seconds=cfg.metrics.linger_seconds, owned=False)  # pushes once the lease is held
    except BaseException as exc:  # noqa: BLE001 - every failure leaves through _fail
        _fail(exc)
    try:
        summary = pipeline.train(cfg)  # it loads TensorFlow once the dataset is listed
    except BaseException as exc:  # noqa: BLE001
        from job.errors import LeaseHeld, Preempted, StorageError

        # refused by a live attempt's lease, or failed before taking it while one holds it: the Pushgateway group is
        # that attempt's, which is not failing
        # (not asked of storage that just failed: a server that never answers took its 6 minutes again)
        held = isinstance(exc, LeaseHeld) or (not metrics.is_owned() and not isinstance(exc, StorageError)
                                              and pipeline.another_attempt_holds(cfg))
        metrics.finish(False, preempted=isinstance(exc, Preempted), push=not held)
        _fail(exc, "train")
    logs.get().info("run finished", **summary)
    # completed by another attempt while this one waited for the lease: its final values are that attempt's
    metrics.finish(True, push=summary.get("status") != "already complete")


@app.command()
def validate(config: ConfigOption, set_: SetOption = None) -> None:
    """Check config, storage access and dataset layout; print class counts per split. Trains nothing."""
    try:
        cfg = _load(config, set_)
        from job import pipeline

        layout = pipeline.validate(cfg)
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)
    _print_counts(layout)
    few = [c for c, n in layout.counts().get("train", {}).items() if n < FEW] if layout.multi_label else []
    if few:
        typer.echo(f"warning: label(s) with fewer than {FEW} training images (their threshold and scores will be "
                   f"unreliable): {', '.join(few)}", err=True)
    for message, _, missing in pipeline.unmeasured(layout):
        typer.echo(f"warning: {message}: {', '.join(missing)}", err=True)
    if pipeline.batch_over_images(cfg, layout):
        typer.echo(f"warning: {pipeline.batch_over_images(cfg, layout)}", err=True)
    if not layout.count("validation") and not layout.count("test"):
        typer.echo("warning: no validation or test images (none given, and data.validation_split carved none): the run "
                   "will measure nothing on images it did not train on, and early stopping will watch the training "
                   "loss", err=True)
    kind = "labels" if layout.multi_label else "classes"
    typer.echo(f"ok: {len(layout.classes)} {kind}, run_id {cfg.run_id}", err=True)


def _print_counts(layout) -> None:
    """Images per class and split; multi-label: images carrying each label, those with none, and the images."""
    counts, splits = layout.counts(), layout.splits
    alike = {name for group in case_clashes(layout.classes) for name in group}  # told apart in the table
    rows = [(shown(c) if c in alike else c, [counts[s][c] for s in splits]) for c in layout.classes]
    if layout.multi_label:
        rows.append(("(no label)", [layout.unlabelled(s) for s in splits]))
    rows.append(("images" if layout.multi_label else "total", [layout.count(s) for s in splits]))
    head = "label" if layout.multi_label else "class"
    width = max(len(name) for name, _ in rows + [(head, [])])
    typer.echo(f"{head:<{width}}  " + "  ".join(f"{s:>10}" for s in splits))
    for name, values in rows:
        typer.echo(f"{name:<{width}}  " + "  ".join(f"{v:>10}" for v in values))


@app.command()
def predict(
    model: Annotated[str, typer.Option("--model", "-m", help="An exported run: local folder or s3://bucket/prefix/run_id.")],
    images: Annotated[list[str], typer.Argument(help="Image files or s3:// URIs.")],
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", min=1, help="How many labels to print per image "
                                                "(default 3; multi-label: at most this many above their thresholds, "
                                                "default all of them).")] = None,
    endpoint_url: Annotated[str, typer.Option(help="S3 endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL).")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per image.")] = False,
    fmt: Annotated[Format, typer.Option("--format", help="Which artifact of the run classifies.")] = "saved_model",
) -> None:
    """Classify images with an exported run; prints the top-k labels with probabilities (multi-label: the labels
    above their thresholds, with scores)."""
    from job import logs
    from job.errors import DataError

    undecodable = 0
    _stop_on_signals()
    try:
        # Its log records on stderr: stdout keeps one line (--json: one object) per image, nothing else.
        logs.setup(json=as_json, level="WARNING", stream=sys.stderr)
        from job.predict import check_images
        from job.predict import predict as classify

        check_images(images)  # before TensorFlow loads: a mistyped path is said within a second (a --model too)

        with logs.native_lines_filtered():  # LiteRT's info lines (--format tflite)
            for r in classify(model, images, top_k, endpoint_url, str(getattr(fmt, "value", fmt))):
                if "error" in r:  # not decodable: said on stderr, the other images still classified; stdout keeps
                    undecodable += 1  # one line (--json: one object) per image: its log record goes to stderr too
                    logs.get().error(r["error"], exit_code=DataError.exit_code)
                    typer.echo(f"finetune-job: error: {r['error']}", err=True)
                    if as_json:
                        typer.echo(json_text(r))
                    continue
                typer.echo(json_text(r) if as_json else _name(r["image"]) + ": " + _shown(r))
        _done(DataError.exit_code if undecodable else 0)
    except BrokenPipeError:  # `predict ... | head -1`: the reader has what it wanted (it was a traceback, exit 1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's own flush at exit would fail too)
        raise typer.Exit(0) from None
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)
    if undecodable:
        raise typer.Exit(DataError.exit_code)


def _shown(result: dict) -> str:
    """One image's line: the top-k labels with probabilities; multi-label, the labels above their thresholds."""
    if "labels" in result:
        return ", ".join(f"{_label(t['label'])} {t['score']:.3f}" for t in result["labels"]) or \
            "(no label above threshold)"
    return ", ".join(f"{_label(t['label'])} {t['probability']:.3f}" for t in result["top"])


def _name(image: str) -> str:
    """An image's name as predict's line prints it: in JSON quotes when it holds a line break or another control
    character, a quote or `: `, or begins or ends with a space (`new<LF>line.png` printed as two lines), else as it
    is."""
    odd = any(ord(c) < 32 or c == "\x7f" for c in image) or '"' in image or ": " in image or image != image.strip()
    return json.dumps(image, ensure_ascii=False) if odd else image


def _label(name: str) -> str:
    """A label as predict's line prints it: in JSON quotes when it holds a comma or a quote, or begins or ends with a
    space (`Zeta, "z"` read as two entries of the line), else as it is."""
    return json.dumps(name, ensure_ascii=False) if "," in name or '"' in name or name != name.strip() else name


@app.command()
def pack(
    source: Annotated[str, typer.Option("--from", help="A folder-per-class dataset, or a manifest (.csv/.jsonl).")],
    dest: Annotated[str, typer.Option("--to", help="Where the shards go: s3://bucket/prefix or a local folder.")],
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest shard, e.g. 256MB or 1GiB.")] = "256MB",
    endpoint_url: Annotated[str, typer.Option(help="S3 endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL).")] = "",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the shards already there (deleted first).")]
    = False,
) -> None:
    """Turn a folder-per-class dataset or a manifest into tar shards (WebDataset convention) in storage."""
    from job import logs

    _stop_on_signals()
    try:
        logs.setup()
        from job.pack import pack as write_shards
        from job.pack import parse_size

        result = write_shards(source, dest, parse_size(shard_size), endpoint_url, overwrite=overwrite)
        images = sum(result["images"].values())
        kind = "labels" if result.get("task") == "multi_label" else "classes"
        typer.echo(f"packed {images} images of {len(result['classes'])} {kind} into {len(result['shards'])} shards "
                   f"under {result['to']}")
        _done(0)
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)


@app.command()
def tensorboard(
    source: Annotated[str, typer.Option("--from", help="Where the runs are: output.uri (s3://... or a folder).")],
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TensorBoard's port.")] = 6006,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 127.0.0.1 keeps it local.")] = "0.0.0.0",
    folder: Annotated[Path, typer.Option("--folder", help="Local mirror of the event files (emptied at start; "
                                         "a folder of other files is refused).")]
    = Path("/tmp/finetune-job/tensorboard"),  # job.tensorboard.DEFAULT_FOLDER (imported late: --help stays fast)
    refresh: Annotated[float, typer.Option("--refresh", min=1.0, help="Seconds between mirror refreshes.")] = 30.0,
    endpoint_url: Annotated[str, typer.Option(help="S3 endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL).")] = "",
) -> None:
    """Mirror every run's event files under a prefix and serve TensorBoard on them (runs side by side, HParams)."""
    from job import logs, signals

    try:
        logs.setup()
        signals.install()
        logs.quiet_tensorflow()  # TensorBoard imports it
        from job.tensorboard import serve

        serve(source, folder, port, host, refresh, endpoint_url, stop=signals.requested)
    except BaseException as exc:  # noqa: BLE001
        _fail(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
