"""`customdiff eval toyworld`: the paper's claims measured with ground truth on a synthetic world."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    evals = sub.add_parser("eval", help="evaluations with ground truth").add_subparsers(dest="eval_command", required=True)
    toy = evals.add_parser(
        "toyworld", help="single, joint, merged, averaged and compressed concepts on the toy world's base",
        description="Trains two concepts of the toy world with `customdiff train` (singly and jointly), merges, "
                    "averages and compresses them, samples every variant on the same prompts and seeds, and "
                    "prints text alignment, image alignment and bytes (a table, then one JSON line). "
                    "See docs/toyworld.md.",
    )
    toy.add_argument("--out", default="toyworld-output", help="output directory (default: toyworld-output)")
    toy.add_argument("--base", default=None, help="base directory (default: the committed evals/toyworld/base)")
    toy.add_argument("--quick", action="store_true", help="2 seeds per prompt instead of 8 (same training)")
    toy.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    toy.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from evals.toyworld.eval import QUICK, EvalConfig, run
    from evals.toyworld.sampling import BASE_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    run(Path(args.out), Path(args.base) if args.base else BASE_DIR, QUICK if args.quick else EvalConfig(),
        progress=True)
    return 0
