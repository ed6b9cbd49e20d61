"""Triton Python-backend model "stable_diffusion": the multi-concept engine behind Triton.

Thin on purpose: typed parameters are parsed once in `initialize`; `execute` turns each request into
a `GenerationRequest` and hands the whole dynamic batch to `Engine.generate_batch`, which shares one
UNet batch across concepts. Every request gets exactly one response, its own TritonError if it
failed. Inputs, parameters and outputs: deploy/triton/README.md.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from concepts.errors import CustomDiffError
from services.inference.engine import Engine, to_png
from services.inference.request import GenerationRequest
from services.inference.triton_protocol import ModelSettings, error_text

log = logging.getLogger("customdiff.triton")



def _error_response(error: CustomDiffError) -> pb_utils.InferenceResponse:
    # pb_utils.TritonError exists only once the stub runs the model, not at import.
    codes = {"INVALID_ARGUMENT": pb_utils.TritonError.INVALID_ARG, "NOT_FOUND": pb_utils.TritonError.NOT_FOUND,
             "UNAVAILABLE": pb_utils.TritonError.UNAVAILABLE}
    code = codes.get(error.reason, pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(error_text(error), code))


def _text(request, name: str) -> str:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return ""
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


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
        responses: list = [None] * len(requests)
        parsed: list[tuple[int, GenerationRequest]] = []
        for i, request in enumerate(requests):
            try:
                params = json.loads(request.parameters() or "{}")
                parsed.append((i, GenerationRequest.from_parameters(
                    _text(request, "PROMPT"), _text(request, "NEGATIVE_PROMPT"), params)))
            except CustomDiffError as e:
                responses[i] = _error_response(e)
        try:
            results = self.engine.generate_batch([r for _, r in parsed])
        except Exception as e:  # a bug, not a bad request: every request of the batch gets it
            log.exception("stable_diffusion: batch of %d failed", len(parsed))
            results = [CustomDiffError(f"internal error: {type(e).__name__}: {e}")] * len(parsed)
        for (i, _), result in zip(parsed, results):
            if isinstance(result, CustomDiffError):
                responses[i] = _error_response(result)
            else:
                pngs = np.array([[to_png(image) for image in result]], dtype=np.object_)
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGES", pngs)])
        return responses
