"""The strongest simple script: the job's own default recipe written in plain Keras (issue 20).

    python bench/keras_job_recipe.py DATA_DIR WEIGHTS_FILE SEED RESULT.json [BACKBONE [BATCH]]

The head the job builds (global average pooling, Dense 256 relu, dropout 0.5, softmax) trained up to 10 epochs
at 1e-3 on the frozen base; then every base layer except BatchNormalization up to 10 epochs at 1e-4, the base
called with training=False (BatchNormalization in inference mode); early stopping on the validation loss with
patience 3 restoring the best weights; batch 32; balanced class weights n / (k * n_c) as the job's
`class_weight: auto` (all 1 on balanced data). BACKBONE: mobilenet_v2 (default) or efficientnet_b0 (which
scales its own inputs). BATCH: 32 (default) or another batch size. What a user who read the job's README would
write in 40 lines of Keras.
"""

import json
import sys
from pathlib import Path

import keras
import numpy as np

data, weights, seed, result = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
backbone = sys.argv[5] if len(sys.argv) > 5 else "mobilenet_v2"
batch = int(sys.argv[6]) if len(sys.argv) > 6 else 32
keras.utils.set_random_seed(seed)


def split(name, shuffle):
    return keras.utils.image_dataset_from_directory(data / name, image_size=(32, 32), batch_size=batch,
                                                    shuffle=shuffle, seed=seed, verbose=False)


train, val, test = split("train", True), split("validation", False), split("test", False)
labels = np.concatenate([y.numpy() for _, y in train])
counts = np.bincount(labels, minlength=len(train.class_names))
class_weight = {i: len(labels) / (len(counts) * c) for i, c in enumerate(counts)}
inputs = keras.Input((32, 32, 3))
if backbone == "mobilenet_v2":
    base = keras.applications.MobileNetV2(include_top=False, weights=weights, input_shape=(32, 32, 3))
    x = keras.applications.mobilenet_v2.preprocess_input(inputs)
else:
    base = keras.applications.EfficientNetB0(include_top=False, weights=weights, input_shape=(32, 32, 3))
    x = inputs
base.trainable = False
x = keras.layers.GlobalAveragePooling2D()(base(x, training=False))
x = keras.layers.Dropout(0.5)(keras.layers.Dense(256, activation="relu")(x))
model = keras.Model(inputs, keras.layers.Dense(len(train.class_names), activation="softmax")(x))


def fit(learning_rate, epochs):
    model.compile(keras.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy", metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)
    return len(model.fit(train, validation_data=val, epochs=epochs, callbacks=[stop], class_weight=class_weight,
                         verbose=0).epoch)


epochs = {"head": fit(1e-3, 10)}
base.trainable = True
for layer in base.layers:
    layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
epochs["finetune"] = fit(1e-4, 10)
out = {"epochs": epochs}
for name, ds in (("validation", val), ("test", test)):
    out[name] = model.evaluate(ds, verbose=0, return_dict=True)
    out[name]["predicted"] = model.predict(ds, verbose=0).argmax(-1).tolist()
    out[name]["labels"] = [int(y) for _, ys in ds for y in ys]
result.write_text(json.dumps(out))
