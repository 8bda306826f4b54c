"""The plain-Keras script the job is measured against: the seeds' recipe, as a user would write it.

    python bench/keras_recipe.py DATA_DIR WEIGHTS_FILE SEED RESULT.json

Dense 128 + dropout 0.3 head trained 10 epochs at 1e-3 on the frozen base, then the top 30 layers
fine-tuned 5 epochs at 1e-4, BatchNormalization in inference mode (base called with training=False),
early stopping with patience 3 restoring the best weights, batch 64 (the Keras transfer-learning guide).
"""

import json
import sys
from pathlib import Path

import keras

data, weights, seed, result = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
keras.utils.set_random_seed(seed)


def split(name, shuffle):
    return keras.utils.image_dataset_from_directory(data / name, image_size=(32, 32), batch_size=64,
                                                    shuffle=shuffle, seed=seed, verbose=False)


train, val, test = split("train", True), split("validation", False), split("test", False)
base = keras.applications.MobileNetV2(include_top=False, weights=weights, input_shape=(32, 32, 3))
base.trainable = False
inputs = keras.Input((32, 32, 3))
x = base(keras.applications.mobilenet_v2.preprocess_input(inputs), training=False)
x = keras.layers.Dropout(0.3)(keras.layers.Dense(128, activation="relu")(keras.layers.GlobalAveragePooling2D()(x)))
model = keras.Model(inputs, keras.layers.Dense(len(train.class_names), activation="softmax")(x))


def fit(learning_rate, epochs):
    model.compile(keras.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy", metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(patience=3, restore_best_weights=True)
    model.fit(train, validation_data=val, epochs=epochs, callbacks=[stop], verbose=0)


fit(1e-3, 10)
base.trainable = True
for layer in base.layers[:-30]:
    layer.trainable = False
fit(1e-4, 5)
out = {}
for name, ds in (("validation", val), ("test", test)):
    out[name] = model.evaluate(ds, verbose=0, return_dict=True)
    out[name]["predicted"] = model.predict(ds, verbose=0).argmax(-1).tolist()
    out[name]["labels"] = [int(y) for _, ys in ds for y in ys]
result.write_text(json.dumps(out))
