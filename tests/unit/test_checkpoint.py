"""Checkpoints (job/checkpoint.py) against a real local store, with a tiny Keras model on one CPU device:
what `restore` puts back is checked variable by variable (weights, every optimizer variable, the best
copy), and the run state, numbering, pruning, stray files and the non-chief path are checked directly."""

from __future__ import annotations

import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402
from structlog.testing import capture_logs  # noqa: E402

from job import metrics, storage  # noqa: E402
from job.checkpoint import REMOTE, STATE_FILE, Checkpoints, number, storage_name  # noqa: E402
from job.distribute import Cluster  # noqa: E402
from job.runstate import RunState  # noqa: E402


def cluster(worker_index: int = 0, num_workers: int = 1) -> Cluster:
    return Cluster(tf.distribute.OneDeviceStrategy("/cpu:0"), "one_device", worker_index, num_workers, False)


class Recording(storage.LocalStore):
    """A local store that records the order of uploads."""

    def __init__(self, uri: str):
        super().__init__(uri)
        self.uploads: list[str] = []

    def upload(self, src, rel: str) -> None:
        self.uploads.append(rel)
        super().upload(src, rel)


def store(tmp_path) -> storage.Store:
    return storage.open_store(str(tmp_path / "out"))


def checkpoints(tmp_path, keep: int = 3, worker_index: int = 0, num_workers: int = 1, **kw) -> Checkpoints:
    return Checkpoints(kw.pop("store", None) or store(tmp_path), tmp_path / "work", cluster(worker_index, num_workers),
                       keep=keep, **kw)


def remote_numbers(tmp_path) -> set[int]:
    return {n for p in (tmp_path / "out" / REMOTE).iterdir() if (n := number(p.name)) is not None}


def tiny_model(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Dense(5, activation="relu")(inputs)))


def trained(seed: int = 0, steps: int = 2) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    """A tiny model and its Adam optimizer after `steps` steps: iterations and both moments non-zero."""
    model = tiny_model(seed)
    optimizer = keras.optimizers.Adam(0.01)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, size=8)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(value, model.trainable_variables), model.trainable_variables))
    return model, optimizer


def state_of(**changes) -> RunState:
    state = RunState(phase="finetune", epoch=3, step=5, sums=[1.25, 7.0], best=[0.4, 0.875], best_epoch=2,
                     patience_used=1, history={"head": [{"epoch": 1, "loss": 0.5}], "finetune": [{"epoch": 1}]},
                     config={"train.seed": 7, "train.finetune.epochs": 10})
    for key, value in changes.items():
        setattr(state, key, value)
    return state


def values(variables) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in variables]


def assert_same(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want) and got
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.array_equal(g, w)


def checkpoints_saved() -> float:
    """finetune_job_checkpoints_saved_total, summed over its series."""
    return sum(s.value for m in metrics.REGISTRY.collect() for s in m.samples
               if s.name == "finetune_job_checkpoints_saved_total")


# ------------------------------------------------------------------ restore


def test_restore_brings_back_weights_every_optimizer_variable_and_the_best_copy(tmp_path):
    model, optimizer = trained(seed=0)
    best = [tf.Variable(v.value * 2.0 + 1.0, trainable=False) for v in model.trainable_variables]
    saved = {"weights": values(model.weights), "optimizer": values(optimizer.variables), "best": values(best)}
    assert int(optimizer.iterations.numpy()) == 2
    moments = [v for v in optimizer.variables if v.name not in ("iteration", "learning_rate")]
    assert len(moments) == 2 * len(model.trainable_variables)
    assert all(np.any(v.numpy() != 0) for v in moments)  # the slots carry something to restore
    state = state_of()
    checkpoints(tmp_path).save(state, weights=model, optimizer=optimizer, best=best)

    # A new process: other weights, a new optimizer (built, zero slots), a zero best copy.
    fresh_model = tiny_model(seed=1)
    fresh_optimizer = keras.optimizers.Adam(0.01)
    fresh_optimizer.build(fresh_model.trainable_variables)
    fresh_best = [tf.Variable(tf.zeros_like(v.value), trainable=False) for v in fresh_model.trainable_variables]
    assert not np.array_equal(fresh_model.weights[0].numpy(), saved["weights"][0])
    assert int(fresh_optimizer.iterations.numpy()) == 0

    ckpt = checkpoints(tmp_path)
    fetched = ckpt.fetch()
    assert fetched == state and fetched is not state
    assert ckpt.latest == str(tmp_path / "work" / "checkpoints-restore" / "ckpt-1")
    ckpt.restore(weights=fresh_model, optimizer=fresh_optimizer, best=fresh_best)

    assert_same(values(fresh_model.weights), saved["weights"])
    assert [v.shape for v in fresh_optimizer.variables] == [v.shape for v in optimizer.variables]
    assert_same(values(fresh_optimizer.variables), saved["optimizer"])
    assert int(fresh_optimizer.iterations.numpy()) == 2
    assert_same(values(fresh_best), saved["best"])


