"""`customdiff merge A B [C ...]` and `customdiff compress A`: closed-form merge and SVD compression.

A, B, ... are artifact digests in ``--store`` or paths of ``.safetensors`` artifact files. Both commands
write the result into ``--out`` (default: ``--store``) and print the report as a table, or as one JSON
line with ``--json``. A merged concept compresses in the metric of its features when ``--base`` is
given (docs/merge.md, compression).
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    merge = sub.add_parser("merge", help="merge two or more concepts of one base into one (closed form)")
    merge.add_argument("concepts", nargs="+", metavar="CONCEPT", help="artifact digest or .safetensors path")
    merge.add_argument("--base", required=True, help="diffusers Stable Diffusion directory of the concepts' base")
    _store_arguments(merge)
    merge.add_argument("--ridge", type=float, default=None,
                       help="ridge term of the solve (default: see docs/merge.md)")
    merge.add_argument("--captions", default=None, help="regularization captions file, one per line "
                       "(default: the shipped set)")
    merge.add_argument("--context-captions", type=int, default=0, metavar="N",
                       help="per token, also constrain it in N regularization captions that name its class word "
                       "(default 0: the reference's two captions; see docs/merge.md)")
    merge.set_defaults(run=_merge)

    compress = sub.add_parser("compress", help="compress a concept's deltas by truncated SVD")
    compress.add_argument("concept", metavar="CONCEPT", help="artifact digest or .safetensors path")
    compress.add_argument("--base", default=None, help="base directory; when given, the concept must match "
                          "it, and a merged concept is compressed in the metric of its features "
                          "(docs/merge.md)")
    compress.add_argument("--captions", default=None, help="with --base, for a merged concept: "
                          "regularization captions file, one per line (default: the shipped set)")
    _store_arguments(compress)
    target = compress.add_mutually_exclusive_group(required=True)
    target.add_argument("--fraction", type=float, help="keep components until their singular values sum "
                        "to this fraction of the total (paper: 0.6)")
    target.add_argument("--rank", type=int, help="keep this many components")
    target.add_argument("--energy", type=float, help="keep this fraction of the squared singular values")
    compress.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16", help="factor dtype (default fp16)")
    compress.set_defaults(run=_compress)


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="artifact store (directory or fsspec URL) of the inputs")
    parser.add_argument("--out", default=None, help="store to write the result to (default: --store)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")


def _merge(args: argparse.Namespace) -> int:
    from pathlib import Path

    from concepts.base import load_base
    from concepts.progress import StageBar
    from concepts.store import ArtifactStore
    from merger.run import load_concept, merge_concepts

    store = ArtifactStore(args.store)
    captions = Path(args.captions).read_text(encoding="utf-8").splitlines() if args.captions else None
    with StageBar("merge", ("loading concepts", "loading base", "merging")) as stages:
        concepts = [load_concept(ref, store) for ref in args.concepts]
        stages.next()
        base = load_base(args.base)
        stages.next()
        concept, report = merge_concepts(base, concepts, captions=captions, ridge=args.ridge,
                                         context_captions=args.context_captions)
        stages.next()
    _print_result(args, concept, report, columns=("residual", "drift", "naive_residual", "naive_drift"))
    return 0


def _compress(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from concepts.apply import check_base
    from concepts.base import load_base
    from concepts.store import ArtifactStore
    from concepts.progress import StageBar
    from merger.compress import FACTOR_DTYPES
    from merger.run import compress_concept, compresses_by_features, load_concept

    captions = Path(args.captions).read_text(encoding="utf-8").splitlines() if args.captions else None
    names = ("loading concept",) + (("checking base",) if args.base is not None else ()) + ("compressing",)
    with StageBar("compress", names) as stages:
        concept = load_concept(args.concept, ArtifactStore(args.store))
        stages.next()
        base = None
        if args.base is not None:
            base = load_base(args.base)
            check_base(concept, base.fingerprint, what=f"concept {args.concept}")
            stages.next()
        merged = compresses_by_features(concept)
        if merged and base is None:
            print("note: compressing a merged concept without --base: plain SVD, which can keep only a "
                  "direction no prompt uses and lose its concepts (docs/merge.md)", file=sys.stderr)
        concept, report = compress_concept(concept, rank=args.rank, fraction=args.fraction, energy=args.energy,
                                           dtype=FACTOR_DTYPES[args.dtype], captions=captions,
                                           base=base if merged else None)
        stages.next()
    _print_result(args, concept, report, columns=("rank", "relative_error"))
    return 0


def _print_result(args: argparse.Namespace, concept, report, columns: tuple[str, ...]) -> None:
    """Store the concept in --out (or --store) and print its digest and the report."""
    from concepts.store import ArtifactStore

    out = args.out or args.store
    digest = ArtifactStore(out).put_concept(concept)
    data = report.to_dict()
    if args.json:
        print(json.dumps({"digest": digest, "store": out, "tokens": list(concept.tokens), "report": data}))
        return
    print(f"wrote {digest} to {out} (tokens {', '.join(concept.tokens)})")
    width = max((len(layer["layer"]) for layer in data["layers"]), default=len("layer"))
    print(f"{'layer':<{width}}  " + "  ".join(f"{c:>14}" for c in columns))
    for layer in data["layers"]:
        print(f"{layer['layer']:<{width}}  " + "  ".join(f"{layer[c]:>14.6g}" for c in columns))
    for key, value in data["summary"].items():
        print(f"{key:>20}: {value:.6g}")
    for rename in data["renamed_tokens"]:
        print(f"renamed {rename}")
