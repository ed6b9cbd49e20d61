"""Write `regularization_captions.txt`: generic captions the merge keeps the base's behaviour on.

Run ``python -m merger.data.make_captions`` to regenerate; the output is deterministic. The words are
those of the tiny base's vocabulary (concepts/tokenizer_files.py), so on the tiny base every word is
one token, and on a real CLIP vocabulary they are ordinary English.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

SUBJECTS = ("dog", "cat", "car", "chair", "table", "cup", "mug", "vase", "lamp", "house", "tree", "flower",
            "bird", "horse", "person", "man", "woman", "child", "toy", "teddy bear", "bag", "shoe", "hat",
            "guitar", "clock", "book", "bottle", "bicycle", "boat")
ADJECTIVES = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
              "gray", "gold", "silver", "dark", "bright", "striped", "small", "large", "old", "new",
              "wooden", "metal", "glass", "plastic", "stone", "paper", "tiny", "big")
PLACES = ("on the beach", "in the forest", "in the city", "on the street", "in the garden", "in the room",
          "in the kitchen", "in a field", "in the snow", "on the sand", "on the grass", "near the water",
          "near a river", "by the lake", "under a tree", "on a table", "next to a chair", "in a studio",
          "with a mountain in the background", "under the sky", "inside a house", "outside a house")
TIMES = ("at sunset", "at sunrise", "at night", "in the morning", "in the evening", "on a sunny day",
         "on a rainy day", "in autumn", "in winter", "in spring", "in summer")
MEDIA = ("a photo of", "a picture of", "a painting of", "a drawing of", "a sketch of", "a render of",
         "a close up photo of", "a high quality photo of", "a detailed painting of", "a portrait of")
# Poses only for subjects that can take them.
ANIMATE = ("dog", "cat", "bird", "horse", "person", "man", "woman", "child")
POSES = ("sitting", "standing", "lying", "running", "jumping", "floating")
SCENES = ("a city street at night", "a forest in autumn", "a lake with a mountain in the background",
          "a beach at sunset", "a garden in spring", "a field of flowers", "snow on a mountain",
          "a river in the forest", "a kitchen in the morning", "an old house by the lake",
          "a street on a rainy day", "the sky at sunrise", "a room with a lamp and a chair")
STYLES = ("", ", studio shot", ", detailed", ", in the style of a painting",
          ", landscape", ", close up", ", far away", ", front view", ", side view", ", top view")
COUNT = 1200


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def families() -> list[list[str]]:
    """Every caption each template family can make, in a fixed order."""
    return [
        [f"{m} {_article(a)} {a} {s}" for m, a, s in itertools.product(MEDIA, ADJECTIVES, SUBJECTS)],
        [f"{_article(a)} {a} {s} {p}" for a, s, p in itertools.product(ADJECTIVES, SUBJECTS, PLACES)],
        [f"{_article(s)} {s} {pose} {p} {t}"
         for s, pose, p, t in itertools.product(ANIMATE, POSES, PLACES, TIMES)],
        [f"{m} {scene}{style}" for m, scene, style in itertools.product(MEDIA, SCENES, STYLES)],
    ]


def make_captions(count: int = COUNT, seed: int = 0) -> list[str]:
    """`count` distinct captions, an equal share from each template family, the same for the same seed."""
    rng = random.Random(seed)
    groups = families()
    shares = [count // len(groups) + (i < count % len(groups)) for i in range(len(groups))]
    picked = [caption for group, share in zip(groups, shares) for caption in rng.sample(group, share)]
    rng.shuffle(picked)
    return picked


def main() -> None:
    path = Path(__file__).with_name("regularization_captions.txt")
    path.write_text("\n".join(make_captions()) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