def test_restore_without_a_fetch_loads_what_this_run_saved_last(tmp_path):
    model, optimizer = trained(seed=0, steps=1)
    ckpt = checkpoints(tmp_path)
    ckpt.save(state_of(step=1), weights=model, optimizer=optimizer)
    trained_more = trained(seed=0, steps=3)
    ckpt.save(state_of(step=3), weights=trained_more[0], optimizer=trained_more[1])
    assert ckpt.latest == str(tmp_path / "work" / "checkpoints" / "ckpt-2")
    want = values(trained_more[0].weights)
    fresh = tiny_model(seed=1)
    ckpt.restore(weights=fresh)
    assert_same(values(fresh.weights), want)


def test_restore_with_nothing_fetched_or_saved_is_an_error(tmp_path):
    ckpt = checkpoints(tmp_path)
    message = "^no checkpoint to restore: none was fetched or saved$"
    with pytest.raises(RuntimeError, match=message):
        ckpt.restore(weights=tiny_model(0))
    assert ckpt.fetch() is None
    with pytest.raises(RuntimeError, match=message):
        ckpt.restore(weights=tiny_model(0))


def test_restore_of_a_part_leaves_the_rest_alone(tmp_path):
    """`expect_partial`: restoring the weights alone from a checkpoint that also holds an optimizer."""
    model, optimizer = trained(seed=0)
    checkpoints(tmp_path).save(state_of(), weights=model, optimizer=optimizer)
    ckpt = checkpoints(tmp_path)
    ckpt.fetch()
    fresh = tiny_model(seed=1)
    ckpt.restore(weights=fresh)
    assert_same(values(fresh.weights), values(model.weights))


# ------------------------------------------------------------------ run state, numbering, storage


def test_the_run_state_round_trips_and_is_logged(tmp_path):
    model = tiny_model(0)
    state = state_of()
    before = checkpoints_saved()
    with capture_logs() as saved_logs:
        checkpoints(tmp_path).save(state, weights=model)
    assert checkpoints_saved() == before + 1
    ckpt = checkpoints(tmp_path)
    with capture_logs() as fetched_logs:
        fetched = ckpt.fetch()
    assert fetched == state
    assert (fetched.history, fetched.config, fetched.best, fetched.sums) == (
        state.history, state.config, state.best, state.sums)
    where = storage_name(ckpt.store, "ckpt-1")
    assert where == f"{tmp_path / 'out'}/checkpoints/ckpt-1"
    expected = {"checkpoint": where, "phase": "finetune", "epochs_done": 3, "steps_done": 5}
    saved_log = [e for e in saved_logs if e["event"] == "checkpoint saved"]
    fetched_log = [e for e in fetched_logs if e["event"] == "resuming from checkpoint"]
    assert len(saved_log) == 1 and expected.items() <= saved_log[0].items() and saved_log[0]["log_level"] == "info"
    assert len(fetched_log) == 1 and expected.items() <= fetched_log[0].items()
    assert fetched_log[0]["log_level"] == "info"


