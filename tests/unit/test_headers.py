"""job/headers.py: what an image's first bytes say, without decoding and without TensorFlow."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from job import headers


def encoded(fmt: str, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (8, 8), (200, 30, 10) if mode == "RGB" else 7).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize(("fmt", "unread"), [("JPEG", ""), ("PNG", ""), ("BMP", ""), ("GIF", ""), ("WEBP", "WEBP"),
                                             ("TIFF", "TIFF"), ("ICO", "ICO"), ("PPM", "PPM")])
def test_the_formats_training_does_not_read_are_named(fmt, unread):
    # predict classified an RGB WebP that training leaves out (an animated one can abort TensorFlow's decoder).
    assert headers.unread_format(encoded(fmt)) == unread


def test_a_jpeg_of_several_pictures_is_read():
    # Pillow names a JPEG with an MPF index (two pictures, as cameras write them) "MPO": predict refused it.
    out = io.BytesIO()
    first, second = Image.new("RGB", (8, 8), (10, 20, 30)), Image.new("RGB", (8, 8), (30, 20, 10))
    first.save(out, format="MPO", save_all=True, append_images=[second])
    with Image.open(io.BytesIO(out.getvalue())) as image:
        assert image.format == "MPO"
    assert headers.unread_format(out.getvalue()) == ""


def test_bytes_that_are_no_image_are_left_to_the_decoder():
    assert headers.unread_format(b"not an image at all") == "" and headers.unread_format(b"") == ""


def test_the_first_2_kb_of_a_palette_bmp_tell_it():
    # validate reads no more of a BMP (a ranged GET): its headers and a 256-colour table fit.
    out = io.BytesIO()
    Image.merge("RGB", [Image.radial_gradient("L"), Image.linear_gradient("L"), Image.radial_gradient("L")]) \
        .quantize(256).save(out, format="BMP")
    blob = out.getvalue()
    assert len(blob) > 60_000 and headers.misread(blob[: headers.BMP_HEAD_BYTES]) == headers.PALETTE_BMP


def _gif_with_frame_at(left: int, top: int, canvas: int = 8) -> bytes:
    """A 4x4 red frame at (left, top) of a `canvas`-square GIF (as `convert x.gif -trim` writes without +repage)."""
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (220, 20, 20)).save(out, format="GIF")
    data = bytearray(out.getvalue())
    data[6:10] = canvas.to_bytes(2, "little") * 2  # the logical screen (the canvas)
    at = data.index(b"\x2c\x00\x00\x00\x00\x04\x00\x04\x00")  # the image descriptor: at (0, 0), 4x4
    data[at + 1:at + 5] = left.to_bytes(2, "little") + top.to_bytes(2, "little")
    return bytes(data)


@pytest.mark.parametrize("left, top, canvas, partial", [(4, 4, 8, True), (4, 0, 8, True), (0, 0, 8, True),
                                                        (0, 0, 4, False)])
def test_a_gif_whose_first_frame_covers_part_of_its_canvas_is_misread(left, top, canvas, partial):
    # TensorFlow decodes the frame alone, clipped at its offset: a trimmed GIF trained as a black-filled crop, and
    # predict classified it; a frame at the corner came out as the frame without its canvas. Viewers, and the README's
    # Pillow recipe for LiteRT, show the whole canvas.
    tf = pytest.importorskip("tensorflow")
    blob = _gif_with_frame_at(left, top, canvas)
    with Image.open(io.BytesIO(blob)) as image:
        assert image.size == (canvas, canvas)
    assert headers.misread(blob) == (headers.PARTIAL_GIF if partial else "")
    decoded = tf.io.decode_image(blob, channels=3, expand_animations=False).numpy()
    assert (decoded.shape[:2] == (canvas, canvas)) != partial  # the premise: where refused, not the canvas Pillow shows
