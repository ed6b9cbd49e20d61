"""Triton Python-backend model "stable_diffusion": the multi-concept engine behind Triton.

Thin on purpose: typed parameters are parsed once in `initialize`. How requests reach the engine
follows config.pbtxt (deploy/triton/README.md, "Batching"):

- not decoupled: `execute` hands its whole dynamic batch to `services.inference.triton_model.respond`,
  which runs the valid requests together through `Engine.generate_batch` and returns one response
  per request, its own TritonError if it failed;
- decoupled (``model_transaction_policy { decoupled: true }``, with ``batching`` "step"): `execute`
  queues each request on the engine's step-level loop (`engine/loop.py`, a thread of this process)
  and returns at once; each request is answered through its response sender when its images are done,
  so requests join the running denoising loop at the next step boundary.

Inputs, parameters and outputs: deploy/triton/README.md.
"""

from __future__ import annotations

import json
import logging
import os

import torch
import triton_python_backend_utils as pb_utils

from concepts.errors import CustomDiffError
from engine.engine import Engine
from services.inference.triton_model import model_parameters, observe, respond, submit_decoupled
from services.inference.triton_protocol import ModelSettings

log = logging.getLogger("customdiff.triton")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        """Load the base model once per instance; concepts come from the store on first use."""
        config = json.loads(args["model_config"])
        try:
            batching, parameters = model_parameters(config.get("parameters", {}))
            settings = ModelSettings.from_config(parameters, os.environ)
        except CustomDiffError as e:
            raise pb_utils.TritonModelException(f"stable_diffusion config.pbtxt: {e}") from e
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        if self.decoupled and batching != "step":
            raise pb_utils.TritonModelException("stable_diffusion config.pbtxt: a decoupled model needs "
                                                'batching "step" (requests are answered by the step loop)')
        gpu = args["model_instance_kind"] == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        observer, self.stop_tracing = observe(args)
        self.engine = Engine.from_paths(
            settings.base_model, settings.store_url, device=device, dtype=getattr(torch, settings.dtype),
            cache_bytes=settings.cache_bytes, host_cache_bytes=settings.host_cache_bytes,
            max_batch_images=settings.max_batch_images, unet_backend=settings.unet_backend,
            unet_onnx=settings.unet_onnx, batching=batching, observer=observer, compose=settings.compose,
            compose_captions_file=settings.compose_captions_file,
            compose_context_captions=settings.compose_context_captions,
            compose_cache_bytes=settings.compose_cache_bytes,
        )
        log.info("stable_diffusion instance %s loaded base %s (fingerprint %s) on %s, %s-level batching%s, "
                 "compose %s", args["model_instance_name"], settings.base_model, self.engine.base.fingerprint,
                 device, batching, ", decoupled" if self.decoupled else "", settings.compose)

    def execute(self, requests: list) -> list | None:
        """Not decoupled: one response per request, in order. Decoupled: None; the loop answers each."""
        if self.decoupled:
            submit_decoupled(self.engine, requests)
            return None
        return respond(self.engine, requests, "stable_diffusion")

    def finalize(self) -> None:
        """Stop the step loop; requests it still holds are answered UNAVAILABLE. Flush the spans."""
        self.engine.close()
        if self.stop_tracing is not None:
            self.stop_tracing()
