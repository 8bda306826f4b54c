"""The plain-Keras script of the job's own default recipe with sigmoid outputs, for the multi-label task.

    python bench/keras_multilabel.py DATA_DIR WEIGHTS_FILE SEED RESULT.json

DATA_DIR holds `labels.jsonl` (one {"path", "labels", "split"} object per image, path relative to DATA_DIR)
and the PNG files it names, all of one size. Dense 256 + dropout 0.5 head with one sigmoid per label,
binary cross-entropy, trained up to 10 epochs at 1e-3 on the frozen base, then every base layer except
BatchNormalization up to 10 epochs at 1e-4, BatchNormalization in inference mode (base called with
training=False), early stopping on the validation loss with patience 3 restoring the best weights, batch 32.
Writes each split's sigmoid scores and 0/1 truth (the driver scores them, threshold 0.5, with job.multilabel).
"""

import json
import sys
from pathlib import Path

import keras
import numpy as np
from PIL import Image

data, weights, seed, result = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
keras.utils.set_random_seed(seed)
rows = [json.loads(line) for line in (data / "labels.jsonl").read_text().splitlines() if line.strip()]
classes = sorted({c for r in rows for c in r["labels"]})


def split(name):
    chosen = [r for r in rows if r["split"] == name]
    x = np.stack([np.asarray(Image.open(data / r["path"]).convert("RGB"), np.float32) for r in chosen])
    return x, np.array([[c in r["labels"] for c in classes] for r in chosen], np.float32)


train, val, test = split("train"), split("validation"), split("test")
shape = train[0].shape[1:]
base = keras.applications.MobileNetV2(include_top=False, weights=weights, input_shape=shape)
base.trainable = False
inputs = keras.Input(shape)
x = base(keras.applications.mobilenet_v2.preprocess_input(inputs), training=False)
x = keras.layers.Dropout(0.5)(keras.layers.Dense(256, activation="relu")(keras.layers.GlobalAveragePooling2D()(x)))
model = keras.Model(inputs, keras.layers.Dense(len(classes), activation="sigmoid")(x))


def fit(learning_rate, epochs):
    model.compile(keras.optimizers.Adam(learning_rate), "binary_crossentropy")
    stop = keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)
    return len(model.fit(*train, batch_size=32, validation_data=val, epochs=epochs, callbacks=[stop],
                         verbose=0).epoch)


epochs = {"head": fit(1e-3, 10)}
base.trainable = True
for layer in base.layers:
    layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
epochs["finetune"] = fit(1e-4, 10)
out = {"classes": classes, "epochs": epochs}
for name, (images, truth) in (("validation", val), ("test", test)):
    scores = model.predict(images, batch_size=32, verbose=0)
    out[name] = {"scores": scores.tolist(), "truth": truth.astype(int).tolist()}
result.write_text(json.dumps(out))
