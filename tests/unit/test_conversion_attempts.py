"""A converter that kills the process (TensorFlow's LiteRT converter aborted with `double free or corruption`,
exit 134, after training) is left out after two attempts died in it: each later attempt, resumed at the export,
aborted in it again (job/export.py `converting`)."""

from __future__ import annotations

import pytest

pytest.importorskip("tensorflow")

from job import export, formats, storage  # noqa: E402


def test_the_marker_names_the_format_while_it_converts_and_goes_when_it_ends(tmp_path):
    store = storage.open_store(str(tmp_path / "run"))
    with export.converting(store, "tflite", tmp_path):
        assert store.read(export.CONVERTING) == b"tflite 1"
    assert not store.exists(export.CONVERTING)
    with pytest.raises(formats.ConversionError, match="conversion failed"), export.converting(store, "onnx", tmp_path):
        raise formats.ConversionError("onnx: conversion failed: ValueError")  # a failure that is no death
    assert not store.exists(export.CONVERTING)


def test_a_format_two_attempts_died_in_is_left_out(tmp_path):
    store = storage.open_store(str(tmp_path / "run"))
    (tmp_path / "m").write_text("tflite_int8 1")
    store.upload(tmp_path / "m", export.CONVERTING)  # one attempt died inside: maybe a pod killed meanwhile
    with export.converting(store, "tflite", tmp_path):  # another format's marker counts nothing for this one
        assert store.read(export.CONVERTING) == b"tflite 1"
    store.upload(tmp_path / "m", export.CONVERTING)
    entered = []
    with export.converting(store, "tflite_int8", tmp_path):  # tried again
        entered.append(store.read(export.CONVERTING))
    assert entered == [b"tflite_int8 2"]
    (tmp_path / "m").write_text("tflite_int8 2")
    store.upload(tmp_path / "m", export.CONVERTING)  # and that attempt died too
    refused = r"^tflite_int8: 2 earlier attempts of this run died inside its conversion \(.*converting\); left"
    with pytest.raises(formats.ConversionError, match=refused), export.converting(store, "tflite_int8", tmp_path):
        pytest.fail("converted a third time")
    assert store.read(export.CONVERTING) == b"tflite_int8 2"  # a later attempt leaves it out too
