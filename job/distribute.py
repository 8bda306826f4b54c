"""The tf.distribute strategy from `distribution.*` and TF_CONFIG, plus mixed precision.

auto: several workers in TF_CONFIG -> MultiWorkerMirroredStrategy; several GPUs -> MirroredStrategy;
`cpu_replicas` > 1 -> MirroredStrategy over that many logical CPU devices; else one device.
Must run before anything else touches TensorFlow's devices. TensorFlow is imported inside
`setup` so that `tf_config_workers` stays cheap for the CLI.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from job.errors import ConfigError, WorkerLost, first_line


@dataclass
class Cluster:
    strategy: Any  # tf.distribute.Strategy
    kind: str  # one_device | mirrored | multi_worker
    worker_index: int
    num_workers: int
    mixed_precision: bool
    xla: bool = False  # compile the training step with XLA (GPUs only: on CPU it is 5-8x slower)
    # Decisions every worker must share take one collective on every worker, whatever the values:
    # `mean` averages floats over the workers, `gather` returns every worker's integers exactly
    # (int64). On one worker both are the identity.
    mean: Callable[[list[float]], list[float]] = list
    gather: Callable[[list[int]], list[list[int]]] = lambda values: [list(values)]  # noqa: E731 (one worker)

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


def tf_config_workers(environ=os.environ) -> tuple[int, int]:
    """(this worker's index, number of workers) from TF_CONFIG; (0, 1) without one.

    A `chief` task counts as worker 0 and shifts the `worker` tasks up by one. ConfigError (exit 2, one line) for a
    TF_CONFIG TensorFlow would fail on after start-up: an index past the cluster's end, no task type, one address
    twice (exit 1 with TensorFlow's traceback, and the Job retried it)."""
    raw = environ.get("TF_CONFIG", "")
    if not raw:
        return 0, 1
    try:
        tf_config = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"TF_CONFIG is not JSON: {e}") from None
    return _place(tf_config)


def _place(tf_config) -> tuple[int, int]:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"TF_CONFIG: {why}")

    if not isinstance(tf_config, dict) or not isinstance(tf_config.get("cluster", {}), dict) \
            or not isinstance(tf_config.get("task", {}), dict):
        raise bad('expected {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": N}}')
    cluster, task = tf_config.get("cluster", {}), tf_config.get("task", {})
    roles = {role: cluster[role] for role in ("chief", "worker") if role in cluster}
    for role, addresses in roles.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) and a.strip() for a in addresses):
            raise bad(f"cluster.{role} must be a list of host:port addresses")
    everyone = roles.get("chief", []) + roles.get("worker", [])
    if len(roles.get("chief", [])) > 1:
        raise bad(f"{len(roles['chief'])} chiefs; a cluster has at most one")
    if len(everyone) <= 1 and not task:
        return 0, 1
    twice = sorted({a for a in everyone if everyone.count(a) > 1})
    if twice:
        raise bad(f"{twice[0]} is listed twice in the cluster; each worker needs its own host:port")
    kind, index = task.get("type"), task.get("index", 0)
    if not isinstance(kind, str) or kind not in roles:  # (a list: "unhashable type", a traceback)
        raise bad(f"task.type must be {' or '.join(sorted(roles)) or 'worker'} (a role the cluster lists), not "
                  f"{kind!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(roles[kind]):
        raise bad(f"task.index {index!r} is not a place in cluster.{kind}, which lists {len(roles[kind])} "
                  f"(0..{len(roles[kind]) - 1})")
    return index + (len(roles.get("chief", [])) if kind == "worker" else 0), max(len(everyone), 1)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a pod's cpuset, `taskset`), else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_strategy(strategy: str, environ=os.environ) -> None:
    """ConfigError for a strategy this process cannot run (no TensorFlow: `validate` says it too)."""
    if strategy == "multi_worker" and tf_config_workers(environ)[1] < 2 and not environ.get("TF_CONFIG"):
        raise ConfigError("config: distribution.strategy: multi_worker needs TF_CONFIG with the workers' addresses")
    workers = tf_config_workers(environ)[1]
    if strategy in ("one_device", "mirrored") and workers > 1:
        # one_device failed with a traceback (exit 1, retried to no end); mirrored trained each worker alone, and
        # the chief exported its own model as the run's, exit 0
        raise ConfigError(f"config: distribution.strategy: {strategy} trains on this node alone, but TF_CONFIG names "
                          f"{workers} workers, which would each train without the others; set auto or multi_worker")


def setup(strategy: str, cpu_replicas: int, mixed_precision: str | bool, connect_timeout: float = 300.0) -> Cluster:
    import tensorflow as tf

    check_strategy(strategy)
    gpus = tf.config.list_physical_devices("GPU")
    worker_index, num_workers = tf_config_workers()
    kind = strategy
    if kind == "auto":
        kind = "multi_worker" if num_workers > 1 else "mirrored" if len(gpus) > 1 or cpu_replicas > 1 else "one_device"

    if not gpus and cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        # The logical devices share one intra-op pool: with every core per op the replicas fight over
        # them (2 replicas 0.70-0.80x one replica; with cores // replicas threads 1.06x, docs/BENCHMARKS.md).
        tf.config.threading.set_intra_op_parallelism_threads(max(1, usable_cpus() // cpu_replicas))
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)

    use_mp = bool(gpus) if mixed_precision == "auto" else bool(mixed_precision)
    if use_mp:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")

    if kind == "multi_worker":
        dist = _multi_worker(tf, worker_index, num_workers, connect_timeout)
    elif kind == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
        dist = tf.distribute.MirroredStrategy(devices)
    else:
        dist = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    cluster = Cluster(dist, kind, worker_index, num_workers, use_mp, xla=bool(gpus))
    if num_workers > 1:
        _collectives(tf, cluster)
    return cluster


def _collectives(tf, cluster: Cluster) -> None:
    dist = cluster.strategy
    mean = tf.function(
        lambda v: dist.reduce(tf.distribute.ReduceOp.MEAN, dist.run(tf.identity, args=(v,)), axis=None))
    gather = tf.function(lambda v: dist.gather(dist.run(tf.identity, args=(v,)), axis=0))
    per_worker = cluster.replicas // cluster.num_workers

    def gather_ints(values: list[int]) -> list[list[int]]:
        rows = gather(tf.constant([values], tf.int64)).numpy()  # one row per replica, a worker's alike
        return [[int(x) for x in row] for row in rows[::per_worker]]

    cluster.mean = lambda values: [float(x) for x in mean(tf.constant(values, tf.float64)).numpy()]
    cluster.gather = gather_ints


_WATCHDOG = """
import json, os, select, signal, sys, time
parent, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], timeout)
if ready:
    sys.exit(0)  # the parent said it is up (or exited on its own): nothing to do
print(json.dumps({"event": message, "level": "error", "worker_pid": parent}), flush=True)
print("finetune-job: error: " + message, file=sys.stderr, flush=True)
os.kill(parent, signal.SIGKILL)
"""


def _multi_worker(tf, worker_index: int, num_workers: int, timeout: float):
    """MultiWorkerMirroredStrategy that fails with one clear line, not a hang, if the others never answer.

    TensorFlow's cluster start-up blocks inside C++ while holding the GIL, so no Python thread in
    this process could time it out: a small watchdog process does. Unless the strategy is up and a
    first all-reduce over every worker has completed within `timeout` seconds, it prints the reason
    and kills the worker (exit 137; Kubernetes retries the pod). Collectives after start-up have no
    timeout of their own: a slow peer (staging a large dataset) is waited for, not failed.
    """
    import subprocess
    import sys

    message = (f"worker {worker_index} could not reach all {num_workers} workers in TF_CONFIG within {timeout:.0f} s "
               "(distribution.connect_timeout_seconds); check that every worker runs and its port is reachable")
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), message],
                                stdin=subprocess.PIPE)
    try:
        dist = tf.distribute.MultiWorkerMirroredStrategy()
        count = tf.function(lambda: dist.reduce(tf.distribute.ReduceOp.SUM, dist.run(lambda: tf.constant(1.0)),
                                                axis=None))
        answered = int(count())
    except tf.errors.OpError as e:  # read as "lost contact with another worker mid-run" before anything ran
        raise WorkerLost(f"worker {worker_index} could not start the cluster of {num_workers} workers in TF_CONFIG "
                         f"({first_line(e)}); check that every worker's TF_CONFIG lists the same addresses in the "
                         "same order") from None
    finally:
        watchdog.stdin.close()
        watchdog.wait()
    if answered != dist.num_replicas_in_sync:
        raise RuntimeError(f"all-reduce over the workers gave {answered}, expected {dist.num_replicas_in_sync}")
    return dist
