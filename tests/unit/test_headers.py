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
