"""`customdiff generate`: images from the local multi-concept engine (no server), written as PNG files."""

from __future__ import annotations

import argparse

from engine.schedulers import SCHEDULERS


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate images with concepts on the local engine (no server)")
    gen.add_argument("--base", required=True, help="diffusers Stable Diffusion directory")
    gen.add_argument("--store", required=True, help="artifact store (directory or fsspec URL) holding the concepts")
    gen.add_argument("--concept", action=_Concept, default=[], metavar="DIGEST",
                     help="concept artifact digest (repeatable); none uses the plain base")
    gen.add_argument("--weight", action=_Weight, type=float, dest="concept", metavar="W",
                     help="weight of the --concept just before it: scales its K/V deltas, 0..2 (default 1)")
    gen.add_argument("--prompt", required=True, help='e.g. "photo of a <new1> dog"')
    gen.add_argument("--negative-prompt", default="", help="classifier-free guidance's negative prompt")
    gen.add_argument("--num-images", type=int, default=1, help="images to generate (1-8; image i uses seed + i)")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    gen.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default 7.5; <= 1 disables)")
    gen.add_argument("--seed", type=int, default=0, help="seed of image 0 (default 0)")
    gen.add_argument("--height", type=int, default=0, help="pixels, multiple of 8 (default: the base's size)")
    gen.add_argument("--width", type=int, default=0, help="pixels, multiple of 8 (default: the base's size)")
    gen.add_argument("--scheduler", default="", choices=SCHEDULERS,
                     help="default: the base's own scheduler")
    gen.add_argument("--device", default="cpu", help="torch device (default cpu)")
    gen.add_argument("--out", required=True, help="directory for the PNG files")
    gen.set_defaults(run=_run)


class _Concept(argparse.Action):
    """--concept DIGEST appends ``[DIGEST, None]`` (weight not given: 1) to a list that --weight amends."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), [value, None]])


class _Weight(argparse.Action):
    """--weight W sets the weight of the --concept given just before it (once)."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        concepts = getattr(namespace, self.dest)
        if not concepts or concepts[-1][1] is not None:
            parser.error(f"--weight {value:g}: give it right after its --concept, once per concept")
        concepts[-1][1] = value


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from concepts.progress import progress_bar
    from engine.engine import Engine
    from engine.request import GenerationRequest
    from engine.telemetry import EngineObserver

    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt,
        concept_digests=tuple(d for d, _ in args.concept),
        concept_weights=tuple(1.0 if w is None else w for _, w in args.concept),
        num_images=args.num_images, num_inference_steps=args.steps, guidance_scale=args.guidance,
        seed=args.seed, height=args.height, width=args.width, scheduler=args.scheduler,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    class StepBar(EngineObserver):
        """Advances `bar` per UNet call: one per denoising step, since one request (<= 8 images) is one batch."""

        bar = None

        def batch(self, images: int, concepts: int) -> None:
            if self.bar is not None:
                self.bar.update(1)

    steps = StepBar()
    engine = Engine.from_paths(args.base, args.store, device=args.device, observer=steps)
    steps.bar = progress_bar(total=_denoising_steps(engine, request), desc="generate", unit="step")
    with steps.bar:
        pngs = engine.generate_png(request)
    for i, png in enumerate(pngs):
        path = out / f"image-{i}-seed{request.seed + i}.png"
        path.write_bytes(png)
        print(path)
    return 0


def _denoising_steps(engine, request) -> int:
    """UNet calls the request makes: its scheduler's timesteps (PNDM, SD 1.x's default, adds one)."""
    from engine.schedulers import make_scheduler

    scheduler = make_scheduler(engine.base.scheduler, request.scheduler)
    scheduler.set_timesteps(request.num_inference_steps)
    return len(scheduler.timesteps)
