"""`customdiff eval toyworld`: the paper's claims measured with ground truth on a synthetic world."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    evals = sub.add_parser("eval", help="evaluations with ground truth").add_subparsers(dest="eval_command", required=True)
    toy = evals.add_parser(
        "toyworld", help="single, joint, merged, averaged, compressed and composed concepts on the toy world's base",
        description="Trains a split's held-out concepts of the toy world with the trainer library (singly and "
                    "in pairs), merges, averages and compresses them, samples every variant on one-concept and "
                    "two-concept prompts and the class word alone, and prints text alignment, image alignment, "
                    "both-concepts rate with 95%% intervals, prior drift and bytes (a table, then one JSON line). "
                    "See docs/toyworld.md.",
    )
    toy.add_argument("--out", default="toyworld-output", help="output directory (default: toyworld-output)")
    toy.add_argument("--base", default=None, help="base directory (default: the committed evals/toyworld/base)")
    toy.add_argument("--split", choices=("test", "validation"), default="test",
                     help="held-out concepts to evaluate: test (reported) or validation (for tuning)")
    toy.add_argument("--quick", action="store_true", help="one pair, 2 seeds per prompt, half the training steps")
    toy.add_argument("--json", action="store_true", help="print only the JSON line (no table, no progress bar)")
    toy.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    toy.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    import torch

    from evals.toyworld.eval import QUICK, EvalConfig, run
    from evals.toyworld.sampling import BASE_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    config = dataclasses.replace(QUICK if args.quick else EvalConfig(), split=args.split)
    run(Path(args.out), Path(args.base) if args.base else BASE_DIR, config, progress=not args.json, table=not args.json)
    return 0
