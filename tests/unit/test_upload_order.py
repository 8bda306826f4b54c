"""The upload of a run's artifacts (job/export.py `upload`) into a folder where an earlier attempt left some: what
this attempt did not write goes before `_SUCCESS`; checkpoints, TensorBoard's files, the lease and a run nested below
stay. Against a local folder (the same Store interface as S3)."""

from __future__ import annotations

from job import export, storage


def test_an_earlier_attempts_artifacts_are_removed_before_success(tmp_path):
    # Attempt 1 (formats saved_model and tflite) was killed during its upload; attempt 2 (saved_model only) completed
    # with attempt 1's model.tflite.json beside its _SUCCESS, which the manifest does not list.
    out = tmp_path / "out" / "r1"
    left = ["model.tflite.json", "model.tflite", "saved_model/old.pb", "labels.txt", "checkpoints/ckpt-1.index",
            "tensorboard/events.1", "_LEASE", "manifest.json", "nested/r2/_SUCCESS", "nested/r2/labels.txt",
            "rows.csv", "._LEASE.12-34-5.part", "tf_serving/_SUCCESS", "tf_serving/model.keras"]  # (a user's file,
    # the lease's temporary, a run named tf_serving nested below)
    for rel in left:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("attempt 1")
    folder = tmp_path / "artifacts"
    for rel in ("labels.txt", "saved_model/saved_model.pb", "metrics.json", "manifest.json"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("attempt 2")
    export.upload(folder, storage.open_store(str(out)))
    found = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert found == sorted(["labels.txt", "saved_model/saved_model.pb", "metrics.json", "manifest.json", "_SUCCESS",
                            "checkpoints/ckpt-1.index", "tensorboard/events.1", "_LEASE", "nested/r2/_SUCCESS",
                            "nested/r2/labels.txt", "rows.csv", "._LEASE.12-34-5.part", "tf_serving/_SUCCESS",
                            "tf_serving/model.keras"])
    assert (out / "labels.txt").read_text() == "attempt 2" and (out / "manifest.json").read_text() == "attempt 2"
