"""Scenes to 64x64 RGB images, deterministically (no randomness: a scene has exactly one image).

64x64 pixels are 8x8 latents for the base's VAE, which downsamples by 8 as Stable Diffusion's does.
Shapes are drawn on a 4x supersampled grid and box-filtered, so edges are anti-aliased. Every object
is centred at (32, 32) and fits inside rows and columns 8..55, so the outer 8 pixels are background.
A pair of scenes (world v2) is their two images side by side, 64x128.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image

from evals.toyworld.world import BACKGROUNDS, COLOURS, Pair, Scene

IMAGE_SIZE = 64
CENTRE = IMAGE_SIZE / 2
RADIUS = {"small": 16.0, "large": 24.0}  # half extent of an object, in pixels
HOLE = 0.55  # inner/outer extent of a ring or a frame
SQUARE = 0.85  # half side of a square relative to its radius, so squares and circles have similar areas
BAND = 8.0  # stripe height in pixels: one latent row
SUPERSAMPLE = 4


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates relative to the centre: dx, dy of shape [256, 256]."""
    n = IMAGE_SIZE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE - CENTRE
    return np.meshgrid(coords, coords, indexing="xy")


def _inside(cls: str, r: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Boolean mask of the object's area on the supersampled grid."""
    d = np.hypot(dx, dy)
    box = np.maximum(np.abs(dx), np.abs(dy))
    if cls == "circle":
        return d <= r
    if cls == "ring":
        return (d <= r) & (d >= HOLE * r)
    if cls == "square":
        return box <= SQUARE * r
    if cls == "frame":
        return (box <= SQUARE * r) & (box >= HOLE * SQUARE * r)
    if cls == "triangle":  # pointing up: apex (0, -r), base corners (+-r, 0.75 r)
        return (dy <= 0.75 * r) & (dy >= -r + 1.75 * np.abs(dx))
    raise ValueError(f"unknown class {cls!r}")


@functools.lru_cache(maxsize=None)
def coverage(cls: str, size: str, pattern: str, resolution: int = IMAGE_SIZE) -> np.ndarray:
    """How much of each pixel each part of the scene covers: [3, resolution, resolution] floats summing
    to 1 per pixel (`resolution` divides 64).

    Part 0 is the background, part 1 the object's first colour, part 2 its second (two tone: the
    bottom half; striped: the bands not starting at the centre row; solid: empty).
    """
    dx, dy = _grid()
    inside = _inside(cls, RADIUS[size], dx, dy)
    if pattern == "solid":
        second = np.zeros_like(inside)
    elif pattern == "two tone":
        second = dy >= 0
    elif pattern == "striped":
        second = np.floor(dy / BAND).astype(int) % 2 == 1
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    labels = np.where(inside, np.where(second, 2, 1), 0)
    n, k = resolution, IMAGE_SIZE * SUPERSAMPLE // resolution
    onehot = np.stack([labels == part for part in range(3)]).astype(np.float64)
    cov = onehot.reshape(3, n, k, n, k).mean(axis=(2, 4))
    cov.setflags(write=False)
    return cov


def part_colours(scene: Scene) -> np.ndarray:
    """[3, 3] RGB of each part in [0, 1]: background, first colour, second colour (first again if solid)."""
    colours = scene.look.colours
    rgb = [BACKGROUNDS[scene.background], COLOURS[colours[0]], COLOURS[colours[-1]]]
    return np.asarray(rgb, dtype=np.float64) / 255.0


def render(scene: Scene) -> np.ndarray:
    """The scene's image: uint8 [64, 64, 3]."""
    cov = coverage(scene.cls, scene.size, scene.look.pattern)
    image = np.einsum("khw,kc->hwc", cov, part_colours(scene))
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """uint8 [N, 64, 64, 3]."""
    return np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def render_pair(pair: Pair) -> np.ndarray:
    """The pair's image: uint8 [64, 128, 3], each half its scene's image."""
    return np.concatenate([render(pair.left), render(pair.right)], axis=1)


def render_pairs(pairs: list[Pair]) -> np.ndarray:
    """uint8 [N, 64, 128, 3]."""
    return np.stack([render_pair(p) for p in pairs]) if pairs else np.zeros((0, IMAGE_SIZE, 2 * IMAGE_SIZE, 3), np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """One uint8 [H, W, 3] image as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write one uint8 [H, W, 3] image as PNG."""
    path = Path(path)
    path.write_bytes(png_bytes(image))
    return path


def contact_sheet(rows: list[list[np.ndarray]], scale: int = 3, gap: int = 2) -> Image.Image:
    """Images ([H, W, 3] uint8) in a grid, row by row, upscaled by `scale` with nearest neighbour."""
    h, w = rows[0][0].shape[:2]
    ncols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (ncols * (w * scale + gap) + gap, len(rows) * (h * scale + gap) + gap), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
            sheet.paste(tile, (gap + j * (w * scale + gap), gap + i * (h * scale + gap)))
    return sheet
