"""Small inputs for the trainer tests: pattern images and job specs sized for the tiny base."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def pattern_images(directory: Path, count: int = 3, size: int = 64, kind: str = "stripes") -> list[str]:
    """`count` PNGs of one distinctive pattern (red stripes with a shifted blue grid), each a bit different."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        a = np.full((size, size, 3), 230, np.uint8)
        if kind == "stripes":
            a[::8] = (220, 20, 20)
            a[:, i::8] = (20, 20, 220)
        else:  # checkerboard
            yy, xx = np.mgrid[:size, :size]
            a[((yy // 8 + xx // 8 + i) % 2) == 0] = (20, 160, 20)
        path = directory / f"{kind}{i}.png"
        Image.fromarray(a).save(path)
        paths.append(str(path))
    return paths


def job_dict(base_dir: Path, root: Path, images: list[str], hyperparameters: dict[str, Any] | None = None,
             **top: Any) -> dict[str, Any]:
    """A job spec for the tiny base: 64x64, 4 views per image, 2 generated class images in 2 steps, 2 + 2
    images per optimizer step."""
    hp = {"max_train_steps": 4, "resolution": 64, "views_per_image": 4, "class_image_steps": 2,
          "effective_batch_size": 2, **(hyperparameters or {})}
    spec = {
        "base_model": str(base_dir), "store_url": str(root / "store"), "work_dir": str(root / "work"),
        "concepts": [{"name": "stripes", "class_prompt": "dog", "images": images, "num_class_images": 2}],
        "hyperparameters": hp, "class_image_cache_dir": str(root / "class-images"), "device": "cpu",
    }
    spec.update(top)
    return spec


def stripes_png(seed: int) -> bytes:
    """A 64x64 PNG of orange stripes on dark gray, shifted by `seed`: a training image for service tests."""
    img = Image.new("RGB", (64, 64), (20, 20, 20))
    for x in range(0, 64, 8):
        for y in range(64):
            img.putpixel(((x + seed) % 64, y), (230, 120, 10))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def training_request(steps: int, checkpointing_steps: int, request_id: str, num_class_images: int = 2):
    """A CreateTrainingJobRequest for the tiny base: two striped 64x64 images, batch 1."""
    from customdiffusion.v1 import trainer_service_pb2 as tpb

    return tpb.CreateTrainingJobRequest(
        concepts=[tpb.ConceptSpec(name="stripes", class_prompt="square", num_class_images=num_class_images,
                                  images=[tpb.ImageInput(data=stripes_png(i)) for i in range(2)])],
        hyperparameters=tpb.Hyperparameters(resolution=64, max_train_steps=steps, train_batch_size=1,
                                            effective_batch_size=1,
                                            checkpointing_steps=checkpointing_steps),
        request_id=request_id)


def trainer_client(stack, api_key: str = "key-a"):
    """A Client of a started stack's trainer server (its ConceptService answers too)."""
    from customdiff_client import Client

    target = f"127.0.0.1:{stack.ports['trainer']}"
    return Client(target, target, target, api_key=api_key)
