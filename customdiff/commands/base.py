"""`customdiff base create-tiny DIR [--family sd15|sd2|sdxl]`: write a tiny Stable-Diffusion-architecture base."""

from __future__ import annotations

import argparse

from concepts.tiny import FAMILIES


def register(sub: argparse._SubParsersAction) -> None:
    base = sub.add_parser("base", help="base-model utilities").add_subparsers(dest="base_command", required=True)
    tiny = base.add_parser("create-tiny", help="write a tiny SD-architecture base in diffusers format")
    tiny.add_argument("dir", help="output directory")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed; the same seed gives the same bytes")
    tiny.add_argument("--family", choices=FAMILIES, default="sd15",
                      help="sd15: SD-1.x shaped (epsilon, PNDM); sd2: SD-2.x shaped (v_prediction, DDIM, "
                           "linear projections, a head count per block, a wider text encoder); sdxl: SDXL "
                           "shaped (two text encoders, pooled text and size/crop time ids, Euler); default: sd15")
    tiny.set_defaults(run=_create_tiny)


def _create_tiny(args: argparse.Namespace) -> int:
    from concepts.base import load_base
    from concepts.tiny import create_tiny_base

    path = create_tiny_base(args.dir, seed=args.seed, family=args.family)
    print(f"wrote {path} (fingerprint {load_base(path).fingerprint})")
    return 0
