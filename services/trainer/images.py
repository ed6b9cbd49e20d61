"""Uploaded training images are checked from their header before any pixel is decoded.

A PNG of a few KB can declare 20000x20000 pixels (a decompression bomb) and a 13000x13000 one costs
a second of CPU and 600 MB to decode. The header check costs microseconds and refuses both; the full
decode (the trainer's `check_inputs`) then runs in `TrainingJobs`' bounded pool, not on RPC threads.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from concepts.errors import InvalidArgument

FORMATS = ("PNG", "JPEG")
MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg"}


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares: its format ("PNG" or "JPEG") and size in pixels."""

    format: str
    width: int
    height: int

    @property
    def mime_type(self) -> str:
        return MIME_TYPES[self.format]


def check_image_size(size: int, field: str, max_bytes: int, partial: bool = False) -> None:
    """`InvalidArgument(field)` when an image of `size` bytes exceeds `max_bytes`; `partial`: `size` is what
    arrived so far of an image still streaming in, so it is refused before the rest is received."""
    if size > max_bytes:
        raise InvalidArgument(field, f"image of {'at least ' if partial else ''}{size} bytes exceeds the limit "
                                     f"of {max_bytes} bytes")


def check_image_header(data: bytes, field: str, max_pixels: int) -> ImageHeader:
    """The image's header (format, width, height), or `InvalidArgument(field)` saying what is wrong.

    Raises:
        InvalidArgument: not a PNG or JPEG, or more than `max_pixels` pixels (width x height).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:  # reads the header only
                fmt, (width, height) = img.format, img.size
    except Image.DecompressionBombError:  # PIL's own bound, 2 x Image.MAX_IMAGE_PIXELS
        raise InvalidArgument(field, f"the image declares over {2 * Image.MAX_IMAGE_PIXELS} pixels; "
                                     f"the limit is {max_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidArgument(field, f"not a readable PNG or JPEG image ({len(data)} bytes)") from None
    if width * height > max_pixels:
        raise InvalidArgument(field, f"the image is {width}x{height} = {width * height} pixels; "
                                     f"the limit is {max_pixels} pixels")
    return ImageHeader(fmt, width, height)

