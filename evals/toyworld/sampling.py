"""Sampling the toy base, and how well it follows prompts (the check run after pretraining).

    python -m evals.toyworld.sampling --base evals/toyworld/base [--per-class 24]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evals.toyworld.metrics import attribute_accuracy, parse_images, parse_pair_images
from evals.toyworld.world import CLASSES, NEW_BACKGROUNDS, SIZES, TEST, VALIDATION, pretraining_scenes, sample_pair

STEPS = 25  # DDIM steps
GUIDANCE = 5.0
BASE_DIR = Path(__file__).resolve().parent / "base"


def load_pipeline(base_dir: str | Path = BASE_DIR):
    """A diffusers `StableDiffusionPipeline` of the base, progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], batch: int = 64, steps: int = STEPS,
             guidance: float = GUIDANCE, width: int = 64) -> np.ndarray:
    """Image i from `prompts[i]` and `torch.Generator().manual_seed(seeds[i])`: uint8 [N, 64, width, 3]
    (`width` 128 for pairs).

    Each image has its own generator, so an image does not depend on the batch it was drawn in.
    """
    out = []
    for i in range(0, len(prompts), batch):
        generators = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        images = pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators, output_type="np", height=64, width=width).images
        out.append(np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 64, width, 3), np.uint8)


def prompt_following(pipe, per_class: int = 24, seed: int = 0) -> dict[str, object]:
    """Attribute accuracy of the base on fully described pretraining scenes, on fully described held-out
    scenes (the concepts' class and look: a composition never seen), on class-only prompts, and on
    fully described pairs (each half's accuracy, and both halves right)."""
    rng = random.Random(seed)
    seen = pretraining_scenes()
    pretrained = [rng.choice([s for s in seen if s.cls == c]) for c in CLASSES for _ in range(per_class)]
    held_out = [c.scene(rng.choice(SIZES), rng.choice(NEW_BACKGROUNDS)) for c in VALIDATION + TEST
                for _ in range(per_class // 4)]
    report: dict[str, object] = {}
    t0 = time.perf_counter()
    for name, scenes in (("described", pretrained), ("held_out_described", held_out)):
        images = generate(pipe, [s.caption() for s in scenes], list(range(len(scenes))))
        report[name] = {k: round(v, 3) for k, v in attribute_accuracy(parse_images(images), scenes).items()}
    classes = [c for c in CLASSES for _ in range(per_class)]
    parses = parse_images(generate(pipe, [f"a {c}" for c in classes], list(range(len(classes)))))
    report["class_only"] = {"recognized": round(sum(p.recognized for p in parses) / len(parses), 3),
                            "class": round(sum(p.recognized and p.scene.cls == c for p, c in zip(parses, classes))
                                           / len(parses), 3)}
    pairs = [sample_pair(seen, rng) for _ in range(len(CLASSES) * per_class)]
    parsed = parse_pair_images(generate(pipe, [p.caption() for p in pairs], list(range(len(pairs))), width=128))
    for side in ("left", "right"):
        accuracy = attribute_accuracy([getattr(p, side) for p in parsed], [getattr(p, side) for p in pairs])
        report[f"pairs_{side}"] = {k: round(v, 3) for k, v in accuracy.items()}
    report["pairs_both"] = round(sum(p.recognized and (p.left.scene, p.right.scene) == (q.left, q.right)
                                     for p, q in zip(parsed, pairs)) / len(pairs), 3)
    report["images"] = len(pretrained) + len(held_out) + len(classes) + len(pairs)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evals.toyworld.sampling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(BASE_DIR))
    parser.add_argument("--per-class", type=int, default=24, help="prompts per class (and per concept)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(prompt_following(load_pipeline(args.base), args.per_class)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
