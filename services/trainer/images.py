"""Uploaded training images are checked from their header before any pixel is decoded.

A PNG of a few KB can declare 20000x20000 pixels (a decompression bomb) and a 13000x13000 one costs
a second of CPU and 600 MB to decode. The header check costs microseconds and refuses both; the full
decode (the trainer's `check_inputs`) then runs in `TrainingJobs`' bounded pool, not on RPC threads.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from concepts.errors import InvalidArgument

FORMATS = ("PNG", "JPEG")


def check_image_header(data: bytes, field: str, max_pixels: int) -> str:
    """The image's format ("PNG" or "JPEG") from its header, or `InvalidArgument(field)` saying what is wrong.

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
    return fmt

