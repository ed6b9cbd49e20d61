"""The concepts each evaluated variant uses: trained by the trainer library (`trainer.job.run_job`, what
`customdiff train` and every training job run) from rendered photos, then merged, averaged and
compressed with the merger.

Custom Diffusion's hyperparameters for this world are chosen once here (`HYPERPARAMETERS`) and used
for every concept, single or joint (docs/toyworld.md says why each differs from the reference's).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from concepts.artifact import Concept, LinearDelta
from evals.toyworld.render import render, save_png
from evals.toyworld.world import (
    PHOTO_BACKGROUNDS,
    SIZES,
    Scene,
    ToyConcept,
    pretraining_scenes,
    sample_caption,
    sample_pair,
    sample_pair_caption,
)


@dataclass(frozen=True)
class Hyperparameters:
    """Training settings for this world; `steps` is per concept (joint training gets N x steps)."""

    steps: int = 500
    learning_rate: float = 1e-4  # before the trainer's scaling by batch size (x2 with prior preservation)
    batch_size: int = 4
    class_images: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.class_images < 1:
            raise ValueError(f"steps, batch_size and class_images must be >= 1, got {self}")

    def spec(self, concepts: int) -> dict:
        """The job spec's hyperparameters (docs/job-spec.md); the rest keep the trainer's defaults."""
        # No zoom augmentation: every object of this world is centred at one of two sizes, and a zoomed
        # view is a scene the world does not have. Horizontal flips stay (the concepts are symmetric).
        return {"max_train_steps": self.steps * concepts, "learning_rate": self.learning_rate,
                "train_batch_size": self.batch_size, "resolution": 64, "seed": self.seed, "augment": False}


HYPERPARAMETERS = Hyperparameters()


def photo_scenes(concept: ToyConcept) -> list[Scene]:
    """What the user's photos show: the concept at both sizes on the photo backgrounds (6 images)."""
    return [concept.scene(size, bg) for bg in PHOTO_BACKGROUNDS for size in SIZES]


def write_photos(concept: ToyConcept, directory: Path) -> Path:
    """The concept's photos as PNG files, the way a user hands photos to `customdiff train`."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(photo_scenes(concept)):
        save_png(render(scene), directory / f"{i:02d}.png")
    return directory


def class_scenes(concept: ToyConcept, n: int, seed: int) -> list[Scene]:
    """`n` other members of the concept's class from the pretraining data (so never the concept's look),
    the regularization set that retrieval of real images of the class gives in the paper."""
    rng = random.Random(seed)
    pool = [s for s in pretraining_scenes() if s.cls == concept.cls]
    return rng.sample(pool, n)


def write_class_images(concept: ToyConcept, n: int, seed: int, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(class_scenes(concept, n, seed)):
        save_png(render(scene), directory / f"{i:03d}.png")
    return directory


def train_concepts(base_dir: Path, store_url: str, concepts: list[ToyConcept], work: Path,
                   hp: Hyperparameters = HYPERPARAMETERS) -> str:
    """Train one concept, or several jointly, as a training job does; return the artifact's digest."""
    from trainer.job import run_job
    from trainer.spec import JobSpec

    specs = []
    for concept in concepts:
        key = concept.token.strip("<>")
        photos = write_photos(concept, work / "photos" / key)
        classes = write_class_images(concept, hp.class_images, hp.seed, work / "class" / key)
        specs.append({"name": key, "class_prompt": concept.cls, "modifier_token": concept.token,
                      "instance_prompt": "a {token} {class_prompt}", "num_class_images": hp.class_images,
                      "images": [str(p) for p in sorted(photos.glob("*.png"))],
                      "class_images": [{"path": str(p)} for p in sorted(classes.glob("*.png"))]})
    spec = JobSpec.from_dict({"base_model": str(base_dir), "store_url": store_url, "work_dir": str(work / "job"),
                              "concepts": specs, "hyperparameters": hp.spec(len(concepts)),
                              "provenance": {"source": "evals.toyworld"}})
    return run_job(spec).digest


def average_concepts(concepts: list[Concept]) -> Concept:
    """Naive averaging, the baseline the merge beats: every delta is the mean of the concepts' deltas
    (a concept without a layer counts as zero there), and every concept's tokens are kept."""
    names = sorted(set().union(*(c.deltas for c in concepts)))
    deltas = {}
    for name in names:
        dense = [c.deltas[name].to_dense(torch.float32) for c in concepts if name in c.deltas]
        deltas[name] = LinearDelta(dense=torch.stack(dense).sum(dim=0) / len(concepts))
    return Concept(
        deltas=deltas,
        tokens=tuple(t for c in concepts for t in c.tokens),
        embeddings=torch.cat([c.embeddings.to(torch.float32) for c in concepts]),
        base_fingerprint=concepts[0].base_fingerprint,
        class_words=tuple(w for c in concepts for w in (c.class_words or ("",) * len(c.tokens))),
        provenance={"kind": "average", "count": len(concepts)},
    )


def world_captions(n: int = 2000, seed: int = 0) -> list[str]:
    """Captions of the pretraining distribution, half of one scene and half of a pair: the merge's
    regularization caption set for this world."""
    rng = random.Random(seed)
    scenes = pretraining_scenes()
    return [sample_caption(rng.choice(scenes), rng) if i % 2 == 0 else sample_pair_caption(sample_pair(scenes, rng), rng)
            for i in range(n)]
