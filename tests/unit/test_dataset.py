"""Images on local disk -> batches: the bad-image check (too large from the header, undecodable), the
image cache, the cached features, and classification reports. TensorFlow on one CPU, tiny data."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from conftest import png_header_only
from hypothesis import given, settings
from hypothesis import strategies as st

tf = pytest.importorskip("tensorflow")

from job import dataset, evaluate, headers  # noqa: E402
from job.sample_data import write_sample_dataset  # noqa: E402


def test_bad_images_are_named_with_the_reason(tmp_path):
    write_sample_dataset(tmp_path / "data", classes=2, per_class=3, size=32, seed=0, test_per_class=0)
    good = sorted(str(p) for p in (tmp_path / "data").rglob("*.*"))
    huge, broken, small_but_over = tmp_path / "huge.png", tmp_path / "broken.jpg", tmp_path / "over.png"
    png_header_only(huge, 25000, 25000)
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    from PIL import Image

    Image.new("RGB", (200, 100)).save(small_but_over)
    gone = tmp_path / "gone.png"
    gone.symlink_to(tmp_path / "nowhere.png")  # a broken link in the user's folder
    bad = dataset.find_bad(good + [str(huge), str(broken), str(small_but_over), str(gone)], max_pixels=10_000)
    assert bad == {
        str(huge): "too large: 25000x25000 = 625,000,000 pixels (data.max_image_pixels 10,000)",
        str(small_but_over): "too large: 200x100 = 20,000 pixels (data.max_image_pixels 10,000)",
        str(broken): "cannot be decoded",
        str(gone): "cannot be read (a broken link, or no permission)",
    }
    assert dataset.find_bad(good + [str(small_but_over)], max_pixels=90_000_000) == {}


def test_an_image_in_a_format_training_does_not_read_is_bad_whatever_its_name(tmp_path):
    # An RGB WebP named .jpg decodes in TensorFlow and was trained on, while `predict` refused it (and an animated
    # or transparent one was "cannot be decoded"): judged by its bytes, as predict judges them, it is left out.
    from PIL import Image

    picture = Image.new("RGB", (20, 20), (200, 40, 40))
    files = {}
    for name, fmt in (("webp.jpg", "WEBP"), ("tiff.png", "TIFF"), ("png.jpg", "PNG"), ("jpeg.png", "JPEG")):
        picture.save(tmp_path / name, format=fmt)
        files[name] = str(tmp_path / name)
    bad = dataset.find_bad(list(files.values()), 10**8)
    assert bad == {files["webp.jpg"]: headers.unread_reason("WEBP"), files["tiff.png"]: headers.unread_reason("TIFF")}
    assert bad[files["webp.jpg"]] == "a WEBP image, a format the job does not read: convert it to JPEG or PNG"
    blobs = [(n, (tmp_path / n).read_bytes()) for n in files]
    assert dataset.find_bad_blobs(blobs, 10**8) == {"webp.jpg": headers.unread_reason("WEBP"),
                                                   "tiff.png": headers.unread_reason("TIFF")}


def test_libjpegs_own_lines_on_a_damaged_jpeg_do_not_reach_stderr(tmp_path, capfd, monkeypatch):
    # `train` printed "Improper call to JPEG library in state 201" beside its own "bad image skipped" record.
    from PIL import Image

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")  # the job's default (job/logs.py setup)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "JPEG")
    whole = buf.getvalue()
    (tmp_path / "half.jpg").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "end.jpg").write_bytes(whole[:-2])
    bad = dataset.find_bad([str(tmp_path / "half.jpg"), str(tmp_path / "end.jpg")], 10**8)
    assert set(bad.values()) == {"cannot be decoded"} and len(bad) == 2
    err = capfd.readouterr().err
    assert "JPEG library" not in err and "Input file read error" not in err, err


GREY_RAMP = [v for i in range(256) for v in (i, i, i)]


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["P", "L", "1", "RGB", "RGBA"]), st.integers(1, 9), st.integers(1, 9), st.booleans(),
       st.integers(0, 2**32 - 1))
def test_a_bmp_is_refused_exactly_when_tensorflow_would_misread_its_pixels(mode, width, height, grey, seed):
    """TensorFlow's BMP decoder reads an 8-bit BMP's palette indices as grey levels and ignores its colour table:
    a palette BMP came out as a picture of its indices, in training and in the exported signature alike. Generated
    BMPs of every mode Pillow writes, with random colour tables or the grey ramp (where index i is grey i and the
    reading is right): the header check refuses exactly those whose decoded pixels are not the image's own."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (height, width) if mode in ("P", "L", "1") else (height, width, len(mode))
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "L" if mode == "1" else mode)
    image = image.convert("1") if mode == "1" else image
    if mode == "P":
        image.putpalette(GREY_RAMP if grey else rng.integers(0, 256, 768).tolist())
    buf = io.BytesIO()
    image.save(buf, "BMP")
    blob = buf.getvalue()
    try:
        decoded = tf.io.decode_image(blob, channels=3, expand_animations=False).numpy()
    except tf.errors.InvalidArgumentError:  # a 1-bit BMP: not decoded at all
        decoded = None
    misread = decoded is None or not np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))
    assert (headers.misread(blob) == headers.PALETTE_BMP) == misread
    assert dataset.find_bad_blobs([("x.bmp", blob)], 10**8) == ({"x.bmp": headers.PALETTE_BMP} if misread else {})


