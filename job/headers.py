"""What an image's header says, read without decoding and without TensorFlow: its size, and whether
TensorFlow's decoder would misread its pixels (BMPs whose colour table or masks it ignores, GIFs whose first frame
covers part of the canvas).

`dataset.find_bad` asks it of every staged image; `validate` of the BMPs it lists, from their first bytes.
"""

from __future__ import annotations

import io

from PIL import Image

# The job checks image sizes itself (data.max_image_pixels) from the header, before any decoding.
Image.MAX_IMAGE_PIXELS = None

# TensorFlow's BMP decoder ignores an 8-bit BMP's colour table: it returns the palette indices as grey levels
# (tests/unit/test_dataset.py checks that it still does). Where the table is the grey ramp (Pillow's mode "L")
# index i is grey i and the reading is right; any other table gave pictures of indices, trained on without a word.
PALETTE_BMP = ("a BMP with a colour palette: TensorFlow's decoder reads its palette indices as grey levels "
               "(convert it to PNG)")
# It ignores a 32-bit BMP's colour masks too, reading every pixel as B, G, R: masks in another order swapped colours.
MASKED_BMP = ("a BMP whose colour masks are not in blue-green-red order: TensorFlow's decoder ignores them and "
              "swaps its colours (convert it to PNG)")
# TensorFlow decodes a GIF's first frame alone, at the frame's size, clipped at its offset: one that covers only part
# of the canvas (ImageMagick's `-trim` or `-crop` without `+repage` writes them) came out cropped and black-filled,
# all black, or the frame without the canvas around it, where viewers (and Pillow, the README's LiteRT recipe) show
# the whole canvas.
PARTIAL_GIF = ("a GIF whose first frame covers only part of its canvas: TensorFlow's decoder reads the frame alone "
               "(cropped and black-filled when it is placed away from the corner), where viewers show the whole "
               "canvas (convert it to PNG)")
# An image file of no bytes (a failed copy, a placeholder): a bad image, known from its size before any read.
EMPTY = "empty (0 bytes)"
UNREADABLE = "cannot be read (a broken link, or no permission)"
# A BMP's file header, info header, masks and a 256-colour table fit in this many first bytes.
BMP_HEAD_BYTES = 2048


def _bmp_misread(image) -> str:
    """Why TensorFlow would misread a BMP that Pillow opened, or "": Pillow reads its colour table and masks."""
    if image.mode in ("P", "1"):  # "1": a black-and-white table (0/1 out of TensorFlow); "L": the grey ramp
        return PALETTE_BMP
    raw = image.tile[0][3][0] if image.tile and image.tile[0][3] else ""  # Pillow's raw mode from the masks
    return MASKED_BMP if image.mode in ("RGB", "RGBA") and isinstance(raw, str) and not raw.startswith("BGR") else ""


def header(source) -> tuple[tuple[int, int] | None, str]:
    """From an image's header (a path or a file-like object), without decoding it: ((width, height), why the job
    leaves it out although its header reads (a format training does not read, whatever its name: a WebP named
    .jpg, which `predict` refused; or pixels TensorFlow's decoder would misread), or ""); (None, "") if the header
    is unreadable."""
    try:
        with Image.open(source) as image:
            if image.format not in READ_FORMATS:
                return image.size, unread_reason(str(image.format))
            if image.format == "GIF":
                extent = tuple(image.tile[0][1]) if image.tile else None
                return image.size, PARTIAL_GIF if extent not in (None, (0, 0, *image.size)) else ""
            return image.size, _bmp_misread(image) if image.format == "BMP" else ""
    except (OSError, ValueError, SyntaxError):
        return None, ""


def unread_reason(fmt: str) -> str:
    """Why an image in format `fmt` (Pillow's name: WEBP, TIFF) is left out, in training and in `predict`."""
    return f"a {fmt} image, a format the job does not read: convert it to JPEG or PNG"


def misread(blob: bytes) -> str:
    """Why TensorFlow's decoder would misread these encoded bytes' pixels, or "" (`header`). The first
    BMP_HEAD_BYTES of a BMP are enough."""
    return header(io.BytesIO(blob))[1]


# What training reads (layout.IMAGE_EXTENSIONS), as Pillow names them: MPO is a JPEG that holds several pictures
# (cameras and phones write them; TensorFlow decodes the first), which predict refused.
READ_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF")


def unread_format(blob: bytes) -> str:
    """Pillow's name of these bytes' image format when it is one training does not read (WEBP, TIFF, ICO...),
    else "" (one it reads, or none Pillow knows)."""
    try:
        with Image.open(io.BytesIO(blob)) as image:
            return "" if image.format in READ_FORMATS else str(image.format)
    except (OSError, ValueError, SyntaxError):
        return ""
