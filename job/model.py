"""The classifier: backbone preprocessing + frozen keras.applications base + a new head.

    image (float32 0..255) -> Preprocess -> base(training=False) -> GlobalAveragePooling -> head

With pre-trained weights the base is called with training=False, so BatchNormalization stays in
inference mode during fine-tuning (the Keras transfer-learning recipe). From scratch (`model.weights:
none`) there are no statistics to keep: the base is called without it, so BatchNormalization
normalises with the batch's statistics while training and its moving statistics follow them, with a
momentum short enough to settle in a run of a few hundred steps (SCRATCH_BN_MOMENTUM). The head is
its own small model on the pooled features, which lets phase 1 train it on cached features and
phase 2 carry it over.
"""

from __future__ import annotations

import warnings
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


# BatchNormalization momentum of a from-scratch base. keras.applications builds it with 0.999: an average
# over about a thousand steps, so after the 380 steps of a 20-epoch run on 600 images the initial statistics
# (mean 0, variance 1) would still be 0.999**380 = 68% of the moving ones, and a base that changes at every
# step would be evaluated with the statistics of weights long gone. 0.9 averages over about ten steps
# (hundreds of images) and stays close behind the weights; 0.99 lagged enough on fashion-easy-200 that one
# seed in three stopped early at chance (bench/quality.py; the averages start from a batch either way,
# `start_moving_statistics`).
SCRATCH_BN_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="finetune_job")
class Thresholds(keras.layers.Layer):
    """Multi-label decisions: 1.0 where a label's score reaches its threshold, else 0.0 (thresholds.json)."""

    def __init__(self, values: list[float], **kwargs):
        super().__init__(**kwargs)
        self.values = [float(v) for v in values]

    def call(self, scores):
        limits = keras.ops.convert_to_tensor(self.values, dtype=scores.dtype)
        return keras.ops.cast(keras.ops.greater_equal(scores, limits), "float32")

    def get_config(self):
        return {**super().get_config(), "values": self.values}


def with_thresholds(model: keras.Model, thresholds: list[float]) -> keras.Model:
    """The multi-label model as it is served: image -> {"scores": [labels], "above": [labels] 1.0/0.0}."""
    scores = model.outputs[0]
    above = Thresholds(thresholds, name="above")(scores)
    return keras.Model(model.inputs, {"scores": scores, "above": above}, name=f"{model.name}_thresholded")


@dataclass
class Parts:
    model: keras.Model  # image -> probabilities
    base: keras.Model
    features: keras.Model  # image -> pooled features (the cached-features extractor)
    head: keras.Model  # pooled features -> probabilities
    from_scratch: bool = False  # random base: BatchNormalization trains (see `build`)


def build(backbone: str, weights_file: str | None, image_size: tuple[int, int], num_classes: int,
          head_units: int, head_dropout: float, *, imagenet: bool = False, from_scratch: bool = False,
          multi_label: bool = False, weights_named: str = "") -> Parts:
    """Build the model. `weights_file` is a local file of base weights; `imagenet` asks Keras for them.
    `multi_label`: one sigmoid per label (scores) instead of a softmax over the classes.

    `from_scratch` (`model.weights: none`): a random base whose BatchNormalization is called in training
    mode while training, with momentum SCRATCH_BN_MOMENTUM. The export rebuilds the model with the same
    flag, so the saved model.keras trains the same way if a user fits it further. `weights_named`: the weights as
    the config names them (an s3:// URI), for messages.
    """
    spec = backbones.get(backbone)
    shape = (*image_size, 3)
    constructor = getattr(keras.applications, spec.constructor)
    weights = "imagenet" if imagenet else weights_file
    try:
        with warnings.catch_warnings():  # Keras' own: one per layer of a file that does not fit (99 for MobileNetV2),
            warnings.simplefilter("ignore")  # and "rows is not 224" at every other size with imagenet weights
            base = constructor(include_top=False, weights=weights, input_shape=shape)
    except (ValueError, OSError) as e:
        reason = str(e).splitlines()[0].split(". Example error message", 1)[0].rstrip(".:")
        named = str(weights_named or weights)
        why = ("Keras reads a file saved by save_weights only when it is named *.weights.h5: rename it?"
               if named.endswith(".h5") and not named.endswith(".weights.h5") else "weights of another backbone?")
        raise ConfigError(f"config: model.weights: {named} does not fit {backbone}: {reason} ({why})") from None
    except Exception as e:  # keras.utils.get_file raises a bare Exception when the download fails
        if not imagenet:
            raise
        raise StorageError(
            f"model.weights: the ImageNet weights of {backbone} could not be downloaded ({str(e).splitlines()[0]}); "
            "without internet access, set model.weights to a weights file (local path or s3:// URI)"
        ) from None
    base.trainable = False
    if from_scratch:
        for layer in batch_normalization(base):
            layer.momentum = SCRATCH_BN_MOMENTUM

    image = keras.Input(shape, name="image")
    x = Preprocess(spec.preprocess, name="preprocess")(image) if spec.preprocess != "none" else image
    # From scratch, `training` follows the outer call: batch statistics while training, moving ones after.
    x = base(x) if from_scratch else base(x, training=False)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)

    feats = keras.Input((pooled.shape[-1],), name="features")
    h = feats
    if head_units:
        h = keras.layers.Dense(head_units, activation="relu", name="head_dense")(h)
    if head_dropout:
        h = keras.layers.Dropout(head_dropout, name="head_dropout")(h)
    # Softmax (sigmoid) in float32 even under mixed precision: probabilities must be well-formed.
    probs = keras.layers.Dense(num_classes, activation="sigmoid" if multi_label else "softmax", dtype="float32",
                               name="scores" if multi_label else "probabilities")(h)
    head = keras.Model(feats, probs, name="head")

    model = keras.Model(image, head(pooled), name=f"finetune_{backbone}")
    features = keras.Model(image, pooled, name="features")
    return Parts(model, base, features, head, from_scratch)


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