def test_the_state_is_the_one_of_the_latest_checkpoint(tmp_path):
    ckpt = checkpoints(tmp_path)
    model = tiny_model(0)
    for step in (1, 2, 3):
        ckpt.save(state_of(step=step), weights=model)
    assert checkpoints(tmp_path).fetch() == state_of(step=3)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    # Damaged or incomplete, the newest checkpoint failed every retry with a raw TensorFlow error (exit 1), though
    # the older ones it keeps were whole.
    from job.errors import StorageError

    ckpt = checkpoints(tmp_path)
    models = [tiny_model(seed) for seed in (1, 2, 3)]
    for step, model in zip((1, 2, 3), models):
        ckpt.save(state_of(step=step), weights=model)
    data = tmp_path / "out" / REMOTE / "ckpt-3.data-00000-of-00001"
    damaged = bytearray(data.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    data.write_bytes(bytes(damaged))
    again = checkpoints(tmp_path)
    with capture_logs() as logs:
        assert again.fetch() == state_of(step=2)
    assert [x["checkpoint"] for x in logs if x["event"] == "checkpoint unreadable, trying the one before it"] == [
        storage_name(again.store, "ckpt-3")]
    restored = tiny_model(9)
    again.restore(weights=restored)
    assert all(np.array_equal(a, b) for a, b in zip(restored.get_weights(), models[1].get_weights()))
    (tmp_path / "out" / REMOTE / "ckpt-2.index").write_bytes(b"")  # an emptied index
    (tmp_path / "out" / REMOTE / "ckpt-1.data-00000-of-00001").unlink()  # a file lost
    with pytest.raises(StorageError, match="none of the 3 checkpoint.s. kept can be read .damaged or incomplete.; "
                                           "delete that folder"):
        checkpoints(tmp_path).fetch()


def test_the_fallback_reaches_the_checkpoints_of_an_earlier_attempt(tmp_path):
    # A resumed attempt's index lists only what it saved: its one damaged checkpoint was "none readable", and the
    # advice was to delete a folder that held two good ones.
    first = checkpoints(tmp_path)
    model = tiny_model(0)
    for step in (1, 2):
        first.save(state_of(step=step), weights=model)
    second = checkpoints(tmp_path)
    second.fetch()
    second.save(state_of(step=3), weights=model)
    data = tmp_path / "out" / REMOTE / "ckpt-3.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-8])  # cut short
    assert checkpoints(tmp_path).fetch() == state_of(step=2)


def test_numbering_continues_after_a_fetch(tmp_path):
    model = tiny_model(0)
    first = checkpoints(tmp_path)
    for _ in range(2):
        first.save(state_of(), weights=model)
    assert first.number == 2
    again = checkpoints(tmp_path)
    assert again.number == 0
    again.fetch()
    assert again.number == 2
    again.save(state_of(), weights=model)
    assert again.number == 3 and again.latest.endswith("ckpt-3")
    assert remote_numbers(tmp_path) == {1, 2, 3}
    assert checkpoints(tmp_path).fetch() is not None
    assert (tmp_path / "out" / REMOTE / "ckpt-3.index").is_file()


def test_a_number_is_never_reused_after_an_attempt_that_died_before_its_index(tmp_path):
    """ckpt-7's files reached storage, its index did not: the state is ckpt-2's, the next number 8."""
    model = tiny_model(0)
    first = checkpoints(tmp_path)
    first.save(state_of(step=1), weights=model)
    first.save(state_of(step=2), weights=model)
    remote = tmp_path / "out" / REMOTE
    (remote / "ckpt-7.data-00000-of-00001").write_bytes(b"orphan")
    again = checkpoints(tmp_path, keep=5)
    assert again.fetch() == state_of(step=2)
    assert again.number == 7 and again.latest.endswith("ckpt-2")
    assert not (tmp_path / "work" / "checkpoints-restore" / "ckpt-7.data-00000-of-00001").exists()
    again.save(state_of(step=8), weights=model)
    assert again.number == 8 and (remote / "ckpt-8.index").is_file()


def test_keep_prunes_storage_to_the_newest_checkpoints(tmp_path):
    model = tiny_model(0)
    ckpt = checkpoints(tmp_path, keep=2)
    ckpt.save(state_of(), weights=model)
    assert remote_numbers(tmp_path) == {1}
    ckpt.save(state_of(), weights=model)
    assert remote_numbers(tmp_path) == {1, 2}
    for _ in range(3):
        ckpt.save(state_of(), weights=model)
    assert remote_numbers(tmp_path) == {4, 5}
    names = {p.name for p in (tmp_path / "out" / REMOTE).iterdir()}
    assert names == {STATE_FILE, "ckpt-4.index", "ckpt-4.data-00000-of-00001", "ckpt-5.index",
                     "ckpt-5.data-00000-of-00001"}
    assert {p.name for p in ckpt.dir.iterdir()} == names  # the local copies are pruned alike (disk space)
    one = checkpoints(tmp_path / "one", keep=1)
    for _ in range(3):
        one.save(state_of(), weights=model)
    assert remote_numbers(tmp_path / "one") == {3}


def test_files_that_are_not_checkpoint_files_are_ignored(tmp_path):
    remote = tmp_path / "out" / REMOTE
    remote.mkdir(parents=True)
    strays = {".ckpt-9.index.123-456.part": b"half", "notes.txt": b"x", "ckpt-12.index.bak": b"x",
              "old-ckpt-11.index": b"x", "ckpt-x.index": b"x", "sub/ckpt-10.index": b"x"}
    for name, data in strays.items():
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        (remote / name).write_bytes(data)
    ckpt = checkpoints(tmp_path, keep=1)
    assert ckpt.fetch() is None and ckpt.number == 0  # no index; no checkpoint number among the strays
    model = tiny_model(0)
    for _ in range(3):
        ckpt.save(state_of(), weights=model)
    assert ckpt.number == 3 and remote_numbers(tmp_path) == {3}
    for name, data in strays.items():
        assert (remote / name).read_bytes() == data  # not pruned
    again = checkpoints(tmp_path)
    assert again.fetch() == state_of() and again.number == 3


def test_fetch_with_no_checkpoint_returns_none(tmp_path):
    ckpt = checkpoints(tmp_path)
    assert ckpt.fetch() is None and ckpt.number == 0 and ckpt.latest is None
    # Checkpoint files without the index that names one: nothing to resume, but their numbers are taken.
    remote = tmp_path / "out" / REMOTE
    remote.mkdir(parents=True)
    (remote / "ckpt-4.index").write_bytes(b"")
    (remote / "ckpt-4.data-00000-of-00001").write_bytes(b"")
    assert ckpt.fetch() is None and ckpt.number == 4 and ckpt.latest is None
    # An index that is not one, over checkpoint files that cannot be read either: exit 4 with the advice, not a
    # fresh start beside them.
    from job.errors import StorageError

    (remote / STATE_FILE).write_text("not a checkpoint state {")
    with pytest.raises(StorageError, match="none of the 1 checkpoint.s. kept can be read"):
        ckpt.fetch()


@pytest.mark.parametrize("damage", ["cut", "empty", "not utf-8"])
def test_a_damaged_index_reads_the_checkpoints_in_storage_newest_first(tmp_path, damage):
    # A cut index made TensorFlow's reader print a raw warning and return None: the run started over from its head
    # phase, and its good checkpoints were pruned later. An empty or undecodable one raised: exit 1, a traceback.
    ckpt = checkpoints(tmp_path, keep=5)
    model = tiny_model(0)
    for step in (1, 2, 3):
        ckpt.save(state_of(step=step), weights=model)
    index = tmp_path / "out" / REMOTE / STATE_FILE
    text = index.read_bytes()
    index.write_bytes({"cut": text[:20], "empty": b"", "not utf-8": b"\xff\xfe" + text[5:]}[damage])
    again = checkpoints(tmp_path)
    with capture_logs() as logs:
        assert again.fetch() == state_of(step=3) and again.number == 3
    assert [x["index"] for x in logs if x["event"].startswith("checkpoint index unreadable")] == [
        storage_name(again.store, STATE_FILE)]
    restored = tiny_model(9)
    again.restore(weights=restored)
    assert_same(values(restored.weights), values(model.weights))


def test_the_index_names_its_latest_checkpoint():
    from job.checkpoint import latest_in_index

    written = b'model_checkpoint_path: "ckpt-12"\nall_model_checkpoint_paths: "ckpt-11"\n'
    assert latest_in_index(written) == "ckpt-12"
    assert latest_in_index(b'model_checkpoint_path: "/work/checkpoints/ckpt-3"\r\n') == "ckpt-3"
    for bad in (b"", b'model_checkpoint_path: "ckpt-1', b'model_checkpoint_path: "other-2"\n', b"\xff\xfe\x00"):
        assert latest_in_index(bad) is None, bad


def test_a_checkpoint_without_the_weights_is_refused_not_resumed_from_fresh_weights(tmp_path):
    # A checkpoint holding only the run state (another layout, another model) resumed with the weights as built and
    # `resumed_from` set: the training before it lost without a word.
    from job.errors import StorageError

    ckpt = checkpoints(tmp_path)
    ckpt.save(state_of(step=2))  # the state alone
    again = checkpoints(tmp_path)
    assert again.fetch() == state_of(step=2)
    with pytest.raises(StorageError, match="ckpt-1: holds no value for some of the run's variables"):
        again.restore(weights=tiny_model(0))


def test_a_checkpoint_of_a_newer_version_is_exit_2_not_a_fallback_to_an_older_one(tmp_path):
    # The newer state was "unreadable, trying the one before it": with ckpt-1 of this version kept, the run rolled
    # back to it with a warning; with none, the advice was to delete the folder, the newer version's training too.
    # Exit 2: the chart's pod failure policy fails the Job at once (no retry of this image can read it).
    from job.errors import ConfigError

    ckpt = checkpoints(tmp_path)
    model = tiny_model(0)
    ckpt.save(state_of(step=1), weights=model)
    newer = json.loads(state_of(step=2).to_json())
    newer["next_version_field"] = 1
    ckpt.state_var.assign(json.dumps(newer))
    manager = tf.train.CheckpointManager(ckpt._checkpoint(weights=model), str(ckpt.dir), max_to_keep=3)
    manager.save(checkpoint_number=2)
    ckpt._mirror("ckpt-2")
    with pytest.raises(ConfigError, match=r"ckpt-2: its run state has fields this version of the job does not know: "
                                           r"next_version_field: written by a newer version"):
        checkpoints(tmp_path).fetch()


def test_a_state_written_by_a_newer_version_is_a_value_error_naming_its_fields():
    # RunState(**values) raised TypeError, which nothing caught: exit 1 and a traceback.
    state = json.loads(state_of(step=2).to_json())
    with pytest.raises(ValueError, match="fields this version of the job does not know: later, next: written by a"):
        RunState.from_json(json.dumps({**state, "next": 1, "later": 2}))
    with pytest.raises(ValueError, match="not a JSON object"):
        RunState.from_json("[1, 2]")
    assert RunState.from_json(json.dumps(state)) == state_of(step=2)


def test_fetch_downloads_only_the_latest_checkpoint_into_a_clean_folder(tmp_path):
    model = tiny_model(0)
    ckpt = checkpoints(tmp_path, keep=5)
    for _ in range(2):
        ckpt.save(state_of(), weights=model)
    restore_dir = tmp_path / "work" / "checkpoints-restore"
    restore_dir.mkdir(parents=True)
    (restore_dir / "ckpt-1.index").write_bytes(b"left by an earlier attempt")
    again = checkpoints(tmp_path)
    again.fetch()
    assert {p.name for p in restore_dir.iterdir()} == {STATE_FILE, "ckpt-2.index", "ckpt-2.data-00000-of-00001"}


# ------------------------------------------------------------------ uploads, guard, workers


def test_the_chief_uploads_the_checkpoint_files_then_the_index(tmp_path):
    recording = Recording(str(tmp_path / "out"))
    ckpt = checkpoints(tmp_path, store=recording)
    ckpt.save(state_of(), weights=tiny_model(0))
    assert recording.uploads == [f"{REMOTE}/ckpt-1.data-00000-of-00001", f"{REMOTE}/ckpt-1.index",
                                 f"{REMOTE}/{STATE_FILE}"]
    assert ckpt.dir == tmp_path / "work" / "checkpoints" and (ckpt.dir / "ckpt-1.index").is_file()


def test_a_guard_that_raises_stops_every_upload(tmp_path):
    calls = []

    def guard():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("lease lost")

    ckpt = checkpoints(tmp_path, guard=guard)
    model = tiny_model(0)
    ckpt.save(state_of(step=1), weights=model)
    assert calls == [1] and remote_numbers(tmp_path) == {1}
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / REMOTE).iterdir()}
    with pytest.raises(RuntimeError, match="lease lost"):
        ckpt.save(state_of(step=2), weights=model)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / REMOTE).iterdir()} == before
    assert checkpoints(tmp_path).fetch() == state_of(step=1)


