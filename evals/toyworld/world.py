"""The toy world: its attributes, every scene in it, the captions that describe scenes, and the concepts.

A scene is one object (a class, a size and a look: pattern plus colours) centred on a plain background.
Five classes x two sizes x 120 looks x six backgrounds make 7,200 scenes; the world is small enough that
the metric can compare an image against every scene there is (see `metrics`).

A concept is one particular instance of a known class, as "my dog" is one dog: a class with one look,
say a ring with an orange top half and a cyan bottom half. Its combination of class and look never
appears in pretraining, although the class appears in every other look and the look on other classes.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

# Object colours (RGB); every pair differs by at least 80 in some channel, so they stay apart after decoding.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 40),
    "green": (30, 170, 50),
    "cyan": (40, 220, 230),
    "blue": (40, 70, 240),
    "purple": (140, 40, 200),
    "pink": (255, 130, 200),
}
# Background colours: muted, never an object colour, so an object always stands out from its background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "brown": (110, 65, 30),
    "navy": (20, 30, 100),
    "olive": (120, 125, 30),
}
CLASSES = ("circle", "ring", "square", "frame", "triangle")  # a ring is a hollow circle, a frame a hollow square
SIZES = ("small", "large")
PATTERNS = ("solid", "two tone", "striped")
PREFIXES = ("", "photo of ", "a photo of ", "a picture of ")

# Probabilities of each part of a pretraining caption. The look is left out of almost half the
# captions, so a class word alone ("a ring") covers every look of its class, as "dog" covers every dog.
P_LOOK = 0.55
P_SIZE = 0.5
P_BACKGROUND = 0.7
P_PREFIX = 0.25


@dataclass(frozen=True, order=True)
class Look:
    """An object's appearance: `solid` has one colour; `two tone` (top half, bottom half) and `striped`
    (horizontal bands, `colours[0]` on the band starting at the centre row) have two different ones."""

    pattern: str
    colours: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {self.pattern!r}")
        unknown = [c for c in self.colours if c not in COLOURS]
        if unknown:
            raise ValueError(f"colours must be in {sorted(COLOURS)}, got {unknown}")
        wanted = 1 if self.pattern == "solid" else 2
        if len(self.colours) != wanted or len(set(self.colours)) != wanted:
            raise ValueError(f"a {self.pattern} look has {wanted} distinct colour(s), got {self.colours}")

    def words(self) -> str:
        """E.g. ``orange``, ``orange and cyan two tone``, ``yellow and blue striped``."""
        if self.pattern == "solid":
            return self.colours[0]
        return f"{self.colours[0]} and {self.colours[1]} {self.pattern}"


@dataclass(frozen=True, order=True)
class Scene:
    """One object of class `cls`, size `size` and look `look`, centred on a `background` background."""

    cls: str
    size: str
    look: Look
    background: str

    def __post_init__(self) -> None:
        if self.cls not in CLASSES:
            raise ValueError(f"cls must be one of {CLASSES}, got {self.cls!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {sorted(BACKGROUNDS)}, got {self.background!r}")

    def caption(self, look: bool = True, size: bool = True, background: bool = True, prefix: str = "") -> str:
        """E.g. ``a large orange and cyan two tone ring on a navy background``; parts can be left out."""
        words = [prefix + "a"]
        if size:
            words.append(self.size)
        if look:
            words.append(self.look.words())
        words.append(self.cls)
        if background:
            words.append(f"on a {self.background} background")
        return " ".join(words)


@dataclass(frozen=True)
class ToyConcept:
    """A concept: one look of one class, taught to the model under the modifier token `token`."""

    name: str
    token: str
    cls: str
    look: Look

    def scene(self, size: str, background: str) -> Scene:
        return Scene(self.cls, size, self.look, background)

    def prompt(self, size: str, background: str, word: str | None = None) -> str:
        """``a large <new1> ring on a navy background``; `word` replaces the token (``""`` drops it)."""
        token = self.token if word is None else word
        return " ".join(w for w in ("a", size, token, self.cls, f"on a {background} background") if w)


@dataclass(frozen=True, order=True)
class Pair:
    """Two scenes side by side on one background: a 64x128 image, `left` in the left half (world v2)."""

    left: Scene
    right: Scene

    def __post_init__(self) -> None:
        if self.left.background != self.right.background:
            raise ValueError(f"both halves share a background, got {self.left.background} and {self.right.background}")

    @property
    def background(self) -> str:
        return self.left.background

    def caption(self, looks: tuple[bool, bool] = (True, True), sizes: tuple[bool, bool] = (True, True),
                background: bool = True, prefix: str = "") -> str:
        """E.g. ``a small red ring left of a large yellow and blue striped square on a navy background``."""
        halves = [s.caption(look=lk, size=sz, background=False) for s, lk, sz in zip((self.left, self.right), looks, sizes)]
        text = f"{prefix}{halves[0]} left of {halves[1]}"
        return f"{text} on a {self.background} background" if background else text


# Held-out concepts (world v2): validation concepts choose every hyperparameter, test concepts are only
# reported. Each split has two-tone and striped looks on four different classes.
VALIDATION = (
    ToyConcept("two-tone ring", "<new1>", "ring", Look("two tone", ("orange", "cyan"))),
    ToyConcept("striped square", "<new2>", "square", Look("striped", ("yellow", "blue"))),
    ToyConcept("two-tone triangle", "<new3>", "triangle", Look("two tone", ("purple", "green"))),
    ToyConcept("striped circle", "<new4>", "circle", Look("striped", ("red", "cyan"))),
)
TEST = (
    ToyConcept("two-tone circle", "<new5>", "circle", Look("two tone", ("pink", "blue"))),
    ToyConcept("striped triangle", "<new6>", "triangle", Look("striped", ("green", "orange"))),
    ToyConcept("two-tone frame", "<new7>", "frame", Look("two tone", ("yellow", "red"))),
    ToyConcept("striped ring", "<new8>", "ring", Look("striped", ("blue", "pink"))),
)
SPLITS = {"validation": VALIDATION, "test": TEST}
CONCEPTS = VALIDATION[:2]  # the demo's two concepts


def compose_prompt(left: ToyConcept, right: ToyConcept, sizes: tuple[str, str], background: str,
                   tokens: bool = True) -> str:
    """``a small <new5> circle left of a large <new6> triangle on a brown background`` (`tokens` False
    drops both tokens, so the class words alone speak)."""
    halves = [" ".join(w for w in ("a", size, c.token if tokens else "", c.cls) if w) for c, size in zip((left, right), sizes)]
    return f"{halves[0]} left of {halves[1]} on a {background} background"
# Composition prompts pair a split's concepts: the first named concept left of the second.
COMPOSITIONS = {"validation": ((VALIDATION[0], VALIDATION[1]), (VALIDATION[2], VALIDATION[3])),
                "test": ((TEST[0], TEST[1]), (TEST[2], TEST[3]))}
# The user's photos of a concept show it on these backgrounds; prompts put it on the others.
PHOTO_BACKGROUNDS = ("black", "white", "gray")
NEW_BACKGROUNDS = ("brown", "navy", "olive")


def all_looks() -> list[Look]:
    """Every look: 8 solid, 56 two-tone and 56 striped (ordered colour pairs)."""
    looks = [Look("solid", (c,)) for c in COLOURS]
    for pattern in ("two tone", "striped"):
        looks += [Look(pattern, pair) for pair in itertools.permutations(COLOURS, 2)]
    return looks


def all_scenes() -> list[Scene]:
    """All 7,200 scenes of the world, in a fixed order."""
    return [Scene(c, s, look, b) for c in CLASSES for s in SIZES for look in all_looks() for b in BACKGROUNDS]


def is_held_out(scene: Scene) -> bool:
    """True for a held-out concept's class with its look, in either colour order: never pretrained on."""
    return any(
        scene.cls == c.cls and scene.look.pattern == c.look.pattern and set(scene.look.colours) == set(c.look.colours)
        for c in VALIDATION + TEST
    )


