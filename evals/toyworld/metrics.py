"""Ground-truth metrics: read an image back into the scene it shows, or say it shows none.

`parse_images` compares each image with every scene of the world (analysis by synthesis), at 32x32
(each 64x64 image averaged over 2x2 pixels, which forgives half-pixel edges): the background is read
from the outer border, and of the 1,200 scenes on that background the one with the
smallest squared pixel distance to the image is the nearest. It is accepted only if every region of it
matches: in each connected region's core (its pixels that no edge passes through), at least
`MIN_MATCH` of the pixels lie within `TOLERANCE` of the scene's colour there. Otherwise the image is
"unrecognized": a blob in the right colours, a ring with its hole filled in, or a smear of two looks
is no scene, so it is neither a hit nor a class. These constants were fixed on rendered scenes, their
VAE reconstructions and hand-made blobs before any concept was trained (docs/toyworld.md).

Image alignment of a concept: the image shows the concept's class with the concept's look (pattern
and both colours in order). Text alignment of a prompt: the image shows an object of the prompt's
class, size (when the prompt names one) and background, whatever its look.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from evals.toyworld.render import IMAGE_SIZE, coverage, render_batch
from evals.toyworld.world import BACKGROUNDS, CLASSES, SIZES, ToyConcept, Scene, all_looks

ANALYSIS = 32  # resolution the images are compared at
TOLERANCE = 0.2  # max abs channel difference (colours in [0, 1]) for a pixel to match the scene's colour
MIN_MATCH = 0.75  # fraction of a region's core pixels that must match
MIN_CORE = 4  # regions whose core has fewer pixels are too thin to judge and are skipped
BORDER = 3  # outer rows/columns (at 32x32) read as background; objects keep 4 away from the edge

_BG_NAMES = tuple(BACKGROUNDS)
_BG_PALETTE = np.asarray([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float64) / 255.0  # [6, 3]


@dataclass(frozen=True)
class Parse:
    """What an image shows: `scene` when recognized; otherwise `reason` says why not, and `nearest` is the
    best-fitting scene (None when not even the background was readable)."""

    scene: Scene | None
    nearest: Scene | None
    error: float
    reason: str = ""

    @property
    def recognized(self) -> bool:
        return self.scene is not None


@dataclass(frozen=True)
class _Shape:
    """The connected regions of the core pixels (pixels entirely inside one part) of a (class, size, pattern)."""

    cls: str
    size: str
    pattern: str
    regions: tuple[np.ndarray, ...]  # each [1024] bool


def downsample(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 64, 64, 3] -> float [N, 32, 32, 3] in [0, 1], each pixel the mean of a 2x2 block."""
    n, k = len(images), IMAGE_SIZE // ANALYSIS
    blocks = images.reshape(n, ANALYSIS, k, ANALYSIS, k, 3).astype(np.float64)
    return blocks.mean(axis=(2, 4)) / 255.0


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a [32, 32] bool mask, by min-label propagation."""
    n = mask.size
    labels = np.where(mask, np.arange(n).reshape(mask.shape), n)
    while True:
        padded = np.pad(labels, 1, constant_values=n)
        nbr = np.minimum.reduce([padded[1:-1, :-2], padded[1:-1, 2:], padded[:-2, 1:-1], padded[2:, 1:-1], labels])
        new = np.where(mask, nbr, n)
        if np.array_equal(new, labels):
            return [(labels == v).ravel() for v in np.unique(labels[mask])]
        labels = new


@functools.lru_cache(maxsize=None)
def _shape(cls: str, size: str, pattern: str) -> _Shape:
    """The connected core regions of every part of a (class, size, pattern)."""
    pure = coverage(cls, size, pattern, resolution=ANALYSIS) == 1.0  # [3, 32, 32]: pixels inside one part
    regions = tuple(r for k in range(3) for r in _components(pure[k]) if r.sum() >= MIN_CORE)
    return _Shape(cls, size, pattern, regions)


def _read_background(x: np.ndarray) -> int | None:
    """Index of the background colour of x [32, 32, 3] (a downsampled image), None if none matches."""
    ring = np.ones((ANALYSIS, ANALYSIS), bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    border = x[ring]  # [n, 3]
    diffs = np.abs(border[None, :, :] - _BG_PALETTE[:, None, :]).max(axis=2) <= TOLERANCE  # [6, n]
    fractions = diffs.mean(axis=1)
    best = int(fractions.argmax())
    return best if fractions[best] >= MIN_MATCH else None


@functools.lru_cache(maxsize=None)
def _templates(bg_index: int) -> tuple[list[Scene], np.ndarray, np.ndarray]:
    """Every scene on background `bg_index`, their 32x32 images [1200, 3072] in [0, 1], squared norms [1200]."""
    bg = _BG_NAMES[bg_index]
    scenes = [Scene(c, s, look, bg) for c in CLASSES for s in SIZES for look in all_looks()]
    images = downsample(render_batch(scenes)).reshape(len(scenes), -1)
    return scenes, images, np.square(images).sum(axis=1)


def _regions_match(x: np.ndarray, scene: Scene) -> bool:
    """Every region core of `scene` matches its colour in x [32, 32, 3] (a downsampled image)."""
    shape = _shape(scene.cls, scene.size, scene.look.pattern)
    template = downsample(render_batch([scene])).reshape(-1, 3)
    ok = np.abs(x.reshape(-1, 3) - template).max(axis=1) <= TOLERANCE
    return all(ok[r].mean() >= MIN_MATCH for r in shape.regions)


def parse_images(images: np.ndarray) -> list[Parse]:
    """Read each uint8 [N, 64, 64, 3] image back into its scene (see the module docstring)."""
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"images must be [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got {tuple(images.shape)}")
    x = downsample(images)
    flat = x.reshape(len(x), -1)
    backgrounds = [_read_background(im) for im in x]
    parses: list[Parse | None] = [None] * len(x)
    for i, bg in enumerate(backgrounds):
        if bg is None:
            parses[i] = Parse(None, None, float("inf"), "the border matches no background colour")
    for bg in sorted({b for b in backgrounds if b is not None}):
        rows = [i for i, b in enumerate(backgrounds) if b == bg]
        scenes, templates, norms = _templates(bg)
        # Squared distance to every scene on this background: ||x||^2 - 2 x.t + ||t||^2.
        sse = np.square(flat[rows]).sum(axis=1)[:, None] - 2 * flat[rows] @ templates.T + norms[None, :]
        for i, j in zip(rows, sse.argmin(axis=1)):
            scene, err = scenes[j], float(sse[rows.index(i), j]) / flat.shape[1]
            if _regions_match(x[i], scene):
                parses[i] = Parse(scene, scene, err)
            else:
                parses[i] = Parse(None, scene, err, "a region of the nearest scene does not match")
    return parses


def parse_image(image: np.ndarray) -> Parse:
    """`parse_images` of one uint8 [64, 64, 3] image."""
    return parse_images(image[None])[0]


@dataclass(frozen=True)
class PairParse:
    """What a 64x128 image shows (world v2): each half parsed as one scene. Recognized when both halves
    are, on one background."""

    left: Parse
    right: Parse

    @property
    def recognized(self) -> bool:
        return self.left.recognized and self.right.recognized and self.left.scene.background == self.right.scene.background


def parse_pair_images(images: np.ndarray) -> list[PairParse]:
    """Read each uint8 [N, 64, 128, 3] image back into two scenes, one per half (`parse_images` each)."""
    if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, 2 * IMAGE_SIZE, 3):
        raise ValueError(f"images must be [N, {IMAGE_SIZE}, {2 * IMAGE_SIZE}, 3], got {tuple(images.shape)}")
    left = parse_images(np.ascontiguousarray(images[:, :, :IMAGE_SIZE]))
    right = parse_images(np.ascontiguousarray(images[:, :, IMAGE_SIZE:]))
    return [PairParse(a, b) for a, b in zip(left, right)]


def image_outcome(parse: Parse, concept: ToyConcept) -> str:
    """``hit`` (the concept's class and look), ``miss`` (another scene) or ``unrecognized``."""
    if not parse.recognized:
        return "unrecognized"
    s = parse.scene
    return "hit" if (s.cls, s.look) == (concept.cls, concept.look) else "miss"


def text_hit(parse: Parse, cls: str, background: str, size: str | None = None) -> bool:
    """The image shows an object of class `cls` (and `size`, when given) on a `background` background."""
    if not parse.recognized:
        return False
    s = parse.scene
    return s.cls == cls and s.background == background and (size is None or s.size == size)


def attribute_accuracy(parses: list[Parse], scenes: list[Scene]) -> dict[str, float]:
    """Fraction of images whose recognized scene agrees with the asked-for scene, per attribute and all
    together; an unrecognized image agrees on nothing."""
    checks = {
        "background": lambda p, s: p.background == s.background,
        "class": lambda p, s: p.cls == s.cls,
        "size": lambda p, s: p.size == s.size,
        "pattern": lambda p, s: p.look.pattern == s.look.pattern,
        "colours": lambda p, s: p.look.colours == s.look.colours,
        "scene": lambda p, s: p == s,
    }
    n = max(len(scenes), 1)
    out = {"recognized": sum(p.recognized for p in parses) / n}
    for name, check in checks.items():
        out[name] = sum(p.recognized and check(p.scene, s) for p, s in zip(parses, scenes)) / n
    return out
