"""Triton Python-backend model "stable_diffusion": the multi-concept engine behind Triton.

Thin on purpose: typed parameters are parsed once in `initialize`; `execute` hands the whole dynamic
batch to `services.inference.triton_model.respond`, which turns each request into a
`GenerationRequest`, runs the valid ones together through `Engine.generate_batch` (one UNet batch
across concepts) and gives every request exactly one response, its own TritonError if it failed.
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
from services.inference.triton_model import respond
from services.inference.triton_protocol import ModelSettings

log = logging.getLogger("customdiff.triton")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        """Load the base model once per instance; concepts come from the store on first use."""
        config = json.loads(args["model_config"])
        try:
            settings = ModelSettings.from_config(config.get("parameters", {}), os.environ)
        except CustomDiffError as e:
            raise pb_utils.TritonModelException(f"stable_diffusion config.pbtxt: {e}") from e
        gpu = args["model_instance_kind"] == "GPU"
        device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        self.engine = Engine.from_paths(
            settings.base_model, settings.store_url, device=device, dtype=getattr(torch, settings.dtype),
            cache_bytes=settings.cache_bytes, host_cache_bytes=settings.host_cache_bytes,
            max_batch_images=settings.max_batch_images, unet_backend=settings.unet_backend,
            unet_onnx=settings.unet_onnx,
        )
        log.info("stable_diffusion instance %s loaded base %s (fingerprint %s) on %s",
                 args["model_instance_name"], settings.base_model, self.engine.base.fingerprint, device)

    def execute(self, requests: list) -> list:
        """One response per request, in order; the batch's valid requests run together."""
        return respond(self.engine, requests, "stable_diffusion")
