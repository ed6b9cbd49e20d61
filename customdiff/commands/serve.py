"""`customdiff serve`: the registry, store, Triton and the three gRPC services from one config."""

from __future__ import annotations

import argparse
import json
import logging

from services.app import COMPONENTS

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the services (all of them, or --only some) until SIGTERM")
    serve.add_argument("--config", help="YAML config file (default $CUSTOMDIFF_CONFIG; see docs/configuration.md)")
    serve.add_argument("--only", action="append", choices=COMPONENTS + ("triton",),
                       help="run only this component (repeatable); default: all three services and Triton")
    serve.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from services.app import resolve_base_model, start_stack
    from services.common.logs import configure_logging
    from services.common.server import StopSignals
    from services.common.settings import Settings
    from concepts.tracing import OTLP_ENV, configure_tracing

    stop = StopSignals()  # from the start: a SIGTERM during start-up still drains and exits 0
    settings = Settings.load(args.config)
    components = tuple(args.only or COMPONENTS + ("triton",))
    service = "customdiff-" + components[0] if len(components) == 1 else "customdiff"
    configure_logging(settings.log_format, service, args.verbose)
    stop_tracing = configure_tracing(service, settings.otlp_endpoint)
    base = resolve_base_model(settings)
    triton = None
    if "triton" in components:
        from customdiff.local import free_port
        from services.inference.triton_server import TritonLaunch, overrides_of
        from services.inference.triton_supervisor import TritonSupervisor

        host, port = settings.triton_url.rsplit(":", 1)
        # Clients use Triton's gRPC port only; its HTTP and metrics endpoints get free ports.
        # Supervised: a tritonserver that dies is restarted (docs/operations.md, "Triton supervision").
        overrides = overrides_of(base, settings.store_url)
        if settings.otlp_endpoint:  # the model's spans go where the services' go
            overrides[OTLP_ENV] = settings.otlp_endpoint
        launch = TritonLaunch(overrides=overrides, host=host, grpc_port=int(port), http_port=free_port(host),
                              metrics_port=free_port(host))
        triton = TritonSupervisor(launch).start()
    stack = start_stack(settings, tuple(c for c in components if c != "triton"), base_model=base)
    ports = dict(stack.ports, **({"triton_metrics": launch.metrics_port} if triton else {}))
    print(json.dumps({"ports": ports, "triton": settings.triton_url if triton else None}), flush=True)
    stop.wait()
    log.info("shutting down")
    stack.stop(grace_s=settings.shutdown_grace_s)  # NOT_SERVING first, then in-flight RPCs get the grace period
    if triton is not None:
        triton.stop()
    if stop_tracing is not None:
        stop_tracing()  # flush the spans still batched
    return 0
