"""Prometheus metrics of a run: one registry, served on /metrics and pushed to a Pushgateway.

Every series carries the labels `run_id` and `worker`. A process serves exactly one run, so this costs
no cardinality, and it lets one dashboard filter select a run whether its series were scraped from the
pod or pushed to the Pushgateway (where `job` and `instance` differ from the scraped ones).

Pushgateway groups: the chief pushes to `{job="finetune-job", run_id}`, the run's summary; other
workers push to `{job="finetune-job", run_id, worker}` during the run, so they never overwrite the
chief's group, and delete their group when they finish, so that only the chief's final summary stays.
Pushes run in a background thread with a short timeout; a failed push is logged and counted in
`finetune_job_push_errors_total`, never raised.

The functions below work without `start()` (they only update the registry), so `validate` and unit
code can call them. No TensorFlow import here: device memory is read only when the training code has
already imported TensorFlow.
"""

from __future__ import annotations

import sys
import threading
import time
import urllib.parse

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    delete_from_gateway,
    disable_created_metrics,
    push_to_gateway,
    start_http_server,
)
from prometheus_client.exposition import basic_auth_handler, default_handler

from job.uris import masked

log = structlog.get_logger()

JOB = "finetune-job"
PHASES = ("staging", "head", "finetune", "refit_head", "refit", "evaluate", "export")
TRAINING_PHASES = ("head", "finetune")  # their series exist from the start; train.refit's appear when it runs
STATUSES = ("running", "succeeded", "failed", "preempted")
# The S3 operations the job's storage code performs; anything else is counted as "other" so that a
# surprising botocore operation name cannot grow the label set.
S3_OPERATIONS = (
    "HeadBucket",
    "ListObjectsV2",
    "HeadObject",
    "GetObject",
    "PutObject",
    "CreateMultipartUpload",
    "UploadPart",
    "CompleteMultipartUpload",
    "AbortMultipartUpload",
    "DeleteObject",
    "DeleteObjects",
    "CopyObject",
    "other",
)
# Steps take from about a millisecond (cached-feature heads on small batches) to a minute (large
# backbones on CPU).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PUSH_TIMEOUT_SECONDS = 5.0
DEVICE_MEMORY_SAMPLE_SECONDS = 5.0

REGISTRY = CollectorRegistry(auto_describe=True)
_RUN = ("run_id", "worker")


def _gauge(name: str, doc: str, *labels: str) -> Gauge:
    return Gauge(f"finetune_job_{name}", doc, _RUN + labels, registry=REGISTRY)


def _counter(name: str, doc: str, *labels: str) -> Counter:
    return Counter(f"finetune_job_{name}", doc, _RUN + labels, registry=REGISTRY)


INFO = Info("finetune_job", "The run: backbone and job version (value 1).", _RUN, registry=REGISTRY)
RUN_STATUS = _gauge("run_status", "1 for the run's status (running, succeeded, failed, preempted), else 0.", "status")
PHASE = _gauge("phase", "1 for the phase the run is in, 0 for the others.", "phase")
EPOCH = _gauge("epoch", "Current epoch of the phase, 1-based.", "phase")
EPOCHS = _gauge("epochs", "Epochs planned for the phase (early stopping may end it sooner).", "phase")
STEPS_PER_EPOCH = _gauge("steps_per_epoch", "Training steps in one epoch of the phase.", "phase")
EPOCH_STEP = _gauge("epoch_step", "Steps done in the current epoch of the phase.", "phase")
TRAIN_LOSS = _gauge("train_loss", "Training loss of the last finished epoch.", "phase")
TRAIN_ACCURACY = _gauge("train_accuracy", "Training accuracy (0..1) of the last finished epoch.", "phase")
VAL_LOSS = _gauge("val_loss", "Validation loss of the last finished epoch.", "phase")
VAL_ACCURACY = _gauge("val_accuracy", "Validation accuracy (0..1) of the last finished epoch.", "phase")
VAL_MAP = _gauge("val_map", "Validation mean average precision (0..1) of the last finished epoch (multi_label).",
                 "phase")
IMAGES = _counter("images_processed", "Training images processed by this worker.", "phase")
STAGE_DONE = _gauge("stage_items_done", "Items done of a stage: staging (images, or shards read), decoding, "
                    "features (images through the frozen base), validation (at each epoch's end).", "stage")
