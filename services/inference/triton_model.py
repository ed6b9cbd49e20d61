"""A Triton Python model's `execute` around the engine: parse the batch's requests, run them, answer each.

Both repositories' `stable_diffusion/1/model.py` use it (torch in `model_repository`, the ONNX graphs
by BLS in `model_repository_onnx`). Importable anywhere; `triton_python_backend_utils` is imported when a
function runs, since only Triton's Python backend stub provides it.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from concepts.errors import CustomDiffError
from engine.engine import Engine, to_png
from engine.request import GenerationRequest
from services.inference.triton_protocol import error_text

log = logging.getLogger("customdiff.triton")


def respond(engine: Engine, requests: list, model: str) -> list:
    """Exactly one response per request, in order; the batch's valid requests run together.

    A request that does not parse gets its own error; an error of the whole batch (a domain error,
    e.g. a BLS call that failed, or a bug) goes to every request that ran.
    """
    import triton_python_backend_utils as pb_utils

    responses: list = [None] * len(requests)
    parsed: list[tuple[int, GenerationRequest]] = []
    for i, request in enumerate(requests):
        try:
            params = json.loads(request.parameters() or "{}")
            parsed.append((i, GenerationRequest.from_parameters(
                _text(request, "PROMPT"), _text(request, "NEGATIVE_PROMPT"), params)))
        except CustomDiffError as e:
            responses[i] = error_response(e)
    try:
        results = engine.generate_batch([r for _, r in parsed])
    except CustomDiffError as e:
        results = [e] * len(parsed)
    except Exception as e:  # a bug, not a bad request
        log.exception("%s: batch of %d failed", model, len(parsed))
        results = [CustomDiffError(f"internal error: {type(e).__name__}: {e}")] * len(parsed)
    for (i, _), result in zip(parsed, results):
        if isinstance(result, CustomDiffError):
            responses[i] = error_response(result)
        else:
            pngs = np.array([[to_png(image) for image in result]], dtype=np.object_)
            responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGES", pngs)])
    return responses


def error_response(error: CustomDiffError):
    """A response carrying `error` as ``[REASON] message`` with the matching Triton status code."""
    import triton_python_backend_utils as pb_utils

    codes = {"INVALID_ARGUMENT": pb_utils.TritonError.INVALID_ARG,
             "NOT_FOUND": pb_utils.TritonError.NOT_FOUND, "UNAVAILABLE": pb_utils.TritonError.UNAVAILABLE}
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(error_text(error), codes.get(error.reason, pb_utils.TritonError.INTERNAL)))


def _text(request, name: str) -> str:
    """A BYTES [1] input as text; "" when the optional input is absent."""
    import triton_python_backend_utils as pb_utils

    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return ""
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