def pretraining_scenes() -> list[Scene]:
    return [s for s in all_scenes() if not is_held_out(s)]


def sample_caption(scene: Scene, rng: random.Random) -> str:
    """One caption of the pretraining distribution for `scene` (parts left out at random)."""
    prefix = rng.choice(PREFIXES[1:]) if rng.random() < P_PREFIX else ""
    return scene.caption(
        look=rng.random() < P_LOOK, size=rng.random() < P_SIZE, background=rng.random() < P_BACKGROUND, prefix=prefix
    )


def sample_pair(scenes: list[Scene], rng: random.Random) -> Pair:
    """A random pair of `scenes` on one background (`scenes` holds every background of each object)."""
    left = rng.choice(scenes)
    right = rng.choice(scenes)
    return Pair(left, Scene(right.cls, right.size, right.look, left.background))


def sample_pair_caption(pair: Pair, rng: random.Random) -> str:
    """One pretraining caption of `pair`: each object's look and size left out at random, as for one scene."""
    prefix = rng.choice(PREFIXES[1:]) if rng.random() < P_PREFIX else ""
    return pair.caption(looks=(rng.random() < P_LOOK, rng.random() < P_LOOK),
                        sizes=(rng.random() < P_SIZE, rng.random() < P_SIZE),
                        background=rng.random() < P_BACKGROUND, prefix=prefix)


def vocabulary() -> list[str]:
    """Every word of the world's captions, plus the words the trainer and merger put into captions
    (initializer words of modifier tokens, augmentation prefixes)."""
    words = set(" ".join(PREFIXES).split()) | {"a", "on", "background", "and", "two", "tone", "striped", "solid"}
    words |= set(COLOURS) | set(BACKGROUNDS) | set(CLASSES) | set(SIZES)
    words |= {"ktn", "pll", "ucd", "sks", "far", "away", "very", "left", "zoomed", "in", "close", "up", "of", "an"}
    return sorted(words)
