"""A small synthetic, learnable image dataset, made here (no downloads): shapes on noise.

Used by `make run-local`, the tests and the quality benchmark. Each class is a shape drawn at a random
position and size on a noisy background, saved as PNG and JPEG. With `random_colours` the colour says
nothing about the class (only the shape does); otherwise each class has its own colour family.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar", "diamond", "star", "hexagon", "arrow")
COLOURS = ((220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 30), (180, 50, 200), (30, 200, 200),
           (240, 140, 30), (200, 200, 200), (120, 220, 120), (230, 110, 170))


def _polygon(cx: float, cy: float, radii: list[float], turn: float = -math.pi / 2) -> list[tuple[float, float]]:
    """Vertices at equal angles around (cx, cy), one per radius, the first pointing up."""
    step = 2 * math.pi / len(radii)
    return [(cx + r * math.cos(turn + k * step), cy + r * math.sin(turn + k * step)) for k, r in enumerate(radii)]


def draw(shape: str, colour: tuple[int, int, int] | None, size: int, rng: random.Random) -> Image.Image:
    """One `size` x `size` image of `shape` in a shade of `colour` (None: a random bright colour)."""
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    px = img.load()
    for _ in range(size * size // 8):  # speckle noise
        px[rng.randrange(size), rng.randrange(size)] = tuple(rng.randint(0, 120) for _ in range(3))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    colour = colour or tuple(rng.randint(110, 255) for _ in range(3))
    col = tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in colour)
    box = (cx - r, cy - r, cx + r, cy + r)
    w = r / 3
    if shape == "circle":
        d.ellipse(box, fill=col)
    elif shape == "square":
        d.rectangle(box, fill=col)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    elif shape == "cross":
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=col)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=col)
    elif shape == "ring":
        d.ellipse(box, outline=col, width=max(2, int(w)))
    elif shape == "bar":
        d.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=col)
    elif shape == "diamond":
        d.polygon(_polygon(cx, cy, [r] * 4), fill=col)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, [r, r * 0.4] * 5), fill=col)
    elif shape == "hexagon":
        d.polygon(_polygon(cx, cy, [r] * 6, turn=0.0), fill=col)
    elif shape == "arrow":
        d.rectangle((cx - r, cy - w / 2, cx, cy + w / 2), fill=col)
        d.polygon([(cx, cy - r * 0.6), (cx + r, cy), (cx, cy + r * 0.6)], fill=col)
    else:
        raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
    return img


def write_sample_dataset(root: Path, classes: int = 3, per_class: int = 40, size: int = 48, seed: int = 0,
                         test_per_class: int | None = None, shapes: tuple[str, ...] | None = None,
                         random_colours: bool = False) -> dict[str, dict[str, int]]:
    """Write root/train/<class>/ and root/test/<class>/ images; returns the counts per split and class.

    The classes are `shapes`, else the first `classes` of SHAPES. Every third image is a JPEG, the
    rest PNG. `test_per_class` defaults to a quarter of `per_class`.
    """
    shapes = tuple(shapes or SHAPES[:classes])
    if not 2 <= len(shapes) <= len(SHAPES) or not set(shapes) <= set(SHAPES):
        raise ValueError(f"classes must be 2..{len(SHAPES)} of {', '.join(SHAPES)}")
    rng = random.Random(seed)
    test_per_class = max(2, per_class // 4) if test_per_class is None else test_per_class
    counts: dict[str, dict[str, int]] = {}
    for split, n in (("train", per_class), ("test", test_per_class)):
        if n == 0:
            continue  # no test/ at all: an empty class folder would be a data error
        for name, i, img in _drawn(shapes, n, size, rng, random_colours):
            folder = Path(root) / split / name
            if i == 0:
                folder.mkdir(parents=True, exist_ok=True)
                counts.setdefault(split, {})[name] = n
            if i % 3 == 2:
                img.save(folder / f"{name}_{i:04d}.jpg", quality=JPEG_QUALITY)
            else:
                img.save(folder / f"{name}_{i:04d}.png")
    return counts


JPEG_QUALITY = 90


def _drawn(shapes: tuple[str, ...], n: int, size: int, rng: random.Random, random_colours: bool):
    """(shape, index, image): `n` images of each shape in turn."""
    for name in shapes:
        colour = None if random_colours else COLOURS[SHAPES.index(name)]
        for i in range(n):
            yield name, i, draw(name, colour, size, rng)


def render(shapes: tuple[str, ...], per_class: int, size: int, seed: int, random_colours: bool = False,
           decode_jpeg=None) -> tuple[np.ndarray, np.ndarray]:
    """The train/ split `write_sample_dataset` writes with these arguments, as arrays instead of files: (uint8
    [n, size, size, 3], int32 labels), classes numbered in sorted order and the images in the order a listing reads
    them (class by class). Every third image goes through JPEG in memory, as it is saved there, and back through
    `decode_jpeg` (bytes -> uint8 array; default Pillow's decoder: TensorFlow's differs by a few levels)."""
    classes, images, labels = sorted(shapes), [], []
    decode_jpeg = decode_jpeg or (lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    for name, i, img in _drawn(tuple(shapes), per_class, size, random.Random(seed), random_colours):
        if i % 3 == 2:
            encoded = io.BytesIO()
            img.save(encoded, "JPEG", quality=JPEG_QUALITY)
            images.append(decode_jpeg(encoded.getvalue()))
        else:
            images.append(np.asarray(img))
        labels.append(classes.index(name))
    order = np.argsort(labels, kind="stable")
    return np.stack(images)[order], np.asarray(labels, np.int32)[order]


def write_multilabel_dataset(root: Path, labels: tuple[str, ...] = SHAPES[:3], train: int = 90, test: int = 30,
                             size: int = 32, seed: int = 0) -> Path:
    """A multi-label dataset: each image shows 0 to 3 of `labels`' shapes side by side (a `size` x `size`
    image of each, in its class colour, tiled in a row: the job resizes it), labelled with the set present; one
    image in eight shows none. Writes root/images/*.png and root/labels.jsonl (path, labels, split); returns
    the manifest's path."""
    import json

    rng = random.Random(seed)
    rows = []
    (Path(root) / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        for i in range(n):
            present = [] if i % 8 == 7 else sorted(rng.sample(labels, rng.randint(1, min(3, len(labels)))))
            tiles = [draw(c, COLOURS[SHAPES.index(c)], size, rng) for c in present] or [draw_empty(size, rng)]
            rng.shuffle(tiles)
            canvas = Image.new("RGB", (size * len(tiles), size))
            for k, tile in enumerate(tiles):
                canvas.paste(tile, (k * size, 0))
            rel = f"images/{split}_{i:04d}.png"
            canvas.save(Path(root) / rel)
            rows.append({"path": rel, "labels": present, "split": split})
    manifest = Path(root) / "labels.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest


def draw_empty(size: int, rng: random.Random) -> Image.Image:
    """Background and noise as `draw` makes them, with no shape."""
    img = Image.new("RGB", (size, size), tuple(rng.randint(0, 90) for _ in range(3)))
    px = img.load()
    for _ in range(size * size // 8):
        px[rng.randrange(size), rng.randrange(size)] = tuple(rng.randint(0, 120) for _ in range(3))
    return img


def pretrain_base(images: np.ndarray, labels: np.ndarray, out: Path, backbone: str = "mobilenet_v2",
                  epochs: int = 8, seed: int = 0, batch_size: int = 16, augment: bool = False,
                  bn_momentum: float = 0.8, progress: bool = False, learning_rate: float = 1e-3,
                  cosine: bool = False) -> Path:
    """Train a backbone from scratch on `images` (uint8 [n, h, w, 3]) and save the base's weights.

    Stands in for ImageNet weights where they cannot be downloaded (CI, the offline demo, the quality
    benchmark): the job then loads it through `model.weights`, exactly as an air-gapped cluster loads a
    real one. `augment` (random flips and shifts) keeps the features from memorising the source images
    when there are enough steps to learn them through it (thousands, not tens). Adam at `learning_rate`,
    decayed to 0 along a cosine over the whole run with `cosine` (a short pre-training: larger batches, a larger
    rate that still ends small).
    """
    import keras
    import tensorflow as tf

    from job import backbones

    keras.utils.set_random_seed(seed)
    spec = backbones.get(backbone)
    shape = images.shape[1:]
    base = getattr(keras.applications, spec.constructor)(include_top=False, weights=None, input_shape=shape)
    for layer in base.layers:
        # Few steps here: let BatchNormalization's moving statistics catch up (0.999 needs thousands),
        # since the job runs the base in inference mode and would otherwise see the initial ones. With
        # tens of steps even 0.9 leaves them off enough that every image gets the same features.
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = bn_momentum
    inputs = x = keras.Input(shape)
    if augment:
        x = keras.layers.RandomFlip("horizontal", seed=seed)(x)
        x = keras.layers.RandomTranslation(0.1, 0.1, seed=seed + 1)(x)
    if spec.preprocess == "tf":
        x = keras.layers.Rescaling(1 / 127.5, offset=-1)(x)
    elif spec.preprocess != "none":  # "none": the base scales its own inputs (EfficientNet), as the job feeds it
        from job.model import Preprocess

        x = Preprocess(spec.preprocess)(x)
    x = keras.layers.GlobalAveragePooling2D()(base(x))
    net = keras.Model(inputs, keras.layers.Dense(int(labels.max()) + 1, activation="softmax")(x))
    rate = learning_rate
    if cosine:
        rate = keras.optimizers.schedules.CosineDecay(learning_rate, epochs * -(-len(images) // batch_size))
    net.compile(keras.optimizers.Adam(rate), "sparse_categorical_crossentropy", metrics=["accuracy"])
    # The optimizer's slot variables made here, eagerly, and not by fit's first trace, where making them took a
    # quarter of MobileNetV2's trace (about 6 s of CPU); the same zeros either way, so the same weights.
    net.optimizer.build(net.trainable_variables)
    # uint8 in memory, cast per batch: a float32 copy of every image up front costs more than the casts
    batches = (tf.data.Dataset.from_tensor_slices((images, np.asarray(labels, np.int32)))
               .shuffle(len(images), seed=seed, reshuffle_each_iteration=True).batch(batch_size)
               .map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(2))
    net.fit(batches, epochs=epochs, shuffle=False, verbose=0, callbacks=[_EpochLines(epochs)] if progress else [])
    out.parent.mkdir(parents=True, exist_ok=True)
    base.save_weights(out)
    return out


def _EpochLines(epochs: int):
    """A Keras callback printing one line per epoch (`make run-local`'s pre-training)."""
    import time

    import keras

    class EpochLines(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            print(f"    pre-training epoch {epoch + 1}/{epochs}: loss {logs.get('loss', float('nan')):.3f}, "
                  f"accuracy {logs.get('accuracy', float('nan')):.3f} ({time.monotonic() - self.started:.1f} s)",
                  flush=True)

    return EpochLines()


def pretrain_base_weights(data_root: Path, out: Path, backbone: str = "mobilenet_v2", size: int = 32,
                          epochs: int = 8, seed: int = 0, batch_size: int = 16, progress: bool = False,
                          **recipe) -> Path:
    """`pretrain_base` on the train/ images of a folder-per-class dataset, resized to `size`; `recipe`: its
    other keywords (learning_rate, cosine, ...)."""
    from job.dataset import image_dataset
    from job.layout import discover

    rels = [p.relative_to(data_root).as_posix() for p in sorted(Path(data_root).rglob("*")) if p.is_file()]
    paths, labels = discover(rels, str(data_root)).items("train")
    batches = image_dataset([str(Path(data_root) / p) for p in paths], labels, (size, size), 256)
    images = np.concatenate([x.numpy() for x, _ in batches]).round().astype(np.uint8)
    return pretrain_base(images, np.asarray(labels), out, backbone, epochs, seed, batch_size, progress=progress,
                         **recipe)
