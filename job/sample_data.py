"""A small synthetic, learnable image dataset, made here (no downloads): coloured shapes on noise.

Used by `make run-local` and the tests. Each class is a shape with its own colour family, drawn at
random positions and sizes on a noisy background, saved as PNG and JPEG.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
COLOURS = ((220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 30), (180, 50, 200), (30, 200, 200))


def _draw(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(0, 90) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    px = img.load()
    for _ in range(size * size // 8):  # speckle noise
        px[rng.randrange(size), rng.randrange(size)] = tuple(rng.randint(0, 120) for _ in range(3))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    col = tuple(max(0, min(255, c + rng.randint(-30, 30))) for c in colour)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=col)
    elif shape == "square":
        d.rectangle(box, fill=col)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    elif shape == "cross":
        w = r / 3
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=col)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=col)
    elif shape == "ring":
        d.ellipse(box, outline=col, width=max(2, int(r / 3)))
    else:
        d.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=col)
    return img


def write_sample_dataset(root: Path, classes: int = 3, per_class: int = 40, size: int = 48, seed: int = 0,
                         test_per_class: int | None = None) -> dict[str, dict[str, int]]:
    """Write root/train/<class>/ and root/test/<class>/ images; returns the counts per split and class.

    Every third image is a JPEG, the rest PNG. `test_per_class` defaults to a quarter of `per_class`.
    """
    if not 2 <= classes <= len(SHAPES):
        raise ValueError(f"classes must be 2..{len(SHAPES)}")
    rng = random.Random(seed)
    test_per_class = max(2, per_class // 4) if test_per_class is None else test_per_class
    counts: dict[str, dict[str, int]] = {}
    for split, n in (("train", per_class), ("test", test_per_class)):
        for k in range(classes):
            name = SHAPES[k]
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = _draw(name, COLOURS[k], size, rng)
                if i % 3 == 2:
                    img.save(folder / f"{name}_{i:04d}.jpg", quality=90)
                else:
                    img.save(folder / f"{name}_{i:04d}.png")
            counts.setdefault(split, {})[name] = n
    return counts


def pretrain_base_weights(data_root: Path, out: Path, backbone: str = "mobilenet_v2", size: int = 32,
                          epochs: int = 8, seed: int = 0) -> Path:
    """Train a backbone from scratch on the sample data and save its weights (a `.weights.h5` file).

    Stands in for ImageNet weights where they cannot be downloaded (CI, the offline demo): the job
    then loads it through `model.weights`, exactly as an air-gapped cluster loads a real one.
    """
    import keras

    from job import backbones
    from job.dataset import image_dataset
    from job.layout import discover

    keras.utils.set_random_seed(seed)
    rels = [p.relative_to(data_root).as_posix() for p in sorted(Path(data_root).rglob("*")) if p.is_file()]
    layout = discover(rels, str(data_root))
    paths, labels = layout.items("train")
    spec = backbones.get(backbone)
    base = getattr(keras.applications, spec.constructor)(include_top=False, weights=None, input_shape=(size, size, 3))
    for layer in base.layers:
        # Few steps here: let BatchNormalization's moving statistics catch up (0.999 needs thousands),
        # since the job runs the base in inference mode and would otherwise see the initial ones.
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.8
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(base(x))
    net = keras.Model(inputs, keras.layers.Dense(len(layout.classes), activation="softmax")(x))
    net.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    data = image_dataset([str(Path(data_root) / p) for p in paths], labels, (size, size), 16, shuffle=True, seed=seed)
    net.fit(data, epochs=epochs, verbose=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    base.save_weights(out)
    return out