STAGE_ITEMS = _gauge("stage_items", "Items of that stage in all (with stage_items_done: its progress).", "stage")
STEP_DURATION = Histogram(
    "finetune_job_step_duration_seconds",
    "Wall time of one training step, waiting for its batch included.",
    _RUN + ("phase",),
    buckets=STEP_BUCKETS,
    registry=REGISTRY,
)
DATA_WAIT = _counter("data_wait_seconds", "Step time spent waiting for the input pipeline.", "phase")
S3_DOWNLOADED = _counter("s3_bytes_downloaded", "Bytes downloaded from object storage.")
S3_UPLOADED = _counter("s3_bytes_uploaded", "Bytes uploaded to object storage.")
S3_ERRORS = _counter("s3_errors", "Failed object storage requests, each failed attempt counted.", "operation")
BAD_IMAGES = _counter("bad_images", "Image files that could not be decoded and were skipped.")
CHECKPOINTS = _counter("checkpoints_saved", "Training checkpoints saved.")
PUSH_ERRORS = _counter("push_errors", "Failed pushes to the Pushgateway.")
DEVICE_MEMORY = _gauge("device_memory_bytes", "GPU memory in use (TensorFlow's allocator).", "device")
LAST_SUCCESS = _gauge("last_success_timestamp_seconds", "Unix time at which the run succeeded.")

_METRICS = (
    INFO,
    RUN_STATUS,
    PHASE,
    EPOCH,
    EPOCHS,
    STEPS_PER_EPOCH,
    EPOCH_STEP,
    TRAIN_LOSS,
    TRAIN_ACCURACY,
    VAL_LOSS,
    VAL_ACCURACY,
    VAL_MAP,
    IMAGES,
    STAGE_DONE,
    STAGE_ITEMS,
    STEP_DURATION,
    DATA_WAIT,
    S3_DOWNLOADED,
    S3_UPLOADED,
    S3_ERRORS,
    BAD_IMAGES,
    CHECKPOINTS,
    PUSH_ERRORS,
    DEVICE_MEMORY,
    LAST_SUCCESS,
)


class _Run:
    """What `start` set up; replaced on every `start`."""

    def __init__(
        self,
        run_id: str = "",
        worker: int = 0,
        is_chief: bool = True,
        pushgateway: str = "",
        push_interval_seconds: float = 15.0,
        linger_seconds: float = 0.0,
    ):
        self.labels = {"run_id": run_id, "worker": str(worker)}
        self.is_chief = is_chief
        self.pushgateway, self.shown, self.handler = _gateway(pushgateway)
        self.push_interval_seconds = push_interval_seconds
        self.linger_seconds = linger_seconds
        self.server = None
        self.server_thread: threading.Thread | None = None
        self.pusher: threading.Thread | None = None
        self.stop_pushing = threading.Event()
        self.owned = threading.Event()  # the run is this attempt's (its lease taken): periodic pushes may begin
        self.push_failing = False
        self.next_memory_sample = 0.0

    @property
    def grouping_key(self) -> dict[str, str]:
        if self.is_chief:
            return {"run_id": self.labels["run_id"]}
        return dict(self.labels)


def _gateway(url: str):
    """(the URL without user:password@, the URL as logged, the handler sending them): prometheus_client takes no
    credentials from the URL (every push failed, "Name or service not known" for `user:pw@host`) and the failure's
    log line printed the password."""
    parts = urllib.parse.urlsplit(url) if "://" in url else None
    if parts is None or "@" not in parts.netloc:
        return url, masked(url), default_handler
    user, password = urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")
    host = parts.netloc.rpartition("@")[2]
    bare = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))

    def handler(url, method, timeout, headers, data):
        return basic_auth_handler(url, method, timeout, headers, data, user, password)

    return bare, masked(url), handler


_run = _Run()


def _reset() -> None:
    """Drop the previous run's series and create the ones that must exist from the start at 0."""
    for metric in _METRICS:
        metric.clear()
    run = _run.labels
    for status in STATUSES:
        RUN_STATUS.labels(**run, status=status).set(status == "running")
    for phase in PHASES:
        PHASE.labels(**run, phase=phase).set(0)
    for phase in TRAINING_PHASES:
        IMAGES.labels(**run, phase=phase)
        DATA_WAIT.labels(**run, phase=phase)
        STEP_DURATION.labels(**run, phase=phase)
    for operation in S3_OPERATIONS:
        S3_ERRORS.labels(**run, operation=operation)
    for counter in (S3_DOWNLOADED, S3_UPLOADED, BAD_IMAGES, CHECKPOINTS, PUSH_ERRORS):
        counter.labels(**run)


