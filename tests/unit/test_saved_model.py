"""job/export.py write_saved_model on a small model with BatchNormalization: each of the model's variables is written
once (Keras' ExportArchive wrote each twice, doubling the artifact), and both signatures give what the Keras model
gives on the same pixels, bit for bit; the variables are kept in name order (a concrete function's own order changes
from process to process)."""

from __future__ import annotations

import numpy as np


def test_each_variable_is_written_once_and_the_signatures_are_the_model(tmp_path):
    import keras
    import tensorflow as tf

    from job import export

    classes, size = ["a", "b", "c"], (8, 8)
    inputs = keras.Input((*size, 3))
    x = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.BatchNormalization()(x, training=False)
    model = keras.Model(inputs, keras.layers.Dense(len(classes), activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(x)))
    rng = np.random.default_rng(0)
    for v in model.variables:  # moved off their initial values, so that a variable left out would show
        v.assign(np.abs(v.numpy() + rng.normal(0, 0.5, v.shape)).astype(np.float32))
    export.write_saved_model(model, classes, size, tmp_path / "sm")

    stored = [name for name, _ in tf.train.list_variables(str(tmp_path / "sm" / "variables" / "variables"))
              if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")]
    assert len(stored) == len(model.variables), stored

    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    names = [v.name for v in loaded.model_variables]
    assert names == sorted(names) and len(set(names)) == len(names), names
    pixels = rng.uniform(0, 255, (5, *size, 3)).astype(np.float32)
    expected = model(pixels, training=False).numpy()
    out = loaded.signatures["serving_pixels"](images=tf.constant(pixels))
    np.testing.assert_array_equal(out["probabilities"].numpy(), expected)
    assert set(out) == {"probabilities"}  # numbers only: LiteRT is converted from it (no string tensor, one output)

    png = [tf.io.encode_png(tf.constant(p.astype(np.uint8))) for p in pixels]  # already at the model's size
    served = loaded.signatures["serving_default"](image_bytes=tf.stack(png))
    whole = model(pixels.astype(np.uint8).astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(served["probabilities"].numpy(), whole, rtol=1e-5, atol=1e-6)
    assert [b.decode() for b in served["label"].numpy()] == [classes[i] for i in whole.argmax(-1)]
    # A batch of none: it failed in BatchNormalization on CPU (oneDNN: "Incompatible shapes [0,8,8,4] vs [4]").
    empty = loaded.signatures["serving_default"](image_bytes=tf.constant([], tf.string))
    assert (empty["probabilities"].shape, empty["label"].shape) == ((0, len(classes)), (0,))
    assert loaded.signatures["serving_default"].structured_outputs["probabilities"].shape.as_list() == [None, 3]


def test_the_bytes_signature_sees_the_pixels_training_read(tmp_path):
    # Training reads the image cache's rounded 8-bit pixels; the signature resized to unrounded floats, so a served
    # probability moved by up to 0.02 from what evaluation measured on the same file.
    import keras
    import tensorflow as tf

    from job import dataset, export

    classes, size = ["a", "b"], (8, 8)
    inputs = keras.Input((*size, 3))
    flat = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(len(classes), activation="softmax")(flat))
    # Small weights: probabilities mid-range, where half a grey level shows (0.02 at most on a real model).
    model.layers[-1].set_weights([np.random.default_rng(1).normal(0, 0.05, (8 * 8 * 3, 2)).astype(np.float32),
                                  np.zeros(2, np.float32)])
    export.write_saved_model(model, classes, size, tmp_path / "sm")
    rng = np.random.default_rng(0)
    files = []
    for i, shape in enumerate([(13, 21, 3), (40, 9, 3), (8, 8, 3)]):  # resized down, across and not at all
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(tf.io.encode_png(rng.integers(0, 256, shape, dtype=np.uint8)).numpy())
    cached = dataset.pixels([str(f) for f in files], size, tmp_path / "cache")  # what training and evaluation read
    decoded = np.stack([dataset.decode_and_resize(tf.constant(f.read_bytes()), size).numpy() for f in files])
    np.testing.assert_array_equal(decoded, cached.astype(np.float32))  # the signature's and predict's decoder
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    served = loaded.signatures["serving_default"](image_bytes=tf.constant([f.read_bytes() for f in files]))
    np.testing.assert_array_equal(served["probabilities"].numpy(),
                                  model(cached.astype(np.float32), training=False).numpy())