def _bmp8(palette: list[tuple[int, int, int]], indices: np.ndarray) -> bytes:
    """An 8-bit BMP with this colour table (as other tools write them; Pillow always writes 256 entries)."""
    import struct

    h, w = indices.shape
    rows = b"".join(indices[r].astype(np.uint8).tobytes() + b"\0" * (-w % 4) for r in range(h - 1, -1, -1))
    table = b"".join(bytes([b, g, r, 0]) for r, g, b in palette)
    dib = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 8, 0, len(rows), 2835, 2835, len(palette), 0)
    offset = 14 + len(dib) + len(table)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + dib + table + rows


def test_an_8_bit_black_and_white_bmp_is_refused_too():
    # Two table entries, black and white: Pillow opens it as mode "1", TensorFlow gives grey levels 0 and 1.
    indices = np.array([[0, 1, 1], [1, 0, 1]])
    blob = _bmp8([(0, 0, 0), (255, 255, 255)], indices)
    assert tf.io.decode_image(blob, channels=3).numpy()[..., 0].tolist() == indices.tolist()
    assert headers.misread(blob) == headers.PALETTE_BMP
    assert headers.misread(_bmp8([(i, i, i) for i in range(256)], indices)) == ""  # the grey ramp reads right


def _bmp32(pixels: np.ndarray, masks: tuple[int, int, int, int]) -> bytes:
    """A 32-bit BMP (BITFIELDS, V4 header) whose bytes are each pixel's B, G, R, A, with these colour masks."""
    import struct

    h, w, _ = pixels.shape
    bgra = np.concatenate([pixels[..., ::-1], np.full((h, w, 1), 255, np.uint8)], axis=-1)
    rows = b"".join(bgra[r].tobytes() for r in range(h - 1, -1, -1))
    dib = struct.pack("<IiiHHIIiiII", 108, w, h, 1, 32, 3, len(rows), 2835, 2835, 0, 0)
    dib += struct.pack("<IIII", *masks) + b"BGRs" + bytes(108 - 40 - 20)
    return b"BM" + struct.pack("<IHHI", 14 + len(dib) + len(rows), 0, 0, 14 + len(dib)) + dib + rows


def test_a_bmp_whose_colour_masks_tensorflow_ignores_is_refused():
    # Masks that name byte 0 red: Pillow applies them, TensorFlow reads B, G, R all the same (colours swapped).
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    swapped = _bmp32(pixels, (0x000000FF, 0x0000FF00, 0x00FF0000, 0xFF000000))
    assert tf.io.decode_image(swapped, channels=3).numpy().tolist() == pixels.tolist()  # the masks ignored
    assert np.asarray(Image.open(io.BytesIO(swapped)).convert("RGB")).tolist() == pixels[..., ::-1].tolist()
    assert headers.misread(swapped) == headers.MASKED_BMP
    assert headers.misread(_bmp32(pixels, (0x00FF0000, 0x0000FF00, 0x000000FF, 0xFF000000))) == ""  # BGRA: right


