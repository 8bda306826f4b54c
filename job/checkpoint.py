"""Checkpoints for resumption: tf.train.CheckpointManager on local disk, mirrored to
<output.uri>/<run_id>/checkpoints/ by the chief.

A checkpoint holds the whole model, the phase's optimizer, the best epoch's trainable weights
(for early stopping's restore) and the run state as JSON in a string variable: phase, epochs done,
steps done in the current epoch, the partial epoch's sums and the history so far. Non-chief
workers of MultiWorkerMirroredStrategy must take part in every save, writing to a private
temporary folder that is removed afterwards (TensorFlow's rule for multi-worker checkpoints).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import tensorflow as tf

from job import logs, metrics
from job.distribute import Cluster
from job.storage import Store

REMOTE = "checkpoints"
STATE_FILE = "checkpoint"  # CheckpointManager's own index of checkpoints; uploaded last
log = logs.get()


class Checkpoints:
    def __init__(self, model, store: Store, work: Path, cluster: Cluster, keep: int):
        self.model = model
        self.store = store
        self.cluster = cluster
        self.keep = keep
        self.dir = work / ("checkpoints" if cluster.is_chief else f"checkpoints-worker-{cluster.worker_index}-tmp")
        self.restore_dir = work / "checkpoints-restore"
        self.number = 0  # the last checkpoint's number; continues after a resume
        with tf.device("/cpu:0"):
            self.state_var = tf.Variable("{}", dtype=tf.string, trainable=False)

    def _checkpoint(self, **objects) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(model=self.model, state=self.state_var, **objects)

    # ------------------------------------------------------------ resume

    def fetch(self) -> dict | None:
        """Download the latest checkpoint from storage (every worker); return its run state."""
        entries = {e.rel.removeprefix(REMOTE + "/"): e for e in self.store.list(REMOTE)}
        # Number after every checkpoint file in storage, also those of an attempt that died before
        # its index was uploaded: a number is never reused for different contents.
        self.number = max((_number(name) for name in entries if name != STATE_FILE), default=0)
        if STATE_FILE not in entries:
            return None
        shutil.rmtree(self.restore_dir, ignore_errors=True)
        self.store.download(f"{REMOTE}/{STATE_FILE}", self.restore_dir / STATE_FILE)
        index = tf.train.get_checkpoint_state(str(self.restore_dir))
        if index is None or not index.model_checkpoint_path:
            return None
        name = Path(index.model_checkpoint_path).name
        for rel in entries:
            if rel.startswith(name + "."):
                self.store.download(f"{REMOTE}/{rel}", self.restore_dir / rel)
        latest = str(self.restore_dir / name)
        self.latest = latest
        state = json.loads(tf.train.load_checkpoint(latest).get_tensor("state/.ATTRIBUTES/VARIABLE_VALUE"))
        log.info("resuming from checkpoint", checkpoint=storage_name(self.store, name), phase=state["phase"],
                 epochs_done=state["epoch"], steps_done=state["step"])
        return state

    def restore(self, **objects) -> None:
        """Load the fetched checkpoint into the model (and the given optimizer and best-weight copies)."""
        self._checkpoint(**objects).restore(self.latest).expect_partial()

    # ------------------------------------------------------------ save

    def save(self, state: dict, **objects) -> None:
        """Save on every worker; the chief uploads the new files, its index last, and prunes old ones."""
        self.state_var.assign(json.dumps(state))
        manager = tf.train.CheckpointManager(self._checkpoint(**objects), str(self.dir), max_to_keep=self.keep)
        self.number += 1
        path = manager.save(checkpoint_number=self.number)
        self.saved = Path(path).name
        if not self.cluster.is_chief:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        self._mirror()
        metrics.checkpoint_saved()
        log.info("checkpoint saved", checkpoint=storage_name(self.store, Path(path).name), phase=state["phase"],
                 epochs_done=state["epoch"], steps_done=state["step"])

    def _mirror(self) -> None:
        """Upload the new checkpoint, then the index naming it; keep the newest `keep` in storage."""
        for path in sorted(self.dir.glob(self.saved + ".*")):
            self.store.upload(path, f"{REMOTE}/{path.name}")
        self.store.upload(self.dir / STATE_FILE, f"{REMOTE}/{STATE_FILE}")
        remote = [e.rel.removeprefix(REMOTE + "/") for e in self.store.list(REMOTE)]
        numbers = sorted({_number(name) for name in remote if name != STATE_FILE})
        kept = set(numbers[-self.keep:])
        stale = [name for name in remote if name != STATE_FILE and _number(name) not in kept]
        if stale:
            self.store.delete([f"{REMOTE}/{name}" for name in stale])


def _number(name: str) -> int:
    """ckpt-12.index -> 12."""
    return int(name.split(".", 1)[0].rsplit("-", 1)[1])


def storage_name(store: Store, name: str) -> str:
    return f"{store.uri}/{REMOTE}/{name}"
