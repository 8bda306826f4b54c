"""The plain-Keras script the job is measured against: the seeds' recipe, as a user would write it.

    python bench/keras_recipe.py DATA_DIR WEIGHTS_FILE SEED RESULT.json [BACKBONE]

Dense 128 + dropout 0.3 head trained 10 epochs at 1e-3 on the frozen base, then the top 30 layers
fine-tuned 5 epochs at 1e-4, BatchNormalization in inference mode (base called with training=False),
early stopping with patience 3 restoring the best weights, batch 64 (the Keras transfer-learning guide).
"""

import json
import sys
from pathlib import Path

import keras

data, weights, seed, result = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
backbone = sys.argv[5] if len(sys.argv) > 5 else "mobilenet_v2"  # or efficientnet_b0, which scales its own inputs
keras.utils.set_random_seed(seed)


def split(name, shuffle):
    return keras.utils.image_dataset_from_directory(data / name, image_size=(32, 32), batch_size=64,
                                                    shuffle=shuffle, seed=seed, verbose=False)


train, val, test = split("train", True), split("validation", False), split("test", False)
inputs = keras.Input((32, 32, 3))
if backbone == "mobilenet_v2":
    base = keras.applications.MobileNetV2(include_top=False, weights=weights, input_shape=(32, 32, 3))
    x = keras.applications.mobilenet_v2.preprocess_input(inputs)
else:
    base = keras.applications.EfficientNetB0(include_top=False, weights=weights, input_shape=(32, 32, 3))
    x = inputs
base.trainable = False
x = base(x, training=False)
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
