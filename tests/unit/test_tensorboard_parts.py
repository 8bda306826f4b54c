"""job/tensorboard.py's pure parts: the step axis over both phases, the tags of a history record, the final
metrics, misclassified examples, and the mirror of a prefix's event files (a local store; no TensorFlow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from job import storage, tensorboard


def test_finetune_steps_follow_the_head_epochs_that_ran():
    history = {"head": [{"epoch": 1}, {"epoch": 2}], "finetune": [{"epoch": 1}]}
    assert tensorboard.step_of(history, "head", 2) == 2 and tensorboard.step_of(history, "finetune", 1) == 3
    assert tensorboard.step_of({"head": [], "finetune": []}, "finetune", 1) == 1  # from scratch: no head phase


def test_a_records_values_get_their_tags():
    record = {"epoch": 3, "loss": 0.5, "accuracy": 0.75, "val_loss": 0.625, "val_map": 0.875, "seconds": 2.0,
              "learning_rate": 1e-4, "images_per_second": 100.0}
    assert tensorboard.scalars(record) == {"loss/train": 0.5, "accuracy/train": 0.75, "loss/validation": 0.625,
                                           "map/validation": 0.875, "learning_rate": 1e-4,
                                           "images_per_second": 100.0}


def test_final_metrics_per_task():
    single = {"validation": {"accuracy": 0.9, "macro_f1": 0.8, "loss": 0.3}, "test": {"accuracy": 0.7, "loss": 0.4,
                                                                                      "macro_f1": 0.6}}
    assert tensorboard.final_metrics(single) == {"val_accuracy": 0.9, "val_macro_f1": 0.8, "val_loss": 0.3,
                                                 "test_accuracy": 0.7, "test_macro_f1": 0.6, "test_loss": 0.4}
    multi = {"test": {"map": 0.8, "micro_f1": 0.7, "loss": 0.2, "accuracy": None}}
    assert tensorboard.final_metrics(multi) == {"test_map": 0.8, "test_micro_f1": 0.7, "test_loss": 0.2}


def test_the_hparams_show_the_rate_the_search_chose_and_the_dataset():
    # The configured rate was shown: runs whose search chose 3e-4 and 1e-4 looked alike (and, without a trial id,
    # were one row of averaged metrics).
    from job.config import Config

    cfg = Config.model_validate({"data": {"uri": "s3://b/flowers"}, "output": {"uri": "/tmp/o"}})
    assert tensorboard.hparams(cfg)["finetune_learning_rate"] == cfg.train.finetune.learning_rate == 1e-4
    chosen = tensorboard.hparams(cfg, 3e-4)
    assert chosen["finetune_learning_rate"] == 3e-4 and chosen["data"] == "s3://b/flowers"


def test_misclassified_examples_and_their_captions():
    images = np.arange(4)
    picked, captions = tensorboard.misclassified(images, np.eye(3)[[0, 2, 1, 1]], np.array([0, 1, 1, 2]),
                                                 ["a", "b", "c"])
    assert list(picked) == [1, 3] and captions == ["b -> c", "c -> b"]
    scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.6, 0.7]])
    truth = np.array([[1, 0], [0, 0], [1, 0]], np.float32)
    picked, captions = tensorboard.misclassified(images[:3], scores, truth, ["x", "y"], thresholds=[0.5, 0.25])
    assert list(picked) == [1, 2] and captions == ["(none) -> y", "x -> x+y"]


def test_the_mirror_copies_new_and_changed_event_files_and_drops_removed_ones(tmp_path):
    runs = tmp_path / "runs"
    (runs / "r1" / "tensorboard").mkdir(parents=True)
    (runs / "r1" / "tensorboard" / "events.1").write_bytes(b"one")
    (runs / "r1" / "checkpoints").mkdir()
    (runs / "r1" / "checkpoints" / "ckpt-1.index").write_bytes(b"not an event file")
    (runs / "r1" / "metrics.json").write_text("{}")
    store, folder, known = storage.open_store(str(runs)), tmp_path / "mirror", {}
    assert tensorboard.mirror(store, folder, known) == 1
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == ["r1/events.1"]
    assert tensorboard.mirror(store, folder, known) == 0  # unchanged: nothing copied again
    (runs / "r1" / "tensorboard" / "events.1").write_bytes(b"one, grown")
    (runs / "r2" / "tensorboard").mkdir(parents=True)
    (runs / "r2" / "tensorboard" / "events.2").write_bytes(b"two")
    assert tensorboard.mirror(store, folder, known) == 2
    assert (folder / "r1" / "events.1").read_bytes() == b"one, grown"
    (runs / "r1" / "tensorboard" / "events.1").unlink()  # a resumed run rewrote its events
    tensorboard.mirror(store, folder, known)
    assert not (folder / "r1" / "events.1").exists() and (folder / "r2" / "events.2").read_bytes() == b"two"


def test_a_refresh_that_storage_fails_keeps_the_mirror_served(tmp_path, monkeypatch):
    # The first refresh that failed (storage gone a moment) stopped `finetune-job tensorboard`, exit 4.
    import structlog.testing

    from job.errors import StorageError

    runs = tmp_path / "runs"
    (runs / "r1" / "tensorboard").mkdir(parents=True)
    (runs / "r1" / "tensorboard" / "events.1").write_bytes(b"one")
    store, folder, known = storage.open_store(str(runs)), tmp_path / "mirror", {}
    tensorboard.mirror(store, folder, known)

    class Gone:
        def list(self):
            raise StorageError(f"listing {runs}/: storage unreachable")

    with structlog.testing.capture_logs() as logged:
        tensorboard.refresh(Gone(), folder, known, "run")
    assert [r["event"] for r in logged] == ["event files not refreshed; serving what is mirrored, trying again at "
                                            "the next refresh"]
    assert (folder / "r1" / "events.1").read_bytes() == b"one"  # still served
    (runs / "r1" / "tensorboard" / "events.1").write_bytes(b"one, grown")
    tensorboard.refresh(store, folder, known, "run")  # storage back: mirrored again
    assert (folder / "r1" / "events.1").read_bytes() == b"one, grown"
    # One file that fails (gone between the listing and its read, as a resumed run rewrites its events): the
    # others are copied still, and it is tried again at the next refresh.
    (runs / "r2" / "tensorboard").mkdir(parents=True)
    (runs / "r2" / "tensorboard" / "events.2").write_bytes(b"two")
    (runs / "r1" / "tensorboard" / "events.1").write_bytes(b"one, grown again")
    real_read = store.read

    def read(rel, *args):
        if rel == "r1/tensorboard/events.1":
            raise StorageError(f"reading {runs}/{rel}: NoSuchKey")
        return real_read(rel, *args)

    store.read = read
    with structlog.testing.capture_logs() as logged:
        tensorboard.refresh(store, folder, known, "run")
    assert (folder / "r2" / "events.2").read_bytes() == b"two"  # copied although events.1 failed
    assert [r["event"] for r in logged] == ["event files not copied this time; tried again at the next refresh",
                                            "event files mirrored"]
    store.read = real_read
    tensorboard.refresh(store, folder, known, "run")
    assert (folder / "r1" / "events.1").read_bytes() == b"one, grown again"
    # A full --folder: the server stopped (exit 4), a cut event file left behind.
    import errno

    (runs / "r2" / "tensorboard" / "events.2").write_bytes(b"2, rewritten")  # (not grown: a new file)
    real_write = Path.write_bytes

    def full(path, data):
        real_write(path, data[:2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with structlog.testing.capture_logs() as logged:
        tensorboard.refresh(store, folder, known, "run")
    monkeypatch.undo()
    assert [r["event"] for r in logged] == ["event files not refreshed; serving what is mirrored, trying again at "
                                            "the next refresh"] and "No space left on device" in logged[0]["reason"]
    assert sorted(p.name for p in (folder / "r2").iterdir()) == ["events.2"]  # no part file left
    assert (folder / "r2" / "events.2").read_bytes() == b"two"  # the last whole copy, still served
    tensorboard.refresh(store, folder, known, "run")
    assert (folder / "r2" / "events.2").read_bytes() == b"2, rewritten"


def test_the_mirror_of_one_runs_folder_serves_that_run():
    # `--from <output.uri>/<run_id>` (one run's folder) mirrored nothing: its events are `tensorboard/...`.
    assert tensorboard.event_file("r1/tensorboard/events.1", "out") == ("r1", "events.1")
    assert tensorboard.event_file("tensorboard/train/events.1", "r7") == ("r7", "train/events.1")
    assert tensorboard.event_file("r1/checkpoints/tensorboard/x", "out") is None  # not a run's own folder
    assert tensorboard.event_file("metrics.json", "out") is None


def test_the_mirror_of_a_single_run_copies_its_events_under_its_name(tmp_path):
    run = tmp_path / "runs" / "20261206T010203Z-abcdef"
    (run / "tensorboard" / "train").mkdir(parents=True)
    (run / "tensorboard" / "train" / "events.1").write_bytes(b"one")
    (run / "metrics.json").write_text("{}")
    store, folder, known = storage.open_store(str(run)), tmp_path / "mirror", {}
    assert tensorboard.mirror(store, folder, known, run.name) == 1
    assert (folder / run.name / "train" / "events.1").read_bytes() == b"one"
    (run / "tensorboard" / "train" / "events.1").unlink()
    assert tensorboard.mirror(store, folder, known, run.name) == 0 and not any(folder.rglob("events.1"))


def test_the_refit_phases_follow_on_the_axis():
    history = {"head": [{}] * 3, "finetune": [{}] * 4, "refit_head": [{}] * 2, "refit": [{}] * 3}
    assert tensorboard.step_of(history, "refit_head", 1) == 8
    assert tensorboard.step_of(history, "refit", 3) == 12


def test_the_mirror_folder_starts_empty_and_another_folder_is_never_emptied(tmp_path):
    # Runs mirrored by an earlier session (another prefix, or deleted since) were served as current.
    import pytest

    from job.errors import ConfigError

    mine = tmp_path / "mirror"
    tensorboard.mirror_folder(mine)
    (mine / "old-run" / "train").mkdir(parents=True)
    (mine / "old-run" / "train" / "events.out.tfevents.1.host").write_bytes(b"e")
    tensorboard.mirror_folder(mine)
    assert sorted(p.name for p in mine.rglob("*")) == [tensorboard.MARK]
    older = tmp_path / "older"  # an earlier version's mirror: event files only, no mark
    (older / "r1").mkdir(parents=True)
    (older / "r1" / "events.out.tfevents.2.host").write_bytes(b"e")
    with pytest.raises(ConfigError, match="holds files this command did not write"):  # or a Keras logdir: kept
        tensorboard.mirror_folder(older)
    assert (older / "r1" / "events.out.tfevents.2.host").is_file()
    tensorboard.DEFAULT_FOLDER, default = older, tensorboard.DEFAULT_FOLDER  # the default folder: an older mirror
    try:
        tensorboard.mirror_folder(older)
    finally:
        tensorboard.DEFAULT_FOLDER = default
    assert not (older / "r1").exists()
    theirs = tmp_path / "home"
    (theirs / "notes").mkdir(parents=True)
    (theirs / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=f"^tensorboard --folder {theirs}: holds files this command did not write"):
        tensorboard.mirror_folder(theirs)
    assert (theirs / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="cannot be the mirror"):
        tensorboard.mirror_folder(theirs / "notes" / "todo.txt")


def test_a_port_in_use_is_a_one_line_error(tmp_path):
    # It was "unexpected error: TensorBoardPortInUseError", exit 1, with a traceback.
    import socket

    import pytest

    from job.errors import ConfigError

    (tmp_path / "runs").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"^tensorboard --host 127.0.0.1 --port {port}: .*"):
            tensorboard.serve(str(tmp_path / "runs"), tmp_path / "mirror", port, "127.0.0.1", 30, stop=lambda: True)


def test_a_host_it_cannot_bind_names_the_reason(tmp_path):
    # It said "cannot serve there (1)": TensorBoard printed the reason on a line of its own and exited 1.
    import pytest

    from job.errors import ConfigError

    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match=r"^tensorboard --host 192\.0\.2\.1 --port 0: cannot serve there: "
                                          r"[A-Z][a-z' ]*assign requested address$"):  # Linux: Cannot, macOS: Can't
        tensorboard.serve(str(tmp_path / "runs"), tmp_path / "mirror", 0, "192.0.2.1", 30, stop=lambda: True)


def test_a_mirror_inside_the_runs_it_mirrors_is_refused(tmp_path):
    # `--from runs --folder runs/tb` copied its own copies again at every refresh: a/, runs/a/, runs/runs/a/, ...
    import pytest

    from job.errors import ConfigError

    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match="inside --from .*runs, whose event files it would mirror again"):
        tensorboard.serve(str(tmp_path / "runs"), tmp_path / "runs" / "tb", 0, "127.0.0.1", 30, stop=lambda: True)
    assert not (tmp_path / "runs" / "tb").exists()


def test_a_port_out_of_range_is_usage():
    # --port -1 was OverflowError, exit 1, a traceback (the README promised exit 2).
    import subprocess
    import sys
    from pathlib import Path

    cli = Path(sys.executable).parent / "finetune-job"
    out = subprocess.run([str(cli), "tensorboard", "--from", "/nonexistent", "--port", "-1"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "--port" in out.stderr


def test_an_event_file_grown_in_storage_is_appended_to_in_place(tmp_path):
    # Replaced by a new file at every epoch's upload, it was never read again by TensorBoard's server, which holds the
    # old one open: a run stopped updating on the board while it trained. Any other change is a new file.
    runs = tmp_path / "runs"
    (runs / "r1" / "tensorboard").mkdir(parents=True)
    source = runs / "r1" / "tensorboard" / "events.1"
    source.write_bytes(b"epoch 1;")
    store, folder, known = storage.open_store(str(runs)), tmp_path / "mirror", {}
    tensorboard.mirror(store, folder, known)
    inode = (folder / "r1" / "events.1").stat().st_ino
    source.write_bytes(b"epoch 1;epoch 2;")
    assert tensorboard.mirror(store, folder, known) == 1
    assert (folder / "r1" / "events.1").read_bytes() == b"epoch 1;epoch 2;"
    assert (folder / "r1" / "events.1").stat().st_ino == inode  # the same file, which the server keeps open
    source.write_bytes(b"rewritten")  # (a resumed run's own file): a new one
    tensorboard.mirror(store, folder, known)
    assert (folder / "r1" / "events.1").read_bytes() == b"rewritten"


def test_keys_that_leave_the_mirror_or_mark_folders_are_not_event_files():
    # `run/tensorboard/../../x` and `../tensorboard/x` were written outside --folder (and unlinked there when gone);
    # a folder marker `run/tensorboard/sub/` was "NoSuchKey" at every refresh.
    assert tensorboard.event_file("r1/tensorboard/events.1", "own") == ("r1", "events.1")
    assert tensorboard.event_file("tensorboard/sub/events.1", "own") == ("own", "sub/events.1")
    for rel in ("r1/tensorboard/../../ESCAPED", "../tensorboard/ESCAPED", "r1/tensorboard/sub/", "tensorboard/../x",
                "r1/tensorboard/./x", "r1/tensorboard/a//b", ".."):
        assert tensorboard.event_file(rel, "own") is None, rel
    assert tensorboard.event_file("tensorboard/x", "..") is None  # (--from a folder named ..)
