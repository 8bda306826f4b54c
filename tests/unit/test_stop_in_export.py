"""A stop (SIGTERM, SIGINT) that arrives while the run exports: the run stops before storage with exit 143 (the
rerun resumes from the trained checkpoint and exports again), where it was ignored until the run was complete.
The export's heavy parts are replaced here (they need a trained model; tests/e2e/test_fault_tolerance.py stops
training)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from job import export, pipeline, signals
from job.errors import Preempted


def test_a_stop_during_the_export_ends_the_run_before_any_upload(tmp_path, monkeypatch):
    uploaded = []

    def artifacts_then_a_signal(run, reports, folder):
        (folder / "model.keras").write_text("m")
        signals._requested.set()  # what the handler does when SIGTERM arrives meanwhile
        return {"formats": {}, "checked_on": "test"}

    monkeypatch.setattr(export, "artifacts", artifacts_then_a_signal)
    monkeypatch.setattr(export, "manifest_fields", lambda run, checked: {})
    monkeypatch.setattr(export, "upload", lambda folder, store: uploaded.append(folder))
    run = SimpleNamespace(cfg=SimpleNamespace(export=SimpleNamespace(formats=None)), work=tmp_path,
                          out=SimpleNamespace(uri=str(tmp_path / "out")), timings=pipeline.Timings(), board=None,
                          lease=None)
    signals._requested.clear()  # (the handlers are not installed here: the flag is all the job reads)
    try:
        with pytest.raises(Preempted, match="during export"):
            pipeline.export_run(run, {}, time.monotonic())
    finally:
        signals._requested.clear()
    assert uploaded == []


def test_a_stop_while_the_savedmodel_is_written_ends_the_export_before_the_other_formats(tmp_path, monkeypatch):
    formats_written = []
    monkeypatch.setattr(export, "clean_copy", lambda *a: SimpleNamespace(save=lambda path: None))
    monkeypatch.setattr(export, "write_saved_model", lambda *a: signals._requested.set())
    monkeypatch.setattr(export, "_formats", lambda *a: formats_written.append(a))
    run = SimpleNamespace(cfg=None, classes=["a", "b"], state=SimpleNamespace(history={}), timings=pipeline.Timings(),
                          parts=None, cluster=None, multi=False, size=(8, 8))
    signals._requested.clear()
    try:
        with pytest.raises(Preempted, match="during export"):
            export.artifacts(run, {}, tmp_path)
    finally:
        signals._requested.clear()
    assert formats_written == [] and (tmp_path / "labels.txt").is_file()
