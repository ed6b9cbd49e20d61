"""The demo's inputs, written once from the toy world as plain files: `customdiff demo` reads them
without importing `evals` (the services image ships no `evals`; the demo only needs files).

    python -m evals.toyworld.demo_inputs [--out evals/toyworld/demo]

Writes, per concept, `<key>/photos/*.png` (the user's 6 photos) and `<key>/class/*.png` (the
regularization images), `captions.txt` (the merge's regularization captions for this world) and
`demo.json` (names, classes, tokens, prompts, the world's training and merge settings).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from evals.toyworld.render import render, save_png
from evals.toyworld.variants import HYPERPARAMETERS, class_scenes, photo_scenes, world_captions
from evals.toyworld.world import CONCEPTS

OUT = Path(__file__).resolve().parent / "demo"
# The demo's names for the world's two concepts, and the background no photo shows that it generates on.
KEYS = {"<new1>": "two-tone-ring", "<new2>": "striped-square"}
NEW_BACKGROUND = "navy"
CONTEXT_CAPTIONS = 8  # the world's merge setting (docs/toyworld.md)


def write_demo_inputs(out: Path = OUT) -> Path:
    """Write every input of `customdiff demo` under `out`; return `out`."""
    hp = HYPERPARAMETERS
    concepts = []
    for toy in CONCEPTS:
        key = KEYS[toy.token]
        for i, scene in enumerate(photo_scenes(toy)):
            save_png(render(scene), _dir(out / key / "photos") / f"{i:02d}.png")
        for i, scene in enumerate(class_scenes(toy, hp.class_images, hp.seed)):
            save_png(render(scene), _dir(out / key / "class") / f"{i:03d}.png")
        concepts.append({"name": key, "class_prompt": toy.cls, "modifier_token": toy.token,
                         "instance_prompt": "a {token} {class_prompt}",
                         "prompt": toy.prompt("large", NEW_BACKGROUND),
                         "base_prompt": toy.prompt("large", NEW_BACKGROUND, word="")})
    (out / "captions.txt").write_text("\n".join(world_captions()) + "\n")
    settings = {"steps": hp.steps, "learning_rate": hp.learning_rate, "batch_size": hp.batch_size,
                "seed": hp.seed, "resolution": 64, "augment": False, "context_captions": CONTEXT_CAPTIONS}
    (out / "demo.json").write_text(json.dumps({"concepts": concepts, "training": settings}, indent=2) + "\n")
    return out


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(OUT))
    print(write_demo_inputs(Path(parser.parse_args().out)))


if __name__ == "__main__":
    main()