def layer_depths(base: keras.Model, variables: list) -> tuple[list[int | None], int]:
    """Each variable's layer's depth among the base's layers with weights (None: not the base's, e.g. the head's),
    and how many such layers there are: what job.recipe.layer_rates scales the rate by."""
    layers = [layer for layer in unfreezable_layers(base) if layer.weights]
    depth = {id(w): i for i, layer in enumerate(layers) for w in layer.weights}
    return [depth.get(id(v)) for v in variables], len(layers)


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


def idle_unfreeze(base: keras.Model, count: int, unfreeze: int | str) -> str | None:
    """What is wrong when the top `count` layers have no weights but BatchNormalization's (kept frozen), else None:
    `unfreeze: 1` (MobileNetV2's out_relu) fine-tuned none of the base without a word, as `unfreeze: 0`, which is
    refused."""
    layers = unfreezable_layers(base)
    batch_norm = keras.layers.BatchNormalization
    trains = [i for i, layer in enumerate(layers) if layer.weights and not isinstance(layer, batch_norm)]
    if not trains or trains[-1] >= len(layers) - count:
        return None
    return (f"config: train.finetune.unfreeze: {unfreeze} unfreezes no layer with weights to train "
            f"({', '.join(layer.name for layer in layers[len(layers) - count:])}: none, or BatchNormalization, kept "
            f"frozen); the top one is {layers[trains[-1]].name}: unfreeze {len(layers) - trains[-1]} or more")


def batch_normalization(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer of `model`, nested models included."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found += batch_normalization(layer)
    return found


def moving_statistics(model: keras.Model) -> list:
    """The moving mean and variance of the BatchNormalization layers that training updates (trainable
    ones: from scratch). Not trainable variables, but they go with the weights: early stopping's best
    epoch keeps them too, or its weights would come back with the last epoch's statistics."""
    return [v for layer in batch_normalization(model) if layer.trainable
            for v in (layer.moving_mean, layer.moving_variance)]


def start_moving_statistics(model: keras.Model, images) -> None:
    """Set the moving statistics of the BatchNormalization layers that train to those of one batch.

    A random base's activations are far from the initial (0, 1): their variances run down to 1e-3 and
    below within a few layers. An exponential average that starts at 1 needs log(1e-3)/log(momentum)
    steps to forget it (65 at 0.9), and until then inference-mode outputs are the same for every image
    (validation at chance, early stopping on noise). One forward pass in training mode with momentum 0
    starts the averages where the batch statistics are. Called eagerly (the momentum is read when traced)."""
    layers = [layer for layer in batch_normalization(model) if layer.trainable]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    try:
        model(images, training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum


def unfreeze(parts: Parts, count: int) -> None:
    """What the fine-tuning phase trains: from scratch every layer of the base, BatchNormalization included
    (a partly frozen random base only adds noise, so `count` is ignored); else `unfreeze_top`."""
    if parts.from_scratch:
        parts.base.trainable = True
        for layer in unfreezable_layers(parts.base):
            layer.trainable = True
    else:
        unfreeze_top(parts.base, count)


def unfreeze_top(base: keras.Model, count: int) -> None:
    """Make the top `count` layers trainable, BatchNormalization excepted (its statistics stay frozen)."""
    base.trainable = True
    layers = unfreezable_layers(base)
    for i, layer in enumerate(layers):
        top = i >= len(layers) - count
        layer.trainable = top and not isinstance(layer, keras.layers.BatchNormalization)
