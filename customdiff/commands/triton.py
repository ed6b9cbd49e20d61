"""`customdiff triton`: tritonserver (from the nvidia-pytriton wheel) on the stable_diffusion model, until SIGTERM."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    triton = sub.add_parser("triton", help="run Triton with the multi-concept stable_diffusion model until SIGTERM")
    triton.add_argument("--config", help="YAML config file (default $CUSTOMDIFF_CONFIG); supplies the defaults below")
    triton.add_argument("--base", help="diffusers Stable Diffusion directory (default: the config's base_model, "
                        "else the tiny base)")
    triton.add_argument("--store", help="artifact store, directory or fsspec URL (default: the config's store_url)")
    triton.add_argument("--model-repository", help="Triton model repository (default: deploy/triton/model_repository)")
    triton.add_argument("--grpc-port", type=int, help="gRPC port (default: the port of the config's triton_url)")
    triton.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    triton.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    triton.add_argument("--host", default="0.0.0.0", help="address every endpoint binds to (default 0.0.0.0)")
    triton.add_argument("--cache-bytes", type=int, help="concept-cache budget (default: config.pbtxt's cache_bytes)")
    triton.add_argument("--log-file", help="write the server's log here (default: a temporary file)")
    triton.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from services.app import resolve_base_model
    from services.common.settings import Settings
    from services.inference.triton_server import DEFAULT_REPOSITORY, serve_until_signal, start_triton

    settings = Settings.load(args.config)
    server = start_triton(
        args.model_repository or DEFAULT_REPOSITORY,
        base_model=args.base or resolve_base_model(settings),
        store_url=args.store or settings.store_url,
        cache_bytes=args.cache_bytes,
        grpc_port=args.grpc_port or int(settings.triton_url.rsplit(":", 1)[1]),
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        host=args.host,
        log_path=args.log_file,
    )
    print(json.dumps({"grpc_port": server.grpc_port, "http_port": server.http_port,
                      "metrics_port": server.metrics_port, "log": str(server.log_path)}), flush=True)
    return 0 if serve_until_signal(server) == 0 else 1
