"""The tf.distribute strategy from `distribution.*` and TF_CONFIG, plus mixed precision.

auto: several workers in TF_CONFIG -> MultiWorkerMirroredStrategy; several GPUs -> MirroredStrategy;
`cpu_replicas` > 1 -> MirroredStrategy over that many logical CPU devices; else one device.
Must run before anything else touches TensorFlow's devices. TensorFlow is imported inside
`setup` so that `tf_config_workers` stays cheap for the CLI.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from job.errors import ConfigError


@dataclass
class Cluster:
    strategy: Any  # tf.distribute.Strategy
    kind: str  # one_device | mirrored | multi_worker
    worker_index: int
    num_workers: int
    mixed_precision: bool

    @property
    def is_chief(self) -> bool:
        return self.worker_index == 0

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


def tf_config_workers(environ=os.environ) -> tuple[int, int]:
    """(this worker's index, number of workers) from TF_CONFIG; (0, 1) without one.

    A `chief` task counts as worker 0 and shifts the `worker` tasks up by one.
    """
    raw = environ.get("TF_CONFIG", "")
    if not raw:
        return 0, 1
    try:
        tf_config = json.loads(raw)
        cluster = tf_config.get("cluster", {})
        task = tf_config.get("task", {})
        chiefs = len(cluster.get("chief", []))
        total = chiefs + len(cluster.get("worker", []))
        index = int(task.get("index", 0)) + (chiefs if task.get("type") == "worker" else 0)
    except (ValueError, AttributeError, TypeError) as e:
        raise ConfigError(f"TF_CONFIG is not valid: {e}") from None
    return index, max(total, 1)


def setup(strategy: str, cpu_replicas: int, mixed_precision: str | bool) -> Cluster:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    worker_index, num_workers = tf_config_workers()
    kind = strategy
    if kind == "auto":
        kind = "multi_worker" if num_workers > 1 else "mirrored" if len(gpus) > 1 or cpu_replicas > 1 else "one_device"
    if kind == "multi_worker" and num_workers < 2 and not os.environ.get("TF_CONFIG"):
        raise ConfigError("config: distribution.strategy: multi_worker needs TF_CONFIG with the workers' addresses")

    if not gpus and cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)

    use_mp = bool(gpus) if mixed_precision == "auto" else bool(mixed_precision)
    if use_mp:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")

    if kind == "multi_worker":
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=300)
        dist = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    elif kind == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU" if gpus else "CPU")]
        dist = tf.distribute.MirroredStrategy(devices)
    else:
        dist = tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    return Cluster(dist, kind, worker_index, num_workers, use_mp)
