"""`customdiff triton`: tritonserver (from the nvidia-pytriton wheel) on the stable_diffusion model, until SIGTERM.

The server is supervised: restarted with backoff whenever it dies (services/inference/triton_supervisor.py).
"""

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
    triton.add_argument("--log-file", help="write the server's log here (default: its per-port state directory's)")
    triton.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.app import resolve_base_model
    from services.common.settings import Settings
    from services.inference.triton_server import DEFAULT_REPOSITORY, TritonLaunch, overrides_of
    from services.common.server import StopSignals
    from services.inference.triton_supervisor import TritonSupervisor, serve_until

    stop = StopSignals()
    settings = Settings.load(args.config)
    launch = TritonLaunch(
        Path(args.model_repository or DEFAULT_REPOSITORY),
        overrides_of(args.base or resolve_base_model(settings), args.store or settings.store_url, args.cache_bytes),
        host=args.host,
        grpc_port=args.grpc_port or int(settings.triton_url.rsplit(":", 1)[1]),
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_path=Path(args.log_file) if args.log_file else None,
    )
    # Supervised: a tritonserver that dies is restarted (docs/operations.md, "Triton supervision").
    supervisor = TritonSupervisor(launch).start()
    print(json.dumps({"grpc_port": launch.grpc_port, "http_port": launch.http_port,
                      "metrics_port": launch.metrics_port, "log": str(supervisor.log_path)}), flush=True)
    return 0 if serve_until(stop, supervisor) == 0 else 1
