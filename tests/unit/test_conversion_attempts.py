"""A converter that kills the process (TensorFlow's LiteRT converter aborted with `double free or corruption`,
exit 134, after training) is left out after two attempts died in it: each later attempt, resumed at the export,
aborted in it again (job/export.py `converting`)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorflow")

from job import export, formats, storage  # noqa: E402


def marker(store) -> dict:
    return json.loads(store.read(export.CONVERTING)) if store.exists(export.CONVERTING) else {}


def test_the_marker_counts_the_format_while_it_converts_and_goes_when_it_ends(tmp_path):
    store = storage.open_store(str(tmp_path / "run"))
    with export.converting(store, "tflite", tmp_path):
        assert marker(store) == {"tflite": 1}
    assert not store.exists(export.CONVERTING)
    with pytest.raises(formats.ConversionError, match="conversion failed"), export.converting(store, "onnx", tmp_path):
        raise formats.ConversionError("onnx: conversion failed: ValueError")  # a failure that is no death
    assert not store.exists(export.CONVERTING)


def test_a_format_two_attempts_died_in_is_left_out_and_the_others_keep_their_counts(tmp_path):
    store = storage.open_store(str(tmp_path / "run"))
    (tmp_path / "m").write_text(json.dumps({"tflite_int8": 1}))
    store.upload(tmp_path / "m", export.CONVERTING)  # one attempt died inside: maybe a pod killed meanwhile
    with export.converting(store, "tflite", tmp_path):  # another format's count is kept, not replaced
        assert marker(store) == {"tflite_int8": 1, "tflite": 1}
    assert marker(store) == {"tflite_int8": 1}
    with export.converting(store, "tflite_int8", tmp_path):  # tried again
        assert marker(store) == {"tflite_int8": 2}
    assert marker(store) == {}  # and it ended: the death before no longer counts
    (tmp_path / "m").write_text(json.dumps({"tflite_int8": 2}))
    store.upload(tmp_path / "m", export.CONVERTING)  # two attempts died in it
    refused = r"^tflite_int8: 2 earlier attempts of this run died inside its conversion; left out \(delete .*converting"
    with pytest.raises(formats.ConversionError, match=refused), export.converting(store, "tflite_int8", tmp_path):
        pytest.fail("converted a third time")
    assert marker(store) == {"tflite_int8": 2}  # a later attempt leaves it out too


def test_storage_trouble_with_the_marker_does_not_end_the_export(tmp_path, monkeypatch):
    from structlog.testing import capture_logs

    from job.errors import StorageError

    store = storage.open_store(str(tmp_path / "run"))

    def refused(*_):
        raise StorageError("uploading: access denied")

    monkeypatch.setattr(store, "upload", refused)
    ran = []
    with capture_logs() as logs, export.converting(store, "tflite", tmp_path):
        ran.append(True)
    assert ran and [r["event"] for r in logs] == ["conversion marker not written"]
