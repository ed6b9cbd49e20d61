"""`customdiff demo`: the end-to-end scenario on the embedded tiny base, writing into `demo-output/`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the end-to-end scenario on the tiny base")
    demo.add_argument("--out", default="demo-output", help="output directory (default: demo-output)")
    demo.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    import torch
    from diffusers import StableDiffusionPipeline

    from concepts.apply import apply_concepts
    from concepts.artifact import Concept, LinearDelta
    from concepts.base import kv_layers, load_base
    from concepts.store import ArtifactStore
    from concepts.tiny import create_tiny_base

    out = Path(args.out)
    summary: dict[str, object] = {}
    # 1. The base model.
    t0 = time.perf_counter()
    base_dir = out / "base"
    if not (base_dir / "model_index.json").exists():
        create_tiny_base(base_dir, seed=0)
    base = load_base(base_dir)
    summary["base"] = {"dir": str(base_dir), "fingerprint": base.fingerprint, "s": round(time.perf_counter() - t0, 3)}

    # 2. A concept artifact, written to the store and read back (verified by digest).
    g = torch.Generator().manual_seed(0)
    concept = Concept(
        deltas={n: LinearDelta(dense=0.05 * torch.randn(layer.weight.shape, generator=g)) for n, layer in kv_layers(base.unet).items()},
        tokens=("<new1>",),
        embeddings=torch.randn(1, base.text_encoder.config.hidden_size, generator=g),
        base_fingerprint=base.fingerprint,
        class_words=("dog",),
        provenance={"kind": "demo"},
    )
    store = ArtifactStore(str(out / "store"))
    digest = store.put_concept(concept)
    concept = store.get_concept(digest)
    summary["concept"] = {"digest": digest, "bytes": len(store.get(digest))}

    # 3. One image with the concept installed into a plain diffusers pipeline.
    pipe = StableDiffusionPipeline.from_pretrained(base_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    apply_concepts(pipe.unet, pipe.text_encoder, pipe.tokenizer, [concept])
    t0 = time.perf_counter()
    image = pipe("photo of a <new1> dog", num_inference_steps=10, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    image.save(out / "concept.png")
    summary["generate"] = {"png": str(out / "concept.png"), "s": round(time.perf_counter() - t0, 3)}
    print(json.dumps(summary))
    return 0