def test_a_palette_bmp_on_disk_is_a_bad_image_named_with_its_reason(tmp_path):
    from PIL import Image

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    palette, grey, full = tmp_path / "palette.bmp", tmp_path / "grey.bmp", tmp_path / "rgb.bmp"
    rgb.convert("P").save(palette)
    rgb.convert("L").save(grey)
    rgb.save(full)
    assert dataset.find_bad([str(palette), str(grey), str(full)], 10**8) == {str(palette): headers.PALETTE_BMP}


def test_image_cache_gives_the_decoded_images(tmp_path, monkeypatch):
    """Decoded pixels cached on disk feed training the same images and labels as decoding every epoch:
    within 8-bit rounding, in evaluation order and shuffled."""
    from job import metrics

    reported = []  # the decoding pass moves a stage gauge: minutes of it moved nothing, and the stall alert fired
    monkeypatch.setattr(metrics, "stage_progress", lambda stage, done, of: reported.append((stage, done, of)))
    write_sample_dataset(tmp_path / "data", classes=2, per_class=9, size=40, seed=1, test_per_class=0)
    paths = sorted(str(p) for p in (tmp_path / "data").rglob("*.*"))
    ids = list(range(len(paths)))  # one label per image identifies it
    size = (24, 32)
    decoded = {int(y): x for xs, ys in dataset.image_dataset(paths, ids, size, 5)
               for x, y in zip(xs.numpy(), ys.numpy())}

    cache = tmp_path / "cache"
    in_order = dataset.image_dataset(paths, ids, size, 5, cache_dir=cache)
    got = [(int(y), x) for xs, ys in in_order for x, y in zip(xs.numpy(), ys.numpy())]
    assert [y for y, _ in got] == ids
    assert all(x.dtype == np.float32 and x.shape == (*size, 3) for _, x in got)
    assert max(float(np.abs(x - decoded[y]).max()) for y, x in got) <= 0.5
    assert len(list(cache.glob("*.npy"))) == 1
    assert reported[0] == ("decoding", 0, len(paths)) and reported[-1] == ("decoding", len(paths), len(paths))

    def pairs(ds):
        out = []
        for xs, ys in ds:
            for x, y in zip(xs.numpy(), ys.numpy()):
                assert float(np.abs(x - decoded[int(y)]).max()) <= 0.5
                out.append(int(y))
        return out

    seen = pairs(dataset.image_dataset(paths, ids, size, 4, shuffle=True, seed=3, cache_dir=cache))
    assert sorted(seen) == ids and seen != ids  # one epoch: a permutation, not the files' order
    repeated = dataset.image_dataset(paths, ids, size, 4, shuffle=True, seed=3, repeat=True, cache_dir=cache)
    assert len(pairs(repeated.take(math.ceil(2 * len(paths) / 4)))) == 4 * math.ceil(2 * len(paths) / 4)
    assert len(list(cache.glob("*.npy"))) == 1  # reused, not rebuilt
    assert not list(cache.glob(".*"))  # no temporary left behind