def test_a_non_chief_saves_to_a_private_folder_it_removes_and_uploads_nothing(tmp_path):
    before = checkpoints_saved()
    ckpt = checkpoints(tmp_path, worker_index=1, num_workers=2, guard=lambda: pytest.fail("guard called"))
    assert ckpt.dir == tmp_path / "work" / "checkpoints-worker-1-tmp"
    assert ckpt.restore_dir == tmp_path / "work" / "checkpoints-restore"
    with capture_logs() as logs:
        ckpt.save(state_of(), weights=tiny_model(0))
        ckpt.save(state_of(), weights=tiny_model(0))
    assert ckpt.number == 2 and ckpt.latest is None
    assert not ckpt.dir.exists() and not (tmp_path / "out").exists()
    assert checkpoints_saved() == before and not [e for e in logs if e["event"] == "checkpoint saved"]
    # It fetches and restores like the chief.
    model, optimizer = trained(seed=0)
    checkpoints(tmp_path).save(state_of(), weights=model, optimizer=optimizer)
    worker = checkpoints(tmp_path, worker_index=1, num_workers=2)
    assert worker.fetch() == state_of()
    fresh = tiny_model(1)
    worker.restore(weights=fresh)
    assert_same(values(fresh.weights), values(model.weights))


def test_checkpoint_file_names():
    assert number("ckpt-12.index") == 12 and number("ckpt-3.data-00000-of-00001") == 3
    assert number("ckpt-0.data-00001-of-00002") == 0
    for name in ("checkpoint", ".ckpt-7.index.1-2.part", "x-1.txt", "ckpt-1.index.part", "xckpt-1.index",
                 "ckpt-.index", "ckpt-1.data", "ckpt-1.data-0-of-", "ckpt-1.meta", "ckpt-1.index\nx"):
        assert number(name) is None, name


def test_storage_that_refuses_deletes_keeps_old_checkpoints_with_one_warning(tmp_path, monkeypatch):
    # Refused deletes were thrown away without a word (checkpoint.keep: 1 kept four); now that storage says so, the
    # pruning must not end the training: the old ones stay, said once.
    from job.errors import StorageError

    ckpt = checkpoints(tmp_path, keep=1)

    def refused(rels):
        raise StorageError("deleting: access denied (AccessDenied)")

    monkeypatch.setattr(ckpt.store, "delete", refused)
    model = tiny_model(0)
    with capture_logs() as logs:
        for step in (1, 2, 3):
            ckpt.save(state_of(step=step), weights=model)
    assert [r["event"] for r in logs if "not deleted" in r["event"]] == ["old checkpoints not deleted; they stay in "
                                                                         "storage"]
    assert remote_numbers(tmp_path) == {1, 2, 3} and checkpoints(tmp_path).fetch() == state_of(step=3)
