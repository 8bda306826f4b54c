"""The classifier: backbone preprocessing + frozen keras.applications base + a new head.

    image (float32 0..255) -> Preprocess -> base(training=False) -> GlobalAveragePooling -> head

The base is always called with training=False, so BatchNormalization stays in inference mode
during fine-tuning (the Keras transfer-learning recipe). The head is its own small model on the
pooled features, which lets phase 1 train it on cached features and phase 2 carry it over.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from job import backbones
from job.errors import ConfigError, StorageError, did_you_mean


@keras.saving.register_keras_serializable(package="finetune_job")
class Preprocess(keras.layers.Layer):
    """The backbone's own `preprocess_input`, as a layer so the saved model needs no outside code."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x):
        from keras.applications import imagenet_utils

        return imagenet_utils.preprocess_input(x, mode=self.mode)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@dataclass
class Parts:
    model: keras.Model  # image -> probabilities
    base: keras.Model
    features: keras.Model  # image -> pooled features (the cached-features extractor)
    head: keras.Model  # pooled features -> probabilities


def build(backbone: str, weights_file: str | None, image_size: tuple[int, int], num_classes: int,
          head_units: int, head_dropout: float, *, imagenet: bool = False) -> Parts:
    """Build the model. `weights_file` is a local file of base weights; `imagenet` asks Keras for them."""
    spec = backbones.get(backbone)
    shape = (*image_size, 3)
    constructor = getattr(keras.applications, spec.constructor)
    weights = "imagenet" if imagenet else weights_file
    try:
        base = constructor(include_top=False, weights=weights, input_shape=shape)
    except (ValueError, OSError) as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(f"config: model.weights: {weights} does not fit {backbone}: {reason}") from None
    except Exception as e:  # keras.utils.get_file raises a bare Exception when the download fails
        if not imagenet:
            raise
        raise StorageError(
            f"model.weights: the ImageNet weights of {backbone} could not be downloaded ({str(e).splitlines()[0]}); "
            "without internet access, set model.weights to a weights file (local path or s3:// URI)"
        ) from None
    base.trainable = False

    image = keras.Input(shape, name="image")
    x = Preprocess(spec.preprocess, name="preprocess")(image) if spec.preprocess != "none" else image
    x = base(x, training=False)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)

    feats = keras.Input((pooled.shape[-1],), name="features")
    h = feats
    if head_units:
        h = keras.layers.Dense(head_units, activation="relu", name="head_dense")(h)
    if head_dropout:
        h = keras.layers.Dropout(head_dropout, name="head_dropout")(h)
    # Softmax in float32 even under mixed precision: probabilities must be well-formed.
    probs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(h)
    head = keras.Model(feats, probs, name="head")

    model = keras.Model(image, head(pooled), name=f"finetune_{backbone}")
    features = keras.Model(image, pooled, name="features")
    return Parts(model, base, features, head)


def _augment_layer(name: str, factor: float, seed: int) -> keras.layers.Layer:
    pixels = (0, 255)  # the model's input range: preprocessing comes after augmentation
    if name in ("flip", "vertical_flip"):
        return keras.layers.RandomFlip("horizontal" if name == "flip" else "vertical", seed=seed)
    if name == "rotation":
        return keras.layers.RandomRotation(factor, seed=seed)
    if name == "zoom":
        return keras.layers.RandomZoom(factor, seed=seed)
    if name == "translation":
        return keras.layers.RandomTranslation(factor, factor, seed=seed)
    if name == "contrast":
        return keras.layers.RandomContrast(factor, value_range=pixels, seed=seed)
    return keras.layers.RandomBrightness(factor, value_range=pixels, seed=seed)


def augmentation(ops: list[tuple[str, float]], seed: int) -> keras.Sequential | None:
    """Keras preprocessing layers for `ops` (job.recipe.augment_ops); active only with training=True."""
    if not ops:
        return None
    return keras.Sequential([_augment_layer(name, factor, seed + i) for i, (name, factor) in enumerate(ops)],
                            name="augment")


def unfreezable_layers(base: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in base.layers if not isinstance(layer, keras.layers.InputLayer)]


def check_unfreeze(base: keras.Model, unfreeze: int | str, backbone: str) -> int:
    """Number of top layers `unfreeze` names ("all", a count, a layer name); ConfigError when it does not fit."""
    layers = unfreezable_layers(base)
    if unfreeze == "all":
        return len(layers)
    if isinstance(unfreeze, int):
        if unfreeze > len(layers):
            raise ConfigError(
                f"config: train.finetune.unfreeze: {unfreeze} is more than the {len(layers)} layers of {backbone}"
            )
        return unfreeze
    names = [layer.name for layer in layers]
    if unfreeze not in names:
        hint = did_you_mean(unfreeze, names)
        raise ConfigError(f"config: train.finetune.unfreeze: {backbone} has no layer '{unfreeze}'{hint}")
    return len(layers) - names.index(unfreeze)


def unfreeze_top(base: keras.Model, count: int) -> None:
    """Make the top `count` layers trainable, BatchNormalization excepted (its statistics stay frozen)."""
    base.trainable = True
    layers = unfreezable_layers(base)
    for i, layer in enumerate(layers):
        top = i >= len(layers) - count
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)
