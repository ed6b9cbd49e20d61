"""`customdiff remote`: a running deployment's jobs, concepts and generation, through the gRPC API.

The API key comes from an environment variable ($CUSTOMDIFF_API_KEY unless --api-key-env names
another), never from the command line. Results print as JSON (one object per line); a failed call
prints its status, message and bad fields on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

API_KEY_ENV = "CUSTOMDIFF_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    remote = sub.add_parser("remote", help="jobs, concepts and generation on a running deployment (gRPC)",
                            description=__doc__.split("\n\n")[0])
    where = remote.add_argument_group("where")
    where.add_argument("--server", help="host:port of all three services (an Ingress or Gateway route)")
    for service in ("trainer", "merger", "inference"):
        where.add_argument(f"--{service}", help=f"host:port of the {service} service (overrides --server)")
    where.add_argument("--api-key-env", default=API_KEY_ENV, help=f"environment variable with the API key "
                                                                   f"(default {API_KEY_ENV})")
    tls = remote.add_argument_group("TLS (default: plaintext)")
    tls.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    tls.add_argument("--ca", help="PEM CA the server's certificate chains to (implies --tls)")
    tls.add_argument("--cert", help="PEM client certificate, for mTLS (with --key)")
    tls.add_argument("--key", help="PEM client key, for mTLS")
    tls.add_argument("--server-name", default="", help="name on the server's certificate, if not the host")
    what = remote.add_subparsers(dest="remote_command", required=True, metavar="WHAT")

    jobs = what.add_parser("jobs", help="training and merger jobs").add_subparsers(dest="action", required=True)
    listing = jobs.add_parser("list", help="every job of the tenant")
    listing.add_argument("--kind", choices=("training", "merger"), help="default: both")
    for action, text in (("get", "one job"), ("watch", "a job's events until it ends"), ("cancel", "cancel a job")):
        parser = jobs.add_parser(action, help=text)
        parser.add_argument("name", help="trainingJobs/<id> or mergerJobs/<id>")

    concepts = what.add_parser("concepts", help="the tenant's concepts").add_subparsers(dest="action", required=True)
    concepts.add_parser("list", help="every version of every concept").add_argument("--name", default="")
    for action, text in (("get", "one version (default: the latest)"), ("delete", "one version, or all (0)"),
                         ("export", "write a version in diffusers' format")):
        parser = concepts.add_parser(action, help=text)
        parser.add_argument("name")
        parser.add_argument("--version", type=int, default=0)
        if action == "export":
            parser.add_argument("--out", required=True, help="directory for the files")
    imported = concepts.add_parser("import", help="register a diffusers or original-repository checkpoint")
    imported.add_argument("path", help="a file, or a directory whose files are sent (diffusers output)")
    imported.add_argument("--name", required=True, help="the concept's name in the tenant's registry")
    imported.add_argument("--format", choices=("diffusers", "original"), default="diffusers")

    train = what.add_parser("train", help="train a concept and follow the job to its end")
    train.add_argument("--name", required=True, help="the concept's name")
    train.add_argument("--class-prompt", required=True, help='e.g. "dog"')
    train.add_argument("--images", nargs="+", required=True, help="training images (PNG or JPEG)")
    train.add_argument("--steps", type=int, default=0, help="training steps (default: the server's)")
    train.add_argument("--resolution", type=int, default=0, help="pixels (default: the base's native size)")
    train.add_argument("--num-class-images", type=int, default=0, help="regularization images (default: the server's)")

    generate = what.add_parser("generate", help="generate with concepts named as in the registry")
    generate.add_argument("prompt", help='e.g. "photo of a <new1> dog"')
    generate.add_argument("--concept", action="append", default=[], metavar="NAME[:WEIGHT]",
                          help="a concept's latest version, weight 0..2 (default 1); repeatable")
    generate.add_argument("--num-images", type=int, default=1)
    generate.add_argument("--steps", type=int, default=0, help="denoising steps (default: the server's, 50)")
    generate.add_argument("--seed", type=int)
    generate.add_argument("--height", type=int, default=0)
    generate.add_argument("--width", type=int, default=0)
    generate.add_argument("--out", required=True, help="directory for the PNG files")
    remote.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from customdiff_client import CallError, JobFailed

    try:
        with _client(args) as client:
            return _COMMANDS[args.remote_command](client, args)
    except CallError as e:
        print(f"customdiff remote: {e.status.name}: {e.message}", file=sys.stderr)
        for violation in e.field_violations:
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        return 1
    except JobFailed as e:
        print(f"customdiff remote: {e}", file=sys.stderr)
        return 1


def _client(args: argparse.Namespace):
    from concepts.errors import InvalidArgument
    from customdiff_client import TLS, Client

    api_key = os.environ.get(args.api_key_env, "")
    if not api_key:
        raise InvalidArgument("api_key_env", f"set ${args.api_key_env} to your API key")
    addresses = [getattr(args, s) or args.server for s in ("trainer", "merger", "inference")]
    if not all(addresses):
        raise InvalidArgument("server", "give --server, or each of --trainer, --merger and --inference")
    if bool(args.cert) != bool(args.key):
        raise InvalidArgument("cert", "mTLS needs both --cert and --key")
    tls = TLS.from_files(args.ca or "", args.cert or "", args.key or "", args.server_name) \
        if args.tls or args.ca or args.cert else None
    return Client(*addresses, api_key=api_key, tls=tls)


def _print(message) -> None:
    from google.protobuf.json_format import MessageToDict

    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True)), flush=True)


def _jobs(client, args: argparse.Namespace) -> int:
    merger = args.action != "list" and args.name.startswith("mergerJobs/")
    if args.action == "list":
        jobs = (client.list_training_jobs() if args.kind != "merger" else []) + \
               (client.list_merger_jobs() if args.kind != "training" else [])
        for job in jobs:
            _print(job)
    elif args.action == "get":
        _print(client.get_merger_job(args.name) if merger else client.get_training_job(args.name))
    elif args.action == "cancel":
        _print(client.cancel_training_job(args.name))
    else:
        for event in (client.watch_merger_job if merger else client.watch_training_job)(args.name):
            _print(event)
    return 0


def _concepts(client, args: argparse.Namespace) -> int:
    if args.action == "list":
        for concept in client.concepts(args.name):
            _print(concept)
    elif args.action == "get":
        _print(client.get_concept(args.name, args.version))
    elif args.action == "delete":
        for concept in client.delete_concept(args.name, args.version):
            _print(concept)
    elif args.action == "export":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in client.export_concept(args.name, args.version).items():
            (out / name).write_bytes(data)
            print(json.dumps({"file": str(out / name), "bytes": len(data)}), flush=True)
    else:
        path = Path(args.path)
        files = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()} if path.is_dir() \
            else {path.name: path.read_bytes()}
        _print(client.import_concept(args.name, files, args.format))
    return 0


def _train(client, args: argparse.Namespace) -> int:
    from customdiffusion.v1 import trainer_service_pb2 as tpb

    concept = tpb.ConceptSpec(name=args.name, class_prompt=args.class_prompt, num_class_images=args.num_class_images,
                              images=[tpb.ImageInput(data=Path(p).read_bytes()) for p in args.images])
    hyperparameters = tpb.Hyperparameters(max_train_steps=args.steps, resolution=args.resolution)
    _print(client.train([concept], hyperparameters=hyperparameters, on_event=_print))
    return 0


def _generate(client, args: argparse.Namespace) -> int:
    concepts = []
    for spec in args.concept:
        name, _, weight = spec.partition(":")
        concepts.append((name, float(weight)) if weight else name)
    fields = {k: v for k, v in (("num_images", args.num_images), ("num_inference_steps", args.steps),
                                ("height", args.height), ("width", args.width)) if v}
    if args.seed is not None:
        fields["seed"] = args.seed
    response = client.generate(args.prompt, concepts, **fields)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for image in response.images:
        path = out / f"{image.seed}.png"
        path.write_bytes(image.png)
        print(json.dumps({"file": str(path), "seed": image.seed}), flush=True)
    return 0


_COMMANDS = {"jobs": _jobs, "concepts": _concepts, "train": _train, "generate": _generate}
