"""Checkpoints for resumption: tf.train.CheckpointManager on local disk, mirrored to
<output.uri>/<run_id>/checkpoints/ by the chief.

A checkpoint holds what changes: the weights being trained (the head alone in the head phase, whose
base is frozen and comes from `model.weights` again on a resume; the whole model afterwards), the
phase's optimizer, the best epoch's trainable weights (for early stopping's restore) and the run state
(job.runstate.RunState) as JSON in a string variable.
Non-chief workers of MultiWorkerMirroredStrategy must take part in every save, writing to a private
temporary folder that is removed afterwards (TensorFlow's rule for multi-worker checkpoints).
Anything in the storage folder that is not a `ckpt-N.*` file (say, a `.part` left by an interrupted
copy) is ignored.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import tensorflow as tf

from job import logs, metrics
from job.distribute import Cluster
from job.errors import ConfigError, StorageError
from job.runstate import NewerState, RunState
from job.storage import Store

REMOTE = "checkpoints"
STATE_FILE = "checkpoint"  # CheckpointManager's own index of checkpoints; uploaded last
_CHECKPOINT_FILE = re.compile(r"^ckpt-(\d+)\.(index|data-\d+-of-\d+)$")
log = logs.get()


def _read_whole(path: str) -> RunState:
    """The run state of the checkpoint at `path`, once every tensor of it has been read (their checksums checked): a
    damaged data file fails here, where the restore failed with a raw TensorFlow error."""
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
        reader.get_tensor(name)
    return RunState.from_json(reader.get_tensor("state/.ATTRIBUTES/VARIABLE_VALUE").decode())


def latest_in_index(text: bytes) -> str | None:
    """The latest checkpoint's name (`ckpt-N`) that CheckpointManager's index names, or None where it names none
    readable. Read here, not with tf.train.get_checkpoint_state, which printed a raw warning for a cut index and
    raised for an empty or undecodable one."""
    found = re.search(rb'^model_checkpoint_path: "([^"\n]*)"\r?$', text, re.M)
    name = Path(found.group(1).decode("utf-8", errors="replace")).name if found else ""
    return name if number(name + ".index") is not None else None


def number(name: str) -> int | None:
    """ckpt-12.index -> 12; None for anything that is not a checkpoint file."""
    match = _CHECKPOINT_FILE.match(name)
    return int(match.group(1)) if match else None


class Checkpoints:
    def __init__(self, store: Store, work: Path, cluster: Cluster, keep: int, guard=None):
        self.store = store
        self.cluster = cluster
        self.keep = keep
        self.guard = guard  # called before every upload; raises to stop writes (a lost lease)
        self.dir = work / ("checkpoints" if cluster.is_chief else f"checkpoints-worker-{cluster.worker_index}-tmp")
        self.restore_dir = work / "checkpoints-restore"
        self.number = 0  # the last checkpoint's number; continues after a resume, never reused
        self.latest: str | None = None  # path prefix of the checkpoint to restore: fetched or saved last
        self._prune_refused = False  # storage refused to delete old checkpoints (said once)
        with tf.device("/cpu:0"):
            self.state_var = tf.Variable("{}", dtype=tf.string, trainable=False)

    def _checkpoint(self, **objects) -> tf.train.Checkpoint:
        return tf.train.Checkpoint(state=self.state_var, **objects)

    def _remote(self) -> dict[str, int]:
        """{name: checkpoint number} of the checkpoint files in storage."""
        names = (e.rel.removeprefix(REMOTE + "/") for e in self.store.list(REMOTE))
        return {name: n for name in names if (n := number(name)) is not None}

    # ------------------------------------------------------------ resume

    def fetch(self) -> RunState | None:
        """Download the latest checkpoint from storage (every worker); return its run state."""
        remote = self._remote()
        # Number after every checkpoint file in storage, also those of an attempt that died before
        # its index was uploaded: a number is never reused for different contents.
        self.number = max(remote.values(), default=0)
        if not self.store.exists(f"{REMOTE}/{STATE_FILE}"):
            return None
        shutil.rmtree(self.restore_dir, ignore_errors=True)
        self.store.download(f"{REMOTE}/{STATE_FILE}", self.restore_dir / STATE_FILE)
        latest = latest_in_index((self.restore_dir / STATE_FILE).read_bytes())
        if latest is None:  # TensorFlow's reader returned None for a cut index (the run started over, its checkpoints
            # then pruned) and raised for an empty or undecodable one (exit 1): the checkpoints are there to read
            log.warning("checkpoint index unreadable; trying the checkpoints in storage, newest first",
                        index=storage_name(self.store, STATE_FILE))
        # The index's latest, then the older ones in storage, newest first (a resumed attempt's index lists only
        # the checkpoints it saved itself)
        below = number(latest + ".index") if latest else self.number + 1
        older = sorted({n for n in remote.values() if n < below}, reverse=True)
        names = ([latest] if latest else []) + [f"ckpt-{n}" for n in older]
        if not names:
            return None
        for name in names:
            for rel in remote:
                if rel.startswith(name + "."):
                    self.store.download(f"{REMOTE}/{rel}", self.restore_dir / rel)
            try:
                state = _read_whole(str(self.restore_dir / name))
            except NewerState as e:  # not damaged: an older checkpoint would roll the newer version's training back.
                # Exit 2, which the chart's pod failure policy fails at once: no retry of this image can read it
                raise ConfigError(f"{storage_name(self.store, name)}: {e}") from None
            except (tf.errors.OpError, ValueError, IndexError, RuntimeError) as e:  # damaged, cut or missing: exit 1
                log.warning("checkpoint unreadable, trying the one before it",
                            checkpoint=storage_name(self.store, name), error=str(e).splitlines()[0][:300])
                continue
            self.latest = str(self.restore_dir / name)
            log.info("resuming from checkpoint", checkpoint=storage_name(self.store, name), phase=state.phase,
                     epochs_done=state.epoch, steps_done=state.step)
            return state
        raise StorageError(f"{self.store.uri}/{REMOTE}: none of the {len(names)} checkpoint(s) kept can be read "
                           f"(damaged or incomplete); delete that folder to train the run again from the start")

    def restore(self, **objects) -> None:
        """Load the latest checkpoint (fetched, or saved by this run) into `objects` (weights=, optimizer=, ...);
        StorageError where it lacks a value for one of their variables (a checkpoint holding only the run state
        resumed with the weights as built, the training before it lost without a word)."""
        if self.latest is None:
            raise RuntimeError("no checkpoint to restore: none was fetched or saved")
        status = self._checkpoint(**objects).restore(self.latest)
        try:
            status.assert_existing_objects_matched()
        except AssertionError as e:
            raise StorageError(f"{storage_name(self.store, Path(self.latest).name)}: holds no value for some of the "
                               f"run's variables ({str(e).splitlines()[0][:200]}); delete the checkpoints folder to "
                               "train the run again from the start") from None
        status.expect_partial()

    # ------------------------------------------------------------ save

    def save(self, state: RunState, **objects) -> None:
        """Save on every worker; the chief uploads the new files, its index last, and prunes old ones."""
        self.state_var.assign(state.to_json())
        manager = tf.train.CheckpointManager(self._checkpoint(**objects), str(self.dir), max_to_keep=self.keep)
        self.number += 1
        path = manager.save(checkpoint_number=self.number)
        if not self.cluster.is_chief:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        self.latest = path
        self._mirror(Path(path).name)
        metrics.checkpoint_saved()
        log.info("checkpoint saved", checkpoint=storage_name(self.store, Path(path).name), phase=state.phase,
                 epochs_done=state.epoch, steps_done=state.step)

    def _mirror(self, name: str) -> None:
        """Upload the new checkpoint, then the index naming it; keep the newest `keep` in storage."""
        if self.guard:
            self.guard()
        for path in sorted(self.dir.glob(name + ".*")):
            self.store.upload(path, f"{REMOTE}/{path.name}")
        self.store.upload(self.dir / STATE_FILE, f"{REMOTE}/{STATE_FILE}")
        remote = self._remote()
        kept = set(sorted(set(remote.values()))[-self.keep:])
        stale = [f"{REMOTE}/{rel}" for rel, n in remote.items() if n not in kept]
        if stale:
            try:
                self.store.delete(stale)
            except StorageError as e:  # storage that refuses deletes (no s3:DeleteObject): they stay, said once
                if not self._prune_refused:
                    log.warning("old checkpoints not deleted; they stay in storage", reason=str(e), keep=self.keep)
                self._prune_refused = True


def storage_name(store: Store, name: str) -> str:
    return f"{store.uri}/{REMOTE}/{name}"
