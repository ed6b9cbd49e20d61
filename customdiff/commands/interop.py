"""`customdiff export` and `customdiff import`: concepts to and from other Custom Diffusion files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="write a concept in diffusers' Custom Diffusion format")
    export.add_argument(
        "source", metavar="DIGEST_OR_FILE", help="artifact digest in --store, or an artifact file"
    )
    export.add_argument("--store", help="artifact store directory or fsspec URL (needed for a digest)")
    export.add_argument("--base", required=True, help="the base model directory the concept was made for")
    export.add_argument("--format", default="diffusers", choices=["diffusers"], help="output format")
    export.add_argument("--out", required=True, help="output directory")
    export.set_defaults(run=_export)

    imp = sub.add_parser(
        "import", help="store a diffusers or original-repo Custom Diffusion checkpoint as a concept"
    )
    imp.add_argument(
        "path", metavar="PATH", help="diffusers output directory, delta.bin or delta_epoch=*.ckpt"
    )
    imp.add_argument("--base", required=True, help="the base model directory the checkpoint was trained from")
    imp.add_argument("--store", required=True, help="artifact store directory or fsspec URL")
    imp.add_argument(
        "--format",
        choices=["diffusers", "original"],
        help="default: diffusers for a directory or pytorch_custom_diffusion_weights.*, else original",
    )
    imp.add_argument(
        "--token",
        action="append",
        dest="tokens",
        help="a token to read, in order; repeat for several (default: all; a .ckpt's are <new1>, ...)",
    )
    imp.add_argument(
        "--class-word",
        action="append",
        dest="class_words",
        help="class word of each token, in the same order (e.g. dog)",
    )
    imp.set_defaults(run=_import)


def _export(args: argparse.Namespace) -> int:
    from concepts.artifact import concept_from_bytes
    from concepts.base import load_base
    from concepts.errors import InvalidArgument
    from concepts.interop import export_diffusers
    from concepts.store import ArtifactStore

    if Path(args.source).is_file():
        concept = concept_from_bytes(Path(args.source).read_bytes(), source=args.source)
    elif args.store is None:
        raise InvalidArgument(
            "store", f"{args.source!r} is not a file, so it is a digest and --store is required"
        )
    else:
        concept = ArtifactStore(args.store).get_concept(args.source)
    files = export_diffusers(concept, load_base(args.base), args.out)
    print(json.dumps({"files": [str(f) for f in files]}))
    return 0


def _import(args: argparse.Namespace) -> int:
    from concepts.base import load_base
    from concepts.interop import import_concept
    from concepts.progress import StageBar
    from concepts.store import ArtifactStore

    with StageBar("import", ("loading base", "converting", "storing")) as stages:
        base = load_base(args.base)
        stages.next()
        concept = import_concept(args.path, base, args.format, args.tokens, args.class_words)
        stages.next()
        digest = ArtifactStore(args.store).put_concept(concept)
        stages.next()
    print(json.dumps({"digest": digest, "tokens": list(concept.tokens), "layers": len(concept.deltas)}))
    return 0