def start(
    *,
    run_id: str,
    backbone: str,
    version: str,
    worker: int = 0,
    is_chief: bool = True,
    port: int = 8000,
    pushgateway: str = "",
    push_interval_seconds: float = 15.0,
    linger_seconds: float = 15.0,
    host: str = "0.0.0.0",
    owned: bool = True,
) -> None:
    """Begin a run: reset the registry, serve it on host:port (port 0: not served) and, with a
    Pushgateway URL, push it every `push_interval_seconds` from a background thread. `owned` False: the periodic
    pushes wait for `owned()` (the run's lease taken): a second attempt of one run id, waiting on the live one's
    lease, pushed its own "running" values into the live one's group every 15 s."""
    global _run
    _stop()
    # _created series would double the series count (and the Pushgateway's); rate() does not need them.
    disable_created_metrics()
    _run = _Run(run_id, worker, is_chief, pushgateway, push_interval_seconds, linger_seconds)
    if owned:
        _run.owned.set()
    _reset()
    INFO.labels(**_run.labels).info({"backbone": backbone, "version": version})
    if port:
        try:
            _run.server, _run.server_thread = start_http_server(port, addr=host, registry=REGISTRY)
        except OSError as exc:
            # Training matters more than its metrics: go on without /metrics, loudly.
            log.warning("metrics_server_failed", host=host, port=port, error=str(exc))
        else:
            shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # all interfaces: this one works
            log.info("metrics_serving", url=f"http://{shown}:{_run.server.server_port}/metrics", bind=host)
    if pushgateway:
        _run.pusher = threading.Thread(target=_push_periodically, args=(_run,), name="pusher", daemon=True)
        _run.pusher.start()


