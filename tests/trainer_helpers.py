"""Small inputs for the trainer tests: pattern images and job specs sized for the tiny base."""

from __future__ import annotations

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
    """A job spec for the tiny base: 64x64, 4 views per image, 2 generated class images in 2 steps."""
    hp = {"max_train_steps": 4, "resolution": 64, "views_per_image": 4, "class_image_steps": 2,
          **(hyperparameters or {})}
    spec = {
        "base_model": str(base_dir), "store_url": str(root / "store"), "work_dir": str(root / "work"),
        "concepts": [{"name": "stripes", "class_prompt": "dog", "images": images, "num_class_images": 2}],
        "hyperparameters": hp, "class_image_cache_dir": str(root / "class-images"), "device": "cpu",
    }
    spec.update(top)
    return spec
