"""Images to training examples: decoding, EXIF rotation, center crop, and the paper's augmentation.

The augmentation (Kumari et al., section 3; the reference's `CustomDiffusionDataset.preprocess`):
with probability 0.66 the image is shrunk to a random size in [resolution/3, resolution] and pasted
at a random place on a blank canvas ("zoom-out"), with a loss mask over the pasted region and the
caption prefix "a far away " or "very small " when it is under 0.6 of the resolution; otherwise it
is enlarged to [1.2, 1.4) x resolution and randomly cropped ("zoom-in", prefix "zoomed in " or
"close up "). Horizontal flips with probability 0.5.

Every view is made once per job (`views_per_image` of them per target image) and encoded once by
the VAE; the training step picks one at random. Randomness comes from a generator seeded by (job
seed, image index), so every rank and every resumed run builds the same views.

Each example also records SDXL's size and crop conditioning (`Example.time_ids`) in the pixel
coordinates of diffusers' train_text_to_image_sdxl.py: the source image's (height, width), and the
top-left of the crop in the source resized to the view's scale (a zoom-out view shows its whole
square, so its crop is the square's).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ZOOM_OUT_PREFIXES = ("a far away ", "very small ")
ZOOM_IN_PREFIXES = ("zoomed in ", "close up ")
ZOOM_OUT_PROBABILITY = 0.66


def load_image(path: str | Path) -> Image.Image:
    """Decode any format PIL reads, apply the EXIF orientation, and convert to RGB.

    Raises:
        OSError, ValueError, SyntaxError, Image.DecompressionBombError: the file is not a readable image.
    """
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


def center_square(image: Image.Image, size: int) -> Image.Image:
    """The largest centered square, resized to `size` x `size`."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)


def square_origin(height: int, width: int, scale: int) -> tuple[int, int]:
    """(top, left) of `center_square`'s square in a `height` x `width` source resized so that the square
    is `scale` pixels wide."""
    side = min(height, width)
    return round((height - side) // 2 * scale / side), round((width - side) // 2 * scale / side)


def to_array(image: Image.Image) -> np.ndarray:
    """[3, H, W] float32 in [-1, 1], the VAE's input range."""
    return (np.asarray(image, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


@dataclass(frozen=True)
class Example:
    """One training view before VAE encoding.

    Args:
        pixels: [3, H, W] float32 in [-1, 1].
        mask: [H/f, W/f] float32 at latent resolution; 1 where the loss counts.
        caption: the full prompt, augmentation prefix included.
        original_size: (height, width) of the source image.
        crop_top_left: (top, left) of the view in the source resized to the view's scale (module doc).
    """

    pixels: np.ndarray
    mask: np.ndarray
    caption: str
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]

    @property
    def time_ids(self) -> tuple[int, ...]:
        """SDXL's added ``time_ids``: original size, crop top-left, target size (the view's), each (h, w)."""
        return (*self.original_size, *self.crop_top_left, *self.pixels.shape[1:])


def paste_mask(top: int, left: int, scale: int, size: int, factor: int) -> np.ndarray:
    """Latent-resolution mask of a `scale`-pixel square pasted at (top, left) on a `size` canvas.

    As in the reference, one latent cell is trimmed on each side so that cells mixing image and canvas
    do not count. At small resolutions that can leave nothing, so it falls back to the cells fully
    inside the square, then to every cell it touches (the reference divides by zero there).
    """
    m = size // factor
    candidates = (
        (top // factor + 1, (top + scale) // factor - 1, left // factor + 1, (left + scale) // factor - 1),
        (math.ceil(top / factor), (top + scale) // factor, math.ceil(left / factor), (left + scale) // factor),
        (top // factor, math.ceil((top + scale) / factor), left // factor, math.ceil((left + scale) / factor)),
    )
    mask = np.zeros((m, m), dtype=np.float32)
    for r0, r1, c0, c1 in candidates:
        if r1 > r0 and c1 > c0:
            mask[r0:r1, c0:c1] = 1.0
            break
    return mask


def augmented_view(image: Image.Image, caption: str, size: int, factor: int, rng: np.random.Generator,
                   augment: bool, hflip: bool, source_size: tuple[int, int] | None = None) -> Example:
    """One random view of a `size`-square image (see the module docstring for the distribution).

    Args:
        source_size: (height, width) of the image `image` is the `center_square` of, for the view's
            `Example.time_ids` (module doc); None: `image` itself. Flips keep the crop coordinates, as
            diffusers' script flips before it crops.
    """
    if hflip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = size
    if augment:
        if rng.random() < ZOOM_OUT_PROBABILITY:
            scale = int(rng.integers(size // 3, size + 1))
        else:
            scale = int(rng.integers(int(1.2 * size), int(1.4 * size)))
    resized = to_array(image.resize((scale, scale), Image.Resampling.BILINEAR)) if scale != size else to_array(image)
    height, width = source_size or (size, size)
    crop = square_origin(height, width, scale)  # the square's, at the view's scale
    if scale > size:
        top, left = (int(v) for v in rng.integers(0, scale - size + 1, size=2))
        pixels = resized[:, top:top + size, left:left + size]
        mask = np.ones((size // factor, size // factor), dtype=np.float32)
        crop = (crop[0] + top, crop[1] + left)
    else:
        top, left = (int(v) for v in rng.integers(0, size - scale + 1, size=2))
        pixels = np.zeros((3, size, size), dtype=np.float32)  # 0 is mid-gray in [-1, 1]
        pixels[:, top:top + scale, left:left + scale] = resized
        mask = paste_mask(top, left, scale, size, factor)
    if scale < 0.6 * size:
        caption = ZOOM_OUT_PREFIXES[int(rng.integers(2))] + caption
    elif scale > size:
        caption = ZOOM_IN_PREFIXES[int(rng.integers(2))] + caption
    return Example(np.ascontiguousarray(pixels), mask, caption, (height, width), crop)


def instance_examples(images: list[tuple[Image.Image, str]], size: int, factor: int, views: int, seed: int,
                      augment: bool, hflip: bool) -> Iterator[Example]:
    """`views` augmented views of each (image, caption), image by image; view k of image i is item i*views+k."""
    for index, (image, caption) in enumerate(images):
        rng = np.random.default_rng([seed, index])
        square = center_square(image, size)
        for _ in range(views):
            yield augmented_view(square, caption, size, factor, rng, augment, hflip, (image.height, image.width))


def class_examples(images: list[tuple[Image.Image, str]], size: int, factor: int, hflip: bool) -> Iterator[Example]:
    """Each regularization image center-cropped, then (with `hflip`) mirrored: item i*2+k, k=1 mirrored."""
    ones = np.ones((size // factor, size // factor), dtype=np.float32)
    for image, caption in images:
        square = center_square(image, size)
        geometry = ((image.height, image.width), square_origin(image.height, image.width, size))
        yield Example(to_array(square), ones, caption, *geometry)
        if hflip:
            yield Example(to_array(square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), ones, caption, *geometry)