def test_cached_features_are_computed_once_and_batched_with_their_labels(tmp_path):
    write_sample_dataset(tmp_path / "data", classes=2, per_class=5, size=32, seed=2, test_per_class=0)
    paths = sorted(str(p) for p in (tmp_path / "data").rglob("*.*"))
    labels = list(range(10))
    inputs = tf.keras.Input((16, 16, 3))
    extractor = tf.keras.Model(inputs, tf.keras.layers.GlobalAveragePooling2D()(inputs))  # mean colour

    def batches():
        return dataset.image_dataset(paths, labels, (16, 16), 4, cache_dir=tmp_path / "cache")

    done = []  # the progress each call reports (the features gauge): every image, computed or read back
    first, first_labels = dataset.cached_features(extractor, batches(), 10, ["k", paths], tmp_path / "cache",
                                                  done.append)
    assert first.shape == (10, 3) and first_labels.tolist() == labels and done == [4, 4, 2]
    assert len(list((tmp_path / "cache").glob("features-*.npy"))) == 1
    again, _ = dataset.cached_features(extractor, batches().take(0), 10, ["k", paths], tmp_path / "cache",
                                       done.append)
    np.testing.assert_array_equal(first, again)  # read back, not recomputed (the dataset given is empty)
    assert done[3:] == [10]  # the gauge stayed at 0 of 10 for a resumed run's whole head phase
    dataset.cached_features(extractor, batches(), 10, ["other weights", paths], tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("features-*.npy"))) == 2
    with pytest.raises(RuntimeError, match="saw 10 images, expected 11"):
        dataset.cached_features(extractor, batches(), 11, ["wrong count"], tmp_path / "cache")

    rows = {int(y): x for xs, ys in dataset.feature_dataset(first, first_labels, 4, shuffle=True, seed=0)
            for x, y in zip(xs.numpy(), ys.numpy())}
    assert sorted(rows) == labels
    for i in labels:
        np.testing.assert_array_equal(rows[i], first[i])


