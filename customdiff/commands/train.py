"""`customdiff train`: learn one concept (or several jointly) from folders of images into an artifact store."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

PER_CONCEPT = ("name", "token", "initializer", "instance_prompt", "class_images")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a concept with Custom Diffusion and store its artifact",
        description="Fine-tune the base's cross-attention K/V and one modifier token per concept. Repeat "
                    "--images/--class-prompt (and the per-concept options) to train several concepts jointly. "
                    "Every option of the job spec is documented in docs/job-spec.md.",
    )
    p.add_argument("--base", required=True, help="diffusers Stable Diffusion directory")
    p.add_argument("--images", required=True, action="append", help="folder of target images (one per concept)")
    p.add_argument("--class-prompt", required=True, action="append", help='class of the concept, e.g. "dog"')
    p.add_argument("--out", required=True, help="artifact store: a directory or an fsspec URL")
    p.add_argument("--name", action="append", help="concept name (default: the images folder's name)")
    p.add_argument("--token", action="append", help="modifier token (default <new1>, <new2>, ...)")
    p.add_argument("--initializer", action="append", help="initializer word (default ktn, pll, ucd, sks)")
    p.add_argument("--instance-prompt", action="append", help='default "photo of a {token} {class_prompt}"')
    p.add_argument("--class-images", action="append", help="folder of regularization images (default: generated)")
    p.add_argument("--num-class-images", type=int, default=200, help="regularization images to generate (200)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 250 per concept)")
    p.add_argument("--lr", type=float, default=1e-5, help="base learning rate before scaling (1e-5)")
    p.add_argument("--effective-batch-size", type=int, default=4,
                   help="target images per optimizer step over every process, plus as many class images (4, the "
                   "paper's 4 + 4)")
    p.add_argument("--batch-size", type=int, help="target images per process and micro-batch (default: up to 2, "
                   "with gradient accumulation up to --effective-batch-size)")
    p.add_argument("--resolution", type=int, help="training resolution in pixels, a multiple of 64 (default: the "
                   "base's own size, e.g. 512 for SD 1.x, 768 for SD 2.x)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-prior-preservation", action="store_true", help="train without regularization images")
    p.add_argument("--no-augment", action="store_true", help="no zoom-in/zoom-out augmentation")
    p.add_argument("--class-image-steps", type=int, default=50, help="denoising steps per generated image (50)")
    p.add_argument("--checkpointing-steps", type=int, default=100, help="checkpoint every N steps (100)")
    p.add_argument("--work-dir", help="job directory (progress, checkpoint); reuse it to resume (default: temporary)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "customdiff" / "class-images"),
                   help="where generated class images are cached and reused")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(run=_run)


def _files(folder: str, option: str) -> list[str]:
    from concepts.errors import InvalidArgument

    path = Path(folder)
    if not path.is_dir():
        raise InvalidArgument(option, f"{folder} is not a directory")
    files = sorted(str(f) for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    if not files:
        raise InvalidArgument(option, f"{folder} holds no files")
    return files


def _concepts(args: argparse.Namespace) -> list[dict]:
    from concepts.errors import InvalidArgument

    n = len(args.images)
    if len(args.class_prompt) != n:
        raise InvalidArgument("--class-prompt", f"give one per --images ({n}), got {len(args.class_prompt)}")
    for key in PER_CONCEPT:
        values = getattr(args, key)
        if values is not None and len(values) != n:
            option = f"--{key.replace('_', '-')}"
            raise InvalidArgument(option, f"give one per --images ({n}) or none, got {len(values)}")
    concepts = []
    for i, (folder, class_prompt) in enumerate(zip(args.images, args.class_prompt)):
        concept = {"name": Path(folder).resolve().name, "class_prompt": class_prompt,
                   "images": _files(folder, "--images"), "num_class_images": args.num_class_images}
        for key, field in (("name", "name"), ("token", "modifier_token"), ("initializer", "initializer_token"),
                           ("instance_prompt", "instance_prompt")):
            if getattr(args, key) is not None:
                concept[field] = getattr(args, key)[i]
        if args.class_images is not None:
            concept["class_images"] = [{"path": f} for f in _files(args.class_images[i], "--class-images")]
        concepts.append(concept)
    return concepts


def _spec(args: argparse.Namespace):
    from trainer.spec import JobSpec

    hp = {"learning_rate": args.lr, "effective_batch_size": args.effective_batch_size,
          "mixed_precision": args.mixed_precision, "seed": args.seed,
          "gradient_checkpointing": args.gradient_checkpointing, "augment": not args.no_augment,
          "with_prior_preservation": not args.no_prior_preservation, "class_image_steps": args.class_image_steps,
          "checkpointing_steps": args.checkpointing_steps}
    for key, value in (("max_train_steps", args.steps), ("resolution", args.resolution),
                       ("train_batch_size", args.batch_size)):
        if value is not None:  # unset: the spec's default (steps per concept; the base's own size)
            hp[key] = value
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="customdiff-train-")
    return JobSpec.from_dict({
        "base_model": args.base, "store_url": args.out, "work_dir": work_dir, "concepts": _concepts(args),
        "hyperparameters": hp, "class_image_cache_dir": args.cache_dir, "device": args.device,
        "provenance": {"source": "customdiff train"},
    })


def _run(args: argparse.Namespace) -> int:
    import logging

    from concepts.progress import progress_bar
    from trainer.job import run_job

    spec = _spec(args)
    log = logging.getLogger("customdiff.train")
    bar = None  # the step bar starts with training: the phases before it have no steps to count

    def on_event(event: dict) -> None:
        nonlocal bar
        if event["event"] == "state":
            if bar is not None:  # training ended (saving, stopped): the bar gives way to the log
                bar.close()
                bar = None
            log.info("%s%s", event["state"], f": {event['message']}" if event.get("message") else "")
            if event["state"] == "training":
                bar = progress_bar(total=spec.hyperparameters.max_train_steps, desc="training", unit="step")
        elif event["event"] == "progress" and bar is not None:
            bar.update(event["step"] - bar.n)
            bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}")

    try:
        result = run_job(spec, listener=on_event, bars=True)
    finally:
        if bar is not None:
            bar.close()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"digest": result.digest, "store": spec.store_url, "work_dir": spec.work_dir,
                          "tokens": [c.modifier_token for c in spec.concepts],
                          "class_words": [c.class_prompt for c in spec.concepts]}))
    return 0