def set_phase(phase: str) -> None:
    """Enter `phase` (one of PHASES)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    for name in PHASES:
        PHASE.labels(**_run.labels, phase=name).set(name == phase)


def stage_progress(stage: str, done: int, total: int) -> None:
    """`done` of `total` items of a stage (staging, decoding, features, validation): a long one shows it moves."""
    STAGE_DONE.labels(**_run.labels, stage=stage).set(done)
    STAGE_ITEMS.labels(**_run.labels, stage=stage).set(total)


def epoch_started(phase: str, epoch: int, epochs: int, steps_per_epoch: int, steps_done: int = 0) -> None:
    """Epoch `epoch` (1-based) of `epochs` begins, or goes on after `steps_done` steps (a resume); it has
    `steps_per_epoch` steps."""
    run = _run.labels
    EPOCH.labels(**run, phase=phase).set(epoch)
    EPOCHS.labels(**run, phase=phase).set(epochs)
    STEPS_PER_EPOCH.labels(**run, phase=phase).set(steps_per_epoch)
    EPOCH_STEP.labels(**run, phase=phase).set(steps_done)  # (0: an epoch resumed mid-way never reached its total)


def step_done(phase: str, images: int, step_seconds: float, data_wait_seconds: float) -> None:
    """One training step of this worker: `images` images in `step_seconds` of wall time, of which
    `data_wait_seconds` were spent waiting for the batch."""
    run = _run.labels
    IMAGES.labels(**run, phase=phase).inc(images)
    STEP_DURATION.labels(**run, phase=phase).observe(step_seconds)
    DATA_WAIT.labels(**run, phase=phase).inc(data_wait_seconds)
    EPOCH_STEP.labels(**run, phase=phase).inc()
    if time.monotonic() >= _run.next_memory_sample:
        _run.next_memory_sample = time.monotonic() + DEVICE_MEMORY_SAMPLE_SECONDS
        _sample_device_memory()


def epoch_done(
    phase: str, epoch: int, *, train_loss: float, train_accuracy: float, val_loss: float, val_accuracy: float,
    val_map: float | None = None,
) -> None:
    """Epoch `epoch` of `phase` finished with these results (`val_map`: multi-label runs only, whose accuracies are
    binary: each label decided at 0.5)."""
    run = _run.labels
    EPOCH.labels(**run, phase=phase).set(epoch)
    TRAIN_LOSS.labels(**run, phase=phase).set(train_loss)
    TRAIN_ACCURACY.labels(**run, phase=phase).set(train_accuracy)
    VAL_LOSS.labels(**run, phase=phase).set(val_loss)
    VAL_ACCURACY.labels(**run, phase=phase).set(val_accuracy)
    if val_map is not None:
        VAL_MAP.labels(**run, phase=phase).set(val_map)


def s3_bytes_downloaded(n: int) -> None:
    S3_DOWNLOADED.labels(**_run.labels).inc(n)


def s3_bytes_uploaded(n: int) -> None:
    S3_UPLOADED.labels(**_run.labels).inc(n)


def s3_error(operation: str) -> None:
    """A failed S3 request; `operation` is the API name (GetObject, ...), others count as "other"."""
    S3_ERRORS.labels(**_run.labels, operation=operation if operation in S3_OPERATIONS else "other").inc()


def bad_images(n: int) -> None:
    BAD_IMAGES.labels(**_run.labels).inc(n)


def checkpoint_saved() -> None:
    CHECKPOINTS.labels(**_run.labels).inc()


def finish(success: bool, preempted: bool = False, push: bool = True) -> None:
    """End the run: record its status, push the final state (the chief) or remove this worker's
    group (the others), keep /metrics up for `linger_seconds` so the last values get scraped, stop.

    A preempted run (SIGTERM, checkpoint saved) is "preempted", not "failed": it resumes, and
    FinetuneJobFailed must not fire on every routine eviction. It does not linger: the pod's grace period is the
    checkpoint's, and a linger that outlasted it ended in SIGKILL (exit 137, counted as a failure by the chart's Job)
    where the run had stopped cleanly; the Pushgateway, when set, has its final state. `push` False: nothing pushed
    at the end (an attempt that found its run completed by another: its push replaced that run's final values)."""
    run = _run.labels
    status = "succeeded" if success else "preempted" if preempted else "failed"
    for name in STATUSES:
        RUN_STATUS.labels(**run, status=name).set(name == status)
    if success:
        LAST_SUCCESS.labels(**run).set_to_current_time()
    _stop_pusher(_run)
    if _run.pushgateway and push:
        if _run.is_chief:
            _push(_run)
        else:
            _gateway_call(
                _run,
                delete_from_gateway,
                _run.pushgateway,
                job=JOB,
                grouping_key=_run.grouping_key,
                timeout=PUSH_TIMEOUT_SECONDS,
                handler=_run.handler,
            )
    if _run.server is not None and _run.linger_seconds > 0 and not preempted:
        time.sleep(_run.linger_seconds)
    _stop()
    # The run is over: later calls only update the registry.
    _run.pushgateway = ""


def _stop() -> None:
    """Stop the server and the pusher of the current run, if any (no final push)."""
    _stop_pusher(_run)
    if _run.server is not None:
        _run.server.shutdown()
        _run.server.server_close()
        _run.server_thread.join()
        _run.server = None


def _stop_pusher(run: _Run) -> None:
    if run.pusher is not None:
        run.stop_pushing.set()
        run.pusher.join()
        run.pusher = None


def owned() -> None:
    """This attempt holds the run (its lease, or a worker's place in it): its periodic pushes begin."""
    _run.owned.set()


def is_owned() -> bool:
    return _run.owned.is_set()


def _push_periodically(run: _Run) -> None:
    while not run.owned.is_set():
        if run.stop_pushing.wait(0.2):
            return
    while True:
        _push(run)
        if run.stop_pushing.wait(run.push_interval_seconds):
            return


def _push(run: _Run) -> None:
    _gateway_call(
        run,
        push_to_gateway,
        run.pushgateway,
        job=JOB,
        registry=REGISTRY,
        grouping_key=run.grouping_key,
        timeout=PUSH_TIMEOUT_SECONDS,
        handler=run.handler,
    )


def _gateway_call(run: _Run, call, *args, **kwargs) -> None:
    """Call the Pushgateway; failures are counted and logged (once per outage), never raised."""
    try:
        call(*args, **kwargs)
    except Exception as exc:  # any failure of an optional sink: training goes on
        PUSH_ERRORS.labels(**run.labels).inc()
        if not run.push_failing:  # (its labels: the pusher's thread does not have the run's bound log context)
            log.warning("pushgateway_failed", url=run.shown, error=str(exc), **_as_logged(run.labels))
        run.push_failing = True
    else:
        if run.push_failing:
            log.info("pushgateway_recovered", url=run.shown, **_as_logged(run.labels))
        run.push_failing = False


def _as_logged(labels: dict[str, str]) -> dict:
    """A run's metric labels as the log binds them: `worker` an int, as on every other record (a string here only,
    which a log store that types fields by their first value refuses)."""
    return {**labels, "worker": int(labels["worker"])}


def _sample_device_memory() -> None:
    """Memory in use per GPU, when the training code has imported TensorFlow and GPUs exist."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return
    try:
        for gpu in tf.config.list_logical_devices("GPU"):
            device = gpu.name.split("device:")[-1]  # "/device:GPU:0" -> "GPU:0"
            DEVICE_MEMORY.labels(**_run.labels, device=device).set(
                tf.config.experimental.get_memory_info(device)["current"]
            )
    except (RuntimeError, ValueError) as exc:
        log.debug("device_memory_unavailable", error=str(exc))


def s3_errors_total() -> int:
    """finetune_job_s3_errors_total of this run, summed over operations (for the run's summary line)."""
    return int(sum(sample.value for family in S3_ERRORS.collect() for sample in family.samples
                   if sample.name.endswith("_total")))