def test_report_counts_and_balanced_accuracy():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 0, 1, 1, 0, 2, 2])
    probs = np.eye(3, dtype=np.float32)[predicted] * 0.98 + 0.01
    r = evaluate.report(probs, labels, ["a", "b", "c"])
    assert r["confusion_matrix"] == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert r["accuracy"] == pytest.approx(6 / 8)
    assert r["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    assert r["per_class"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert r["macro_f1"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)  # a: precision 3/4, recall 3/4
    assert r["loss"] == pytest.approx(-(6 * np.log(0.99) + 2 * np.log(0.01)) / 8, rel=1e-5)


@given(st.integers(2, 6).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), min_size=1, max_size=40))))
def test_macro_f1_averages_the_classes_a_split_has_or_predicts(case):
    # A class that a split lacks (validation/ and test/ may hold a subset of the classes) and that nothing was
    # predicted as has no F1: it counted as 0, so a test split without one class of four and every image right
    # scored macro-F1 0.75. The classes averaged are those in the labels or the predictions (scikit-learn's).
    n, pairs = case
    labels, predicted = (np.array(x) for x in zip(*pairs))
    present = set(labels) | set(predicted)
    f1s = []
    for c in present:
        tp = sum(lab == c and p == c for lab, p in pairs)
        f1s.append(2 * tp / (sum(lab == c for lab, _ in pairs) + sum(p == c for _, p in pairs)))
    report = evaluate.report(np.eye(n, dtype=np.float32)[predicted], labels, [f"c{i}" for i in range(n)])
    assert report["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
    # A class neither in the split nor predicted has no score (0.0 read as a class always missed), one the split
    # lacks no recall; the others have all three, as multi-label's per-label entries.
    for i in range(n):
        entry = report["per_class"][f"c{i}"]
        assert (entry["recall"] is None) == (i not in set(labels))
        assert (entry["precision"] is None) == (entry["f1"] is None) == (i not in present)


def test_the_confusion_plot_is_bounded_for_many_classes(tmp_path):
    # 0.5 inch a class at 100 dpi grew without bound: 300 classes took 7.4 GB after training, 1,000 would not fit.
    from PIL import Image

    for n, side in ((4, 400), (10, 700), (100, 3200)):
        cm = np.arange(n * n).reshape(n, n).tolist()
        evaluate.plot_confusion(cm, [f"class {i}" for i in range(n)], tmp_path / f"{n}.png", "test")
        with Image.open(tmp_path / f"{n}.png") as png:
            assert png.size == (side, side), n


def test_long_class_names_are_shortened_on_the_confusion_plot(tmp_path):
    # A 300-character class name squeezed the matrix out of the figure ("Tight layout not applied").
    import warnings

    names = ["L" * 300, "short", "\u00fc" * 31]
    assert [evaluate.axis_name(n) for n in names] == ["L" * 29 + "\u2026", "short", "\u00fc" * 29 + "\u2026"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate.plot_confusion(np.eye(3, dtype=int).tolist(), names, tmp_path / "cm.png", "test")


def test_class_names_with_dollar_signs_are_drawn_as_written(tmp_path):
    # Matplotlib read `$1_to_$` as mathematics: a class `cost_$1_to_$5` failed the run after training, exit 1, and
    # every rerun of it. The confusion matrix and TensorBoard's misclassified images both draw class names.
    from PIL import Image

    from job.tensorboard import image_grid

    names = ["cost_$1_to_$5", "a$_$b", "$x^$"]
    evaluate.plot_confusion(np.eye(3, dtype=int).tolist(), names, tmp_path / "cm.png", "test")
    assert Image.open(tmp_path / "cm.png").size[0] > 0
    png = image_grid(np.zeros((2, 8, 8, 3), np.uint8), [f"{names[0]} -> {names[1]}", f"{names[2]} -> x"])
    assert png.startswith(b"\x89PNG")


def test_names_the_plot_font_cannot_draw_are_one_log_record_not_raw_warnings(tmp_path):
    # Matplotlib's DejaVu Sans has no CJK glyphs: it warned on stderr once per glyph and call, amid the JSON log.
    import warnings

    from structlog.testing import capture_logs

    with warnings.catch_warnings(), capture_logs() as logs:
        warnings.simplefilter("error")  # a glyph warning that escaped would raise
        evaluate.plot_confusion(np.eye(3, dtype=int).tolist(), ["\u732b", "\u72ac", "cat"], tmp_path / "cm.png", "t")
    assert [(r["event"], r["plot"], r["characters"]) for r in logs] == [
        ("class names drawn with boxes in a plot: its font has no glyph for these characters", "cm.png",
         "\u72ac\u732b")]
    assert (tmp_path / "cm.png").stat().st_size > 0


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.data())
def test_rows_of_a_mapped_file_read_with_pread_equal_indexing(tmp_path_factory, n, dim, data):
    """`dataset.rows` reads a memory-mapped .npy file with positional reads (nothing mapped stays resident):
    the same rows, bit for bit, as indexing the array, for any sorted selection."""
    array = np.random.default_rng(n * 7 + dim).normal(size=(n, dim)).astype(np.float32)
    path = tmp_path_factory.mktemp("rows") / "a.npy"
    np.save(path, array)
    idx = np.array(sorted(data.draw(st.lists(st.integers(0, n - 1), max_size=3 * n))), np.int64)
    mapped = np.load(path, mmap_mode="r")
    assert isinstance(mapped, np.memmap)
    got = dataset.rows(mapped, idx)
    assert got.dtype == array.dtype and got.shape == (len(idx), dim)
    assert np.array_equal(got, array[idx])


@settings(max_examples=8, deadline=None)
@given(st.lists(st.sampled_from(["circle", "square", "star", "arrow", "ring"]), min_size=2, max_size=3, unique=True),
       st.integers(1, 5), st.integers(0, 3), st.booleans())
def test_rendered_images_are_the_files_the_sample_dataset_writes(tmp_path_factory, shapes, per_class, seed, colours):
    """job.sample_data.render (the demo base's source images, drawn in memory) gives the pixels and labels of the
    train/ files write_sample_dataset writes with the same arguments, in the order a listing reads them."""
    from PIL import Image

    from job.sample_data import render

    root = tmp_path_factory.mktemp("written")
    write_sample_dataset(root, per_class=per_class, size=16, seed=seed, test_per_class=0, shapes=tuple(shapes),
                         random_colours=colours)
    files = sorted((root / "train").rglob("*.*"))
    images, labels = render(tuple(shapes), per_class, 16, seed, random_colours=colours)
    np.testing.assert_array_equal(images, np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    assert labels.tolist() == [sorted(shapes).index(f.parent.name) for f in files]
